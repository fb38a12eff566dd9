"""Reading an exported file's named outputs back: which variant they are (from their names),
and the detections per image in original-image pixels — the model source's NMS for raw and
decoded outputs, the file's own NMS output for end2end ones.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from harness.errors import UserError
from harness.export.variants import END2END_OUTPUTS

# other exporters' end2end outputs (harness.artifacts.layout reads the rest of such files):
# mmyolo easydeploy (num_dets (B, 1), boxes (B, K, 4), scores (B, K), labels (B, K)) and
# mmdeploy (dets (B, K, 5) = box + score, labels (B, K); empty rows: label -1 or score 0)
FOREIGN_OUTPUTS = {"easydeploy": ("num_dets", "boxes", "scores", "labels"),
                   "mmdeploy": ("dets", "labels")}
from harness.models.source import ModelSource


def variant_of(names: Sequence[str],
               source: Optional[ModelSource] = None) -> tuple[str, Union[str, None]]:
    """(variant, end2end NMS kind or None) of a file whose outputs are `names`.

    end2end outputs are the NMS op's own names; raw and decoded ones are the source's
    (ModelSource.output_variant). Without a source, the mmyolo source's names are assumed.
    """
    have = set(names)
    for kind, wanted in {**END2END_OUTPUTS, **FOREIGN_OUTPUTS}.items():
        if set(wanted) <= have and (kind != "onnx" or "selected_indices" in have):
            return "end2end", kind
    if source is not None:
        own = source.output_variant(list(names))
    else:
        from harness.models.mmyolo import output_variant

        own = output_variant(list(names))
    if own is not None:
        return own, None
    raise UserError(f"outputs {', '.join(sorted(have))} are none of the harness's variants "
                    "(raw head maps, decoded boxes/scores, or an end2end NMS's outputs)")


def head_maps_from_outputs(outputs: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """`cls_scores.0`, ... arrays back into MmyoloModel.raw_outputs' {kind: [level tensors]}.
    Kept for callers written before the ModelSource protocol: a source's own methods
    (`decode`, `framework_detections`) take the named outputs as they are."""
    from harness.models.mmyolo import grouped_head_maps

    return grouped_head_maps({k: np.asarray(v) for k, v in outputs.items()})


def to_original_pixels(boxes: np.ndarray, meta: Any) -> np.ndarray:
    """boxes (K, 4) xyxy in network-input pixels → original-image pixels, clamped (mmyolo's
    rescale and clamp, docs/nms-semantics.md "mmyolo predict_by_feat" steps 4 and 6)."""
    from harness.data.preprocess import pad_left_top

    left, top = pad_left_top(meta)
    sx, sy = meta.scale_factor
    shift = np.asarray([left, top, left, top], np.float32)
    scale = np.asarray([sx, sy, sx, sy], np.float32)
    out = (np.asarray(boxes, np.float32) - shift) / scale
    h, w = meta.ori_shape
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h)
    return out


def _end2end_rows(outputs: dict[str, np.ndarray], kind: str,
                  image: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (K, 4) input pixels, scores (K,), labels (K,), box index or -1) of one image,
    in the NMS's output order."""
    if kind == "onnx":
        sel = outputs["selected_indices"]
        rows = sel[sel[:, 0] == image]
        scores = outputs["scores"][image, rows[:, 2], rows[:, 1]]
        # the op groups rows by class; detections read best first
        rows = rows[np.argsort(-scores, kind="stable")]
        boxes = outputs["boxes"][image, rows[:, 2]]
        scores = outputs["scores"][image, rows[:, 2], rows[:, 1]]
        return boxes, scores, rows[:, 1].astype(np.int64), rows[:, 2].astype(np.int64)
    if kind == "mmdeploy":
        dets, classes = outputs["dets"][image], outputs["labels"][image]
        valid = (classes >= 0) & (dets[:, 4] > 0)
        return (dets[valid, :4], dets[valid, 4], classes[valid].astype(np.int64),
                np.full(int(valid.sum()), -1, np.int64))
    names = {**END2END_OUTPUTS, **FOREIGN_OUTPUTS}[kind]
    num, boxes, scores, classes = (outputs[n][image] for n in names)
    if kind == "easydeploy":
        # the first num_dets rows; the rest pad (label -1, score 0)
        valid = (np.arange(boxes.shape[0]) < int(np.asarray(num).reshape(-1)[0])) & \
            (classes >= 0)
    elif kind == "efficient":
        n = int(num[0])
        valid = np.arange(boxes.shape[0]) < n
    else:
        # BatchedNMS: invalid rows (class -1) can sit between valid ones
        valid = classes >= 0
    return (boxes[valid], scores[valid], classes[valid].astype(np.int64),
            np.full(int(valid.sum()), -1, np.int64))


def detections_from_outputs(model: ModelSource, outputs: dict[str, np.ndarray],
                            metas: Sequence[Any]) -> list[Any]:
    """Per image NmsResult (boxes in original pixels) from a backend's outputs of any variant.

    raw / decoded: the source's decoded candidates through its NMS with its settings (the
    harness's reference). end2end: the file's own NMS output, rescaled and clamped.
    """
    from harness.nms import NmsResult

    variant, kind = variant_of(list(outputs), model)
    if variant != "end2end":
        return model.detections(model.decode(outputs, metas), metas)
    results = []
    for i, meta in enumerate(metas):
        boxes, scores, labels, index = _end2end_rows(outputs, kind, i)
        results.append(NmsResult(boxes=to_original_pixels(boxes, meta),
                                 scores=np.asarray(scores, np.float32), labels=labels,
                                 box_index=index))
    return results
