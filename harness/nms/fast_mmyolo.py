"""The fast path of harness.nms.mmyolo for accuracy runs: the same post-processing for a whole
batch at once, in torch on the backend's device, without a trace.

It gives what `mmyolo_nms(..., tie_order="stable")` gives on the same candidates, element for
element (tests/nms/test_fast_mmyolo.py checks it against the reference kernel on the fixture's
outputs, random candidate sets, tied scores and the split branch): the same filters in the
same float32 arithmetic, one stable descending sort, and greedy suppression computed as the
unique fixed point of "kept = valid and not hit by an earlier kept candidate" over the IoU
matrix of the candidates (iterated from "all valid"; after t rounds the first t positions are
final, so it ends in at most K + 1 rounds and in practice in a few). `harness compare` keeps
the traced kernel: it needs every candidate's fate, this path only the survivors.

Two forms of it:
  fast_mmyolo_nms   shapes follow the data (the candidates' count, convergence checked as it
                    goes): ~13 host-device syncs and ~290 op calls per call;
  fixed_mmyolo_nms  every shape fixed by the inputs' and a candidate capacity `k_cap`, a fixed
                    number of rounds, no sync: what harness.eval.coco_graphs captures once in
                    a CUDA graph and replays (one launch, one sync per call); it says
                    whether `k_cap` held every candidate (where not, the caller runs it again
                    with more) and whether the rounds converged (where not,
                    fixed_continued goes on from where they stopped).

Images whose candidate set is too large for one IoU matrix in the memory budget are left to
the reference kernel (`None` in the returned list).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from harness.data.preprocess import pad_left_top
from harness.nms.mmyolo import MMCV_SPLIT_THR
from harness.nms.trace import NmsResult

# the IoU matrices of one call (B x K x K float32 plus its masks) stay below this
MATRIX_BUDGET_BYTES = 1 << 30
# rounds of the fixed point between two convergence checks (the fixture needs 6–8)
CHECK_EVERY = 4
# the fixed form's rounds (then one more, to see that they converged; where not,
# fixed_continued goes on)
FIXED_ROUNDS = 12
# fixed_mmyolo_nms's table: per candidate x1 y1 x2 y2 score label box kept (float32: labels
# and box indices exact below 2**24)
TABLE_COLUMNS = 8
EXACT_INDEX = 1 << 24


def fast_mmyolo_nms(boxes: Any, scores: Any, objectness: Optional[Any], metas: Sequence[Any],
                    *, score_thr: float, nms_pre: int, iou_threshold: float, max_per_img: int,
                    multi_label: bool, yolox_style: bool = False, min_bbox_size: float = -1.0,
                    class_agnostic: bool = False, split_thr: int = MMCV_SPLIT_THR,
                    budget_bytes: int = MATRIX_BUDGET_BYTES) -> list[Optional[NmsResult]]:
    """mmyolo's detections for a batch. boxes (B, N, 4), scores (B, N, C), objectness (B, N)
    or None: float32 torch tensors on one device, decoded as in mmyolo_nms. metas: per image
    (pad_param, scale_factor, ori_shape). Returns per image an NmsResult (numpy, on the host)
    or None where the image's candidates exceed `budget_bytes` (run the reference there)."""
    import torch

    b = scores.shape[0]
    order, counts, flat_scores, best, c = _ranked(boxes, scores, objectness, score_thr,
                                                  nms_pre, multi_label, yolox_style)
    k = int(counts.max().item()) if b else 0
    if k == 0:
        return [NmsResult.empty() for _ in range(b)]
    cand = _candidates(boxes, order[:, :k], counts, flat_scores, best, c,
                       per_image_meta(metas, scores.device), min_bbox_size)
    xyxy, cand_cls, in_top = cand["xyxy"], cand["cls"], cand["in_top"]
    # one transfer: per image the candidates a matrix must span and how many there are
    widths, sizes = torch.stack([_widths(in_top), in_top.sum(dim=1)]).tolist()
    keep = torch.zeros_like(in_top)
    groups = _groups(widths, budget_bytes)
    for idx in groups:
        w = max(widths[i] for i in idx)
        split = [sizes[i] >= split_thr for i in idx]
        hit_f, valid_f = _hits(xyxy[idx, :w], cand_cls[idx, :w], in_top[idx, :w],
                               iou_threshold, class_agnostic,
                               torch.tensor(split, device=xyxy.device) if any(split) else None)
        keep[idx, :w] = _fixed_point(hit_f, valid_f) > 0
    done = {i for idx in groups for i in idx}
    keep, out = _finish(keep, xyxy, cand["wh"], max_per_img, yolox_style)
    img, pos = keep.nonzero(as_tuple=True)  # image-major, positions ascending
    floats = torch.cat([out[img, pos], cand["score"][img, pos][:, None]], dim=1).cpu().numpy()
    ints = torch.stack([img, cand_cls[img, pos], cand["box"][img, pos]], dim=1).cpu().numpy()
    bounds = np.searchsorted(ints[:, 0], np.arange(b + 1))
    results: list[Optional[NmsResult]] = []
    for i in range(b):
        lo, hi = bounds[i], bounds[i + 1]
        results.append(NmsResult(
            boxes=np.ascontiguousarray(floats[lo:hi, :4]),
            scores=np.ascontiguousarray(floats[lo:hi, 4]),
            labels=ints[lo:hi, 1].astype(np.int64), box_index=ints[lo:hi, 2].astype(np.int64))
            if i in done else None)
    return results


