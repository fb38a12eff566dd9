"""A split two-stage deployment as one backend: the RPN graph on onnxruntime, then what the
code around the engines does — the proposal selection (harness.nms.rpn, with the settings
the RPN file records), RoIAlign on each RoI's FPN level (harness.kernels.roi_align, mmcv's
convention) — then the head graph. Its outputs have the raw two-stage variant's names
(rpn maps, proposals padded to the cap, num_proposals, roi_cls, roi_reg), so compare and
coco read it as they read the one-graph file. Opened for a file whose metadata says
`split.role == "rpn"` (OnnxruntimeBackend.open_file); the head file sits beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from harness.errors import UserError


def grid_anchors(base: np.ndarray, stride: Sequence[float], size: Sequence[int]) -> np.ndarray:
    """mmdet AnchorGenerator.single_level_grid_priors in float32: every cell's shift (row-
    major, x then y) plus each base anchor, ordered (h, w, anchor)."""
    h, w = int(size[0]), int(size[1])
    sx = np.arange(w, dtype=np.float32) * np.float32(stride[0])
    sy = np.arange(h, dtype=np.float32) * np.float32(stride[1])
    xx, yy = np.tile(sx, h), np.repeat(sy, w)
    shifts = np.stack([xx, yy, xx, yy], axis=-1)
    return (np.asarray(base, np.float32)[None] + shifts[:, None]).reshape(-1, 4)


def roi_levels(boxes: np.ndarray, finest_scale: float, levels: int) -> np.ndarray:
    """mmdet SingleRoIExtractor.map_roi_levels: floor(log2(sqrt(w h) / finest_scale + 1e-6)),
    clamped to the levels there are."""
    b = np.asarray(boxes, np.float32)
    scale = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    lvl = np.floor(np.log2(scale / np.float32(finest_scale) + np.float32(1e-6)))
    return np.clip(lvl, 0, levels - 1).astype(np.int64)


class SplitTwoStageBackend:
    """The pair (RPN file, head file) as one backend with the raw two-stage outputs."""

    name = "onnxruntime"
    file_kind = "onnx"

    def __init__(self, rpn: Any, provider: str = "cpu"):
        from harness.backends.onnxruntime_backend import OnnxruntimeBackend

        self.rpn = rpn  # a loaded OnnxruntimeBackend of the RPN file
        record = rpn.metadata or {}
        self.steps = record.get("split") or {}
        head = Path(rpn.path).with_name(self.steps.get("head_file", ""))
        if not self.steps.get("head_file") or not head.is_file():
            raise UserError(f"{rpn.path.name} is the RPN graph of a split export; its head "
                            f"graph {head.name or '(unnamed)'} is not beside it")
        self.head = OnnxruntimeBackend(head, provider=provider)
        self.head.load()
        self.path = Path(rpn.path)
        self.precision = rpn.precision
        self.input_dims = rpn.input_dims
        self.model_sha256 = rpn.model_sha256
        self.metadata = record

    # the Backend members compare and coco use
    def load(self) -> None:
        self.rpn.load()
        self.head.load()

    def source_onnx(self) -> Path:
        return self.path

    @property
    def input_name(self) -> str:
        return self.rpn.input_name

    def check_fits(self, inputs: np.ndarray) -> None:
        self.rpn.check_fits(inputs)

    def intermediate_names(self) -> list[str]:
        return [*self.rpn.intermediate_names(), self.head.input_name,
                *self.head.intermediate_names()]

    def graph_nodes(self) -> list[Any]:
        """Both graphs' nodes, RPN graph first: what names the layers of the pair."""
        from harness.backends.onnxruntime_backend import read_onnx

        return [*read_onnx(self.path).graph.node, *read_onnx(self.head.path).graph.node]

    def intermediates(self, inputs: np.ndarray, names: Sequence[str],
                      metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        """Tensors of the RPN graph, the RoI features made between the graphs (the head
        graph's input name) and tensors of the head graph."""
        early = set(self.rpn.intermediate_names()) | {self.rpn.input_name}
        found = self.rpn.intermediates(inputs, [n for n in names if n in early], metas)
        late = [n for n in names if n not in early]
        if late:
            feeds = {self.head.input_name: self._run(inputs, metas)[1]}
            found.update(self.head.intermediates_named(
                feeds, [n for n in late if n != self.head.input_name]))
            found.update(feeds)
        return {n: found[n] for n in names if n in found}

    def infer(self, inputs: np.ndarray, metas: Optional[Sequence[Any]] = None
              ) -> dict[str, np.ndarray]:
        """The raw two-stage outputs of the pair."""
        return self._run(inputs, metas)[0]

    def _run(self, inputs: np.ndarray, metas: Optional[Sequence[Any]] = None
             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(the raw two-stage outputs, the RoI features fed to the head graph)."""
        from harness.export.variants import img_shape_rows
        from harness.kernels.roi_align import roi_align
        from harness.nms.rpn import RpnSettings, flatten_rpn_level, rpn_proposals

        out = self.rpn.infer(inputs, metas)
        s = self.steps
        settings = RpnSettings(**s["rpn"])
        levels = sorted(int(k.split(".")[1]) for k in out if k.startswith("rpn_cls."))
        cls = [out[f"rpn_cls.{i}"] for i in levels]
        reg = [out[f"rpn_reg.{i}"] for i in levels]
        anchors = [grid_anchors(s["base_anchors"][i], s["strides"][i], cls[i].shape[2:])
                   for i in levels]
        shapes = img_shape_rows(metas, inputs.shape[0], inputs.shape[2:])
        b, k = inputs.shape[0], int(settings.max_per_img)
        proposals = np.zeros((b, k, 5), np.float32)
        counts = np.zeros(b, np.int64)
        for i in range(b):
            flat = [flatten_rpn_level(c[i], r[i]) for c, r in zip(cls, reg)]
            found = rpn_proposals([f[0] for f in flat], [f[1] for f in flat], anchors,
                                  tuple(int(v) for v in shapes[i]), settings,
                                  s["rpn_coder"]["means"], s["rpn_coder"]["stds"],
                                  trace=False)
            n = min(len(found.boxes), k)
            proposals[i, :n, :4], proposals[i, :n, 4] = found.boxes[:n], found.scores[:n]
            counts[i] = n
        feats = self._roi_features(out, proposals[..., :4], roi_align)
        head = self.head.run_named({self.head.input_name: feats})
        named = {n: v for n, v in out.items() if not n.startswith("feats.")}
        named.update(proposals=proposals, num_proposals=counts,
                     roi_cls=head["roi_cls"].reshape(b, k, -1),
                     roi_reg=head["roi_reg"].reshape(b, k, -1))
        return named, feats

    def _roi_features(self, out: dict[str, np.ndarray], boxes: np.ndarray,
                      roi_align: Any) -> np.ndarray:
        """Every proposal slot's features (padding rows too, as the one-graph file reads
        them), each read from its level."""
        ext = self.steps["roi_extractor"]
        layers = ext["levels"]
        b, k = boxes.shape[:2]
        flat = boxes.reshape(-1, 4)
        rois = np.concatenate([np.repeat(np.arange(b, dtype=np.float32), k)[:, None], flat],
                              axis=1)
        level = roi_levels(flat, ext["finest_scale"], len(layers))
        feats0 = out["feats.0"]
        h, w = layers[0]["output_size"]
        result = np.zeros((b * k, feats0.shape[1], h, w), np.float32)
        for i, layer in enumerate(layers):
            rows = np.flatnonzero(level == i)
            if rows.size:
                result[rows] = roi_align(out[f"feats.{i}"], rois[rows], tuple(layer["output_size"]),
                                         layer["spatial_scale"], layer["sampling_ratio"],
                                         layer["aligned"], layer["pool_mode"])
        return result

    def describe(self) -> dict[str, Any]:
        info = self.rpn.describe()
        info["split"] = {"head_file": str(self.head.path),
                         "outside": "proposal selection (harness.nms.rpn) and RoIAlign "
                                    "(harness.kernels.roi_align) between the graphs"}
        return info
