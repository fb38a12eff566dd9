"""The post-processing of a COCO pass: a backend's outputs → per image detections.

Two paths give the same detections:
  reference  harness.export.outputs.detections_from_outputs: the source's decode in torch on
             the CPU, then the numpy reference kernel (harness.nms) image by image;
  fast       for an mmyolo one-stage source on a CUDA row: decode and NMS for the whole batch
             in torch on that GPU (harness.nms.fast_mmyolo), which keeps the host free for
             reading images — on a fast GPU the numpy NMS at score_thr 0.001 starves it —,
             replayed as CUDA graphs there (harness.eval.coco_graphs).
A file with its own NMS (end2end) has nothing to run: both paths rescale its output.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import numpy as np

Post = Callable[[Any, Sequence[Any]], list]
POST_PATHS = ("auto", "fast", "reference")
_local = threading.local()  # each post-processing thread's own CUDA stream


def make_post(model: Any, device: str, path: str = "auto", graphs: bool = True
              ) -> tuple[Post, str]:
    """(post(outputs, metas) → per image NmsResult, which path it takes).

    path: "auto" (fast on a CUDA row when the source supports it, else reference), "fast"
    (also on the CPU: tests and benchmarks), "reference". graphs: the fast path on a GPU
    replays CUDA graphs (False: eager, for benchmarks)."""
    from harness.export.outputs import detections_from_outputs

    if path not in POST_PATHS:
        raise ValueError(f"post path must be one of {POST_PATHS}, got {path!r}")

    def reference(outputs: Any, metas: Sequence[Any]) -> list:
        return detections_from_outputs(model, outputs, metas)

    if path == "reference" or not hasattr(model, "decode_torch"):
        return reference, "reference"
    if path == "auto" and not str(device).startswith("cuda"):
        return reference, "reference"
    target = device if str(device).startswith("cuda") else "cpu"
    replays = None
    if target != "cpu" and graphs:
        from harness.eval.coco_graphs import GraphedPost

        replays = GraphedPost(model, target)

    def batch_major(outputs: Any) -> bool:
        """raw / decoded outputs are (B, ...); an end2end file's NMS outputs may not be
        (ONNX NonMaxSuppression's selected_indices hold batch numbers)."""
        from harness.export.outputs import variant_of

        return variant_of(list(outputs), model)[0] != "end2end"

    def fast(outputs: Any, metas: Sequence[Any]) -> list:
        if not batch_major(outputs):
            return reference(outputs, metas)
        return fast_detections(model, outputs, metas, target, graphs=replays)

    fast.can_join = batch_major  # type: ignore[attr-defined]  (coco_pass groups batches)
    fast.graphs = replays  # type: ignore[attr-defined]  (its counts, for benchmarks)
    if replays is not None:  # the images per call coco_pass gathers for it
        from harness.eval.coco_graphs import GRAPH_GROUP_IMAGES

        fast.post_group = GRAPH_GROUP_IMAGES  # type: ignore[attr-defined]
        fast.prepare = replays.prepare  # type: ignore[attr-defined]  (a pass's warm-up)
    return fast, f"fast (batched torch on {target}{', CUDA graphs' if replays else ''})"


def post_record(post: Post, how: str) -> dict[str, Any]:
    """What results.json keeps of the post-processing a pass ran: its path and, where it
    replayed CUDA graphs, their counts (captured, replayed, redone with more capacity,
    continued past the graph's rounds, left to the eager path)."""
    out: dict[str, Any] = {"path": how}
    graphs = getattr(post, "graphs", None)
    if graphs is not None:
        out["graphs"] = graphs.summary()
    return out


def fast_detections(model: Any, outputs: Any, metas: Sequence[Any], device: str,
                    budget_bytes: Optional[int] = None, graphs: Any = None) -> list:
    """Per image NmsResult of raw / decoded outputs, decoded and NMS'd on `device`; an image
    whose IoU matrix exceeds `budget_bytes` (default fast_mmyolo's) goes to the reference.
    graphs: a coco_graphs.GraphedPost, tried first (not where `budget_bytes` is given: the
    graphs keep their own budget, and a caller's budget asks for the eager path's groups)."""
    import torch

    from harness.models.mmyolo import grouped_head_maps
    from harness.models.source import DecodedCandidates
    from harness.nms.fast_mmyolo import MATRIX_BUDGET_BYTES, fast_mmyolo_nms

    def on_device(value: Any) -> Any:
        t = value if torch.is_tensor(value) else torch.from_numpy(np.asarray(value))
        return t.to(device=device, dtype=torch.float32)

    with torch.no_grad(), _own_stream(device):
        if graphs is not None and budget_bytes is None:
            found = graphs(graph_inputs(outputs), metas)
            if found is not None:
                return found
        if "boxes" in outputs and "scores" in outputs:
            boxes, scores = on_device(outputs["boxes"]), on_device(outputs["scores"])
            obj = outputs.get("objectness")
            obj = None if obj is None else on_device(obj)
        else:
            grouped = grouped_head_maps(outputs)
            on_host = not any(m.is_cuda for maps in grouped.values() for m in maps)
            raw = packed_to(grouped, device) if on_host \
                else {kind: [on_device(m) for m in maps] for kind, maps in grouped.items()}
            boxes, scores, obj = model.decode_torch(raw)
        results = fast_mmyolo_nms(boxes, scores, obj, metas, **asdict(model.nms),
                                  budget_bytes=budget_bytes or MATRIX_BUDGET_BYTES)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # too many candidates for one IoU matrix: the reference kernel
            decoded = DecodedCandidates(
                boxes=boxes[missing].cpu().numpy(), scores=scores[missing].cpu().numpy(),
                objectness=None if obj is None else obj[missing].cpu().numpy())
            for i, r in zip(missing, model.detections(decoded, [metas[i] for i in missing])):
                results[i] = r
    return results


def graph_inputs(outputs: Any) -> dict[str, Any]:
    """The outputs a GraphedPost takes: the decoded candidates where there are, else the
    head's maps by `kind.level`."""
    from harness.models.mmyolo import grouped_head_maps

    if "boxes" in outputs and "scores" in outputs:
        return {name: outputs[name] for name in ("boxes", "scores", "objectness")
                if outputs.get(name) is not None}
    return {f"{kind}.{level}": m for kind, maps in grouped_head_maps(outputs).items()
            for level, m in enumerate(maps)}


def packed_to(grouped: dict[str, list[Any]], device: str) -> dict[str, list[Any]]:
    """{kind: [maps]} as float32 on `device` in one copy: host maps (a file's outputs) go
    to a GPU in one copy instead of one per map (each a synchronous copy from pageable
    memory), packed into one buffer and split again there."""
    import torch

    maps = [m for kind in grouped.values() for m in kind]
    flat = torch.cat([m.reshape(-1).to(torch.float32) for m in maps]).to(device)
    parts = iter(torch.split(flat, [m.numel() for m in maps]))
    return {kind: [next(parts).view(m.shape) for m in kind_maps]
            for kind, kind_maps in grouped.items()}


def _own_stream(device: str) -> Any:
    """On a GPU, the calling thread's own stream: the default stream would wait for (and
    hold up) the inference running in the other thread; elsewhere nothing."""
    import torch

    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream(device=device)
    return torch.cuda.stream(stream)
