"""The fast batched path (harness.nms.fast_mmyolo, harness.eval.coco_post) gives the reference
kernel's detections element for element: on the fixture's real outputs, on random candidate
sets over every setting, on tied scores, on the split branch and when images fall back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from harness.nms.fast_mmyolo import fast_mmyolo_nms  # noqa: E402
from harness.models.zoo import SHIPPED_CONFIGS  # noqa: E402
from harness.nms.mmyolo import mmyolo_nms  # noqa: E402


@dataclass
class Meta:
    ori_shape: tuple[int, int]
    scale_factor: tuple[float, float]
    pad_param: Optional[tuple[float, float, float, float]]


def assert_same(ref, fast, where=""):
    assert len(ref) == len(fast), f"{where}: {len(ref)} reference vs {len(fast)} fast detections"
    for name in ("boxes", "scores", "labels", "box_index"):
        a, b = getattr(ref, name), getattr(fast, name)
        assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), \
            f"{where}: {name} differ\n{a[:8]}\n{b[:8]}"


def candidates(rng, b, n, c, *, tied=False, negative=False, objectness=True):
    centres = rng.uniform(0, 320, size=(b, n // 8 + 1, 2))
    pick = rng.integers(0, centres.shape[1], size=(b, n))
    xy = np.take_along_axis(centres, pick[..., None], axis=1) + rng.normal(0, 6, (b, n, 2))
    wh = rng.uniform(4, 60, size=(b, n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=2).astype(np.float32)
    if negative:
        boxes -= np.float32(200)
    scores = rng.uniform(0, 1, size=(b, n, c)).astype(np.float32) ** 3
    if tied:
        scores = np.round(scores * 8).astype(np.float32) / np.float32(8)
    obj = rng.uniform(0, 1, size=(b, n)).astype(np.float32) if objectness else None
    return boxes, scores, obj


def metas_for(b):
    return [Meta((480 + 7 * i, 640 - 9 * i), (0.5 + 0.01 * i, 0.5 + 0.02 * i),
                 (3.0 * i, 1.0, 2.0 + i, 0.0) if i % 2 == 0 else None) for i in range(b)]


def run_both(boxes, scores, obj, metas, budget=1 << 30, **settings):
    fast = fast_mmyolo_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                           None if obj is None else torch.from_numpy(obj), metas,
                           budget_bytes=budget, **settings)
    refs = []
    for i, m in enumerate(metas):
        pad = m.pad_param
        refs.append(mmyolo_nms(boxes[i], scores[i], None if obj is None else obj[i],
                               pad_left_top=(pad[2], pad[0]) if pad else (0.0, 0.0),
                               scale_factor=m.scale_factor, clamp_hw=m.ori_shape,
                               tie_order="stable", **settings))
    return refs, fast


BASE = dict(score_thr=0.001, nms_pre=30000, iou_threshold=0.65, max_per_img=300,
            multi_label=True)
CASES = {
    "mmyolo defaults": {},
    "single label": dict(multi_label=False),
    "nms_pre cut": dict(nms_pre=50),
    "max_per_img cut": dict(max_per_img=7),
    "yolox style": dict(yolox_style=True),
    "score threshold 0.3": dict(score_thr=0.3),
    "no threshold": dict(score_thr=-1.0, nms_pre=400),
    "min bbox size": dict(min_bbox_size=40.0),
    "class agnostic": dict(class_agnostic=True),
    "split branch": dict(split_thr=20),
    "iou 0.3": dict(iou_threshold=0.3),
}


@pytest.mark.parametrize("objectness", [True, False], ids=["objectness", "no objectness"])
@pytest.mark.parametrize("case", list(CASES))
def test_random_candidates_equal_the_reference(case, objectness):
    rng = np.random.default_rng(abs(hash(case)) % 2 ** 32)
    boxes, scores, obj = candidates(rng, 3, 300, 4, objectness=objectness)
    refs, fast = run_both(boxes, scores, obj, metas_for(3), **{**BASE, **CASES[case]})
    assert sum(len(r) for r in refs) > 0, "a case whose reference keeps nothing tests nothing"
    for i, (r, f) in enumerate(zip(refs, fast)):
        assert_same(r, f, f"{case} image {i}")


@pytest.mark.parametrize("settings", [{}, dict(multi_label=False), dict(nms_pre=40)],
                         ids=["multi label", "single label", "nms_pre at a tie"])
def test_tied_scores_follow_the_reference_stable_order(settings):
    rng = np.random.default_rng(7)
    boxes, scores, obj = candidates(rng, 2, 400, 3, tied=True, objectness=False)
    refs, fast = run_both(boxes, scores, obj, metas_for(2), **{**BASE, **settings})
    ties = sum(len(r.scores) - len(np.unique(r.scores)) for r in refs)
    assert ties > 0, "the planted scores must tie among the kept detections"
    for i, (r, f) in enumerate(zip(refs, fast)):
        assert_same(r, f, f"tied image {i}")


def test_negative_coordinates_let_classes_interact_as_mmcv_does():
    rng = np.random.default_rng(3)
    boxes, scores, obj = candidates(rng, 2, 300, 3, negative=True)
    refs, fast = run_both(boxes, scores, obj, metas_for(2), **BASE)
    for i, (r, f) in enumerate(zip(refs, fast)):
        assert_same(r, f, f"negative image {i}")


def test_non_finite_candidates_equal_the_reference():
    rng = np.random.default_rng(5)
    boxes, scores, obj = candidates(rng, 2, 200, 3)
    boxes[0, :5] = np.nan
    boxes[1, 5:9, 2] = np.inf
    scores[0, 10:20] = np.nan
    refs, fast = run_both(boxes, scores, obj, metas_for(2), **BASE)
    for i, (r, f) in enumerate(zip(refs, fast)):
        assert_same(r, f, f"non-finite image {i}")


def test_an_image_over_the_memory_budget_is_left_to_the_reference():
    rng = np.random.default_rng(11)
    boxes, scores, obj = candidates(rng, 3, 300, 4)
    scores[1], obj[1] = np.maximum(scores[1], 0.9), 1.0  # image 1: every pair a candidate
    refs, fast = run_both(boxes, scores, obj, metas_for(3), budget=32 * 400 ** 2,
                          **{**BASE, "score_thr": 0.5})
    assert fast[1] is None, "1200 candidates must not fit a budget of 400"
    assert 0 < len(refs[0]) < 400 and 0 < len(refs[2]) < 400
    assert_same(refs[0], fast[0])
    assert_same(refs[2], fast[2])


def test_fixture_outputs_through_both_paths_are_equal(tmp_path_factory):
    from harness.eval.coco_pass import plan_batches, prepare_batch
    from harness.eval.coco_post import fast_detections, make_post, packed_to
    from harness.models.mmyolo import flat_head_outputs, grouped_head_maps, load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
    from tests.conftest import synth_val_images

    @dataclass
    class Image:
        path: object
        image_id: int
        file_name: str

    model = load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    paths = synth_val_images(tmp_path_factory, "fast_post", 16, seed=4)
    images = [Image(p, i, p.name) for i, p in enumerate(paths)]
    reference, _ = make_post(model, "cpu", "reference")
    fast, how = make_post(model, "cpu", "fast")
    assert how.startswith("fast")
    # the pass may join batches for it only where the outputs are batch-major: not an ONNX
    # NMS file's (selected_indices numbers the images of its own batch)
    onnx_nms = {"boxes": np.zeros((2, 5, 4)), "scores": np.zeros((2, 3, 5)),
                "selected_indices": np.zeros((4, 3), np.int64)}
    assert fast.can_join(onnx_nms) is False
    assert make_post(model, "cpu", "auto")[1] == "reference"  # the numpy kernel is faster there
    kept = 0
    for chunk in plan_batches(images, 4):
        p = prepare_batch(chunk, model.preprocess)
        raw = flat_head_outputs(model.raw_outputs(torch.from_numpy(p.inputs)))
        outputs = {k: v.numpy() for k, v in raw.items()}
        assert fast.can_join(outputs)
        # host maps go to a GPU packed in one copy: split again, each map as it was
        grouped = grouped_head_maps(outputs)
        packed = packed_to(grouped, "cpu")
        assert [len(v) for v in packed.values()] == [len(v) for v in grouped.values()] == [3] * 3
        assert all(torch.equal(a, b) for kind in grouped
                   for a, b in zip(grouped[kind], packed[kind]))
        refs = reference(outputs, p.metas)
        for r, f in zip(refs, fast(outputs, p.metas)):
            assert_same(r, f, "fixture")
            kept += len(r)
        # a budget below the second-largest image: those images go to the reference
        widths = sorted(len(r) for r in refs)
        for r, f in zip(refs, fast_detections(model, outputs, p.metas, "cpu",
                                               budget_bytes=32 * widths[1] ** 2)):
            assert_same(r, f, "fixture, partly through the reference")
        decoded = model.decoded_outputs(raw)
        named = {k: v.numpy() for k, v in decoded.items()}
        for r, f in zip(reference(named, p.metas), fast(named, p.metas)):
            assert_same(r, f, "fixture, decoded outputs")
    assert kept > 100


FAMILY_CANDIDATES = 2000  # per image: mmyolo's random init ties at the class prior
FAMILY_ROUNDS = 64  # the fixed form's rounds there (the ties make chains longer than 16)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SHIPPED_CONFIGS))
def test_every_family_at_random_init_on_real_photos(family, real_photos):
    """Every family's own decode and settings (objectness or not, yolox_style, multi-label),
    on photos of real size and odd aspect batched together, at mmyolo's random init, where
    most families score hundreds of thousands of (box, class) pairs equal to the class prior:
    with the threshold just below the 2000th score and nms_pre 2000, the top-k cut falls in
    the middle of that tie, and the fast kernel (no image left to the reference) gives the
    reference kernel's detections element for element."""
    from dataclasses import asdict

    from harness.data.preprocess import preprocess_files
    from harness.eval.coco_post import make_post
    from harness.models.mmyolo import flat_head_outputs, load_mmyolo_model
    from harness.models.zoo import shipped_config

    model = load_mmyolo_model(shipped_config(family), seed=0)
    batch = preprocess_files(real_photos, model.preprocess)
    raw = model.raw_outputs(batch.inputs)
    boxes, scores, obj = model.decode_torch(raw)
    s = scores if obj is None else scores * obj[..., None]
    top = np.sort(s.reshape(len(real_photos), -1).numpy(), axis=1)[:, ::-1]
    kth = top[:, FAMILY_CANDIDATES].min()
    model = model.with_nms(score_thr=float(min(model.nms.score_thr,
                                               np.nextafter(kth, np.float32(0)))),
                           nms_pre=FAMILY_CANDIDATES)
    reference, _ = make_post(model, "cpu", "reference")
    refs = reference({k: v.numpy() for k, v in flat_head_outputs(raw).items()}, batch.metas)
    fast = fast_mmyolo_nms(boxes, scores, obj, batch.metas, **asdict(model.nms))
    fixed, most, converged = run_fixed(
        boxes.numpy(), scores.numpy(), None if obj is None else obj.numpy(), batch.metas,
        FAMILY_CANDIDATES, rounds=FAMILY_ROUNDS, **asdict(model.nms))
    assert most <= FAMILY_CANDIDATES and converged == 1.0, f"{family}: {most}, {converged}"
    assert sum(len(r) for r in refs) > 0
    ties = sum(len(r.scores) - len(np.unique(r.scores)) for r in refs)
    for i, (r, f, g) in enumerate(zip(refs, fast, fixed)):
        assert f is not None, f"{family} photo {i}: left to the reference, nothing tested"
        assert_same(r, f, f"{family} photo {i} ({ties} tied detections)")
        assert_same(r, g, f"{family} photo {i}, fixed form")


