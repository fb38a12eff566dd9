"""`harness compare` end to end on every mmyolo family, as a new user would run it: mmyolo's
shipped config at mmyolo's own random init (saved as a checkpoint), its raw fp32 ONNX, real
photographs of real size and varied aspect. At random init scores tie massively, boxes collapse
and some families keep every candidate: the verdicts must still be backed by checks — no fp32
layer past 1e-4, every mismatch explained, tie groups counted, and the PyTorch column equal to
what mmyolo's own `model.test_step` outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness.cli import main
from harness.models.zoo import SHIPPED_CONFIGS, shipped_config
from tests.models.mmyolo_reference import mmyolo_test_step

pytestmark = pytest.mark.slow

# about this many candidates pass the score threshold the test sets (mmyolo's random init
# scores everything near the class prior, often below the configs' 0.001)
CANDIDATES = 1000


def _threshold(model, photo) -> float:
    """The config's score_thr, or lower, so that about CANDIDATES candidates pass on `photo`:
    the largest distinct score with at least that many strictly above it."""
    from harness.data.preprocess import preprocess_files

    batch = preprocess_files([photo], model.preprocess)
    d = model.decode(model.raw_outputs(batch.inputs))
    s = d.scores if d.objectness is None else d.scores * d.objectness[..., None]
    values, counts = np.unique(s.ravel(), return_counts=True)
    values, at_least = values[::-1], np.cumsum(counts[::-1])
    k = int(np.searchsorted(at_least, CANDIDATES))
    # strictly above values[k + 1] are at_least[k] >= CANDIDATES; when the last run of
    # equal scores is needed too (everything ties at the prior), go just below it
    thr = values[k + 1] if k + 1 < len(values) else np.nextafter(values[-1], np.float32(0))
    return float(min(model.nms.score_thr, thr))


def _user_files(family, photo, folder):
    """What a user would hand the harness: a config (the shipped one with a score threshold
    of their own) and a checkpoint of the random-init weights."""
    import torch

    from harness.models.mmyolo import load_mmyolo_model

    model = load_mmyolo_model(shipped_config(family), seed=0)
    thr = _threshold(model, photo)
    cfg = folder / f"{family}.py"
    cfg.write_text(f"_base_ = {str(shipped_config(family))!r}\n"
                   f"model = dict(test_cfg=dict(score_thr={thr!r}))\n")
    ckpt = folder / f"{family}.pth"
    torch.save({"state_dict": model.module.state_dict(), "meta": {}}, ckpt)
    return cfg, ckpt


@pytest.mark.parametrize("family", list(SHIPPED_CONFIGS))
def test_compare_family_at_random_init_on_real_photos(family, real_photos, tmp_path, capsys):
    from harness.backends.torch_backend import TorchBackend
    from harness.data.preprocess import preprocess_files
    from harness.export.outputs import head_maps_from_outputs
    from harness.models.mmyolo import load_mmyolo_model

    cfg, ckpt = _user_files(family, real_photos[0], tmp_path)
    out = tmp_path / "report"
    code = main(["compare", str(cfg), str(ckpt), "--images", str(real_photos[0].parent),
                 "--batch", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    doc = json.loads((out / "results.json").read_text())["compare"]
    (t,) = doc["targets"]
    assert doc["inputs"]["count"] == len(real_photos)

    # layers: every mapped layer within fp32's 1e-4, nothing non-finite, nothing skipped
    layers = t["layers"]
    assert len(layers["rows"]) > 20 and not layers["skipped"]
    worst = max(layers["rows"], key=lambda r: r["rel_l2"])
    assert worst["rel_l2"] < 1e-4, worst
    assert layers["first_past_tolerance"] is None and layers["first_nonfinite"] is None

    # detections: something was compared, every mismatch has a cause, ties are counted
    det = t["detections"]
    assert det["reference"] > 0 and det["unexplained"] == 0, det["examples"]
    assert sum(det["causes"].values()) == det["mismatches"]
    assert set(det["ties"]) == {"reference", "target"}
    if det["ties"]["reference"] or det["ties"]["target"]:
        assert "tie groups" in doc["verdict"]
    check = doc["reference"]["replay_check"]
    assert check["not_found_in_candidates"] == 0 and check["differ_outside_ties"] == 0
    md = (out / "compare.md").read_text()
    assert doc["verdict"] in md and "tie groups" in md

    # the PyTorch column is mmyolo's own output: model.test_step on each photo, same order
    model = load_mmyolo_model(cfg, ckpt)
    reference = TorchBackend(model, outputs="raw")
    for photo in real_photos:
        batch = preprocess_files([photo], model.preprocess)
        ours = model.mmyolo_detections(head_maps_from_outputs(reference.infer(batch.inputs)),
                                       batch.metas)[0]
        theirs = mmyolo_test_step(model.cfg, model.module, photo)
        np.testing.assert_array_equal(ours.labels, theirs.labels.numpy(), err_msg=photo.name)
        np.testing.assert_array_equal(ours.scores, theirs.scores.numpy(), err_msg=photo.name)
        np.testing.assert_allclose(ours.boxes, theirs.bboxes.numpy(), atol=1e-3, rtol=0,
                                   err_msg=photo.name)
