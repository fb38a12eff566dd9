"""One configuration's pass over a COCO split, with inference on the critical path: batches
are read and preprocessed by a pool of threads ahead of the backend (OpenCV's decode and
resize and numpy's large operations release the GIL, so they run in parallel), and decoded +
NMS'd by a second pool behind it, then written to the RunStore in batch order, while the
calling thread only runs inference. On a fast GPU one reader and one post-processor starve it
(H200, fixture: wall / inference 1.8–6.7 at batch 4); `workers` sets both pools' size.

Batches are fixed by position in the split (batch k holds images k*B .. k*B+B-1, unreadable
ones left out), so a resumed run feeds the backend the very same batches as an uninterrupted
one; a batch already stored is not run again and no image is written twice.
"""
from __future__ import annotations

import collections
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from harness.errors import UserError

QUEUE_DEPTH = 2  # batches prepared ahead / waiting for post-processing, beyond the workers
MAX_WORKERS = 8  # per pool, by default: enough for the H200 at batch 4 (bench_coco_overhead)
# post-processing runs on groups of at least this many images (several inference batches
# concatenated), so its fixed per-call cost — ~150 device ops on the fast path — is shared
POST_GROUP_IMAGES = 16
# During a pass the interpreter hands the GIL over after this long instead of 5 ms: the
# inference thread re-takes it after every kernel launch / session.run, and with busy worker
# threads waiting out 5 ms each time cost PyTorch CUDA 2.6x its inference at batch 4 (H200)
SWITCH_INTERVAL_S = 0.0002
POLL_S = 0.1
BOX_DECIMALS = 3  # stored boxes: 0.001 px
SCORE_DECIMALS = 7


@dataclass
class PassTimes:
    """What one pass did. Sums are of each stage's own wall time (stages overlap, so they
    may add up to more than `wall_s`); `infer_s` is the backend's summed inference time."""

    wall_s: float = 0.0
    infer_s: float = 0.0
    preprocess_s: float = 0.0
    post_s: float = 0.0
    batches: int = 0
    images: int = 0  # computed in this pass
    skipped: int = 0  # already in the store
    unreadable: int = 0  # found unreadable in this pass

    @property
    def overhead_ratio(self) -> float:
        """wall time over summed inference time (1.0: nothing but inference)."""
        return self.wall_s / self.infer_s if self.infer_s else float("nan")


@dataclass
class _Prepared:
    images: list[Any]  # SplitImage readable, in batch order
    unreadable: list[tuple[Any, str]] = field(default_factory=list)
    inputs: Optional[np.ndarray] = None
    metas: list[Any] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Failure:
    error: BaseException


def plan_batches(images: Sequence[Any], batch_size: int) -> list[list[Any]]:
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    return [list(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def prepare_batch(chunk: Sequence[Any], spec: Any) -> _Prepared:
    """Read and preprocess a batch's images; an unreadable one is set aside with the reason."""
    from harness.data.preprocess import read_image, stack_inputs, transform_image

    started = time.perf_counter()
    out = _Prepared(images=[])
    arrays = []
    for im in chunk:
        try:
            x, meta = transform_image(read_image(im.path), spec, str(im.path),
                                      getattr(im, "batch_shape", None))
        except UserError as exc:
            out.unreadable.append((im, str(exc)))
            continue
        arrays.append(x)
        out.metas.append(meta)
        out.images.append(im)
    if arrays:
        out.inputs = stack_inputs(arrays, spec)
    out.seconds = time.perf_counter() - started
    return out


def coco_entries(image_id: int, det: Any, category_ids: Sequence[int]) -> list[dict]:
    """COCO result entries of one NmsResult; classes without a category (-1) are dropped."""
    from harness.eval.coco import detections_to_coco

    labels = np.asarray(det.labels)
    keep = np.asarray([category_ids[int(k)] >= 0 for k in labels], dtype=bool)
    entries = detections_to_coco(image_id, np.asarray(det.boxes)[keep],
                                 np.asarray(det.scores)[keep], labels[keep], category_ids)
    for e in entries:  # shorter JSON; far below anything COCOeval can tell apart
        e["bbox"] = [round(v, BOX_DECIMALS) for v in e["bbox"]]
        e["score"] = round(e["score"], SCORE_DECIMALS)
    return entries


_PROCESS_POOLS: dict[int, Any] = {}


def reader_pool(workers: int) -> Any:
    """A pool of `workers` processes that read and preprocess, kept for the life of the
    process (a pass of a few hundred images on a fast GPU is shorter than starting them).
    Spawned, not forked: the parent may hold a CUDA context, which a fork cannot share."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = _PROCESS_POOLS.get(workers)
    if pool is not None and getattr(pool, "_broken", False):  # a worker died: start anew
        pool = None
    if pool is None:
        pool = _PROCESS_POOLS[workers] = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_reader_started)
    return pool


def _reader_started() -> None:
    import importlib

    import cv2

    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would fight it
    importlib.import_module("harness.data.preprocess")  # once, not with the first batch


def _started(_: int) -> bool:
    return True


def default_workers() -> int:
    """Threads per pool: the usable cores less the inference thread, at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores - 1))


