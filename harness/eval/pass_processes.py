"""The parts of a COCO pass that run in other processes on a GPU row, where the host must keep
up with a fast accelerator and one interpreter's GIL cannot: reading + preprocessing, and
turning detections into the JSON lines the RunStore writes.

Measured on 2 cores (fixture, 320x320): a batch of 4 preprocessed inputs (4.9 MB) returned
through a ProcessPoolExecutor's pipe costs the main process 6.2 ms of CPU — 1.5 ms per
image, more than the H200 takes to infer it — so batches come back through `InputSlots` (a
shared memory file both sides map) and only the image metas are pickled; building and JSON-
encoding an image's ~100 COCO entries costs 0.56 ms of the main interpreter, so
`encode_batches` does that in the pool too.

Pools are spawned, not forked (the parent may hold a CUDA context a fork cannot share), and
kept for the life of the process: a pass of a few hundred images on a fast GPU is shorter
than starting them. So are the slots (`input_slots`): their pages allocated and mapped in
every process before a pass, not faulted in by its first batches — each first use of a
batch's 4.9 MB (fixture, batch 4) costs ~1,200 page faults on both sides.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

# the readers' pool: "executor" (a ProcessPoolExecutor) or "pipes" (pipe_pool.PipePool: a job
# written straight into a worker's pipe, its result read by the thread waiting for it): the
# same on the H200 (onnxruntime b4, 200 images, side by side: 1.092, 1.085, 1.089 / 1.089,
# 1.097, 1.086 wall / inference; experiments/bench_coco_overhead.py --read-pool)
READ_POOL = "executor"
# the readers run this much nicer than the pass's own process: where the host's cores are all
# taken (8 readers of 4 threads and the encoders on the H200's 16), the threads the pass waits
# for (inference's launches and copies, the post's calls) get a core first; reading is
# throughput, ahead of inference by several batches. Not yet told apart from the host's noise
# (H200, three pairs: 1.155, 1.085, 1.094 at 5 / 1.087, 1.094, 1.096 at 0; --read-nice)
READ_NICE = 5
# the readers' allocator keeps the memory they free (glibc: large blocks from the heap, not
# mapped and unmapped each time, and the heap not trimmed), so an image's arrays land on pages
# already there instead of faulting in fresh ones: a reader idle for a second (between a run's
# passes) otherwise took ~260 page faults for its next image, 4.85 against 4.20 ms median
# (H200 host, experiments/bench_fill.py); a whole pass's ratio moved within its noise
READ_KEEP_MEMORY = True
KEEP_MMAP_BELOW = 64 << 20  # blocks under this come from the heap
KEEP_HEAP_UP_TO = 1 << 30  # freed heap memory kept up to this much
_POOLS: dict[tuple[str, int, bool, int, bool], Any] = {}
_MAPPED: dict[str, Any] = {}  # in a worker: the slots file it has mapped (one at a time)
_SLOTS: dict[str, "InputSlots"] = {}  # in the main process: the kept slots ("current")
_READ_THREADS: dict[int, Any] = {}  # in a worker: its reading threads, by count
_AT_EXIT: list[bool] = []  # drop_slots registered to run at exit
SHM_DIR = Path("/dev/shm")
SLOTS_PREFIX = "harness-inputs-"  # then the creating process's id


def process_pool(workers: int, role: str = "read") -> Any:
    """A spawned pool of `workers` processes for `role`, kept for the life of the process and
    started anew when one of its workers died; the readers' a pipe_pool.PipePool where
    READ_POOL says "pipes"."""
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pipes = role == "read" and READ_POOL == "pipes"
    nice = READ_NICE if role == "read" else 0
    keep = READ_KEEP_MEMORY and role == "read"
    key = (role, workers, pipes, nice, keep)
    pool = _POOLS.get(key)
    if pool is not None and getattr(pool, "_broken", False):
        pool = None
    started = functools.partial(_started, nice, keep)
    if pool is None and pipes:
        from harness.eval.pipe_pool import PipePool

        pool = _POOLS[key] = PipePool(workers, initializer=started)
    elif pool is None:
        pool = _POOLS[key] = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=started)
    return pool


def warm(pool: Any, workers: int) -> None:
    """Start every worker of `pool` now (before a pass is timed), not with the first job."""
    list(pool.map(_ready, range(workers)))


def _started(nice: int = 0, keep_memory: bool = False) -> None:
    import importlib

    import cv2

    if keep_memory:
        keep_freed_memory()
    if nice:
        try:
            os.nice(nice)
        except (AttributeError, OSError):  # not on this platform: the same work, less fairly
            pass
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would fight it
    # what the jobs use, imported once here rather than by each worker's first job
    for name in ("harness.data.preprocess", "harness.eval.coco", "harness.eval.coco_pass",
                 "harness.eval.store"):
        importlib.import_module(name)


def _ready(_: int) -> bool:
    return True


def keep_freed_memory() -> bool:
    """Have this process's allocator (glibc's malloc) serve blocks under KEEP_MMAP_BELOW from
    its heap and keep up to KEEP_HEAP_UP_TO of what is freed there, instead of mapping each
    large block anew and giving freed memory back; False where the C library has no mallopt
    (not glibc): the same work, with page faults."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_threshold, KEEP_MMAP_BELOW)) and \
        bool(mallopt(m_trim_threshold, KEEP_HEAP_UP_TO))