def fixed_mmyolo_nms(boxes: Any, scores: Any, objectness: Optional[Any], per_image: Any,
                     k_cap: int, *, score_thr: float, nms_pre: int, iou_threshold: float,
                     max_per_img: int, multi_label: bool, yolox_style: bool = False,
                     min_bbox_size: float = -1.0, class_agnostic: bool = False,
                     split_thr: int = MMCV_SPLIT_THR, rounds: int = FIXED_ROUNDS
                     ) -> tuple[Any, Any, dict[str, Any]]:
    """fast_mmyolo_nms with every shape fixed: (table (B, k_cap, TABLE_COLUMNS) float32 —
    per ranked candidate its clamped box, score, label, box index and whether it is kept —,
    flags (2,) float32: the largest candidate count (k_cap held them all if it is <= k_cap)
    and 1.0 if `rounds` rounds reached the fixed point, the state fixed_continued goes on
    from). No host-device sync and no shape that depends on the data, so a CUDA graph can
    hold it. per_image: per_image_meta(metas, batch) (a row whose last column is 0 is a
    padding image: no candidates). Where both flags are good, table_results(table) equals
    fast_mmyolo_nms's detections."""
    import torch

    order, counts, flat_scores, best, c = _ranked(boxes, scores, objectness, score_thr,
                                                  nms_pre, multi_label, yolox_style,
                                                  active=per_image[:, 10] > 0)
    k = min(k_cap, order.shape[1])
    cand = _candidates(boxes, order[:, :k], counts, flat_scores, best, c, per_image,
                       min_bbox_size)
    in_top = cand["in_top"]
    split = in_top.sum(dim=1) >= split_thr
    hit_f, valid_f = _hits(cand["xyxy"], cand["cls"], in_top, iou_threshold, class_agnostic,
                           split)
    keep = valid_f
    for _ in range(rounds):
        keep = _round(keep, hit_f, valid_f)
    converged = torch.eq(_round(keep, hit_f, valid_f), keep).all()
    state = {**cand, "hit": hit_f, "valid": valid_f, "keep": keep, "k_cap": k_cap,
             "max_per_img": max_per_img, "yolox_style": yolox_style}
    flags = torch.stack([counts.max().to(torch.float32), converged.to(torch.float32)])
    return _table(state, keep), flags, state


