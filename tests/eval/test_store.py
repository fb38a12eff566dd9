"""The per-configuration JSONL store: appends survive, a torn last line is dropped, nothing is
written twice, and a file made by something else is set aside rather than mixed in."""
from __future__ import annotations

import json

import pytest

from harness.errors import UserError
from harness.eval.store import RunStore

HEADER = {"configuration": "torch_cpu_fp32_b1", "model": {"checkpoint_sha256": "abc"}}


def image(i: int) -> dict:
    return {"image_id": i, "file": f"{i:012d}.jpg",
            "detections": [{"image_id": i, "category_id": 1, "bbox": [1, 2, 3, 4],
                            "score": 0.5}], "ms": {"infer": 1.0}}


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_append_and_resume(tmp_path):
    path = tmp_path / "runs" / "a.jsonl"
    store = RunStore(path, HEADER).open()
    assert not store.resumed
    store.append_images([image(1), image(2)])
    store.append_images([image(2), image(3)])  # 2 again: not written twice
    store.append_latency({"runs": 3})
    again = RunStore(path, HEADER).open()
    assert again.resumed
    assert sorted(again.images) == [1, 2, 3]
    assert again.latency == {"runs": 3}
    assert [d["image_id"] for d in again.detections()] == [1, 2, 3]
    assert [d["image_id"] for d in again.detections([3, 1, 9])] == [1, 3]
    kinds = [x["kind"] for x in lines(path)]
    assert kinds == ["header", "image", "image", "image", "latency"]


def test_torn_last_line_is_dropped_and_cut(tmp_path):
    path = tmp_path / "a.jsonl"
    store = RunStore(path, HEADER).open()
    store.append_images([image(1)])
    with open(path, "ab") as f:  # a kill in the middle of a write
        f.write(json.dumps({"kind": "image", **image(2)}).encode()[:25])
    again = RunStore(path, HEADER).open()
    assert again.dropped_partial_line
    assert sorted(again.images) == [1]
    again.append_images([image(2)])
    assert [x.get("image_id") for x in lines(path)] == [None, 1, 2]  # all lines parse


def test_other_header_sets_the_file_aside(tmp_path):
    path = tmp_path / "a.jsonl"
    RunStore(path, HEADER).open().append_images([image(1)])
    other = {**HEADER, "model": {"checkpoint_sha256": "def"}}
    with pytest.warns(UserWarning, match="started over"):
        store = RunStore(path, other).open()
    assert store.images == {} and not store.resumed
    assert (tmp_path / "a.jsonl.stale").is_file()
    assert lines(path) == [{"kind": "header", "format": 1, **other}]


def test_damaged_middle_line_is_a_user_error(tmp_path):
    path = tmp_path / "a.jsonl"
    RunStore(path, HEADER).open().append_images([image(1), image(2)])
    text = path.read_text().splitlines()
    text[1] = text[1][:10]
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(UserError, match="damaged at line 2"):
        RunStore(path, HEADER).open()


def test_unreadable_records(tmp_path):
    store = RunStore(tmp_path / "a.jsonl", HEADER).open()
    store.append_images([{"image_id": 5, "file": "x.jpg", "unreadable": "cannot decode"}])
    assert store.unreadable() == {5: "cannot decode"}
    assert store.detections() == []


def test_read_any_run_file(tmp_path):
    path = tmp_path / "a.jsonl"
    RunStore(path, HEADER).open().append_images([image(1), image(2)])
    store = RunStore.read(path)
    assert sorted(store.images) == [1, 2] and len(store.detections()) == 2
    (tmp_path / "b.jsonl").write_text("hello\n")
    with pytest.raises(UserError, match="not a harness run file"):
        RunStore.read(tmp_path / "b.jsonl")


def test_lines_encoded_elsewhere_are_stored_as_records_are(tmp_path):
    """append_encoded (lines made in an encoder process) writes what append_images would,
    keeps no image twice, and its records read back (parsed when first read) equal."""
    from harness.eval.store import image_line

    records = [{"image_id": 7, "file": "a.jpg", "detections": [
                   {"image_id": 7, "category_id": 1, "bbox": [1.5, 2.0, 3.0, 4.0],
                    "score": 0.5}], "ms": {"infer": 1.25}},
               {"image_id": 8, "file": "b.jpg", "unreadable": "not an image"}]
    plain = RunStore(tmp_path / "plain.jsonl", {"configuration": "x"}).open()
    plain.append_images(records)
    encoded = RunStore(tmp_path / "encoded.jsonl", {"configuration": "x"}).open()
    encoded.append_encoded([(r["image_id"], image_line(r)) for r in records])
    encoded.append_encoded([(7, image_line({**records[0], "file": "again.jpg"}))])
    assert encoded.path.read_bytes() == plain.path.read_bytes()
    assert encoded.detections() == plain.detections() == records[0]["detections"]
    assert encoded.unreadable() == {8: "not an image"} and encoded.done(8)
    again = RunStore(tmp_path / "encoded.jsonl", {"configuration": "x"}).open()
    assert dict(again.images) == dict(plain.images)