def input_slots(count: int, capacity: int, readers: Any, workers: int) -> "InputSlots":
    """`count` slots of `capacity` bytes, kept from one pass to the next while they fit
    (a new file where not), mapped by `readers` (its `workers` processes) before the pass."""
    import atexit

    kept = _SLOTS.get("current")
    if kept is not None and kept.count >= count and kept.capacity == capacity and \
            os.path.exists(kept.path):
        return kept
    drop_slots()
    slots = _SLOTS["current"] = InputSlots(count, capacity)
    if not _AT_EXIT:
        atexit.register(drop_slots)
        _AT_EXIT.append(True)  # registered once (a flag: no reference to dropped slots)
    list(readers.map(_map_in, [slots.path] * workers))
    return slots


def drop_slots() -> None:
    """Remove the kept slots (a pass that did not end cleanly: a reader may still write)."""
    kept = _SLOTS.pop("current", None)
    if kept is not None:
        kept.close()


def _map_in(path: str) -> None:
    _map_slots(path)


def _map_slots(path: str) -> Any:
    mapped = _MAPPED.get(path)
    if mapped is None:
        for old in _MAPPED.values():
            old.close()
        _MAPPED.clear()
        with open(path, "r+b") as f:
            mapped = _MAPPED[path] = _populated_map(f.fileno(), os.fstat(f.fileno()).st_size)
    return mapped


def _populated_map(fd: int, size: int) -> Any:
    """A shared mapping of the file with its page tables filled in now (MAP_POPULATE)."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags)


class InputSlots:
    """`count` slots of `capacity` bytes in one file under /dev/shm (or the temp folder where
    /dev/shm lacks the room) that the main process and the readers both map: a reader writes
    a batch's float32 inputs into the slot it was given, the main process reads them in place
    and gives the slot back once inference has taken them. The file's name carries the
    creating process's id, so one left by a killed run is removed by the next."""

    def __init__(self, count: int, capacity: int):
        self.count, self.capacity = count, int(capacity)
        size = count * self.capacity
        for folder in (SHM_DIR, Path(tempfile.gettempdir())):
            remove_orphans(folder)
        folder = SHM_DIR if _room(SHM_DIR) > size else Path(tempfile.gettempdir())
        fd, name = tempfile.mkstemp(prefix=f"{SLOTS_PREFIX}{os.getpid()}-", dir=folder)
        self.path = name
        try:
            os.ftruncate(fd, size)
            _allocate(fd, size, name)
            self._map = _populated_map(fd, size)
        finally:
            os.close(fd)

    def view(self, slot: int, shape: Sequence[int]) -> np.ndarray:
        return np.ndarray(tuple(shape), dtype=np.float32, buffer=self._map,
                          offset=slot * self.capacity)

    def close(self) -> None:
        """Remove the file (a reader still writing into its mapping is unaffected)."""
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _allocate(fd: int, size: int, name: str) -> None:
    """The file's pages allocated now: a full /dev/shm fails here with a clear line, not
    with SIGBUS in the middle of a pass (filesystems without fallocate: left sparse)."""
    import errno

    from harness.errors import UserError

    allocate = getattr(os, "posix_fallocate", None)  # not on every platform
    if allocate is None:
        return
    try:
        allocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        os.unlink(name)
        raise UserError(f"no room for {size / 2**20:.0f} MiB of input slots in "
                        f"{Path(name).parent} ({exc.strerror}): free some, or point TMPDIR "
                        "at a folder with room") from exc


