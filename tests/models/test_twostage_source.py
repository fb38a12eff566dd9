"""The mmdet two-stage source (harness/models/mmdet_twostage.py) on mmdet's own shipped
Faster R-CNN and Mask R-CNN configs (the latter's Resize at 640 x 384) at random init, on real
photographs: the harness's preprocessing + torch stages + numpy box-head NMS equal mmdet's
`model.test_step` (boxes 1e-3 px, scores 1e-5, labels equal), one image and a padded batch of
two; mmdet's own post-processing on the source's outputs equals it too; padding rows never
count."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.data.preprocess import preprocess_files
from harness.models.config import load_model_source
from tests.models.test_detections_match_mmyolo import assert_same_detections as assert_same

pytestmark = pytest.mark.slow

CONFIGS = {"faster_rcnn": "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
           "mask_rcnn": "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"}


def mmdet_config(relative: str) -> Path:
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "configs" / relative


SCALED = """_base_ = {base!r}
test_pipeline = [dict(type='LoadImageFromFile'),
                 dict(type='Resize', scale={scale!r}, keep_ratio=True),
                 dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                                       'img_shape', 'scale_factor'))]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


def scaled_config(relative: str, scale: tuple[int, int], folder: Path) -> Path:
    """A config of mmdet's shipped `relative` whose test pipeline's keep-ratio Resize is at
    `scale` instead of 1333 x 800 (whose fixed-input file is 1344 x 1344: a ResNet-50 there
    is slow on 2 cores)."""
    path = folder / f"{Path(relative).stem}_{scale[0]}x{scale[1]}.py"
    path.write_text(SCALED.format(base=str(mmdet_config(relative)), scale=tuple(scale)))
    return path


