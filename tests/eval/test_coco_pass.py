"""The pipelined COCO pass with stand-in stages (no model): fixed batches, every image stored
once, unreadable images recorded and skipped, errors and interruptions from any thread
surface in the caller, and reading / writing overlap inference."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from harness.errors import UserError
from harness.eval.coco_pass import plan_batches, run_pass
from harness.eval.coco_split import open_split
from harness.eval.store import RunStore
from harness.models.pipeline import preprocess_spec_from_config
from harness.models.zoo import FIXTURE_CONFIG
from tests.eval.split_data import copy_split

CATEGORY_IDS = [1, 2, 3, 4, 5]


@dataclass
class FakeDetections:
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    box_index: np.ndarray = field(default_factory=lambda: np.array([0]))


@pytest.fixture(scope="module")
def spec():
    from harness.models.mmyolo import read_config

    return preprocess_spec_from_config(read_config(FIXTURE_CONFIG))


class Stages:
    """infer: the per-image mean of the input; post: one box per image from it (image by
    image, as run_pass requires: it may hand post several batches at once)."""

    def __init__(self, infer_sleep: float = 0.0, post_sleep: float = 0.0, fail_at: int = 0):
        self.shapes: list[tuple] = []
        self.infer_sleep, self.post_sleep, self.fail_at = infer_sleep, post_sleep, fail_at

    def infer(self, x: np.ndarray, metas=None) -> dict:
        self.shapes.append(x.shape)
        if self.fail_at and len(self.shapes) == self.fail_at:
            raise UserError("backend refused the batch")
        time.sleep(self.infer_sleep)
        return {"mean": x.mean(axis=(1, 2, 3))}

    def post(self, outputs: dict, metas) -> list:
        time.sleep(self.post_sleep)
        return [FakeDetections(np.array([[1, 2, 30 + 10 * m, 40]], np.float32),
                               np.array([0.5], np.float32), np.array([int(m * 1e3) % 5]))
                for m in outputs["mean"]]


def store_for(tmp_path, name="run"):
    return RunStore(tmp_path / f"{name}.jsonl", {"configuration": name}).open()


def test_batches_are_fixed_by_position():
    assert plan_batches(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(UserError):
        plan_batches([1], 0)


def test_every_image_once_with_timings(synth_val, spec, tmp_path):
    split = open_split(synth_val)
    stages, store = Stages(), store_for(tmp_path)
    times = run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS, store,
                     progress=False)
    assert [s[0] for s in stages.shapes] == [4, 4, 4]
    assert (times.batches, times.images, times.skipped, times.unreadable) == (3, 12, 0, 0)
    assert times.infer_s > 0 and times.wall_s >= times.infer_s
    # fill and drain, the drain in its order: the last post-processing, then the last write
    assert 0 < times.first_infer_s and 0 < times.after_infer_s < times.wall_s
    d = times.drain_parts_s
    assert 0 <= d["post_end"] <= d["write_start"] <= d["write_end"] <= times.after_infer_s
    records = [json.loads(x) for x in store.path.read_text().splitlines()[1:]]
    assert sorted(r["image_id"] for r in records) == split.image_ids
    first = records[0]
    assert set(first["ms"]) == {"preprocess", "infer", "post"}
    det = first["detections"][0]
    assert det["image_id"] == first["image_id"] and det["category_id"] in CATEGORY_IDS
    assert det["bbox"][:2] == [1.0, 2.0] and det["score"] == 0.5


def test_interrupted_pass_resumes_without_redoing_or_duplicating(synth_val, spec, tmp_path):
    split = open_split(synth_val)
    clean_store = store_for(tmp_path, "clean")
    run_pass(split.images, 4, spec, Stages().infer, Stages().post, CATEGORY_IDS, clean_store,
             progress=False)

    def crash(stored: int) -> None:
        if stored == 1:
            raise KeyboardInterrupt  # Ctrl-C after the first batch reached the disk

    stages = Stages()
    with pytest.raises(KeyboardInterrupt):
        run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS,
                 store_for(tmp_path), progress=False, on_batch=crash)
    resumed_stages = Stages()
    store = store_for(tmp_path)
    # batches that were ready together are written together: the first, maybe the second
    kept = len(store.images)
    assert store.resumed and kept in (4, 8)
    times = run_pass(split.images, 4, spec, resumed_stages.infer, resumed_stages.post,
                     CATEGORY_IDS, store, progress=False)
    assert len(resumed_stages.shapes) == (12 - kept) // 4
    assert times.skipped == kept and times.images == 12 - kept
    ids = [json.loads(x).get("image_id") for x in store.path.read_text().splitlines()[1:]]
    assert sorted(ids) == split.image_ids  # nothing twice
    assert store.detections() == clean_store.detections()


def test_unreadable_image_is_recorded_and_skipped(synth_val, spec, tmp_path):
    val = copy_split(synth_val, tmp_path / "copy")
    split = open_split(val)
    broken = split.images[5]
    broken.path.write_bytes(b"not a jpeg at all")
    warnings: list[str] = []
    stages, store = Stages(), store_for(tmp_path)
    times = run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS, store,
                     progress=False, warn=warnings.append)
    assert [s[0] for s in stages.shapes] == [4, 3, 4]
    assert times.unreadable == 1 and times.images == 11
    assert store.unreadable().keys() == {broken.image_id}
    assert len(warnings) == 1 and broken.file_name in warnings[0]
    # resuming does not try it again
    again = Stages()
    run_pass(split.images, 4, spec, again.infer, again.post, CATEGORY_IDS,
             store_for(tmp_path), progress=False, warn=warnings.append)
    assert again.shapes == [] and len(warnings) == 1


def test_a_failing_backend_stops_the_pass(synth_val, spec, tmp_path):
    split = open_split(synth_val)
    stages, store = Stages(fail_at=2), store_for(tmp_path)
    with pytest.raises(UserError, match="refused"):
        run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS, store,
                 progress=False)
    assert len(store.images) == 4  # the batch before the failure was kept


def test_a_failing_post_step_stops_the_pass(synth_val, spec, tmp_path):
    split = open_split(synth_val)
    stages = Stages()

    def bad_post(outputs, metas):
        raise ValueError("bug in decoding")

    with pytest.raises(ValueError, match="bug in decoding"):
        run_pass(split.images, 2, spec, stages.infer, bad_post, CATEGORY_IDS,
                 store_for(tmp_path), progress=False, post_group=1)
    assert len(stages.shapes) <= 4  # stopped soon, not after all 6 batches


def test_grouped_post_processing_stores_what_batch_by_batch_does(synth_val, spec, tmp_path):
    split = open_split(synth_val)
    calls: dict[int, list[int]] = {1: [], 4: []}
    stores = {}
    for group in (1, 4):
        stages = Stages()

        def post(outputs, metas, group=group, stages=stages):
            calls[group].append(len(metas))
            return stages.post(outputs, metas)

        post.can_join = lambda outputs: True  # its outputs are batch-major

        stores[group] = store_for(tmp_path, f"group{group}")
        run_pass(split.images, 2, spec, stages.infer, post, CATEGORY_IDS, stores[group],
                 progress=False, post_group=group, workers=2)
    assert calls[1] == [2] * 6 and calls[4][:2] == [4, 4] and sum(calls[4]) == 12
    assert stores[4].detections() == stores[1].detections()
    assert stores[4].detections() and len(stores[4].images) == 12


@pytest.mark.parametrize("slow", ["inference", "post", "post beyond inference"])
def test_the_last_stretch_does_not_wait_for_a_group_to_fill(synth_val, spec, tmp_path, slow):
    """With fewer images to come than a group, what has gathered is post-processed as soon
    as no group is running (slow inference: batch by batch), and not call by call behind a
    running one (slow post-processing: the rest joined); nor when a call would outlast the
    inference still to come (it would slow the last call, which the pass waits for)."""
    split = open_split(synth_val)
    stages = Stages(infer_sleep=0.0 if slow == "post" else 0.1)
    sizes: list[int] = []

    def post(outputs, metas):
        sizes.append(len(metas))
        if slow == "post":  # the second group still runs when the first is written
            time.sleep(0.2 if len(sizes) == 1 else 0.6)
        elif slow == "post beyond inference":  # 0.16 s a call; 0.1 s of inference left
            time.sleep(0.16)
        return stages.post(outputs, metas)

    post.can_join = lambda outputs: True
    run_pass(split.images, 2, spec, stages.infer, post, CATEGORY_IDS, store_for(tmp_path),
             progress=False, post_group=4, workers=2)
    assert sizes == ([4, 4, 2, 2] if slow == "inference" else [4, 4, 4])


def test_the_last_full_group_joins_the_last_call_where_it_would_not_end_first(synth_val, spec,
                                                                             tmp_path):
    """12 images one by one, groups of 5: the second group fills with 2 images to come
    (0.08 s of inference) while a call takes 0.1 s (x2 beside inference) — made then, it
    would still run beside the last call; it waits and goes with the last two instead."""
    split = open_split(synth_val)
    stages = Stages(infer_sleep=0.04)  # the first call ends before the second group fills
    sizes: list[int] = []

    def post(outputs, metas):
        sizes.append(len(metas))
        time.sleep(0.1)
        return stages.post(outputs, metas)

    post.can_join = lambda outputs: True
    store = store_for(tmp_path)
    run_pass(split.images, 1, spec, stages.infer, post, CATEGORY_IDS, store, progress=False,
             post_group=5, workers=2)
    assert sizes == [5, 7] and len(store.images) == 12

    # a post that cannot join batches costs per batch, not per call: nothing is held back
    stages, inferred_before = Stages(infer_sleep=0.04), []

    def per_batch(outputs, metas):
        inferred_before.append(len(stages.shapes))
        time.sleep(0.1 / 5)
        return stages.post(outputs, metas)

    run_pass(split.images, 1, spec, stages.infer, per_batch, CATEGORY_IDS,
             store_for(tmp_path, "per_batch"), progress=False, post_group=5, workers=2)
    assert len(inferred_before) == 12 and inferred_before[5] < 12, inferred_before


def test_post_processing_overlaps_the_next_inference(synth_val, spec, tmp_path):
    """What the pipelining guarantees, without timing anything: the post-processing of batch
    k can still be running when inference of batch k + 1 starts. Each post step waits for the
    next inference to begin (a serial pass would never get there and time out)."""
    import threading

    split = open_split(synth_val)
    started = [threading.Event() for _ in range(6)]
    waited: list[bool] = []
    stages = Stages()
    infer, post = stages.infer, stages.post

    def infer_marking(x, metas=None):
        started[len(stages.shapes)].set()
        return infer(x)

    def post_waiting(outputs, metas):
        k = len(waited)
        waited.append(started[k + 1].wait(timeout=10) if k + 1 < len(started) else True)
        return post(outputs, metas)

    times = run_pass(split.images, 2, spec, infer_marking, post_waiting, CATEGORY_IDS,
                     store_for(tmp_path), progress=False, post_group=1)
    assert times.batches == 6 and times.images == len(split.images)
    assert waited == [True] * 6, "post-processing never overlapped the next inference"


@pytest.mark.parametrize("read_threads,fill_rounds,read_pool", [
    (1, 2, "executor"), (4, 2, "executor"), (3, 0, "executor"), (4, 2, "pipes")])
def test_reading_in_processes_stores_what_threads_do(synth_val, spec, tmp_path, monkeypatch,
                                                     read_threads, fill_rounds, read_pool):
    """Whole batches read by a process's threads side by side (READ_THREADS), after the
    first images read one job each (FILL_ROUNDS) or from the first batch on; the readers a
    ProcessPoolExecutor or a pipe_pool.PipePool."""
    from harness.eval import coco_pass, pass_processes

    monkeypatch.setattr(coco_pass, "READ_THREADS", read_threads)
    monkeypatch.setattr(coco_pass, "FILL_ROUNDS", fill_rounds)
    monkeypatch.setattr(pass_processes, "READ_POOL", read_pool)
    split = open_split(synth_val)
    stores = {}
    for processes in (False, True):
        stages = Stages()
        stores[processes] = store_for(tmp_path, f"processes{processes}")
        run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS,
                 stores[processes], progress=False, workers=2, processes=processes)
        assert len(stages.shapes) == 3
    assert stores[True].detections() == stores[False].detections()
    assert len(stores[True].images) == 12


def test_the_timeline_has_each_image_of_the_batches_read_image_by_image(synth_val, spec,
                                                                         tmp_path, monkeypatch):
    """PassTimes.read_parts: per batch read one job per image (FILL_ROUNDS x workers images),
    each image's read, spanning the batch's read in the timeline; none for the others."""
    from harness.eval import coco_pass

    monkeypatch.setattr(coco_pass, "FILL_ROUNDS", 3)  # 3 x 2 workers: batches 0 and 1
    split = open_split(synth_val)
    times = run_pass(split.images, 4, spec, Stages().infer, Stages().post, CATEGORY_IDS,
                     store_for(tmp_path), progress=False, workers=2, processes=True,
                     timeline=True)
    assert sorted(times.read_parts) == [0, 1] and sorted(times.timeline) == [0, 1, 2]
    for k, parts in times.read_parts.items():
        assert len(parts) == 4 and all(0 <= a <= b for a, b in parts)
        assert (min(a for a, _ in parts), max(b for _, b in parts)) == \
            pytest.approx(times.timeline[k]["read"], abs=1e-9)


def test_a_batch_read_by_threads_is_the_batch_read_in_turn(synth_val, spec, tmp_path):
    """prepare_batch with a pool: the same inputs, metas and unreadable images, in batch
    order, as one thread reading the images one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from harness.eval.coco_pass import prepare_batch

    val = copy_split(synth_val, tmp_path / "copy")
    split = open_split(val)
    split.images[2].path.write_bytes(b"not a jpeg")
    chunk = split.images[:6]
    alone = prepare_batch(chunk, spec)
    with ThreadPoolExecutor(3) as pool:
        side_by_side = prepare_batch(chunk, spec, pool)
    assert [im.image_id for im in side_by_side.images] == [im.image_id for im in alone.images]
    assert len(alone.images) == 5 and [im.image_id for im, _ in alone.unreadable] == \
        [split.images[2].image_id] == [im.image_id for im, _ in side_by_side.unreadable]
    assert side_by_side.metas == alone.metas
    assert np.array_equal(side_by_side.inputs, alone.inputs)


