"""The fast post-processing of a COCO pass as CUDA graphs: the source's decode and
harness.nms.fast_mmyolo.fixed_mmyolo_nms captured once per input shapes and candidate
capacity, then replayed — one launch and one host-device sync per call, where the eager fast
path makes ~290 op calls and 13 syncs. Each op call of a thread hands the interpreter's lock
over and has to take it back, so beside the pass's other threads (inference, reading,
writing) the eager call took 12 ms instead of 4 on the H200, and slowed inference with it.

A call copies its host inputs into a pinned staging buffer of its own (before it waits for
the graph), then into the graph's own buffers in one copy, replays, and copies the fixed-size
table of ranked candidates back; the host keeps each image's kept rows (after the graph is
free again). A graph holds 1, 2, 4, 8 or a multiple of 8 images (a call of
fewer fills the rest with padding images, which have no candidates), so the few batch sizes
a pass makes — its batches, groups of them, its last stretch — need few graphs. Where the
table's capacity `k_cap` was too small for an image's candidates the call is replayed on a graph of
a larger one (remembered for the shapes); where the fixed rounds did not converge the fixed
point is continued eagerly from where they stopped; where a graph cannot hold the batch
(the memory budget, a failed capture) the caller runs the eager path: the detections are the
same every way (tests/eval/test_coco_graphs.py: on the CPU with a stand-in that runs the
captured function again at each replay, on a GPU with CUDA graphs).

The graphs of one post share one memory pool; calls are serialised by a lock held for one
replay, its copies to and from the device and its sync only: a call's copy into its staging
buffer (0.3-7.8 ms beside a pass on the H200, 8.6 MB of onnxruntime's outputs at batch 4) and
the reading of its table happen outside it, so the calls queued behind it do not wait for
them (they did: calls waited up to 14-29 ms for the lock, the pass's last call with them).
A capture runs beside the pass's inference in "thread_local" mode: other threads may launch
work and wait for their streams, but not synchronise the whole device (CUDA refuses that
during any capture, and the capture fails): the pass's own wait is for its stream
(harness.eval.latency.cuda_sync). A capture that fails anyway leaves this post on the eager
path, said by describe().
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

# the candidate capacity of a first graph; where an image has more candidates, the next is
# K_GROWTH times that many, rounded up to a multiple of K_STEP
K_START = 1024
K_GROWTH = 1.25
K_STEP = 256
# images per call a pass gathers for a post that replays graphs: a replay costs little per
# call (H200: 1.5 ms for 4 images, 2.7 for 16), while a group's matrices are as wide as its
# most crowded image — so a batch of 4 goes as it is, and the pass's last call is small
GRAPH_GROUP_IMAGES = 4


@dataclass
class _Graph:
    replay: Callable[[], None]
    device: Any        # the graph's flat float32 input buffer
    views: dict[str, Any]  # name -> its view of `device`
    per_image: Any     # the graph's (B, 11) per-image rows
    outputs: tuple     # (table, flags, state for fixed_continued) — the graph's own tensors
    table_host: Any
    flags_host: Any


@dataclass
class _Staging:
    """One call's pinned copy of its host inputs, laid out as a graph of its shapes holds
    them (one copy to the device), and of its per-image rows; a call takes a free one."""
    host: Any                   # flat float32, pinned on a GPU
    views: dict[str, np.ndarray]  # name -> its (B, ...) view of `host`
    per_image: Any              # (B, 11) float32, pinned on a GPU


class GraphedPost:
    """post(inputs, metas) → per image NmsResult, or None where the caller must run the eager
    path. inputs: name → array or tensor, either decoded candidates (`boxes`, `scores`,
    optionally `objectness`) or the head's maps (`cls_scores.0`, ...)."""

    def __init__(self, model: Any, device: str, *, budget_bytes: Optional[int] = None):
        import torch

        from harness.nms.fast_mmyolo import FIXED_ROUNDS, MATRIX_BUDGET_BYTES

        self.rounds = FIXED_ROUNDS  # of the fixed point in a graph
        self.model, self.device = model, torch.device(device)
        self.cuda = self.device.type == "cuda"
        # a graph's matrices stay in its memory pool: up to 1/32 of a large GPU's memory
        self.budget_bytes = budget_bytes or max(
            MATRIX_BUDGET_BYTES,
            torch.cuda.get_device_properties(self.device).total_memory // 32
            if self.cuda else 0)
        self.lock = threading.Lock()
        self.graphs: dict[tuple, _Graph] = {}
        self.staging: dict[tuple, list[_Staging]] = {}  # free staging buffers, by shapes
        # buffers made at once for a shapes' first call (prepare: the calls that may run
        # side by side), so a pass's first calls do not each allocate pinned memory
        self.stage_ahead = 1
        self._said = threading.Lock()  # for slowest / last
        self.k_caps: dict[tuple, int] = {}
        self.failed: Optional[str] = None
        # captures (and their seconds), replays, redone (a larger capacity), continued (the
        # rounds had not converged), eager (too large for a graph)
        self.stats: collections.Counter = collections.Counter()
        # the slowest and the last call so far: its seconds and their parts (waiting for the
        # lock, copying the inputs in, replay + sync, the host's results), for benchmarks
        self.slowest: tuple[float, dict[str, float]] = (0.0, {})
        self.last: tuple[float, dict[str, float]] = (0.0, {})
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None

    def summary(self) -> dict[str, Any]:
        """The counts describe() says, for results.json."""
        s = self.stats
        out = {k: int(s[k]) for k in ("captures", "replays", "redone", "continued", "eager")}
        out["capture_s"] = round(s["capture_s"], 3)
        if self.failed:
            out["failed"] = self.failed
        return out

    def describe_calls(self) -> str:
        """The slowest and the last call so far, and where their time went (ms)."""
        return "; ".join(f"{which} call {1e3 * total:.1f} ms (" + ", ".join(
            f"{name} {1e3 * v:.1f}" for name, v in parts.items()) + ")"
            for which, (total, parts) in (("slowest", self.slowest), ("last", self.last)))

    def describe(self) -> str:
        s = self.summary()
        text = (f"{s['captures']} graphs captured ({1e3 * s['capture_s']:.0f} ms), "
                f"{s['replays']} replays, {s['redone']} redone with more capacity, "
                f"{s['continued']} continued past the graph's rounds, {s['eager']} left to the "
                "eager path")
        return text + (f" (capture failed: {s['failed']})" if "failed" in s else "")

    def __call__(self, inputs: dict[str, Any], metas: Sequence[Any]) -> Optional[list]:
        import torch

        from harness.nms.fast_mmyolo import fixed_continued, table_results

        if self.failed or torch.jit.is_tracing() or not inputs:
            return None
        n = len(metas)
        batch = graph_batch(n)
        shapes = tuple((name, (batch, *value.shape[1:])) for name, value in inputs.items())
        nms = self.model.nms
        clock = time.perf_counter
        asked = clock()
        stage = self._stage(shapes, inputs, metas)
        parts = {"inputs": clock() - asked}
        try:
            t0 = clock()
            with self.lock:
                parts["lock"] = clock() - t0
                k_cap = self.k_caps.get(shapes, min(K_START, nms.nms_pre))
                while True:
                    graph = self._graph(shapes, batch, k_cap)
                    if graph is None:
                        self.stats["eager"] += 1
                        return None
                    self._run(graph, stage, inputs, n, parts)
                    most, converged = (float(v) for v in graph.flags_host.numpy())
                    if most <= k_cap:
                        break
                    self.stats["redone"] += 1
                    k_cap = self.k_caps[shapes] = min(
                        nms.nms_pre, -(-int(most * K_GROWTH) // K_STEP) * K_STEP)
                t0 = clock()
                if not converged:  # more rounds than the graph's: on from where they stopped
                    self.stats["continued"] += 1
                    table = fixed_continued(graph.outputs[2]).cpu().numpy()[:n]
                else:  # the graph's table, free for the next call once copied
                    table = graph.table_host.numpy()[:n].copy()
                held = clock() - t0
        finally:
            self.staging[shapes].append(stage)
        t0 = clock()
        out = table_results(table)
        parts["results"] = held + clock() - t0
        with self._said:
            self.last = (clock() - asked, parts)
            if self.last[0] > self.slowest[0]:
                self.slowest = self.last
        return out

    def prepare(self, calls: int) -> None:
        """Up to `calls` calls may run side by side (a pass's post workers): the first call
        of new shapes makes a staging buffer for each (pinned memory: ~ms each on the H200,
        and a pass's first calls would otherwise each make one while the others wait)."""
        self.stage_ahead = max(1, int(calls))

    def _stage(self, shapes: tuple, inputs: dict[str, Any], metas: Sequence[Any]
               ) -> _Staging:
        """A free staging buffer for `shapes` (made where none is free) holding the call's
        host inputs (the first len(metas) images; the rest are padding) and per-image rows."""
        import torch

        from harness.nms.fast_mmyolo import per_image_rows

        if shapes not in self.staging:
            self.staging[shapes] = [self._new_stage(shapes) for _ in range(self.stage_ahead)]
        free = self.staging[shapes]
        try:
            stage = free.pop()
        except IndexError:
            stage = self._new_stage(shapes)
        n = len(metas)
        for name, value in inputs.items():
            if not _on_device(value):
                np.copyto(stage.views[name][:n],
                          value.numpy() if torch.is_tensor(value) else value,
                          casting="same_kind")
        stage.per_image.numpy()[:] = per_image_rows(metas, len(stage.per_image))
        return stage

    def _new_stage(self, shapes: tuple) -> _Staging:
        import torch

        sizes = [int(np.prod(shape)) for _, shape in shapes]
        host = torch.zeros(sum(sizes), dtype=torch.float32, pin_memory=self.cuda)
        views = {name: part.reshape(shape) for (name, shape), part in
                 zip(shapes, np.split(host.numpy(), np.cumsum(sizes)[:-1]))}
        per_image = torch.zeros((shapes[0][1][0], 11), dtype=torch.float32,
                                pin_memory=self.cuda)
        return _Staging(host, views, per_image)

    def _run(self, graph: _Graph, stage: _Staging, inputs: dict[str, Any], n: int,
             parts: dict[str, float]) -> None:
        """One replay on the staged inputs (and the first `n` images of those on the
        device); its copies to the device's and its replay's seconds added to `parts`."""
        import torch

        t0 = time.perf_counter()
        if not all(_on_device(value) for value in inputs.values()):
            graph.device.copy_(stage.host, non_blocking=True)
        for name, value in inputs.items():  # then those already on the device
            if _on_device(value):
                graph.views[name][:n].copy_(value)
        graph.per_image.copy_(stage.per_image, non_blocking=True)
        t1 = time.perf_counter()
        graph.replay()
        graph.table_host.copy_(graph.outputs[0], non_blocking=True)
        graph.flags_host.copy_(graph.outputs[1], non_blocking=True)
        self.stats["replays"] += 1
        if self.cuda:  # (the staging buffer is free again after this)
            torch.cuda.current_stream(self.device).synchronize()
        t2 = time.perf_counter()  # (a redone call: both runs)
        parts["inputs"] = parts.get("inputs", 0.0) + t1 - t0
        parts["replay"] = parts.get("replay", 0.0) + t2 - t1

    def _graph(self, shapes: tuple, batch: int, k_cap: int) -> Optional[_Graph]:
        from harness.nms.fast_mmyolo import matrix_bytes

        key = (shapes, k_cap)
        if key in self.graphs:
            return self.graphs[key]
        if matrix_bytes(batch, k_cap) > self.budget_bytes:
            return None
        t0 = time.perf_counter()
        try:
            graph = self.graphs[key] = self._capture(shapes, batch, k_cap)
        except Exception as exc:  # noqa: BLE001 — the eager path gives the same detections
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return None
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0
        return graph

    def _capture(self, shapes: tuple, batch: int, k_cap: int) -> _Graph:
        import torch

        from harness.nms.fast_mmyolo import EXACT_INDEX, fixed_mmyolo_nms

        sizes = [int(np.prod(shape)) for _, shape in shapes]
        # zeros, not garbage, in the padding images' inputs until a call fills them
        device = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
        views = {name: d.view(shape) for (name, shape), d in
                 zip(shapes, torch.split(device, sizes))}
        dev_meta = torch.zeros((batch, 11), dtype=torch.float32, device=self.device)
        dev_meta[:, 4:8] = 1.0  # padding images' scale (the warm-up run divides by it)
        nms = asdict(self.model.nms)

        def body() -> tuple:
            named = dict(views)
            if "boxes" in named and "scores" in named:
                boxes, scores, obj = named["boxes"], named["scores"], named.get("objectness")
            else:
                from harness.models.mmyolo import grouped_head_maps

                boxes, scores, obj = self.model.decode_torch(grouped_head_maps(named))
            if scores.shape[1] * scores.shape[2] >= EXACT_INDEX:
                raise ValueError(f"{scores.shape[1]} x {scores.shape[2]} candidates: too "
                                 "many for the table's float32 indices")
            return fixed_mmyolo_nms(boxes, scores, obj, dev_meta, k_cap, **nms,
                                    rounds=self.rounds)

        with torch.no_grad():
            if self.cuda:
                replay, outputs = _cuda_capture(body, self.device, self.pool)
            else:  # a stand-in for the graph: the body run again on each replay
                outputs = body()

                def replay() -> None:
                    with torch.no_grad():
                        table, flags, state = body()
                    outputs[0].copy_(table)
                    outputs[1].copy_(flags)
                    outputs[2].update(state)
        table_host = torch.empty(outputs[0].shape, dtype=torch.float32, pin_memory=self.cuda)
        flags_host = torch.empty(outputs[1].shape, dtype=torch.float32, pin_memory=self.cuda)
        return _Graph(replay, device, views, dev_meta, outputs, table_host, flags_host)


def _on_device(value: Any) -> bool:
    """Whether an input is a tensor on an accelerator (copied device to device), not a host
    array or CPU tensor (copied through a staging buffer)."""
    import torch

    return torch.is_tensor(value) and value.device.type != "cpu"


def graph_batch(images: int) -> int:
    """The images a graph for `images` holds: the next power of two up to 8, then the next
    multiple of 8 (padding costs a graph's whole matrices per padding image)."""
    return 1 << max(0, images - 1).bit_length() if images <= 8 else -(-images // 8) * 8


def _cuda_capture(body: Callable[[], tuple], device: Any, pool: Any
                  ) -> tuple[Callable[[], None], tuple]:
    """(replay, the graph's outputs) of `body` captured on `device`, after one run on the
    capturing stream (cuBLAS's handles, the head's cached priors and the allocator warmed)."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        body()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    # capture_begin itself, not torch.cuda.graph(), which first synchronises the whole device
    # and empties the allocator's caches (the inference beside it would pay for both);
    # thread_local: the pass's other threads (inference) go on launching and synchronising
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            outputs = body()
        finally:
            graph.capture_end()
    return graph.replay, outputs
