"""The mmyolo source's export modules: the detector as the `raw` and `decoded` variants' graphs,
holding the detector's own backbone / neck / bbox_head under those names so ONNX node names
keep module scopes (`/backbone/stem/conv/Conv`). Imports torch: load it lazily
(MmyoloModel.export_module).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MmyoloRawModule(nn.Module):
    """images (B, 3, H, W) → every head map: cls_scores.l (B, A*C, H_l, W_l),
    bbox_preds.l (B, A*4, H_l, W_l) (or the head's own channel count),
    objectnesses.l (B, A, H_l, W_l) for heads with objectness (MmyoloModel.head_outputs)."""

    def __init__(self, source: Any):
        super().__init__()
        detector = source.module
        # the detector's submodules under their own names: ONNX scopes = module paths
        self.backbone = detector.backbone
        self.neck = getattr(detector, "neck", None)
        self.bbox_head = detector.bbox_head
        self._source = [source]  # a list, so nn.Module does not register it twice

    @property
    def source(self) -> Any:
        return self._source[0]

    def forward_named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.source.head_outputs(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.forward_named(images).values())


class MmyoloDecodedModule(MmyoloRawModule):
    """images → boxes (B, N, 4) xyxy in input pixels, scores (B, N, C) class probabilities
    (sigmoid, not multiplied by objectness), and objectness (B, N) for heads that have it:
    exactly MmyoloModel.decoded_outputs, i.e. YOLOv5Head.predict_by_feat before filtering, so
    the harness can run mmyolo's own NMS on these outputs."""

    def forward_named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.source.decoded_outputs(super().forward_named(images))