@pytest.mark.parametrize("read_pool", ["executor", "pipes"])
def test_processes_fall_back_where_shared_memory_cannot_take_a_batch(synth_val, spec,
                                                                     tmp_path, monkeypatch,
                                                                     read_pool):
    """The first batch is read image by image into its slot; an unreadable image in it
    makes it read whole; a batch larger than a slot comes through the pipe; the slots'
    file is kept for the next pass and gone once dropped; a ΔAP split's reference still sees
    each batch's inputs."""
    import glob

    from harness.eval import pass_processes

    monkeypatch.setattr(pass_processes, "READ_POOL", read_pool)

    val = copy_split(synth_val, tmp_path / "copy")
    split = open_split(val)
    split.images[1].path.write_bytes(b"not a jpeg")
    before = set(glob.glob("/dev/shm/harness-inputs-*"))
    stores, seen = {}, {}
    for name, capacity in (("threads", None), ("slots", None), ("pipe", 1024)):
        if capacity:
            monkeypatch.setattr(pass_processes, "slot_capacity", lambda b, s: capacity)
        stages = Stages()
        means = seen[name] = {}  # post threads run in parallel: by image, not in order

        def reference(outputs, metas, inputs, dets, stages=stages):
            from harness.eval.delta_ap import ReferenceNms

            means.update(zip((m.path for m in metas), inputs.mean(axis=(1, 2, 3)).tolist()))
            return [ReferenceNms(d) for d in stages.post(outputs, metas)]

        stores[name] = store_for(tmp_path, name)
        run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS,
                 stores[name], progress=False, workers=2, processes=name != "threads",
                 warn=lambda m: None, post_reference=reference,
                 post_group=1)
    kept = set(glob.glob("/dev/shm/harness-inputs-*")) - before
    assert [Path(k).name.split("-")[2] for k in kept] in ([], [str(os.getpid())])
    pass_processes.drop_slots()
    assert set(glob.glob("/dev/shm/harness-inputs-*")) <= before  # none left (orphans go)
    for name in ("slots", "pipe"):
        assert stores[name].detections() == stores["threads"].detections()
        assert stores[name].unreadable() == stores["threads"].unreadable() != {}
        assert seen[name] == seen["threads"] and len(seen[name]) == 11


