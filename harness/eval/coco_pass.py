"""One configuration's pass over a COCO split, with inference on the critical path: batches
are read and preprocessed by a pool of threads ahead of the backend (OpenCV's decode and
resize and numpy's large operations release the GIL, so they run in parallel), and decoded +
NMS'd by a second pool behind it, then written to the RunStore in batch order, while the
calling thread only runs inference. On a fast GPU the host must do better than one
interpreter can (H200, fixture: wall / inference 1.8–6.7 at batch 4 with one reader and one
post-processor): there reading and encoding the stored records run in processes
(harness.eval.pass_processes), the first images are read one job each (the fill), the fast
post replays CUDA graphs batch by batch (harness.eval.coco_graphs), and the last stretch is
post-processed as soon as no call runs, or, where a call would not end before inference
does, in one call after the last inference (the drain). `workers` sets the
pools' size. With `warmup` the backend and the post run once on blank images before the
pass's clock starts (harness.eval.pass_warmup), the readers already at work.

Batches are fixed by position in the split (batch k holds images k*B .. k*B+B-1, unreadable
ones left out), so a resumed run feeds the backend the very same batches as an uninterrupted
one; a batch already stored is not run again and no image is written twice.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from harness.errors import UserError

QUEUE_DEPTH = 2  # batches prepared ahead / waiting for post-processing, beyond the workers
# reading in processes, the pass's first FILL_ROUNDS * workers images are read one job each
# (the batches after them one job per batch: a job costs the submitting thread ~0.2 ms), so
# the first batches come as soon as one image is read, not four (H200, onnxruntime batch 4:
# two rounds 1.17, one 1.22 wall / inference)
FILL_ROUNDS = 2
# and a batch after them is read by one process with this many threads side by side, so it
# comes after about one image's time, not four: read by one thread, the first whole batches
# came 12-20 ms after the fill's and inference sat idle 4-9 ms for them (H200, onnxruntime
# batch 4, 200 images: 1.15 wall / inference with 1 thread, 1.08-1.10 with 4)
READ_THREADS = 4
MAX_WORKERS = 8  # per pool, by default: enough for the H200 at batch 4 (bench_coco_overhead)
# post-processing runs on groups of at least this many images (several inference batches
# concatenated), so its fixed per-call cost — ~690 aten ops, 13 device syncs, 4-5 ms alone on
# the H200 on the eager fast path (experiments/bench_fast_post.py) — is shared; a post that
# says otherwise (`post.post_group`: replayed CUDA graphs, coco_graphs.GRAPH_GROUP_IMAGES)
# gets that many
POST_GROUP_IMAGES = 16
# During a pass the interpreter hands the GIL over after this long instead of 5 ms: the
# inference thread re-takes it after every kernel launch / session.run, and with busy worker
# threads waiting out 5 ms each time cost PyTorch CUDA 2.6x its inference at batch 4 (H200)
SWITCH_INTERVAL_S = 0.0002
# and this where reading and encoding run in processes (GPU rows): the interpreter's threads
# are then inference, post calls and the writer, short steps between waits, and at 0.05 ms the
# post's calls queue behind one another less (H200, onnxruntime b4, 200 images, side by side
# on two machines: 1.083 / 1.095, 1.128 / 1.163, 1.082 / 1.095 wall / inference at 0.05 /
# 0.2 ms; on 2 CPU cores with threads no better)
PROCESSES_SWITCH_INTERVAL_S = 0.00005
POLL_S = 0.1
WAKE_S = 0.002  # the writer's wait for a new batch while others are being post-processed
# at the pass's end (nothing more to come from inference) the last batches holding at most this
# many images are encoded in the writer thread while the encoders take the rest: 4 images took
# it 2.2 ms on the H200 before their detections were formatted at once (coco_entries_json,
# 2-4x faster), a round trip through the encoders' pool 5-7 ms. Only the last batch's: with
# 8, the writer encoding the one before it took the GIL from the last post calls, which the
# pass waits for (H200, onnxruntime b4, 200 images: 1.163 / 1.095 with 8 / 4 images,
# 1.128 / 1.082 at PROCESSES_SWITCH_INTERVAL_S)
LOCAL_ENCODE_IMAGES = 4
# a post-processing call running beside inference takes this many times its mean (its device
# syncs wait behind the inference's kernels: H200, onnxruntime batch 4, 11.9 ms where alone
# it takes 4.3): in the last stretch a call is made only if it can end before inference does
POST_OVERLAP_COST = 2.0
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
    # inference waiting: for the next batch to be read / for room behind it (post-processing
    # and writing not keeping up) — which side binds a host-bound pass
    wait_read_s: float = 0.0
    wait_post_s: float = 0.0
    first_infer_s: float = 0.0  # from the pass's start to its first inference (the fill)
    # run_pass(warmup=True): the warm-up call's seconds, and from the readers' start to the
    # pass's: how much of the fill that call overlapped (the blank batch is made before)
    warmup_s: float = 0.0
    head_s: float = 0.0
    after_infer_s: float = 0.0  # from its last inference to its end (the drain)
    # the drain in its parts, from the last inference: to the end of the last
    # post-processing call, to the start of the last write, to its end
    drain_parts_s: dict[str, float] = field(default_factory=dict)
    # run_pass(timeline=True): per batch (in pass order) its stages' (start, end) in seconds
    # from the pass's start — "read" (in its worker), "handed" (read submitted → handed to
    # inference), "infer", "post", "write" — where the fill, ramp and drain go
    timeline: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)
    # and per batch read image by image (the fill), each image's read (start, end) likewise
    read_parts: dict[int, list[tuple[float, float]]] = field(default_factory=dict)

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
    slot: Optional[int] = None  # read in a process: the InputSlots slot it was given
    slot_shape: Optional[tuple[int, ...]] = None  # the inputs' shape, where they are there
    read_at: float = 0.0  # perf_counter at its reading's start (the same clock in every process)
    index: int = -1  # its place in the pass (timeline)


@dataclass
class _Reading:
    """A batch being read: one job, or (into a slot, image by image) a job per image in
    batch order; `slot` None where it is read in a thread."""

    jobs: list[Future]
    chunk: list[Any]
    slot: Optional[int] = None
    submitted: float = 0.0
    index: int = -1


@dataclass
class _Failure:
    error: BaseException


def plan_batches(images: Sequence[Any], batch_size: int) -> list[list[Any]]:
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    return [list(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def prepare_batch(chunk: Sequence[Any], spec: Any, pool: Optional[Any] = None,
                  into: Optional[Callable[[tuple[int, ...]], Optional[np.ndarray]]] = None
                  ) -> _Prepared:
    """Read and preprocess a batch's images; an unreadable one is set aside with the reason.
    pool: an executor whose threads read the images side by side (OpenCV's decode and resize
    release the GIL), so the batch takes about as long as its slowest image. into(shape):
    where to stack the batch (a reader's shared-memory slot), or None for a new array."""
    started = time.perf_counter()
    out = _Prepared(images=[])
    arrays = []
    read = [read_one(im, spec) for im in chunk] if pool is None or len(chunk) < 2 else \
        list(pool.map(read_one, chunk, [spec] * len(chunk)))
    for im, done in zip(chunk, read):
        if isinstance(done, str):
            out.unreadable.append((im, done))
            continue
        x, meta = done
        arrays.append(x)
        out.metas.append(meta)
        out.images.append(im)
    if arrays:
        from harness.data.preprocess import stack_inputs, stacked_shape

        where = into(stacked_shape(arrays, spec)) if into is not None else None
        out.inputs = stack_inputs(arrays, spec, out=where)
    out.seconds = time.perf_counter() - started
    out.read_at = started
    return out


def read_one(im: Any, spec: Any) -> Any:
    """One image (SplitImage) read and preprocessed: (input, meta), or why it is unreadable."""
    from harness.data.preprocess import read_image, transform_image

    try:
        return transform_image(read_image(im.path), spec, str(im.path),
                               getattr(im, "batch_shape", None))
    except UserError as exc:
        return str(exc)


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


# one COCO result entry as coco_entries gives it, json.dumps'd: "%.3f" is the correctly rounded
# decimal that round(v, 3) stands for, so both parse to the same float
_ENTRY = ('%d,"bbox":[%.{b}f,%.{b}f,%.{b}f,%.{b}f],"score":%.{s}f}}'
          .format(b=BOX_DECIMALS, s=SCORE_DECIMALS))


def coco_entries_json(image_id: int, det: Any, category_ids: Sequence[int]) -> str:
    """coco_entries(image_id, det, category_ids) as the JSON text of its list, made about 4x
    faster (formatted all at once, no dict per entry) — it is what the encoders spend their
    time on, and at the pass's end what the pass waits for; it parses to the same entries
    (tests/eval/test_coco_pass.py). Non-finite values are left to json.dumps."""
    labels = np.asarray(det.labels, dtype=np.int64)
    cats = np.asarray(category_ids, dtype=np.int64)[labels] if len(labels) else labels
    keep = cats >= 0
    boxes = np.asarray(det.boxes, dtype=np.float64)[keep].reshape(-1, 4)
    scores = np.asarray(det.scores, dtype=np.float64)[keep]
    x1, y1 = boxes[:, 0], boxes[:, 1]
    values = np.column_stack([x1, y1, boxes[:, 2] - x1, boxes[:, 3] - y1, scores])
    if not np.isfinite(values).all():
        return json.dumps(coco_entries(image_id, det, category_ids), separators=(",", ":"))
    head = '{"image_id":%d,"category_id":' % int(image_id)
    # one format for all the entries (1.25x faster than one per entry): the category as the
    # first value of each row, %d of a float that holds an integer exactly
    values = np.column_stack([cats[keep], values]).ravel().tolist()
    return "[" + ",".join([head + _ENTRY] * (len(values) // 6)) % tuple(values) + "]"


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
    delta_ap.ReferenceNms `ref`: `reference_nms` (its candidates through the reference's NMS),
    `nms_causes` (per entry of each list, its mismatch cause or None) and, where checked,
    `reference_replay_agrees` (the candidates through the file's own NMS gave `det`)."""
    from harness.eval.delta_ap import entry_causes

    out = {"reference_nms": coco_entries(image_id, ref.result, category_ids),
           "nms_causes": {
               "detections": entry_causes(det, ref.target_causes, category_ids),
               "reference_nms": entry_causes(ref.result, ref.reference_causes, category_ids)}}
    if ref.replay_agrees is not None:
        out["reference_replay_agrees"] = ref.replay_agrees
    return out


def image_lines(images: Sequence[tuple[int, str]], dets: Sequence[Any], ms: dict[str, float],
                category_ids: Sequence[int], refs: Optional[Sequence[Any]] = None
                ) -> list[bytes]:
    """The RunStore lines (kind "image") of a batch's images ((image_id, file) pairs) from
    their detections, the per-image share of its timings and, for a ΔAP split, their
    delta_ap.ReferenceNms (reference_records); the same in the writer and in an encoder."""
    from harness.eval.store import image_line

    lines = []
    for i, ((image_id, file_name), det) in enumerate(zip(images, dets)):
        # image_line({"image_id", "file", "detections", "ms", ...}), the detections' text
        # made by coco_entries_json
        head = image_line({"image_id": image_id, "file": file_name})
        rest = {"ms": ms}
        if refs is not None:
            rest.update(reference_records(image_id, det, refs[i], category_ids))
        lines.append(b"".join([
            head[:-2], b',"detections":',
            coco_entries_json(image_id, det, category_ids).encode(), b",",
            json.dumps(rest, separators=(",", ":")).encode()[1:], b"\n"]))
    return lines


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
             post_reference: Optional[Callable[[Any, Sequence[Any], np.ndarray, list],
                                               list]] = None,
             shard: tuple[int, int] = (0, 1), workers: Optional[int] = None,
             processes: bool = False, post_group: Optional[int] = None,
             timeline: bool = False, warmup: bool = False) -> PassTimes:
    """Run every batch of `images` (SplitImage) not yet in `store` (RunStore).

    infer(inputs (B,3,H,W) float32, metas) → outputs; post(outputs, metas) → per image
    NmsResult, image by image (a post with `can_join(outputs) -> True` gets several
    batches' outputs joined on the batch axis, `post_group` images at a time);
    post_reference(outputs, metas, inputs, the batch's detections) → per image a
    delta_ap.ReferenceNms (a file with its own NMS: its candidates through the reference's
    NMS, and the mismatch causes), stored beside the detections (reference_records);
    sync: device synchronisation around inference (GPU). on_batch(batches stored so far) is
    called after each batch is safely on disk (tests use it to interrupt a run).
    shard (rank, world): this process runs batches k with k % world == rank only (batches
    are planned on the whole of `images`, so every batch is the one a single process runs).
    workers: threads reading ahead, and threads post-processing (default_workers()).
    processes: read and preprocess in `workers` processes instead, the inputs handed over in
    shared memory, and encode the stored records in a second small pool
    (harness.eval.pass_processes), which the GIL does not bind; worth it where the backend is
    fast enough to wait for the host (GPU).
    post_group: images gathered per post-processing call (1: every batch on its own;
    default: the post's own `post_group` where it has one, else POST_GROUP_IMAGES).
    timeline: record each batch's stages in times.timeline (benchmarks).
    warmup: before the pass is timed, run infer and post once on blank images of the first
    batch's sizes (harness.eval.pass_warmup: a backend's and a CUDA graph's one-time set-up
    kept out of the pass's figures), while the readers already read the first batches; the
    pass's clock starts after it (times.head_s: how long the readers had).
    """
    from tqdm import tqdm

    from harness.eval import pass_processes as pp
    from harness.eval.store import image_line

    clock = time.perf_counter
    post_group = post_group or getattr(post, "post_group", None) or POST_GROUP_IMAGES
    n_workers = workers or default_workers()
    slots, free_slots, encoders, n_encoders = None, None, None, 0
    if processes:  # started (once per process) before the pass is timed, like the model
        readers = pp.process_pool(n_workers, "read")
        n_encoders = max(1, min(4, n_workers // 2))
        encoders = pp.process_pool(n_encoders, "encode")
        pp.warm(readers, n_workers)
        pp.warm(encoders, n_encoders)
        slots = pp.input_slots(n_workers + QUEUE_DEPTH + 3, pp.slot_capacity(batch_size, spec),
                               readers, n_workers)
        free_slots = queue.Queue()
        for k in range(slots.count):
            free_slots.put(k)
    else:
        readers = ThreadPoolExecutor(n_workers, thread_name_prefix="coco-read")
    posters = ThreadPoolExecutor(n_workers, thread_name_prefix="coco-post")
    started = clock()  # (with a warm-up: after it)
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
    # clocks, for the drain; and each post-processing call's seconds
    marks: dict[str, Any] = {"post_end": 0.0, "write_start": 0.0, "write_end": 0.0,
                             "post_calls": []}

    def mark(prepared: _Prepared, stage: str, start: float, end: float) -> None:
        if timeline:  # on the clock; made relative to the pass's start at its end
            times.timeline.setdefault(prepared.index, {})[stage] = (start, end)

    def submit_read(chunk: list[Any], by_image: bool = False) -> Optional[_Reading]:
        """The reading of `chunk`: by one job, or (by_image, in processes) by one job per
        image, each writing into its place of the batch's slot: the pass's first batches,
        which inference waits for with nothing to do (a batch of 4 read by one process:
        12 ms)."""
        if slots is None:
            return _Reading([readers.submit(prepare_batch, chunk, spec)], chunk,
                            submitted=clock())
        slot = _get(free_slots, stop)  # a slot comes back as each batch is inferred
        if slot is None:
            return None
        images = [[im] for im in chunk] if by_image and len(chunk) > 1 else [chunk]
        return _Reading([readers.submit(pp.prepare_into, part, spec, slots.path, slot,
                                        slots.capacity, i, READ_THREADS)
                         for i, part in enumerate(images)], chunk, slot, clock())

    def received(reading: _Reading) -> _Prepared:
        parts = [job.result() for job in reading.jobs]
        spans = [(p.read_at, p.read_at + p.seconds) for p in parts]  # (before they are joined)
        read_span = (min(a for a, _ in spans), max(b for _, b in spans))
        prepared = parts[0] if len(parts) == 1 else pp.join_parts(parts)
        if prepared is None:  # the images did not stack in place: read whole, same slot
            prepared = readers.submit(pp.prepare_into, reading.chunk, spec, slots.path,
                                      reading.slot, slots.capacity).result()
        if reading.slot is not None:
            prepared.slot = reading.slot
            if prepared.slot_shape is not None:
                prepared.inputs = slots.view(prepared.slot, prepared.slot_shape)
            else:  # nothing readable, or too large for a slot: came through the pipe
                release(prepared)
        prepared.index = reading.index
        mark(prepared, "read", *read_span)
        if timeline and len(spans) > 1:
            times.read_parts[reading.index] = spans
        mark(prepared, "handed", reading.submitted, clock())
        return prepared

    def release(prepared: _Prepared) -> None:
        """Give the batch's slot back once inference has taken its inputs (a copy kept where
        the reference NMS of a ΔAP split still needs them)."""
        if prepared.slot is None:
            return
        if prepared.slot_shape is not None:
            prepared.inputs = None if post_reference is None else np.array(prepared.inputs)
        free_slots.put(prepared.slot)
        prepared.slot = None

    def read_ahead() -> None:
        # batches prepared in parallel, handed on in order; at most n_workers in flight
        pending: "collections.deque[_Reading]" = collections.deque()
        chunks = iter(todo)
        by_image = FILL_ROUNDS * n_workers  # the first images, one job each
        index = 0
        try:
            while True:
                while len(pending) < n_workers and not stop.is_set():
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    job = submit_read(chunk, by_image=by_image > 0)
                    by_image -= len(chunk)
                    if job is None:
                        return
                    job.index, index = index, index + 1
                    pending.append(job)
                if not pending or stop.is_set():
                    break
                if not _put(ready, received(pending.popleft()), stop):
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
        end = clock()
        share = (end - t0) / sum(len(prepared.metas) for prepared, _ in group)
        out = []
        for (prepared, outputs), dets in zip(group, per_batch):
            mark(prepared, "post", t0, end)
            refs = None if post_reference is None else \
                post_reference(outputs, prepared.metas, prepared.inputs, dets)
            out.append((dets, refs, share * len(prepared.metas)))
        marks["post_end"] = max(marks["post_end"], clock())
        marks["post_calls"].append(end - t0)
        return out

    def encode(done: list[tuple[_Prepared, float, Optional[tuple]]],
               last: bool = False) -> list[tuple]:
        """Per batch of `done` ((prepared, infer seconds, its post result or None): batches
        whose post-processing ended together, in order): (lines of its unreadable images,
        its detection lines — or (one job encoding them all in a process, index) —, post
        seconds). last: nothing more comes from inference — the last LOCAL_ENCODE_IMAGES
        images are encoded here, while the encoders take the rest."""
        here = [encoders is None or (result is not None and result[1] is not None)
                for _, _, result in done]
        if last:
            left = LOCAL_ENCODE_IMAGES
            for k in reversed(range(len(done))):
                left -= len(done[k][0].images)
                if left < 0:
                    break
                here[k] = True
        out, jobs, local = [], [], []
        for k, (prepared, infer_s, result) in enumerate(done):
            first = []
            for im, reason in prepared.unreadable:
                say(f"skipping unreadable image {im.file_name} (id {im.image_id}): {reason}")
                first.append((im.image_id, image_line({"image_id": im.image_id,
                                                       "file": im.file_name,
                                                       "unreadable": reason})))
            if result is None:
                out.append((first, [], 0.0))
                continue
            dets, refs, post_s = result
            n = len(prepared.images)
            ms = {"preprocess": prepared.seconds / n * 1e3, "infer": infer_s / n * 1e3,
                  "post": post_s / n * 1e3}
            ms = {key: round(v, 4) for key, v in ms.items()}
            if here[k]:
                local.append((k, prepared, dets, refs, ms))
                out.append((first, None, post_s))
            else:
                jobs.append(([(im.image_id, im.file_name) for im in prepared.images],
                             pp.detections_payload(dets), ms))
                out.append((first, len(jobs) - 1, post_s))
        if jobs:  # spread over the encoders: the last ones are on the pass's critical path
            parts = np.array_split(np.arange(len(jobs)), min(n_encoders, len(jobs)))
            where = {}
            for part in parts:
                job = encoders.submit(pp.encode_batches, [jobs[i] for i in part],
                                      category_ids)
                where.update({int(i): (job, j) for j, i in enumerate(part)})
            out = [(first, where[lines] if isinstance(lines, int) else lines, post_s)
                   for first, lines, post_s in out]
        for k, prepared, dets, refs, ms in local:  # while the encoders work
            pairs = [(im.image_id, im.file_name) for im in prepared.images]
            lines = image_lines(pairs, dets, ms, category_ids, refs)
            out[k] = (out[k][0], [(image_id, line) for (image_id, _), line in
                                  zip(pairs, lines)], out[k][2])
        return out

    def write_behind() -> None:
        # inferred batches gathered into groups of `post_group` images, each group
        # post-processed by a worker (up to n_workers groups at once); each batch's records
        # encoded (in a process where there are encoders) as its group is done, and written
        # in arrival (= batch) order
        stored = 0
        # (prepared, infer_s, group job or None, index in the group)
        pending: "collections.deque[tuple[Any, float, Optional[Future], int]]" = \
            collections.deque()
        # (prepared, unreadable lines, detection lines or (their encoding job, index), post s)
        writing: "collections.deque[tuple[Any, list, Any, float]]" = collections.deque()
        gathering: list[tuple[Any, Any, float]] = []
        finished = False
        to_come = sum(len(b) for b in todo)  # images not yet taken from inference
        taken = 0  # images taken (inferred)

        def submit() -> None:
            if not gathering:
                return
            job = posters.submit(post_batches, [(p, o) for p, o, _ in gathering])
            for k, (prepared, _, infer_s) in enumerate(gathering):
                pending.append((prepared, infer_s, job, k))
            gathering.clear()

        def take(item: Any) -> None:
            nonlocal to_come, taken
            prepared, outputs, infer_s = item
            to_come -= len(prepared.images) + len(prepared.unreadable)
            taken += len(prepared.images)
            if outputs is None:  # nothing readable in the batch: nothing to post-process
                submit()
                pending.append((prepared, infer_s, None, 0))
                return
            gathering.append((prepared, outputs, infer_s))
            if not to_come or (sum(len(p.metas) for p, _, _ in gathering) >= post_group and
                               (to_come >= post_group or ends_before_inference())):
                submit()  # (the last full group, where it would not end first, joins the last)

        def ends_before_inference() -> bool:
            """Whether a post-processing call made now would end before inference does
            (from the mean call so far, made POST_OVERLAP_COST times longer by the inference
            beside it): one that does not slows the last call, which the pass waits for —
            the calls share the interpreter and the device. Only for a post that joins
            batches into one call (its cost is per call); another's is per batch, and
            holding batches back would only leave more to do at the end."""
            calls = marks["post_calls"]
            can_join = getattr(post, "can_join", None)
            if not calls or not taken or can_join is None or \
                    not all(can_join(outputs) for _, outputs, _ in gathering):
                return True
            return to_come * times.infer_s / taken > POST_OVERLAP_COST * sum(calls) / len(calls)

        def last_stretch_idle() -> bool:
            """In the last stretch (fewer images to come than a group) what has gathered
            goes as soon as no group is running — a group waiting to fill there waits for
            the end of inference, and the pass with it; one call per batch would queue up
            behind each other (the fast path's cost is per call, not per image) — if it
            ends before inference does."""
            if not gathering or to_come >= post_group or \
                    any(job is not None and not job.done() for _, _, job, _ in pending):
                return False
            return ends_before_inference()

        def write_ready() -> None:
            """Write every batch at the front of `writing` whose lines are there, in one
            write (one fsync); then count them, batch by batch."""
            nonlocal stored
            t0 = clock()
            batches, lines = [], []
            while ready_to_write():
                prepared, first, mine, post_s = writing.popleft()
                if isinstance(mine, tuple):
                    job, k = mine
                    mine = list(zip((im.image_id for im in prepared.images), job.result()[k]))
                lines += first + mine
                batches.append((prepared, post_s))
            marks["write_start"] = clock()
            store.append_encoded(lines)
            marks["write_end"] = clock()
            share = (clock() - t0) / len(batches)
            for prepared, post_s in batches:
                mark(prepared, "write", marks["write_start"], marks["write_end"])
                times.post_s += share + post_s
                times.preprocess_s += prepared.seconds
                times.images += len(prepared.images)
                times.unreadable += len(prepared.unreadable)
                times.batches += 1
                stored += 1
                bar.update(len(prepared.images) + len(prepared.unreadable))
                if on_batch is not None:
                    on_batch(stored)

        def ready_to_write() -> bool:
            return bool(writing) and (not isinstance(writing[0][2], tuple) or
                                      writing[0][2][0].done())

        try:
            while not errors and (pending or gathering or writing or not finished):
                if stop.is_set() and not finished:
                    # interrupted or failed: write what inference already produced, no more
                    while (item := _get_nowait(inferred)) is not None:
                        take(item)
                    finished = True
                if finished or last_stretch_idle():
                    submit()
                if ready_to_write():
                    write_ready()
                    continue
                if pending and (pending[0][2] is None or pending[0][2].done()):
                    # the oldest batch and those post-processed with it, encoded together
                    done, job = [], pending[0][2]
                    while pending and pending[0][2] is job:
                        prepared, infer_s, _, k = pending.popleft()
                        done.append((prepared, infer_s, None if job is None else
                                     job.result()[k]))
                    t0 = clock()
                    encoded = encode(done, last=not to_come)
                    share = (clock() - t0) / len(done)
                    for (prepared, _, _), (first, lines, post_s) in zip(done, encoded):
                        writing.append((prepared, first, lines, post_s + share))
                    continue
                groups_running = len({id(job) for _, _, job, _ in pending if job is not None})
                if not finished and groups_running < n_workers:
                    try:  # short waits while work is in flight: its end wakes nobody
                        item = inferred.get(timeout=WAKE_S if pending or writing else POLL_S)
                    except queue.Empty:
                        continue
                    if item is None:
                        finished = True
                    else:
                        take(item)
                    continue
                if writing:  # nothing else to do: wait for the oldest batch's encoding
                    wait([writing[0][2][0]], timeout=POLL_S)
                elif pending:
                    wait([pending[0][2]], timeout=POLL_S)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    reader = threading.Thread(target=read_ahead, name="coco-read-ahead", daemon=True)
    writer = threading.Thread(target=write_behind, name="coco-write-behind", daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, PROCESSES_SWITCH_INTERVAL_S if processes
                              else SWITCH_INTERVAL_S))
    blank = None
    if warmup and todo:  # made before the readers start: only the warm-up's call overlaps them
        from harness.eval.pass_warmup import blank_batch, warm_up

        blank = blank_batch(todo[0], spec)
    reads_started = clock()
    reader.start()
    writer.start()
    last_infer, clean = 0.0, False
    try:
        if blank is not None:
            times.warmup_s = warm_up(blank, infer, post, sync, calls=n_workers)
            started = clock()
            times.head_s = started - reads_started
        while not errors:
            t0 = clock()
            item = _get(ready, stop)
            times.wait_read_s += clock() - t0
            if item is None:
                break
            if isinstance(item, _Failure):
                raise item.error
            outputs, infer_s = None, 0.0
            if item.inputs is not None:
                if sync:
                    sync()
                t0 = clock()
                if not times.first_infer_s:
                    times.first_infer_s = t0 - started
                outputs = infer(item.inputs, item.metas)
                if sync:
                    sync()
                last_infer = clock()
                infer_s = last_infer - t0
                mark(item, "infer", t0, last_infer)
                times.infer_s += infer_s
                release(item)
            t0 = clock()
            if not _put(inferred, (item, outputs, infer_s), stop):
                break
            times.wait_post_s += clock() - t0
        _put(inferred, None, stop)
        writer.join()
        if errors:
            raise errors[0]
        clean = True
    finally:
        # Interrupted or failed: stop reading ahead, let the writer finish the batch it holds
        # (so the file ends on a whole line), and leave.
        stop.set()
        writer.join(timeout=60)
        reader.join(timeout=5)
        if not processes:
            readers.shutdown(wait=False, cancel_futures=True)
        if slots is not None and not clean:  # kept for the next pass unless a reader may
            pp.drop_slots()                   # still be writing into them
        posters.shutdown(wait=False, cancel_futures=True)
        sys.setswitchinterval(switch)
        bar.close()
    times.wall_s = clock() - started
    times.timeline = {k: {stage: (a - started, b - started) for stage, (a, b) in v.items()}
                      for k, v in times.timeline.items()}
    times.read_parts = {k: [(a - started, b - started) for a, b in v]
                        for k, v in times.read_parts.items()}
    if last_infer:
        times.after_infer_s = started + times.wall_s - last_infer
        times.drain_parts_s = {k: round(max(0.0, marks[k] - last_infer), 4)
                               for k in ("post_end", "write_start", "write_end")}
    return times
