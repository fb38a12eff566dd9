"""Harness preprocessing + decoding + numpy mmyolo-style NMS == mmyolo's own test_step,
for the 7 families (random init, head outputs spread so NMS has work) and the fixture."""
from __future__ import annotations

import numpy as np
import pytest

from harness.data.preprocess import preprocess_files
from harness.models.mmyolo import load_mmyolo_model
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG, SHIPPED_CONFIGS, shipped_config
from tests.models.mmyolo_reference import mmyolo_test_step


def spread_head_outputs(model, seed: int = 0) -> None:
    """Random init leaves every class score near the prior (about 0.01), so nearly all
    candidates tie; re-draw the prediction layers' biases so scores spread over (0, 1)
    and thresholds, nms_pre and NMS all bite."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.module.bbox_head.named_modules():
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None \
                    and module.out_channels in _prediction_widths(model):
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 2.0 - 3.0)
                module.weight.mul_(4.0)


def _prediction_widths(model) -> set[int]:
    head = model.module.bbox_head
    c, a = head.num_classes, head.num_base_priors
    return {c, c * a, a, 4 * a, 4, (c + 5) * a}


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
    spread_head_outputs(model)
    total = 0
    for path in varied_images:
        batch = preprocess_files([path], model.preprocess)
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