def test_slots_are_kept_between_clean_passes_and_dropped_after_a_failed_one(synth_val, spec,
                                                                           tmp_path):
    """A second pass reuses the first's slots (allocated and mapped before the pass); a
    pass that fails drops them (a reader may still be writing); the timeline has every
    batch's stages in their order."""
    from harness.eval import pass_processes

    split = open_split(synth_val)
    paths = []
    for k in range(2):
        times = run_pass(split.images, 4, spec, Stages().infer, Stages().post, CATEGORY_IDS,
                         store_for(tmp_path, f"kept{k}"), progress=False, workers=2,
                         processes=True, timeline=True)
        paths.append(pass_processes._SLOTS["current"].path)
        assert Path(paths[-1]).exists()
        assert sorted(times.timeline) == [0, 1, 2]
        for spans in times.timeline.values():
            assert set(spans) == {"read", "handed", "infer", "post", "write"}
            assert spans["read"][1] <= spans["handed"][1] <= spans["infer"][0] \
                <= spans["infer"][1] <= spans["post"][0] <= spans["post"][1] \
                <= spans["write"][0] <= spans["write"][1] <= times.wall_s
    assert paths[0] == paths[1]
    with pytest.raises(UserError):
        run_pass(split.images, 4, spec, Stages(fail_at=2).infer, Stages().post, CATEGORY_IDS,
                 store_for(tmp_path, "failed"), progress=False, workers=2, processes=True)
    assert "current" not in pass_processes._SLOTS and not Path(paths[0]).exists()