def fixed_continued(state: dict[str, Any]) -> Any:
    """The table of a fixed_mmyolo_nms whose rounds did not converge: the fixed point
    continued from where they stopped (eagerly, convergence checked as it goes)."""
    return _table(state, _fixed_point(state["hit"], state["valid"], start=state["keep"]))


def _table(state: dict[str, Any], keep: Any) -> Any:
    """fixed_mmyolo_nms's (B, k_cap, TABLE_COLUMNS) table for the kept 0/1 floats `keep`."""
    import torch

    keep, out = _finish(keep > 0, state["xyxy"], state["wh"], state["max_per_img"],
                        state["yolox_style"])
    table = torch.cat([out, state["score"][..., None], state["cls"][..., None].to(out.dtype),
                       state["box"][..., None].to(out.dtype), keep[..., None].to(out.dtype)],
                      dim=2)
    k, k_cap = table.shape[1], state["k_cap"]
    if k < k_cap:  # fewer candidates than k_cap in all: the table is k_cap wide all the same
        table = torch.nn.functional.pad(table, (0, 0, 0, k_cap - k))
    return table


def table_results(table: np.ndarray) -> list[NmsResult]:
    """Per image the NmsResult of a fixed_mmyolo_nms table (on the host): its kept rows in
    rank order."""
    results = []
    for rows in table:
        kept = rows[rows[:, 7] > 0]
        results.append(NmsResult(
            boxes=np.ascontiguousarray(kept[:, :4]), scores=np.ascontiguousarray(kept[:, 4]),
            labels=kept[:, 5].astype(np.int64), box_index=kept[:, 6].astype(np.int64)))
    return results


def per_image_meta(metas: Sequence[Any], device: Any, batch: Optional[int] = None) -> Any:
    """(batch, 11) float32 on `device`: per image its letterbox padding (left, top, twice),
    scale factors (twice), original width and height, and 1 — what fixed_mmyolo_nms takes of
    metas; rows past len(metas) (up to `batch`) are padding images (last column 0)."""
    import torch

    return torch.from_numpy(per_image_rows(metas, batch)).to(device)


def per_image_rows(metas: Sequence[Any], batch: Optional[int] = None) -> np.ndarray:
    """per_image_meta's rows as a host array."""
    rows = np.zeros((batch or len(metas), 11), np.float32)
    rows[:, 4:8] = 1.0  # a padding image's scale: no division by zero
    if metas:
        rows[:len(metas)] = [[*pad_left_top(m)] * 2 + [*m.scale_factor] * 2 +
                             [m.ori_shape[1], m.ori_shape[0], 1.0] for m in metas]
    return rows


def _ranked(boxes: Any, scores: Any, objectness: Optional[Any], score_thr: float,
            nms_pre: int, multi_label: bool, yolox_style: bool,
            active: Optional[Any] = None) -> tuple:
    """(order: each image's candidates ranked, valid ones first by descending score (ties:
    lower position first), counts: valid ones per image up to nms_pre, flat scores, best
    class per box (single label) or None, classes). active: per image, False for a padding
    image (no valid candidate)."""
    import torch

    b, n, c = scores.shape
    dev = scores.device
    # scalars made on the device (torch.full: a fill, where torch.tensor would copy from the
    # host and wait for it), rounded to float32 as torch.tensor rounds them
    thr = torch.full((), score_thr, dtype=torch.float32, device=dev)
    multi_label = bool(multi_label) and c > 1
    if objectness is not None:
        alive = objectness > thr if (score_thr > 0 and not yolox_style) else \
            torch.ones_like(objectness, dtype=torch.bool)
        scores = scores * objectness[..., None]
    else:
        alive = torch.ones((b, n), dtype=torch.bool, device=dev)
    best = None
    if multi_label:
        valid = (scores > thr) & alive[..., None]
        flat_scores = scores.reshape(b, n * c)
        valid = valid.reshape(b, n * c)
    else:
        best_score, best = scores.max(dim=2)  # the first maximal class, as torch documents
        valid = (best_score > thr) & alive
        flat_scores = best_score
    if active is not None:
        valid = valid & active[:, None]
    key = torch.where(valid, flat_scores, torch.full_like(flat_scores, -float("inf")))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    counts = valid.sum(dim=1).clamp(max=nms_pre)
    return order, counts, flat_scores, best, c if multi_label else 0