def run_fixed(boxes, scores, obj, metas, k_cap, rounds=None, continued=False, **settings):
    from harness.nms.fast_mmyolo import (fixed_continued, fixed_mmyolo_nms, per_image_meta,
                                         table_results)

    extra = {} if rounds is None else {"rounds": rounds}
    table, flags, state = fixed_mmyolo_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores),
        None if obj is None else torch.from_numpy(obj), per_image_meta(metas, "cpu"), k_cap,
        **settings, **extra)
    assert table.shape == (len(metas), k_cap, 8), "the table is k_cap wide, whatever the data"
    most, converged = flags.tolist()
    if continued:
        table = fixed_continued(state)
    return table_results(table.numpy()), most, converged


@pytest.mark.parametrize("objectness", [True, False], ids=["objectness", "no objectness"])
@pytest.mark.parametrize("case", list(CASES))
def test_fixed_form_equals_the_reference(case, objectness):
    """fixed_mmyolo_nms (every shape fixed, for a CUDA graph): where its capacity held every
    candidate and its rounds converged, the reference's detections element for element."""
    rng = np.random.default_rng(abs(hash(case)) % 2 ** 32)
    boxes, scores, obj = candidates(rng, 3, 300, 4, objectness=objectness)
    settings = {**BASE, **CASES[case]}
    refs, _ = run_both(boxes, scores, obj, metas_for(3), **settings)
    fixed, most, converged = run_fixed(boxes, scores, obj, metas_for(3), 1280, **settings)
    assert most <= 1280 and converged == 1.0
    for i, (r, f) in enumerate(zip(refs, fixed)):
        assert_same(r, f, f"{case} image {i}, fixed form")