def test_processes_read_a_keep_ratio_models_batches_of_varied_shapes(synth_val, tmp_path):
    """The two-stage fixture keeps each image's aspect (inputs of varied shapes, padded per
    batch): its first batch cannot be stacked in place image by image, and every batch must
    come back as threads stack it."""
    from harness.models.config import read_config_file
    from harness.models.zoo import TWO_STAGE_FIXTURE_CONFIG

    spec = preprocess_spec_from_config(read_config_file(TWO_STAGE_FIXTURE_CONFIG))
    split = open_split(synth_val)
    shapes, stores = {}, {}
    for processes in (False, True):
        stages = Stages()
        stores[processes] = store_for(tmp_path, f"keep_ratio_{processes}")
        run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS,
                 stores[processes], progress=False, workers=2, processes=processes)
        shapes[processes] = stages.shapes
    assert shapes[True] == shapes[False] and len(set(shapes[True])) > 1
    assert stores[True].detections() == stores[False].detections()


def test_slots_left_by_a_killed_run_are_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    from harness.eval.pass_processes import SLOTS_PREFIX, InputSlots, remove_orphans

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = tmp_path / f"{SLOTS_PREFIX}{dead}-abc"
    mine = tmp_path / f"{SLOTS_PREFIX}{os.getpid()}-abc"
    other = tmp_path / "harness-inputs-notes.txt"
    for p in (orphan, mine, other):
        p.write_bytes(b"x")
    assert remove_orphans(tmp_path) == [orphan]
    assert mine.exists() and other.exists() and not orphan.exists()
    slots = InputSlots(2, 64)
    assert Path(slots.path).name.startswith(f"{SLOTS_PREFIX}{os.getpid()}-")
    slots.close()
    assert not Path(slots.path).exists()


