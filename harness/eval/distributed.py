"""`harness coco` as one process per GPU under torchrun, the way mmdet's tools/dist_test.sh
runs its test: every rank runs its shard of each configuration's batches (batch k on rank
k % world, batches planned on the whole split) into a run file of its own, and rank 0 merges
the files and scores them. Latency is timed on one named device, or on each rank in turn.

The ranks talk over gloo, GPU runs included: only Python objects (ids, statuses, timings,
detections a rank 0 on another disk lacks) and barriers cross between them, never tensors;
gloo notices at once when a peer's socket closes (a rank that died), where NCCL waits out its
timeout; and CPU-only CI runs the very code the GPUs run.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from harness.errors import UserError, first_line

LAUNCHERS = ("none", "torchrun")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; a dead rank is noticed at once
RESUME = "every finished batch is stored: run the same command again to resume"


class RankFailure(UserError):
    """Another rank is gone (died, was killed) or did not reach a synchronisation point within
    the timeout; what this rank stored is on disk."""


@dataclass(frozen=True)
class Ranks:
    """How this process takes part in a run: rank / world / local rank / local world as
    torchrun numbers them (0 / 1 / 0 / 1 without a launcher); gpu: the host's CUDA device
    this rank runs on (an entry of CUDA_VISIBLE_DEVICES as the launcher gave it); timeout_s:
    how long a rank waits for the others; latency_rank: whose device times every
    configuration; latency_per_rank: every rank times it, one after the other."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launcher: str = "none"
    host: str = field(default_factory=socket.gethostname)
    gpu: str = "0"
    timeout_s: float = DEFAULT_TIMEOUT_S
    latency_rank: int = 0
    latency_per_rank: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launcher != "none"

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    @property
    def store_rank(self) -> Optional[int]:
        """The rank in this process's run file names (None: the one-process file)."""
        return self.rank if self.distributed else None

    @property
    def latency_ranks(self) -> list[int]:
        return list(range(self.world)) if self.latency_per_rank else [self.latency_rank]

    def where(self, device: str) -> dict[str, Any]:
        """Which device of which host this rank runs `device` ("cpu" | "cuda") on."""
        name = None
        if device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0)
        return {"rank": self.rank if self.distributed else None, "host": self.host,
                "device": f"cuda:{self.gpu}" if device.startswith("cuda") else "cpu",
                "gpu": name}

    # -- synchronisation: each one fails with a RankFailure instead of waiting forever --------

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # gloo: peer closed, timed out; c10d's DistError
            raise RankFailure(
                f"rank {self.rank} of {self.world} lost the other ranks while {what}: "
                f"{_short(exc)} (a rank died, was killed, or did not get there within "
                f"--dist-timeout {self.timeout_s:g} s); {RESUME}") from exc

    def barrier(self, what: str) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._call(dist.barrier, what)

    def all_gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's `value`, by rank, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        self._call(lambda: dist.all_gather_object(out, value), what)
        return out

    def broadcast(self, value: Any, what: str) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        self._call(lambda: dist.broadcast_object_list(box, src=0), what)
        return box[0]

    def gather(self, value: Any, what: str) -> Optional[list[Any]]:
        """Every rank's `value`, by rank, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: Optional[list[Any]] = [None] * self.world if self.main else None
        self._call(lambda: dist.gather_object(value, out, dst=0), what)
        return out

    def in_turn(self, fn: Callable[[], Any], what: str) -> Any:
        """fn() on rank 0 first, then on every host's local rank 0, then on the rest: the
        first to need a file of the cache (an export, an engine build) makes it while the
        others wait, whether or not the hosts share the cache folder."""
        if not self.distributed:
            return fn()
        phase = 0 if self.main else 1 if self.local_rank == 0 else 2
        result = None
        for turn in range(3):
            if turn == phase:
                result = fn()
            self.barrier(what)
        return result

    def take_turns(self, ranks: Sequence[int], fn: Callable[[], Any],
                   what: str) -> dict[int, Any]:
        """fn() on each of `ranks`, one rank at a time while the others wait (timing on a
        quiet host); every rank gets {rank: its result}."""
        mine = None
        for r in ranks:
            if r == self.rank:
                mine = fn()
            if self.distributed and len(ranks) > 1:
                self.barrier(what)
        results = self.all_gather(mine, what)
        return {r: results[r] for r in ranks}

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def ranks_from_env(launcher: str, environ: Mapping[str, str], *, uses_cuda: bool = False,
                   timeout_s: float = DEFAULT_TIMEOUT_S, latency_rank: int = 0,
                   latency_per_rank: bool = False) -> Ranks:
    """This process's Ranks from the launcher's environment; a UserError (one line) for a
    launcher that is not there or settings that do not fit the world (uses_cuda: a GPU per
    rank is needed)."""
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown --launcher '{launcher}'; choose {' | '.join(LAUNCHERS)}")
    if timeout_s <= 0:
        raise UserError(f"--dist-timeout must be more than 0 seconds, got {timeout_s:g}")
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if launcher == "none":
        world = environ.get("WORLD_SIZE")
        if world not in (None, "", "1"):
            raise UserError(f"started by a launcher (WORLD_SIZE={world}) with --launcher none: "
                            "add --launcher torchrun, or every process runs the whole matrix "
                            "into the same files")
        if latency_rank != 0:
            raise UserError(f"--latency-rank {latency_rank}: a run without a launcher has "
                            "rank 0 only")
        return Ranks(gpu=visible[0] if visible else "0", timeout_s=timeout_s,
                     latency_per_rank=False)
    missing = [k for k in TORCHRUN_ENV if not environ.get(k)]
    if missing:
        raise UserError(f"--launcher torchrun needs torchrun's environment ({', '.join(missing)} "
                        "not set): run it under torchrun --nproc_per_node N -m harness coco ...")
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ["LOCAL_RANK"])
        local_world = int(environ.get("LOCAL_WORLD_SIZE") or world)
    except ValueError as exc:
        raise UserError(f"torchrun's environment is not numbers: {exc}") from None
    if not 0 <= latency_rank < world:
        raise UserError(f"--latency-rank {latency_rank} is not a rank of this run (0 .. "
                        f"{world - 1})")
    if uses_cuda and visible and local_rank >= len(visible):
        raise UserError(f"rank {rank} has no GPU: it is local rank {local_rank} but "
                        f"CUDA_VISIBLE_DEVICES lists {len(visible)} ({','.join(visible)}); "
                        "start at most that many processes per host (--nproc_per_node)")
    return Ranks(rank=rank, world=world, local_rank=local_rank, local_world=local_world,
                 launcher=launcher,
                 gpu=visible[local_rank] if local_rank < len(visible) else str(local_rank),
                 timeout_s=timeout_s, latency_rank=latency_rank,
                 latency_per_rank=latency_per_rank)


def prepare(ranks: Ranks, uses_cuda: bool) -> Ranks:
    """Give this rank its own GPU and its share of the host's cores, before anything touches
    CUDA: CUDA_VISIBLE_DEVICES is the rank's GPU, so "cuda" is its cuda:LOCAL_RANK for
    PyTorch, onnxruntime and TensorRT alike; threads = usable cores // local world size, for
    PyTorch, OpenCV and onnxruntime's sessions."""
    if not ranks.distributed:
        return ranks
    import torch

    if uses_cuda:
        if torch.cuda.is_initialized():  # too late to choose the device
            raise RuntimeError("CUDA was initialised before the rank chose its GPU")
        os.environ["CUDA_VISIBLE_DEVICES"] = ranks.gpu
        # mmengine's logger (built with every model) reads LOCAL_RANK as an index into
        # CUDA_VISIBLE_DEVICES, which now lists this rank's GPU only: rank 1 of two got
        # "list index out of range" building the fixture on the two-GPU machine
        os.environ["LOCAL_RANK"] = "0"
    threads = max(1, usable_cores() // max(1, ranks.local_world))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    from harness.backends.onnxruntime_backend import OnnxruntimeBackend

    OnnxruntimeBackend.default_threads = threads  # its sessions would take every core
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass
    return ranks


def join(ranks: Ranks) -> None:
    """Join the other ranks (gloo), within the timeout or a RankFailure. Called once the
    model is built: mmyolo's detectors turn every BatchNorm into SyncBatchNorm when built in
    a distributed process (use_syncbn), and each rank must run the module one process runs."""
    if not ranks.distributed:
        return
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    try:
        dist.init_process_group("gloo", init_method="env://", rank=ranks.rank,
                                world_size=ranks.world,
                                timeout=datetime.timedelta(seconds=ranks.timeout_s))
    except RuntimeError as exc:
        raise RankFailure(
            f"rank {ranks.rank}: the {ranks.world} ranks did not all join within "
            f"--dist-timeout {ranks.timeout_s:g} s ({_short(exc)}); check that every rank "
            "was started (torchrun --nnodes / --nproc_per_node) and reaches "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}") from exc


def _short(exc: BaseException) -> str:
    """gloo's message without its source location and advice: `Connection closed by peer
    [127.0.0.1]:6020`"""
    text = first_line(exc)
    if text.startswith("[") and "] " in text:  # [/path/gloo/transport/tcp/pair.cc:553]
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0].rstrip(".")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def member(ranks: Ranks) -> dict[str, Any]:
    """What the report says about one rank."""
    import torch

    return {"rank": ranks.rank, "host": ranks.host, "local_rank": ranks.local_rank,
            "gpu": ranks.gpu, "threads": torch.get_num_threads()}