def remove_orphans(folder: Path) -> list[Path]:
    """Remove the slots files in `folder` whose creating process is gone (a run killed in
    the middle of a pass); returns them."""
    gone = []
    for path in folder.glob(f"{SLOTS_PREFIX}*-*") if folder.is_dir() else []:
        pid = path.name[len(SLOTS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                path.unlink()
                gone.append(path)
            except OSError:
                pass
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _room(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def slot_capacity(batch_size: int, spec: Any) -> int:
    """Bytes of a slot: a batch of the largest input `spec` makes (its fixed input, else its
    largest resize scale rounded up to 32); a batch that does not fit comes back through the
    pipe instead."""
    if getattr(spec, "pad_to", None):
        h, w = spec.pad_to
    else:
        scales = [max(s.scale) for s in spec.steps if getattr(s, "scale", None)]
        side = max(scales or [1333])
        h = w = -(-side // 32) * 32
    return batch_size * 3 * int(h) * int(w) * 4


def prepare_into(chunk: Sequence[Any], spec: Any, slots_path: Optional[str], slot: int,
                 capacity: int, index: int = 0, threads: int = 1) -> Any:
    """coco_pass.prepare_batch in a reader process; the inputs written into `slot` of the
    slots file (and `inputs` left None, `slot_shape` set) when they fit. index: `chunk` is
    the image at that place of a batch read image by image (join_parts): written where it
    lies in the stacked batch if all its images come out of the same shape. threads: the
    chunk's images read side by side by this many threads of the process."""
    from harness.eval.coco_pass import prepare_batch

    placed: list[np.ndarray] = []

    def into(shape: tuple[int, ...]) -> Optional[np.ndarray]:
        """The batch's place in the slot (stacked there, not copied), where it fits."""
        nbytes = int(np.prod(shape)) * 4
        if slots_path is None or (index + 1) * nbytes > capacity:
            return None
        placed.append(np.ndarray(shape, dtype=np.float32, buffer=_map_slots(slots_path),
                                 offset=slot * capacity + index * nbytes))
        return placed[0]

    out = prepare_batch(chunk, spec, _threads(threads) if threads > 1 else None, into)
    if placed and out.inputs is placed[0]:
        out.slot_shape, out.inputs = out.inputs.shape, None
    return out


def _threads(count: int) -> Any:
    """This process's pool of `count` reading threads (made on first use, kept)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = _READ_THREADS.get(count)
    if pool is None:
        pool = _READ_THREADS[count] = ThreadPoolExecutor(count, thread_name_prefix="read")
    return pool


def join_parts(parts: Sequence[Any]) -> Optional[Any]:
    """One batch of the _Prepared its images gave, each read alone (and so already padded as
    stacking pads it) into its place of the slot (prepare_into with index), or None where
    the slot does not hold the batch as prepare_batch stacks it (an image unreadable, or
    shaped unlike the others): then the batch must be read whole."""
    shapes = {p.slot_shape for p in parts}
    if len(shapes) != 1 or None in shapes or any(p.unreadable for p in parts):
        return None
    _, c, h, w = shapes.pop()
    out = parts[0]
    for p in parts[1:]:
        out.images += p.images
        out.metas += p.metas
        out.seconds += p.seconds
    out.slot_shape = (len(parts), c, h, w)
    return out


def detections_payload(dets: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """What encode_records needs of each image's NmsResult, as plain arrays."""
    return [(np.asarray(d.boxes), np.asarray(d.scores), np.asarray(d.labels)) for d in dets]


def encode_batches(batches: Sequence[tuple[Sequence[tuple[int, str]], Sequence[Any],
                                           dict[str, float]]],
                   category_ids: Sequence[int]) -> list[list[bytes]]:
    """The RunStore lines (kind "image") of each batch (its (image_id, file) pairs, their
    detections_payload, the per-image share of its timings): coco_pass.image_lines, in a
    process. One job for several batches: a job costs the submitting process ~0.2 ms."""
    from harness.eval.coco_pass import image_lines

    return [image_lines(images, [_Det(*arrays) for arrays in payload], ms, category_ids)
            for images, payload, ms in batches]


class _Det:
    def __init__(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray):
        self.boxes, self.scores, self.labels = boxes, scores, labels