def test_slots_without_room_say_so_and_leave_no_file(tmp_path, monkeypatch):
    import errno
    import glob

    from harness.eval import pass_processes

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = set(glob.glob("/dev/shm/harness-inputs-*") + glob.glob("/tmp/harness-inputs-*"))
    monkeypatch.setattr(pass_processes.os, "posix_fallocate", full)
    with pytest.raises(UserError, match="no room for .* MiB of input slots .*TMPDIR"):
        pass_processes.InputSlots(2, 1 << 20)
    after = set(glob.glob("/dev/shm/harness-inputs-*") + glob.glob("/tmp/harness-inputs-*"))
    assert after <= before


def test_join_parts_takes_only_images_that_stack_in_place():
    from harness.eval.coco_pass import _Prepared
    from harness.eval.pass_processes import join_parts

    def part(shape, unreadable=()):
        p = _Prepared(images=["im"], metas=["meta"], seconds=0.5,
                      unreadable=list(unreadable))
        p.slot_shape = shape
        return p

    joined = join_parts([part((1, 3, 32, 64)), part((1, 3, 32, 64))])
    assert joined.slot_shape == (2, 3, 32, 64) and joined.images == ["im", "im"]
    assert joined.seconds == 1.0
    assert join_parts([part((1, 3, 32, 64)), part((1, 3, 64, 32))]) is None
    assert join_parts([part((1, 3, 32, 64)), part(None, [("im", "unreadable")])]) is None


def test_a_reader_pool_whose_worker_died_is_started_anew():
    import os
    import signal

    from harness.eval.pass_processes import process_pool

    pool = process_pool(1)
    pid = pool.submit(os.getpid).result()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(Exception):
        pool.submit(os.getpid).result(timeout=30)
    again = process_pool(1)
    assert again is not pool and again.submit(os.getpid).result(timeout=30) != pid


