"""What `harness coco` writes: the `coco` section of results.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from harness.results.base import Schema
from harness.results.compare import Unreadable

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


@dataclass
class CocoRow(Schema):
    """One configuration of the matrix; numbers are None unless status is "ok"."""

    backend: str
    device: str
    precision: str
    batch: int
    status: str
    nms_pre: Optional[int] = None  # the row's test_cfg.nms_pre (an nms_pre axis varies it)
    # fixed: every image letterboxed to the config's size; batch_shapes: to its batch's
    # rectangle, as mmyolo's own evaluation (tools/test.py) does with batch_shapes_cfg
    preprocess: str = "fixed"
    AP: Optional[float] = None
    AP50: Optional[float] = None
    AP75: Optional[float] = None
    APs: Optional[float] = None
    APm: Optional[float] = None
    APl: Optional[float] = None
    AR1: Optional[float] = None
    AR10: Optional[float] = None
    AR100: Optional[float] = None
    delta_AP: Optional[float] = None
    # AP of the row's own candidates through the reference's NMS (a file ending in its own
    # NMS; the row's AP where its NMS is the reference's), and ΔAP split into what the
    # numbers cost (numeric = that AP − the reference's) and what the NMS cost (nms = AP −
    # that AP), with how the split was made (harness.eval.delta_ap) and on how many images
    # the candidates read did not reproduce the row's detections ("replay_disagrees")
    AP_reference_nms: Optional[float] = None
    delta_AP_parts: Optional[dict[str, Any]] = None
    per_class: Optional[dict[str, Optional[float]]] = None
    # the per-stage pipeline view (preprocess, infer, post on one thread): "in a real
    # pipeline"
    latency_ms: Optional[dict[str, dict[str, float]]] = None
    latency_stability: Optional[dict[str, Any]] = None
    images_per_s: Optional[float] = None
    # inference in its own phase (harness.eval.inference_timing.InferenceTiming.to_json():
    # host end-to-end, compute, transfers, each mean / median / p90 / p99 ms per batch)
    inference: Optional[dict[str, Any]] = None
    # where the latency was timed: `rank 0: cuda:3 (NVIDIA H200), host gpu-a` (never an
    # average over GPUs); with --latency-per-rank every rank's figures, by rank: {"rank",
    # "host", "device", "gpu", "total_ms", "inference_ms", "compute_ms" (statistics),
    # "images_per_s", "stable"}
    latency_device: Optional[str] = None
    latency_per_rank: Optional[list[dict[str, Any]]] = None
    # the accuracy pass of this invocation (rank 0's under torchrun; None when every image
    # was already stored): {"images", "wall_s", "inference_s", "ratio" (wall / inference:
    # about 1 when the backend was the bottleneck, more when the host could not feed it),
    # "waited_for_reading_s" / "waited_for_post_s" (inference idle for want of the next read
    # batch / of room behind it: which side of the host binds), "warmup_s" (the untimed
    # warm-up call before the pass, coco_pass.run_pass(warmup)), "fill_s" / "drain_s" (from
    # the pass's start to its first inference / from its last to the end: once per pass),
    # "drain_parts_s" (from the last inference to the end of the last post-processing call,
    # to the start of the last write, to its end),
    # "inference_alone_s" (its batches × the inference phase's host median: inference as it
    # runs alone; absent where the latency was timed on another rank)}
    accuracy_pass: Optional[dict[str, Any]] = None
    images: Optional[int] = None
    unreadable: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> tuple:
        return (self.backend, self.device, self.precision, self.batch, self.nms_pre,
                self.preprocess)


@dataclass
class CocoDataset(Schema):
    images_dir: str
    annotations: str
    images: int
    unreadable: int = 0
    unreadable_images: list[Unreadable] = field(default_factory=list)


@dataclass
class CocoResult(Schema):
    created: str
    seconds: float
    dataset: CocoDataset
    machine: dict[str, Any]
    model: dict[str, Any]
    evaluator: dict[str, Any]
    latency: dict[str, Any]
    rows: list[CocoRow]
    # a run under torchrun: launcher, world_size, backend, timeout_s, latency_rank,
    # latency_per_rank, ranks [{rank, host, local_rank, gpu, threads}], passes {configuration
    # key: [{rank, computed, found_stored, wall_s}]}; None for one process
    distributed: Optional[dict[str, Any]] = None
