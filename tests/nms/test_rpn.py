"""The RPN reference kernel == mmdet 3.0.0's own RPNHead.predict_by_feat (mmcv 2.0.1 CPU ops) on
random FPN maps, for Faster R-CNN's test_cfg.rpn and smaller cuts; the deployment variants
(lower nms_pre / max_per_img, one NMS over all levels, one TopK over all levels) give the fates
they should; tied objectness behaves as mmdet's does."""
from __future__ import annotations

import numpy as np
import pytest

from harness.nms.rpn import (
    RpnResult, RpnSettings, delta_xywh_decode, flatten_rpn_level, rpn_proposals,
)
from harness.nms.trace import FateKind
from tests.nms.conftest import assert_trace_consistent, need

MM_INSTALL = "the mm extra (pip install -e .[mm]) and mmcv 2.0.1 built by tools/build_mmcv.py"
STRIDES = (4, 8, 16, 32, 64)
RATIOS = (0.5, 1.0, 2.0)
A = len(RATIOS)
# configs/_base_/models/faster-rcnn_r50_fpn.py, model.test_cfg.rpn
FASTER_RCNN_RPN = dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                       min_bbox_size=0)


# ---------------------------------------------------------------- inputs

def _featmap_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """FPN map sizes of an image padded to a multiple of 32 (pad_size_divisor=32)."""
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    return [(-(-ph // s), -(-pw // s)) for s in STRIDES]


def _anchors(sizes) -> list[np.ndarray]:
    """mmdet AnchorGenerator(scales=[8], ratios=[0.5, 1, 2], strides=[4..64]).grid_priors in
    numpy: base anchors centred on 0 (center_offset 0), cells (y, x) with x fastest, A per cell."""
    h_ratios = np.sqrt(np.asarray(RATIOS, np.float32))
    out = []
    for (fh, fw), s in zip(sizes, STRIDES):
        ws = np.float32(s) / h_ratios * np.float32(8)
        hs = np.float32(s) * h_ratios * np.float32(8)
        base = np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=1).astype(np.float32)
        yy, xx = np.meshgrid(np.arange(fh, dtype=np.float32) * s,
                             np.arange(fw, dtype=np.float32) * s, indexing="ij")
        shifts = np.stack([xx.ravel(), yy.ravel(), xx.ravel(), yy.ravel()], axis=1)
        out.append((shifts[:, None, :] + base[None]).reshape(-1, 4))
    return out


def _distinct_logits(rng, n: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """n logits whose sigmoids are distinct by far more than a float32 ulp (so torch's unstable
    sort has no ties to order), probabilities in (lo, hi), skewed low like an RPN's."""
    p = lo + (hi - lo) * ((rng.permutation(n) + 1) / (n + 1)) ** 3
    return np.log(p / (1 - p)).astype(np.float32)


class Case:
    """One image's RPN outputs: flat per-level logits (N_l,) and deltas (N_l, 4) in mmdet's
    (H, W, A) order, the maps they come from, and the anchors."""

    def __init__(self, img_hw, logits: np.ndarray, deltas: np.ndarray):
        self.img_hw = img_hw
        self.sizes = _featmap_sizes(*img_hw)
        self.anchors = _anchors(self.sizes)
        counts = [len(a) for a in self.anchors]
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        assert logits.shape == (self.starts[-1],) and deltas.shape == (self.starts[-1], 4)
        self.cls_maps, self.reg_maps = [], []
        for (fh, fw), lo, hi in zip(self.sizes, self.starts[:-1], self.starts[1:]):
            self.cls_maps.append(logits[lo:hi].reshape(fh, fw, A).transpose(2, 0, 1).copy())
            self.reg_maps.append(deltas[lo:hi].reshape(fh, fw, 4 * A).transpose(2, 0, 1).copy())

    @property
    def num_anchors(self) -> int:
        return int(self.starts[-1])

    def index(self, level: int, y: int, x: int, a: int) -> int:
        """Concatenated anchor index of anchor a of cell (y, x) of a level."""
        fw = self.sizes[level][1]
        return int(self.starts[level] + (y * fw + x) * A + a)

    def run(self, settings: RpnSettings = RpnSettings(), **kw) -> RpnResult:
        flat = [flatten_rpn_level(c, r) for c, r in zip(self.cls_maps, self.reg_maps)]
        return rpn_proposals([f[0] for f in flat], [f[1] for f in flat], self.anchors,
                             self.img_hw, settings, **kw)


def _random_case(seed: int, img_hw=(333, 500)) -> Case:
    """Distinct logits, deltas N(0, 0.5) with 3% of the log-size deltas at +-6 (beyond the
    wh_ratio_clip bound 4.135) so every step has work to do."""
    rng = np.random.default_rng(seed)
    n = sum(fh * fw * A for fh, fw in _featmap_sizes(*img_hw))
    deltas = rng.normal(0, 0.5, (n, 4)).astype(np.float32)
    big = rng.random((n, 2)) < 0.03
    deltas[:, 2:][big] = rng.choice(np.float32([-6, 6]), int(big.sum()))
    return Case(img_hw, _distinct_logits(rng, n), deltas)


# ---------------------------------------------------------------- mmdet's own head

@pytest.fixture(scope="module")
def rpn_head():
    """mmdet's RPNHead built from the registry as Faster R-CNN's config builds it (small
    channel counts: predict_by_feat never runs the convolutions)."""
    need("mmcv.ops", MM_INSTALL)
    need("mmdet", MM_INSTALL)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    return MODELS.build(dict(
        type="RPNHead", in_channels=8, feat_channels=8,
        anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=list(RATIOS),
                              strides=list(STRIDES)),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                        target_stds=[1.0] * 4)))


def _mmdet(head, case: Case, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """RPNHead.predict_by_feat's boxes and scores for the case, as numpy."""
    import torch
    from mmengine.config import ConfigDict

    with torch.no_grad():
        out = head.predict_by_feat([torch.from_numpy(c)[None] for c in case.cls_maps],
                                   [torch.from_numpy(r)[None] for r in case.reg_maps],
                                   batch_img_metas=[dict(img_shape=case.img_hw,
                                                         scale_factor=(1.0, 1.0))],
                                   cfg=ConfigDict(cfg), rescale=False)[0]
    assert out.labels.eq(0).all()
    return out.bboxes.numpy(), out.scores.numpy()


MMDET_CFGS = {
    "faster_rcnn": FASTER_RCNN_RPN,
    "small_cuts": dict(FASTER_RCNN_RPN, nms_pre=50, max_per_img=30),
    # nms.class_agnostic: one NMS over all levels, our scope "all"
    "class_agnostic": dict(FASTER_RCNN_RPN, nms=dict(type="nms", iou_threshold=0.7,
                                                     class_agnostic=True)),
    # 5 x 1000 candidates >= split_thr: mmcv's one-NMS-per-level branch and its re-sort
    "split_branch": dict(FASTER_RCNN_RPN, nms=dict(type="nms", iou_threshold=0.7,
                                                   split_thr=2000)),
}


@pytest.mark.parametrize("img_hw", [(320, 480), (333, 500)])
@pytest.mark.parametrize("name", list(MMDET_CFGS))
def test_matches_mmdet_rpn_head(rpn_head, img_hw, name):
    import torch

    cfg = MMDET_CFGS[name]
    case = _random_case(7 + img_hw[0], img_hw)
    priors = rpn_head.prior_generator.grid_priors(case.sizes, dtype=torch.float32,
                                                  device="cpu")
    for ours, theirs in zip(case.anchors, priors):
        np.testing.assert_array_equal(ours, theirs.numpy())

    tb, ts = _mmdet(rpn_head, case, cfg)
    res = case.run(RpnSettings.from_test_cfg(cfg))
    assert len(res) == len(ts) == min(cfg["max_per_img"], len(res.trace.kept()[0]))
    assert np.abs(res.boxes - tb).max() <= 1e-3
    assert np.abs(res.scores - ts).max() <= 1e-5
    assert np.all(np.diff(res.scores) <= 0)
    assert_trace_consistent(res)

    # every step did something, so the equality covers it
    counts = res.trace.counts()
    assert counts["cut_pre_nms_topk"] > 0 and counts["suppressed"] > 0
    assert counts["below_min_bbox_size"] > 0 and counts["cut_max_detections"] > 0
    cand = np.flatnonzero(res.trace.code[:, 0] != FateKind.CUT_PRE_NMS_TOPK)
    flat_deltas = np.concatenate([flatten_rpn_level(c, r)[1]
                                  for c, r in zip(case.cls_maps, case.reg_maps)])
    assert np.any(np.abs(flat_deltas[cand, 2:]) > 4.2), "wh_ratio_clip not exercised"
    assert np.all(np.bincount(res.levels, minlength=5)[:3] > 0)


# ---------------------------------------------------------------- decode

def test_decode_matches_mmdet_delta2bbox_box_head_layout():
    need("mmdet", MM_INSTALL)
    import torch
    from mmdet.models.task_modules.coders.delta_xywh_bbox_coder import delta2bbox

    rng = np.random.default_rng(3)
    xy = rng.uniform(-50, 400, (500, 2))
    rois = np.concatenate([xy, xy + rng.uniform(1, 200, (500, 2))], 1).astype(np.float32)
    deltas = rng.normal(0, 2, (500, 4 * 5)).astype(np.float32)  # 5 classes, per-class deltas
    means, stds = (0.1, -0.2, 0.0, 0.05), (0.1, 0.1, 0.2, 0.2)
    for shape in [None, (300, 420)]:
        ref = delta2bbox(torch.from_numpy(rois), torch.from_numpy(deltas), means, stds,
                         max_shape=shape).numpy()
        ours = delta_xywh_decode(rois, deltas, means, stds, max_shape=shape)
        assert ours.shape == ref.shape == (500, 20) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)
        assert np.mean(ours == ref) > 0.95
    # the clamp of log-size deltas at |log(16 / 1000)|: a huge dw gives 62.5 x the width
    box = delta_xywh_decode(np.float32([[0, 0, 10, 10]]), np.float32([[0, 0, 50, -50]]))
    np.testing.assert_allclose(box[0, 2] - box[0, 0], 10 * 1000 / 16, rtol=1e-5)
    np.testing.assert_allclose(box[0, 3] - box[0, 1], 10 * 16 / 1000, rtol=1e-5)


# ---------------------------------------------------------------- deployment variants

def test_lower_nms_pre_cuts_by_rank_in_each_level():
    case = _random_case(11)
    full = case.run()
    low = case.run(RpnSettings(nms_pre=200))
    assert_trace_consistent(low)
    tr = low.trace
    code, rank, limit, score = tr.code[:, 0], tr.rank[:, 0], tr.limit[:, 0], tr.score[:, 0]
    for lo, hi in zip(case.starts[:-1], case.starts[1:]):
        cut = np.flatnonzero(code[lo:hi] == FateKind.CUT_PRE_NMS_TOPK) + lo
        if hi - lo <= 200:
            assert cut.size == 0
            continue
        np.testing.assert_array_equal(np.sort(rank[cut]), np.arange(200, hi - lo))
        assert np.all(limit[cut] == 200)
        passed = np.setdiff1d(np.arange(lo, hi), cut)
        assert passed.size == 200 and score[cut].max() <= score[passed].min()
    # what the default kept and the lower nms_pre lost, it lost to the cut
    lost = np.setdiff1d(full.box_index, low.box_index)
    assert lost.size > 0
    assert np.all(code[lost] == FateKind.CUT_PRE_NMS_TOPK) and np.all(rank[lost] >= limit[lost])
    assert np.all(full.trace.code[lost, 0] == FateKind.KEPT)


def _cross_level_pairs(case: Case) -> tuple[Case, list[tuple[int, int]]]:
    """Plant top-scoring pairs: a level-0 anchor (32 px) whose log-size deltas log(2) make it the
    level-1 anchor (64 px) of the same centre; the level-0 one scores higher."""
    logits = np.concatenate([c.transpose(1, 2, 0).ravel() for c in case.cls_maps])
    deltas = np.concatenate([r.transpose(1, 2, 0).reshape(-1, 4) for r in case.reg_maps])
    pairs = []
    for k, (y, x) in enumerate([(5, 5), (12, 30), (25, 10)]):
        i, j = case.index(0, 2 * y, 2 * x, 1), case.index(1, y, x, 1)
        deltas[i] = [0, 0, np.log(2), np.log(2)]
        deltas[j] = 0
        logits[i], logits[j] = 12 - k, 11 - k
        pairs.append((i, j))
    return Case(case.img_hw, logits, deltas), pairs


def test_one_nms_over_all_levels_suppresses_across_levels():
    case, pairs = _cross_level_pairs(_random_case(12))
    per_level = case.run()
    over_all = case.run(RpnSettings(scope="all"))
    assert_trace_consistent(over_all)
    lv = over_all.anchor_level
    for i, j in pairs:
        assert per_level.trace.code[i, 0] == per_level.trace.code[j, 0] == FateKind.KEPT
        f = over_all.trace.fate(j, 0)
        assert f.kind == FateKind.SUPPRESSED and f.by_box == i and f.iou > 0.99
        assert lv[f.by_box] == 0 != lv[j]
        assert over_all.trace.code[i, 0] == FateKind.KEPT
    # per level, a suppressor is always of the box's own level; over all levels, often not
    for res, cross in [(per_level, False), (over_all, True)]:
        box = np.flatnonzero(res.trace.code[:, 0] == FateKind.SUPPRESSED)
        other = lv[res.trace.by_box[box, 0]] != lv[box]
        assert other.any() == cross
    assert set(per_level.box_index) != set(over_all.box_index)
    # our scope "all" is mmdet's nms.class_agnostic below split_thr
    assert RpnSettings.from_test_cfg(MMDET_CFGS["class_agnostic"]).scope == "all"


def test_lower_max_per_img_cuts_the_tail_with_ranks():
    case = _random_case(13)
    full = case.run(RpnSettings(max_per_img=100000))
    low = case.run(RpnSettings(max_per_img=100))
    assert_trace_consistent(low)
    assert len(full) > 100 and len(low) == 100
    np.testing.assert_array_equal(low.box_index, full.box_index[:100])
    np.testing.assert_array_equal(low.boxes, full.boxes[:100])
    tail = full.box_index[100:]
    assert np.all(low.trace.code[tail, 0] == FateKind.CUT_MAX_DETECTIONS)
    np.testing.assert_array_equal(low.trace.rank[tail, 0], np.arange(100, len(full)))
    assert np.all(low.trace.limit[tail, 0] == 100)
    assert np.all(full.trace.code[:, 0] != FateKind.CUT_MAX_DETECTIONS)


def test_topk_over_all_levels_differs_from_per_level():
    case = _random_case(14)
    # the other levels score lower: one TopK over all levels then takes only level 0
    logits = np.concatenate([c.transpose(1, 2, 0).ravel() for c in case.cls_maps])
    logits[case.starts[1]:] -= 8
    deltas = np.concatenate([r.transpose(1, 2, 0).reshape(-1, 4) for r in case.reg_maps])
    case = Case(case.img_hw, logits, deltas)
    per_level = case.run(RpnSettings(nms_pre=300))
    over_all = case.run(RpnSettings(nms_pre=300, topk_scope="all"))
    assert_trace_consistent(over_all)
    lv = over_all.anchor_level
    counts = np.bincount(lv, minlength=5)

    def entered(res):
        return np.flatnonzero(res.trace.code[:, 0] != FateKind.CUT_PRE_NMS_TOPK)

    np.testing.assert_array_equal(np.bincount(lv[entered(per_level)], minlength=5),
                                  np.minimum(counts, 300))
    assert entered(over_all).size == 300 and np.all(lv[entered(over_all)] == 0)
    cut = np.flatnonzero(over_all.trace.code[:, 0] == FateKind.CUT_PRE_NMS_TOPK)
    np.testing.assert_array_equal(np.sort(over_all.trace.rank[cut, 0]),
                                  np.arange(300, case.num_anchors))
    # level 4 has 48 anchors, never cut per level, all cut by the global TopK
    top = np.flatnonzero(lv == 4)
    assert top.size < 300 and np.all(over_all.trace.code[top, 0] == FateKind.CUT_PRE_NMS_TOPK)
    assert np.any(per_level.trace.code[top, 0] == FateKind.KEPT)
    assert set(per_level.box_index) != set(over_all.box_index)


@pytest.mark.parametrize("scope", ["level", "all"])
@pytest.mark.parametrize("topk_scope", ["level", "all"])
@pytest.mark.parametrize("nms_pre, max_per_img, min_bbox_size",
                         [(1000, 1000, 0.0), (60, 25, 20.0), (-1, 5000, -1.0)])
def test_trace_complete_and_kept_rows_are_the_output(scope, topk_scope, nms_pre, max_per_img,
                                                     min_bbox_size):
    case = _random_case(15, img_hw=(96, 128))
    s = RpnSettings(nms_pre=nms_pre, max_per_img=max_per_img, min_bbox_size=min_bbox_size,
                    scope=scope, topk_scope=topk_scope)
    res = case.run(s)
    res.trace.check_complete()
    assert_trace_consistent(res)
    assert res.trace.num_boxes == case.num_anchors and res.trace.num_classes == 1
    assert len(res) == min(max_per_img, len(res))
    kept = np.flatnonzero(res.trace.code[:, 0] == FateKind.KEPT)
    np.testing.assert_array_equal(np.sort(kept), np.sort(res.box_index))
    np.testing.assert_array_equal(res.trace.score[res.box_index, 0], res.scores)
    np.testing.assert_array_equal(res.levels, res.anchor_level[res.box_index])
    # no trace: the same proposals
    plain = case.run(s, trace=False)
    assert plain.trace is None
    np.testing.assert_array_equal(plain.box_index, res.box_index)
    np.testing.assert_array_equal(plain.boxes, res.boxes)
    if min_bbox_size > 0:
        small = res.trace.code[:, 0] == FateKind.BELOW_MIN_BBOX_SIZE
        assert small.any()
    if nms_pre < 0:
        assert res.trace.counts()["cut_pre_nms_topk"] == 0


# ---------------------------------------------------------------- ties

def _tied_case(img_hw, tie_levels, values, per_group: int, seed: int) -> tuple[Case, list]:
    """Low distinct background logits and zero deltas (boxes = clipped anchors), plus groups of
    anchors (ratio 1, cells 3 apart: IoU < 0.7 with each other) sharing one logit each."""
    rng = np.random.default_rng(seed)
    sizes = _featmap_sizes(*img_hw)
    n = sum(fh * fw * A for fh, fw in sizes)
    logits = _distinct_logits(rng, n, 0.0, 0.5)
    case = Case(img_hw, logits, np.zeros((n, 4), np.float32))
    groups = []
    for level in tie_levels:
        fh, fw = sizes[level]
        cells = [(y, x) for y in range(0, fh, 3) for x in range(0, fw, 3)]
        assert len(cells) >= per_group * len(values)
        pick = rng.permutation(len(cells))
        for g, v in enumerate(values):
            idx = [case.index(level, *cells[c], 1)
                   for c in pick[g * per_group:(g + 1) * per_group]]
            logits[idx] = v
            groups.append(np.array(idx))
    return Case(img_hw, logits, np.zeros((n, 4), np.float32)), groups


def _runs(scores: np.ndarray) -> list[slice]:
    """Slices of the runs of equal scores."""
    edges = np.flatnonzero(np.diff(scores) != 0) + 1
    bounds = np.concatenate([[0], edges, [scores.size]])
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _rows(boxes: np.ndarray) -> list[tuple]:
    return sorted(map(tuple, boxes.tolist()))


def test_tied_scores_give_mmdets_proposals_in_mmdets_order_up_to_the_tie(rpn_head):
    """Ties that cannot change which proposals survive: mmdet's scores come in our order and
    each run of equal scores holds the same boxes. Inside a run torch.sort's order is its own
    (x86-simd-sort on this build), which no index rule reproduces."""
    case, groups = _tied_case((320, 480), (0, 1, 2), (3.0, 2.0, 1.0), 8, seed=21)
    tb, ts = _mmdet(rpn_head, case, FASTER_RCNN_RPN)
    stable = case.run(RpnSettings.from_test_cfg(FASTER_RCNN_RPN))
    reverse = case.run(RpnSettings.from_test_cfg(FASTER_RCNN_RPN, tie_order="reverse"))
    tied = np.concatenate(groups)
    # every tied anchor is a proposal, in runs of 24 (3 levels x 8)
    assert set(tied) <= set(stable.box_index)
    runs = _runs(stable.scores)
    assert [r.stop - r.start for r in runs[:3]] == [24, 24, 24]
    # the premise: the tie order decides nothing here
    np.testing.assert_array_equal(stable.scores, reverse.scores)
    for res in (stable, reverse):
        assert len(res) == len(ts)
        assert np.abs(res.scores - ts).max() <= 1e-5
        for r in _runs(res.scores):
            assert _rows(res.boxes[r]) == _rows(tb[r])
    # the two models: equal scores lower anchor index first, or higher first, in every sort
    for r in runs[:3]:
        assert np.all(np.diff(stable.box_index[r]) > 0)
        assert np.all(np.diff(reverse.box_index[r]) < 0)
    # outside the ties the order is exact
    single = [r for r in runs if r.stop - r.start == 1]
    assert len(single) > 500
    rows = np.concatenate([np.arange(r.start, r.stop) for r in single])
    assert np.abs(stable.boxes[rows] - tb[rows]).max() <= 1e-3


def test_tie_across_the_nms_pre_cut_is_flagged_and_mmdet_picks_from_the_tie(rpn_head):
    """60 tied anchors at level 2 and nms_pre 40: which 40 pass is decided by the tie. mmdet
    takes 40 of the 60; "stable" and "reverse" take different 40; the trace shows the cut ones
    at the very score that passed; every other proposal is mmdet's, in mmdet's order."""
    case, (group,) = _tied_case((320, 480), (2,), (3.0,), 60, seed=22)
    cfg = dict(FASTER_RCNN_RPN, nms_pre=40)
    tb, ts = _mmdet(rpn_head, case, cfg)
    clipped = delta_xywh_decode(case.anchors[2][group - case.starts[2]],
                                np.zeros((group.size, 4), np.float32), max_shape=case.img_hw)
    group_rows = set(map(tuple, clipped.tolist()))
    assert len(group_rows) == 60
    assert set(map(tuple, tb[:40].tolist())) <= group_rows
    assert np.all(ts[:40] == ts[0]) and ts[40] < ts[0]
    picked = {}
    for tie_order in ("stable", "reverse"):
        res = case.run(RpnSettings.from_test_cfg(cfg, tie_order=tie_order))
        assert_trace_consistent(res)
        assert len(res) == len(ts)
        np.testing.assert_array_equal(res.scores[:40], ts[:40])
        assert np.abs(res.boxes[40:] - tb[40:]).max() <= 1e-3
        assert np.abs(res.scores - ts).max() <= 1e-5
        tr = res.trace
        cut = group[tr.code[group, 0] == FateKind.CUT_PRE_NMS_TOPK]
        assert cut.size == 20 and np.all(tr.rank[cut, 0] >= 40)
        assert np.all(tr.score[cut, 0] == res.scores[0])
        picked[tie_order] = set(res.box_index[:40])
    assert picked["stable"] != picked["reverse"]
    assert picked["stable"] == set(np.sort(group)[:40])