def spread_box_head(model, seed: int = 0) -> None:
    """At random init every objectness is near 0.5, every class score near 1/81 (below
    score_thr 0.05) and every class box is its proposal: draw the RPN's convs and the box
    head's classifier and regressor so scores spread and boxes move, so both NMS have work
    and ties are rare."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    head = model.module.roi_head.bbox_head
    rpn = model.module.rpn_head
    with torch.no_grad():
        # objectness near 0.5 everywhere ties thousands of anchors: spread the RPN too
        for conv, gain in ((rpn.rpn_conv, 1.0), (rpn.rpn_cls, 1.0), (rpn.rpn_reg, 0.1)):
            torch.nn.init.kaiming_normal_(conv.weight, generator=gen)
            conv.weight.mul_(gain)
        head.fc_cls.weight.copy_(torch.randn(head.fc_cls.weight.shape, generator=gen) * 0.3)
        head.fc_cls.bias.copy_(torch.randn(head.fc_cls.bias.shape, generator=gen))
        head.fc_reg.weight.copy_(torch.randn(head.fc_reg.weight.shape, generator=gen) * 0.02)


# Faster R-CNN at its shipped 1333 x 800; Mask R-CNN (the same RPN and box head, and a mask
# head the harness does not run) at 640 x 384: ~50 s less of this module on 2 cores
SCALES = {"faster_rcnn": None, "mask_rcnn": (640, 384)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, tmp_path_factory):
    scale = SCALES[request.param]
    source = load_model_source(
        mmdet_config(CONFIGS[request.param]) if scale is None else
        scaled_config(CONFIGS[request.param], scale, tmp_path_factory.mktemp("configs")))
    spread_box_head(source)
    return source


def mmdet_test_step(model, paths):
    """pred_instances of mmdet's own test path (its pipeline, data preprocessor, test_step)
    on a batch of image files."""
    import torch
    from mmcv.transforms import Compose
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    pipeline = Compose([dict(t) for t in model.cfg.test_dataloader.dataset.pipeline
                        if "LoadAnnotations" not in t["type"]])
    items = [pipeline(dict(img_path=str(p), img_id=i)) for i, p in enumerate(paths)]
    with torch.no_grad():
        out = model.module.test_step(dict(inputs=[d["inputs"] for d in items],
                                          data_samples=[d["data_samples"] for d in items]))
    return [o.pred_instances for o in out]


@pytest.mark.parametrize("which", [[0], [1], [0, 1]], ids=["landscape", "portrait", "batch2"])
def test_predict_equals_mmdet_test_step(model, real_photos, which):
    paths = [real_photos[i] for i in which]
    theirs = mmdet_test_step(model, paths)
    batch = preprocess_files(paths, model.preprocess)
    outputs = model.head_outputs(batch.inputs, batch.metas)
    ours = model.detections(model.decode(outputs, batch.metas), batch.metas, trace=True)
    framework = model.framework_detections(outputs, batch.metas)
    for i, (o, f, t) in enumerate(zip(ours, framework, theirs)):
        assert len(t.scores) >= 20, f"test premise: {len(t.scores)} detections"
        assert_same(o, t, f"{paths[i].name} (numpy reference)")
        assert_same(f, t, f"{paths[i].name} (mmdet on the source's outputs)")
        o.trace.check_complete()


def test_padding_rows_never_count(model, real_photos):
    """Proposals are padded to the RPN's max_per_img; rows past num_proposals hold zeros and
    are neither proposals nor candidates."""
    batch = preprocess_files(real_photos[:1], model.preprocess)
    outputs = model.head_outputs(batch.inputs, batch.metas)
    k = outputs["proposals"].shape[1]
    n = int(outputs["num_proposals"][0])
    assert k == model.rpn.max_per_img and 0 < n <= k
    assert len(model.proposals(outputs, batch.metas)[0]) == n
    decoded = model.decode(outputs, batch.metas)
    (det,) = model.detections(decoded, batch.metas, trace=True)
    assert det.trace.code.shape[0] == n and (det.box_index < n).all()
    # pretend fewer proposals are real: detections come only from those rows
    outputs = dict(outputs, num_proposals=outputs["num_proposals"].clone() * 0 + n // 2)
    (fewer,) = model.detections(model.decode(outputs, batch.metas), batch.metas)
    assert (fewer.box_index < n // 2).all()


def test_with_nms_changes_the_rpn_and_the_box_head(model):
    changed = model.with_nms(nms_pre=300, score_thr=0.3, max_per_img=20)
    assert changed.rpn.nms_pre == 300 and changed.rpn_test_cfg["nms_pre"] == 300
    assert changed.rcnn_test_cfg["score_thr"] == 0.3 and changed.nms.max_per_img == 20
    assert model.rpn.nms_pre == 1000 and model.rcnn_test_cfg["score_thr"] == 0.05
    assert model.describe()["family"] in ("faster_rcnn", "mask_rcnn")


def test_reference_proposals_equal_mmdet_rpn(model, real_photos):
    """The numpy RPN (harness/nms/rpn.py) on the source's RPN maps gives mmdet's proposals.
    Random init ties objectness scores and torch's sort orders ties its own way, so: every
    proposal of mmdet's is one the replay gives under one of the two tie orders, the rows
    both tie orders agree on are mmdet's row for row, and each trace is complete."""
    import dataclasses

    batch = preprocess_files(real_photos[:1], model.preprocess)
    outputs = model.head_outputs(batch.inputs, batch.metas)
    (theirs,) = model.proposals(outputs, batch.metas)
    found = {}
    for order in ("stable", "reverse"):
        other = dataclasses.replace(model.rpn, tie_order=order)
        (found[order],) = _with_rpn(model, other).reference_proposals(
            outputs, batch.metas, trace=True)
        found[order].trace.check_complete()
        assert len(found[order].scores) == len(theirs)

    def rows(boxes):
        return {tuple(np.round(b, 2)) for b in boxes}

    either = rows(found["stable"].boxes) | rows(found["reverse"].boxes)
    assert rows(theirs[:, :4]) <= either
    same = np.all(np.abs(found["stable"].boxes - found["reverse"].boxes) < 1e-3, axis=1)
    assert same.mean() > 0.9, f"test premise: tie order decides {1 - same.mean():.1%} rows"
    np.testing.assert_allclose(found["stable"].boxes[same], theirs[same, :4], atol=1e-3, rtol=0)
    np.testing.assert_allclose(found["stable"].scores, theirs[:, 4], atol=1e-5, rtol=0)


def _with_rpn(model, rpn):
    import copy

    other = copy.copy(model)
    other.rpn = rpn
    return other
