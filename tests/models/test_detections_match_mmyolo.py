"""Harness preprocessing + decoding + numpy mmyolo-style NMS == mmyolo's own test_step,
for the 7 families (random init, head outputs spread so NMS has work) and the fixture."""
from __future__ import annotations

import numpy as np
import pytest

from harness.data.preprocess import preprocess_files
from harness.models.mmyolo import load_mmyolo_model
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG, SHIPPED_CONFIGS, shipped_config
from tests.models.mmyolo_reference import mmyolo_test_step


def spread_head_outputs(model, inputs, seed: int = 0) -> None:
    """Random init gives near-constant feature maps and every score near the class prior,
    so almost all candidates tie, and torch's unstable sort orders ties arbitrarily. Re-draw
    every conv He-normal and scale the prediction layers to unit spatial spread, so scores
    spread over (0, 1) and the comparison is about the pipeline, not about tie order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    head = model.module.bbox_head
    c, a = head.num_classes, head.num_base_priors
    widths = {c, c * a, a, 4 * a, 4, (c + 5) * a}
    with torch.no_grad():
        for module in model.module.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, generator=gen)
    preds = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)
             and m.bias is not None and m.out_channels in widths]
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.__setitem__(id(mod), o))
             for m in preds]
    model.raw_outputs(inputs)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m in preds:
            o = outputs[id(m)]
            spread = float((o - o.mean(dim=(0, 2, 3), keepdim=True)).std())
            if spread > 1e-6:
                m.weight.mul_(0.25 / spread)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3 - 2.0)


def tie_free_settings(model, inputs, candidates: int = 1500) -> None:
    """Set score_thr for this one-image batch so no two candidates share a float32 score
    (letterbox padding gives runs of identical scores; torch's sort orders such ties
    arbitrarily), and nms_pre below the candidate count so the pre-NMS cut bites."""
    import dataclasses

    d = model.decode(model.raw_outputs(inputs))
    s = d.scores if d.objectness is None else d.scores * d.objectness[..., None]
    flat = np.sort(s[0].ravel())[::-1]
    values, counts = np.unique(flat, return_counts=True)
    tied = values[counts > 1]
    thr = float(max(flat[candidates], tied.max() if len(tied) else -1.0))
    above = flat[flat > thr]
    assert len(above) >= 50, f"test premise: only {len(above)} tie-free candidates"
    nms_pre = len(above) * 2 // 3
    head = model.module.bbox_head
    head.test_cfg.score_thr = thr
    head.test_cfg.nms_pre = nms_pre
    model.nms = dataclasses.replace(model.nms, score_thr=thr, nms_pre=nms_pre)


def sort_detections(boxes, scores, labels):
    order = np.lexsort((boxes[:, 1], boxes[:, 0], labels, -np.round(scores, 5)))
    return boxes[order], scores[order], labels[order]


def assert_same_detections(ours, theirs, where: str) -> None:
    tb = theirs.bboxes.numpy()
    ts = theirs.scores.numpy()
    tl = theirs.labels.numpy()
    assert len(ours.scores) == len(ts), f"{where}: {len(ours.scores)} vs {len(ts)} detections"
    ob, os_, ol = sort_detections(ours.boxes, ours.scores, ours.labels)
    tb, ts, tl = sort_detections(tb, ts, tl)
    np.testing.assert_array_equal(ol, tl, err_msg=where)
    np.testing.assert_allclose(os_, ts, atol=1e-5, rtol=0, err_msg=where)
    np.testing.assert_allclose(ob, tb, atol=1e-3, rtol=0, err_msg=where)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SHIPPED_CONFIGS))
def test_random_init_family_matches_test_step(family, varied_images):
    model = load_mmyolo_model(shipped_config(family), seed=0)
    batches = [preprocess_files([p], model.preprocess) for p in varied_images]
    spread_head_outputs(model, np.concatenate([b.inputs for b in batches]))
    total = 0
    for path, batch in zip(varied_images, batches):
        tie_free_settings(model, batch.inputs)
        ours = model.predict(batch)[0]
        theirs = mmyolo_test_step(model.cfg, model.module, path)
        assert_same_detections(ours, theirs, f"{family} {path.name}")
        total += len(ours.scores)
    assert total > 0, "no detections at all: the comparison would be empty"


@pytest.mark.slow
def test_fixture_matches_test_step(varied_images, tmp_path):
    model = load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    for path in varied_images:
        batch = preprocess_files([path], model.preprocess)
        assert_same_detections(model.predict(batch)[0],
                               mmyolo_test_step(model.cfg, model.module, path),
                               f"fixture {path.name}")
