"""One configuration's pass over a COCO split, with inference on the critical path: images
are read and preprocessed in a thread ahead of the backend, and decoded + NMS'd + written to
the RunStore in a thread behind it, while the calling thread only runs inference.

Batches are fixed by position in the split (batch k holds images k*B .. k*B+B-1, unreadable
ones left out), so a resumed run feeds the backend the very same batches as an uninterrupted
one; a batch already stored is not run again and no image is written twice.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from harness.errors import UserError

QUEUE_DEPTH = 2  # batches prepared ahead / waiting for post-processing
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


def _put(q: "queue.Queue[Any]", item: Any, stop: threading.Event) -> bool:
    """Put unless `stop` is set first (so no thread blocks forever on a full queue)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


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
             shard: tuple[int, int] = (0, 1)) -> PassTimes:
    """Run every batch of `images` (SplitImage) not yet in `store` (RunStore).

    infer(inputs (B,3,H,W) float32, metas) → outputs; post(outputs, metas) → per image
    NmsResult; post_reference(outputs, metas, inputs) → per image NmsResult of the same
    candidates through the reference's NMS (a file with its own NMS: the ΔAP split), stored
    beside the detections as `reference_nms`;
    sync: device synchronisation around inference (GPU). on_batch(batches stored so far) is
    called after each batch is safely on disk (tests use it to interrupt a run).
    shard (rank, world): this process runs batches k with k % world == rank only (batches
    are planned on the whole of `images`, so every batch is the one a single process runs).
    """
    from tqdm import tqdm

    clock = time.perf_counter
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
        try:
            for chunk in todo:
                if not _put(ready, prepare_batch(chunk, spec), stop):
                    return
        except BaseException as exc:  # handed to the main thread, which raises it
            _put(ready, _Failure(exc), stop)
            return
        _put(ready, None, stop)

    def write_behind() -> None:
        stored = 0
        try:
            while not errors:
                item = _get(inferred, stop)
                if item is None:
                    return
                prepared, outputs, infer_s = item
                t0 = clock()
                records = []
                for im, reason in prepared.unreadable:
                    say(f"skipping unreadable image {im.file_name} (id {im.image_id}): {reason}")
                    records.append({"image_id": im.image_id, "file": im.file_name,
                                    "unreadable": reason})
                if outputs is not None:
                    n = len(prepared.images)
                    dets = post(outputs, prepared.metas)
                    post_s = clock() - t0
                    refs = None if post_reference is None else \
                        post_reference(outputs, prepared.metas, prepared.inputs)
                    ms = {"preprocess": prepared.seconds / n * 1e3, "infer": infer_s / n * 1e3,
                          "post": post_s / n * 1e3}
                    for i, (im, det) in enumerate(zip(prepared.images, dets)):
                        records.append({"image_id": im.image_id, "file": im.file_name,
                                        "detections": coco_entries(im.image_id, det,
                                                                   category_ids),
                                        "ms": {k: round(v, 4) for k, v in ms.items()}})
                        if refs is not None:
                            records[-1]["reference_nms"] = coco_entries(
                                im.image_id, refs[i], category_ids)
                store.append_images(records)
                times.post_s += clock() - t0
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
        bar.close()
    times.wall_s = clock() - started
    return times