# -- what the ranks agree on, per configuration (pure: tested without processes) -------------

def store_view(store: Any, image_ids: Sequence[int], header: Any,
               problem: Optional[str]) -> dict[str, Any]:
    """What one rank found before the pass: its problem (a row status) or its run files'
    header and the ids of the split they hold."""
    if store is None:
        return {"problem": problem}
    readable = [r for r in store.images.values() if not r.get("unreadable")]
    return {"problem": problem, "header": header,
            "stored": [i for i in image_ids if i in store.images],
            "reference_nms": all("reference_nms" in r for r in readable) if readable
            else None}


@dataclass
class Agreement:
    """problem: the row's status when a rank cannot run it (else None); stored: ids some rank
    holds; reference_nms: whether every stored readable image has the ΔAP split's record
    (None: nothing readable stored)."""

    problem: Optional[str] = None
    stored: set[int] = field(default_factory=set)
    reference_nms: Optional[bool] = None


def first_problem(reports: Sequence[dict[str, Any]]) -> Optional[str]:
    """The first rank's problem, naming the rank when the ranks disagree."""
    problems = [(r, v["problem"]) for r, v in enumerate(reports) if v.get("problem")]
    if not problems:
        return None
    rank, text = problems[0]
    same = len(problems) == len(reports) and len({p for _, p in problems}) == 1
    return text if same else f"{text} (on rank {rank})"