def _candidates(boxes: Any, order: Any, counts: Any, flat_scores: Any, best: Optional[Any],
                c: int, per_image: Any, min_bbox_size: float) -> dict[str, Any]:
    """The ranked candidates `order` (B, K) gathered: in_top (within each image's count and,
    where set, min_bbox_size), box and cls indices, score, xyxy in original pixels (not yet
    clamped) and each image's (width, height)."""
    import torch

    b, k = order.shape
    dev = order.device
    in_top = torch.arange(k, device=dev)[None, :] < counts[:, None]
    if best is None:
        cand_box, cand_cls = order // c, order % c
    else:
        cand_box, cand_cls = order, torch.gather(best, 1, order)
    cand_score = torch.gather(flat_scores, 1, order)
    pad, scale, wh = per_image[:, None, 0:4], per_image[:, None, 4:8], per_image[:, 8:10]
    xyxy = (torch.gather(boxes, 1, cand_box[..., None].expand(b, k, 4)) - pad) / scale
    if min_bbox_size >= 0:
        m = torch.full((), min_bbox_size, dtype=torch.float32, device=dev)
        in_top &= ((xyxy[..., 2] - xyxy[..., 0]) > m) & ((xyxy[..., 3] - xyxy[..., 1]) > m)
    return {"in_top": in_top, "box": cand_box, "cls": cand_cls, "score": cand_score,
            "xyxy": xyxy, "wh": wh}


def _finish(keep: Any, xyxy: Any, wh: Any, max_per_img: int, yolox_style: bool
            ) -> tuple[Any, Any]:
    """(keep within max_per_img, the boxes clamped to the original image — after NMS)."""
    import torch

    if not yolox_style:  # results[:max_per_img]
        keep = keep & (keep.cumsum(dim=1) <= max_per_img)
    zero = torch.zeros((), dtype=torch.float32, device=xyxy.device)
    x = torch.minimum(torch.maximum(xyxy[..., 0::2], zero), wh[:, None, 0:1])
    y = torch.minimum(torch.maximum(xyxy[..., 1::2], zero), wh[:, None, 1:2])
    return keep, torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=2)


def _groups(widths: Sequence[int], budget_bytes: int) -> list[list[int]]:
    """Images grouped, fewest candidates first, so that each group's IoU matrices fit the
    budget (a group's matrices are as wide as its widest image); an image too large alone is
    in no group."""
    groups: list[list[int]] = []
    for i in sorted(range(len(widths)), key=lambda i: widths[i]):
        if matrix_bytes(1, widths[i]) > budget_bytes:
            break
        if groups and matrix_bytes(len(groups[-1]) + 1, widths[i]) <= budget_bytes:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _widths(valid: Any) -> Any:
    """Per row, the last valid position + 1 (0 if none): the candidates a matrix must span
    (min_bbox_size leaves gaps, so this is not the count)."""
    import torch

    pos = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    return (valid * pos).amax(dim=1) if valid.shape[1] else valid.sum(dim=1)


def matrix_bytes(images: int, width: int) -> int:
    """The memory the IoU matrices of `images` images `width` candidates wide take at their
    peak (_hits: about eight float32 / bool K x K temporaries at once)."""
    return images * width * width * 32