def test_padding_images_have_no_candidates():
    """fixed_mmyolo_nms's batch may hold more images than there are (a graph of a power of
    two): a padding row (per_image_meta's last column 0) ranks nothing, keeps nothing and
    changes nothing for the images before it."""
    from harness.nms.fast_mmyolo import fixed_mmyolo_nms, per_image_meta, table_results

    rng = np.random.default_rng(4)
    boxes, scores, obj = candidates(rng, 4, 300, 4)
    metas = metas_for(3)
    refs, _ = run_both(boxes[:3], scores[:3], obj[:3], metas, **BASE)
    table, flags, _ = fixed_mmyolo_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                       torch.from_numpy(obj), per_image_meta(metas, "cpu", 4),
                                       1280, **BASE)
    found = table_results(table.numpy())
    assert len(found[3]) == 0 and flags[1] == 1.0
    for r, f in zip(refs, found):
        assert_same(r, f, "beside a padding image")


def test_fixed_form_says_when_its_capacity_or_rounds_fall_short():
    rng = np.random.default_rng(2)
    boxes, scores, obj = candidates(rng, 2, 300, 4)
    refs, _ = run_both(boxes, scores, obj, metas_for(2), **BASE)
    counts = [int(((scores[i] * obj[i][:, None] > 0.001) & (obj[i][:, None] > 0.001)).sum())
              for i in range(2)]
    _, most, _ = run_fixed(boxes, scores, obj, metas_for(2), 100, **BASE)
    assert most == max(counts) > 100, "a capacity below the candidates must say so"
    fixed, most, converged = run_fixed(boxes, scores, obj, metas_for(2), 512 * 3, rounds=1,
                                       continued=True, **BASE)
    assert converged == 0.0, "one round cannot reach the fixed point of hundreds of boxes"
    for r, f in zip(refs, fixed):
        assert_same(r, f, "fixed form, continued after one round")
    fixed, _, converged = run_fixed(boxes, scores, obj, metas_for(2), 512 * 3, **BASE)
    assert converged == 1.0
    for r, f in zip(refs, fixed):
        assert_same(r, f, "fixed form, enough capacity")