def agree(views: Sequence[dict[str, Any]]) -> Agreement:
    """One Agreement from every rank's store_view."""
    problem = first_problem(views)
    if problem:
        return Agreement(problem=problem)
    headers = [v["header"] for v in views]
    if any(h != headers[0] for h in headers):
        rank = next(r for r, h in enumerate(headers) if h != headers[0])
        keys = sorted(k for k in set(headers[0]) | set(headers[rank])
                      if headers[0].get(k) != headers[rank].get(k))
        return Agreement(problem=f"failed: rank {rank} loaded other files or data than rank 0 "
                                 f"({', '.join(keys)} differ): give every host the same "
                                 "files (a shared cache folder, or the experiment's files)")
    stored = set().union(*(v["stored"] for v in views))
    split = [v["reference_nms"] for v in views if v["reference_nms"] is not None]
    return Agreement(stored=stored, reference_nms=all(split) if split else None)


def merge_records(ranks: Ranks, store: Any, wanted: Sequence[int], what: str) -> None:
    """Give rank 0's store every record of `wanted`: read again the other ranks' files it can
    see (a shared cache: all of them), and have the records it still lacks (files on another
    host's disk) sent over and written into its own file, so that a later run there finds
    them."""
    missing = None
    if ranks.main:
        store.read_beside()
        missing = [i for i in wanted if i not in store.images]
    missing = ranks.broadcast(missing, what)
    if not missing:
        return
    mine = [store.images[i] for i in missing if i in store.images]
    sent = ranks.gather(mine, what)
    if not ranks.main:
        return
    for records in sent or []:
        store.append_images(records)
    lost = [i for i in missing if i not in store.images]
    if lost:
        raise UserError(f"{len(lost)} images stored as done are in no rank's run file (image "
                        f"ids {', '.join(map(str, lost[:5]))}...): was a run file removed "
                        "during the run? Run the same command again")