def _hits(xyxy: Any, labels: Any, valid: Any, iou_threshold: float, class_agnostic: bool,
          split: Optional[Any]) -> tuple[Any, Any]:
    """(hit (G, W, W), valid (G, W)) as 0/1 float32: hit[g, i, j] where the earlier valid
    candidate i would suppress the later valid candidate j in mmcv 2.0.1's batched_nms over
    each row's valid candidates, which are in descending score order (ties: lower position
    first, the reference's stable order). split: None, or per row (bool tensor) whether mmcv
    takes its per-class branch (split_thr candidates or more)."""
    import torch

    w = xyxy.shape[1]
    dev = xyxy.device
    if class_agnostic:
        for_nms = xyxy
    else:
        # boxes.max() over the image's candidates (amax propagates NaN, as numpy's max
        # does), float32 offsets label * (max + 1)
        neg = torch.full_like(xyxy, -float("inf"))
        top = torch.where(valid[..., None], xyxy, neg).amax(dim=(1, 2)) if w else \
            torch.zeros(xyxy.shape[0], dtype=xyxy.dtype, device=dev)
        offsets = labels.to(torch.float32) * (top[:, None] + 1)
        for_nms = xyxy + offsets[..., None]
    x1, y1, x2, y2 = for_nms.unbind(dim=2)
    areas = (x2 - x1) * (y2 - y1)
    # mmcv/ops/csrc/pytorch/cpu/nms.cpp, row = the earlier (kept) box i, column = later j
    xx1 = torch.where(x1[:, :, None] < x1[:, None, :], x1[:, None, :], x1[:, :, None])
    yy1 = torch.where(y1[:, :, None] < y1[:, None, :], y1[:, None, :], y1[:, :, None])
    xx2 = torch.where(x2[:, None, :] < x2[:, :, None], x2[:, None, :], x2[:, :, None])
    yy2 = torch.where(y2[:, None, :] < y2[:, :, None], y2[:, None, :], y2[:, :, None])
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    dw, dh = xx2 - xx1, yy2 - yy1
    del xx1, yy1, xx2, yy2
    inter = torch.where(zero < dw, dw, zero) * torch.where(zero < dh, dh, zero)
    del dw, dh
    iou = inter / (areas[:, :, None] + areas[:, None, :] - inter)
    del inter
    hit = iou > torch.full((), iou_threshold, dtype=torch.float32, device=dev)
    del iou
    hit &= torch.ones((w, w), dtype=torch.bool, device=dev).triu(diagonal=1)
    hit &= valid[:, :, None] & valid[:, None, :]
    if split is not None:
        # mmcv's split branch: one NMS per class (on the same offset boxes), union re-sorted
        # by score — the same survivors as hits restricted to one class, in the same order
        hit &= ~split[:, None, None] | (labels[:, :, None] == labels[:, None, :])
    # kept and hit as 0/1 floats, so that each round is three device ops (a matrix product
    # counts the kept candidates hitting each one); a sum of 0/1 terms is 0 only where every
    # term is, in any float precision, so on a GPU half precision does (half the memory the
    # rounds read, on tensor cores)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    return hit.to(dtype), valid.to(dtype)


def _round(keep: Any, hit_f: Any, valid_f: Any) -> Any:
    """One round of the fixed point: valid and not hit by a kept candidate (0/1 floats)."""
    import torch

    return valid_f * (torch.bmm(keep.unsqueeze(1), hit_f).squeeze(1) == 0)


def _fixed_point(hit_f: Any, valid_f: Any, start: Optional[Any] = None) -> Any:
    """The kept candidates (0/1 floats): rounds from "all valid" (or from `start`, a round's
    result) until nothing changes."""
    import torch

    w = hit_f.shape[1]
    keep = valid_f if start is None else start
    for step in range(w + 1):
        new = _round(keep, hit_f, valid_f)
        # a fixed point stays fixed, so convergence is checked (a device sync) every few steps
        if (step % CHECK_EVERY == CHECK_EVERY - 1 or step == w) and torch.equal(new, keep):
            break
        keep = new
    return keep