@pytest.mark.parametrize("read_pool", ["executor", "pipes"])
def test_readers_run_nicer_than_the_pass_and_encoders_do_not(monkeypatch, read_pool):
    """READ_NICE: the readers give way to the pass's own threads where the cores are all
    taken; the encoders, which the pass's last batches wait for, do not; a new setting gets
    pools of its own."""
    from harness.eval import pass_processes

    monkeypatch.setattr(pass_processes, "READ_POOL", read_pool)
    here = os.nice(0)
    for nice in (3, 0):
        monkeypatch.setattr(pass_processes, "READ_NICE", nice)
        readers = pass_processes.process_pool(1, "read")
        assert readers.submit(os.nice, 0).result(timeout=60) == min(19, here + nice)
    encoders = pass_processes.process_pool(1, "encode")
    assert encoders.submit(os.nice, 0).result(timeout=60) == here


def test_outputs_not_said_batch_major_are_never_joined(synth_val, spec, tmp_path):
    """An ONNX NonMaxSuppression's selected_indices (K, 3) number the images of its batch:
    joined with the next batch's they would give detections to the wrong images."""
    split = open_split(synth_val)
    stages, sizes = Stages(), []

    def post(outputs, metas):  # no can_join: the pass may not join its batches
        sizes.append(len(metas))
        return stages.post(outputs, metas)

    run_pass(split.images, 2, spec, stages.infer, post, CATEGORY_IDS, store_for(tmp_path),
             progress=False, post_group=16, workers=2)
    assert sizes == [2] * 6


def _old_line(image_id, file_name, det, ms, category_ids):
    """The stored line as the record's dict, json.dumps'd (what image_lines made before its
    detections were formatted at once)."""
    from harness.eval.coco_pass import coco_entries
    from harness.eval.store import image_line

    return image_line({"image_id": image_id, "file": file_name,
                       "detections": coco_entries(image_id, det, category_ids), "ms": ms})


def test_stored_lines_parse_to_the_entries_json_dumps_gives():
    """image_lines formats the detections all at once (coco_entries_json): every line parses
    to the record the per-entry dicts gave — boxes at their 3 decimals, scores at 7, in
    float64 as coco_entries computes widths, categories mapped and -1 dropped — on tiny,
    negative, huge and half-way values, an empty image and non-finite ones."""
    import json

    from harness.eval.coco_pass import image_lines
    from harness.nms.trace import NmsResult

    rng = np.random.default_rng(12)

    def det(n, scale=500.0):
        boxes = (rng.normal(0, 1, (n, 4)) * scale).astype(np.float32)
        return NmsResult(boxes=boxes, scores=rng.random(n).astype(np.float32),
                         labels=rng.integers(0, 6, n), box_index=np.arange(n))

    cats = [1, 2, -1, 7, 90, -1]
    dets = [det(300), det(50, 1e-3), det(40, 1e7), det(0), det(20)]
    halves = np.array([[0.0005, -0.0015, 2.5e-4, 1.0625]], np.float32)
    dets.append(NmsResult(boxes=halves, scores=np.array([0.12345675], np.float32),
                          labels=np.array([0]), box_index=np.array([0])))
    dets[4].boxes[3, 1] = np.nan
    dets[4].scores[5] = np.inf
    images = [(100 + i, f"im\u00e9{i}.jpg") for i in range(len(dets))]
    ms = {"preprocess": 1.25, "infer": 0.5, "post": 0.125}
    lines = image_lines(images, dets, ms, cats)
    for (image_id, name), d, line in zip(images, dets, lines):
        old = _old_line(image_id, name, d, ms, cats)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line) == json.loads(old) or \
            json.dumps(json.loads(line)) == json.dumps(json.loads(old)), name  # NaN != NaN
    assert json.loads(lines[0])["detections"], "a test image with no entries tests nothing"
    assert lines[3] == _old_line(103, images[3][1], dets[3], ms, cats)


def _faults_of_reused_blocks() -> int:
    """Page faults taken by the second and third 8 MB block allocated, written and freed in a
    fresh process."""
    import resource

    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.ones(8 << 20, np.uint8)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(faults[1:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_readers_keep_the_memory_they_free(monkeypatch):
    """READ_KEEP_MEMORY: a reader's large blocks come from a heap it keeps, so using one again
    faults in no fresh pages; a reader that gives memory back (glibc's default) took ~450
    faults for the same two blocks (this machine)."""
    from harness.eval import pass_processes

    faults = {}
    for keep in (True, False):
        monkeypatch.setattr(pass_processes, "READ_KEEP_MEMORY", keep)
        readers = pass_processes.process_pool(1, "read")
        faults[keep] = readers.submit(_faults_of_reused_blocks).result(timeout=60)
        readers.shutdown()
        for key in [k for k, pool in pass_processes._POOLS.items() if pool is readers]:
            del pass_processes._POOLS[key]
    assert faults[True] < 50 < 200 < faults[False]