def reference_records(image_id: int, det: Any, ref: Any,
                      category_ids: Sequence[int]) -> dict[str, Any]:
    """What a row with a ΔAP split stores beside its detections `det`, from its
    delta_ap.ReferenceNms `ref`: `reference_nms` (its candidates through the reference's NMS)
    and `nms_causes` (per entry of each list, its mismatch cause or None)."""
    from harness.eval.delta_ap import entry_causes

    return {"reference_nms": coco_entries(image_id, ref.result, category_ids),
            "nms_causes": {
                "detections": entry_causes(det, ref.target_causes, category_ids),
                "reference_nms": entry_causes(ref.result, ref.reference_causes, category_ids)}}


def _put(q: "queue.Queue[Any]", item: Any, stop: threading.Event) -> bool:
    """Put unless `stop` is set first (so no thread blocks forever on a full queue)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _concatenated(outputs: Sequence[Any], post: Callable[..., Any]) -> Optional[dict[str, Any]]:
    """The batches' outputs joined along the batch axis, or None where they cannot be: one
    batch; a `post` that does not say its outputs are batch-major (`post.can_join(outputs)`:
    an ONNX NonMaxSuppression's selected_indices (K, 3) carry batch numbers instead); other
    names or shapes beyond the batch axis; not numpy."""
    can_join = getattr(post, "can_join", None)
    if len(outputs) < 2 or can_join is None or not all(isinstance(o, dict) for o in outputs) \
            or not all(can_join(o) for o in outputs):
        return None
    names = list(outputs[0])
    joined = {}
    for name in names:
        parts = [o.get(name) for o in outputs]
        if not all(isinstance(v, np.ndarray) and v.ndim >= 1 for v in parts) or \
                len({v.shape[1:] for v in parts}) != 1 or \
                any(set(o) != set(names) for o in outputs):
            return None
        joined[name] = np.concatenate(parts, axis=0)
    return joined


def _get_nowait(q: "queue.Queue[Any]") -> Any:
    try:
        return q.get_nowait()
    except queue.Empty:
        return None


def _get(q: "queue.Queue[Any]", stop: threading.Event) -> Any:
    while True:
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            if stop.is_set():
                return None


def run_pass(images: Sequence[Any], batch_size: int, spec: Any,
             infer: Callable[[np.ndarray, Sequence[Any]], Any],
             post: Callable[[Any, Sequence[Any]], list],
             category_ids: Sequence[int], store: Any, *,
             sync: Optional[Callable[[], None]] = None, desc: Optional[str] = None,
             progress: bool = True, on_batch: Optional[Callable[[int], None]] = None,
             warn: Optional[Callable[[str], None]] = None,
             post_reference: Optional[Callable[[Any, Sequence[Any], np.ndarray], list]] = None,
             shard: tuple[int, int] = (0, 1), workers: Optional[int] = None,
             processes: bool = False, post_group: int = POST_GROUP_IMAGES) -> PassTimes:
    """Run every batch of `images` (SplitImage) not yet in `store` (RunStore).

    infer(inputs (B,3,H,W) float32, metas) → outputs; post(outputs, metas) → per image
    NmsResult, image by image (a post with `can_join(outputs) -> True` gets several
    batches' outputs joined on the batch axis, `post_group` images at a time);
    post_reference(outputs, metas, inputs) → per image a delta_ap.ReferenceNms (a file with
    its own NMS: its candidates through the reference's NMS, and the mismatch causes),
    stored beside the detections (reference_records);
    sync: device synchronisation around inference (GPU). on_batch(batches stored so far) is
    called after each batch is safely on disk (tests use it to interrupt a run).
    shard (rank, world): this process runs batches k with k % world == rank only (batches
    are planned on the whole of `images`, so every batch is the one a single process runs).
    workers: threads reading ahead, and threads post-processing (default_workers()).
    processes: read and preprocess in `workers` processes instead (reader_pool), which the
    GIL does not bind; worth it where the backend is fast enough to wait for the host (GPU).
    post_group: images gathered per post-processing call (1: every batch on its own).
    """
    from tqdm import tqdm

    clock = time.perf_counter
    n_workers = workers or default_workers()
    if processes:  # started (once per process) before the pass is timed, like the model
        readers = reader_pool(n_workers)
        list(readers.map(_started, range(n_workers)))
    else:
        readers = ThreadPoolExecutor(n_workers, thread_name_prefix="coco-read")
    posters = ThreadPoolExecutor(n_workers, thread_name_prefix="coco-post")
    started = clock()
    times = PassTimes()
    rank, world = shard
    mine = [b for k, b in enumerate(plan_batches(images, batch_size)) if k % world == rank]
    todo = [b for b in mine if not all(store.done(im.image_id) for im in b)]
    times.skipped = sum(len(b) for b in mine) - sum(len(b) for b in todo)
    say = warn or (lambda m: tqdm.write(f"warning: {m}", file=sys.stderr))
    bar = tqdm(total=sum(len(b) for b in mine), initial=times.skipped, unit="img", desc=desc,
               disable=not progress, leave=False, dynamic_ncols=True)
    stop = threading.Event()
    ready: "queue.Queue[Any]" = queue.Queue(maxsize=QUEUE_DEPTH)
    inferred: "queue.Queue[Any]" = queue.Queue(maxsize=QUEUE_DEPTH)
    errors: list[BaseException] = []

    def read_ahead() -> None:
        # batches prepared in parallel, handed on in order; at most n_workers in flight
        pending: "collections.deque[Future]" = collections.deque()
        chunks = iter(todo)
        try:
            while True:
                while len(pending) < n_workers and not stop.is_set():
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    pending.append(readers.submit(prepare_batch, chunk, spec))
                if not pending or stop.is_set():
                    break
                if not _put(ready, pending.popleft().result(), stop):
                    return
        except BaseException as exc:  # handed to the main thread, which raises it
            _put(ready, _Failure(exc), stop)
            return
        _put(ready, None, stop)

    def post_batches(group: list[tuple[_Prepared, Any]]) -> list[tuple[Any, Any, float]]:
        """(detections, reference-NMS results, seconds) per batch of `group`, post-processed
        in one call where the batches' outputs can be concatenated."""
        t0 = clock()
        joined = _concatenated([outputs for _, outputs in group], post)
        if joined is not None:
            dets = post(joined, [m for prepared, _ in group for m in prepared.metas])
            per_batch, at = [], 0
            for prepared, _ in group:
                per_batch.append(dets[at:at + len(prepared.metas)])
                at += len(prepared.metas)
        else:
            per_batch = [post(outputs, prepared.metas) for prepared, outputs in group]
        share = (clock() - t0) / sum(len(prepared.metas) for prepared, _ in group)
        out = []
        for (prepared, outputs), dets in zip(group, per_batch):
            refs = None if post_reference is None else \
                post_reference(outputs, prepared.metas, prepared.inputs)
            out.append((dets, refs, share * len(prepared.metas)))
        return out

    def write_behind() -> None:
        # inferred batches gathered into groups of `post_group` images, each group
        # post-processed by a worker (up to n_workers groups at once), the batches written in
        # arrival (= batch) order as each oldest one is done
        stored = 0
        # (prepared, infer_s, group job or None, index in the group)
        pending: "collections.deque[tuple[Any, float, Optional[Future], int]]" = \
            collections.deque()
        gathering: list[tuple[Any, Any, float]] = []
        finished = False

        def submit() -> None:
            if not gathering:
                return
            job = posters.submit(post_batches, [(p, o) for p, o, _ in gathering])
            for k, (prepared, _, infer_s) in enumerate(gathering):
                pending.append((prepared, infer_s, job, k))
            gathering.clear()

        def take(item: Any) -> None:
            prepared, outputs, infer_s = item
            if outputs is None:  # nothing readable in the batch: nothing to post-process
                submit()
                pending.append((prepared, infer_s, None, 0))
                return
            gathering.append((prepared, outputs, infer_s))
            if sum(len(p.metas) for p, _, _ in gathering) >= post_group:
                submit()

        try:
            while not errors and (pending or gathering or not finished):
                if stop.is_set() and not finished:
                    # interrupted or failed: write what inference already produced, no more
                    while (item := _get_nowait(inferred)) is not None:
                        take(item)
                    finished = True
                if finished:
                    submit()
                oldest_done = pending and (pending[0][2] is None or pending[0][2].done())
                groups_running = len({id(job) for _, _, job, _ in pending if job is not None})
                if not oldest_done and not finished and groups_running < n_workers:
                    try:
                        item = inferred.get(timeout=POLL_S)
                    except queue.Empty:
                        continue
                    if item is None:
                        finished = True
                    else:
                        take(item)
                    continue
                if not pending:
                    continue
                prepared, infer_s, job, k = pending.popleft()
                t0 = clock()
                records = []
                for im, reason in prepared.unreadable:
                    say(f"skipping unreadable image {im.file_name} (id {im.image_id}): {reason}")
                    records.append({"image_id": im.image_id, "file": im.file_name,
                                    "unreadable": reason})
                if job is not None:
                    n = len(prepared.images)
                    dets, refs, post_s = job.result()[k]
                    ms = {"preprocess": prepared.seconds / n * 1e3, "infer": infer_s / n * 1e3,
                          "post": post_s / n * 1e3}
                    for i, (im, det) in enumerate(zip(prepared.images, dets)):
                        records.append({"image_id": im.image_id, "file": im.file_name,
                                        "detections": coco_entries(im.image_id, det,
                                                                   category_ids),
                                        "ms": {k: round(v, 4) for k, v in ms.items()}})
                        if refs is not None:
                            records[-1].update(reference_records(im.image_id, det, refs[i],
                                                                 category_ids))
                store.append_images(records)
                times.post_s += clock() - t0 + (post_s if job is not None else 0.0)
                times.preprocess_s += prepared.seconds
                times.images += len(prepared.images)
                times.unreadable += len(prepared.unreadable)
                times.batches += 1
                stored += 1
                bar.update(len(prepared.images) + len(prepared.unreadable))
                if on_batch is not None:
                    on_batch(stored)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    reader = threading.Thread(target=read_ahead, name="coco-read-ahead", daemon=True)
    writer = threading.Thread(target=write_behind, name="coco-write-behind", daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, SWITCH_INTERVAL_S))
    reader.start()
    writer.start()
    try:
        while not errors:
            item = _get(ready, stop)
            if item is None:
                break
            if isinstance(item, _Failure):
                raise item.error
            outputs, infer_s = None, 0.0
            if item.inputs is not None:
                if sync:
                    sync()
                t0 = clock()
                outputs = infer(item.inputs, item.metas)
                if sync:
                    sync()
                infer_s = clock() - t0
                times.infer_s += infer_s
            if not _put(inferred, (item, outputs, infer_s), stop):
                break
        _put(inferred, None, stop)
        writer.join()
        if errors:
            raise errors[0]
    finally:
        # Interrupted or failed: stop reading ahead, let the writer finish the batch it holds
        # (so the file ends on a whole line), and leave.
        stop.set()
        writer.join(timeout=60)
        reader.join(timeout=5)
        if not processes:
            readers.shutdown(wait=False, cancel_futures=True)
        posters.shutdown(wait=False, cancel_futures=True)
        sys.setswitchinterval(switch)
        bar.close()
    times.wall_s = clock() - started
    return times
