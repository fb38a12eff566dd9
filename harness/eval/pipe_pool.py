"""A pool of spawned worker processes, each with a pipe of its own: a job is written straight
into the least busy worker's pipe by the thread that submits it, and its result is read back
by the thread that asks for it — no feeder or management thread in between.

A ProcessPoolExecutor hands each job through two threads of the submitting process (its
management thread moves it to a queue, the queue's feeder thread pickles and writes it) and
each result through its management thread again; each hop waits for the interpreter's lock.
On the H200's busy host a COCO pass's first image started being read ~1 ms after it was
submitted and was handed over ~0.7 ms after it was read (reports/coco-overhead-h200), time
the pass's first inference waits for. Here a job is one write, a result one read.

Only what coco_pass's reading needs: submit, map (one job per worker when there are as many
as workers), a worker's death failing the jobs it held (the pool then says it is broken and
pass_processes.process_pool starts a new one).
"""
from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Optional


class PipeJob:
    """A submitted job: result() waits for it (reading whatever results arrive meanwhile)."""

    def __init__(self, pool: "PipePool", key: int):
        self._pool, self._key = pool, key

    def result(self, timeout: Optional[float] = None) -> Any:
        return self._pool._result(self._key, timeout)

    def __del__(self) -> None:  # nobody will ask for its result: not kept when it comes
        self._pool._forget(self._key)


class PipePool:
    def __init__(self, workers: int, initializer: Optional[Callable[[], None]] = None):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # the parent may hold a CUDA context
        self._conns, self._procs = [], []
        for _ in range(workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(there, initializer), daemon=True,
                               name="harness-reader")
            proc.start()
            there.close()
            self._conns.append(here)
            self._procs.append(proc)
        self._held: list[set[int]] = [set() for _ in range(workers)]  # job keys per worker
        self._done: dict[int, tuple[bool, Any]] = {}
        self._keys = itertools.count()
        self._cond = threading.Condition()
        self._receiving = False
        self._dead: set[int] = set()  # workers whose death was seen (not waited on again)
        self._dropped: set[int] = set()  # jobs whose result nobody will ask for
        self.broken: Optional[str] = None

    @property
    def _broken(self) -> bool:  # what pass_processes.process_pool asks of its pools
        return self.broken is not None

    def submit(self, fn: Callable[..., Any], *args: Any) -> PipeJob:
        with self._cond:
            if self.broken:
                raise BrokenProcessPool(self.broken)
            key = next(self._keys)
            worker = min(range(len(self._conns)), key=lambda w: len(self._held[w]))
            self._held[worker].add(key)
            self._conns[worker].send((key, fn, args))
        return PipeJob(self, key)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        jobs = [self.submit(fn, *args) for args in zip(*iterables)]
        return [job.result() for job in jobs]

    def shutdown(self, wait: bool = True) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        if wait:
            for proc in self._procs:
                proc.join(timeout=5)

    def _result(self, key: int, timeout: Optional[float]) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while key not in self._done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {key} not done within {timeout} s")
                if self._receiving:  # another thread reads the pipes: it wakes us
                    self._cond.wait(left)
                    continue
                self._receiving = True
                self._cond.release()
                try:
                    got = self._receive(left)
                finally:
                    self._cond.acquire()
                    self._receiving = False
                self._settle(got)
                self._cond.notify_all()
            ok, value = self._done.pop(key)
        if not ok:
            raise value
        return value

    def _forget(self, key: int) -> None:
        with self._cond:  # (reentrant: a collection may run while this thread holds it)
            if self._done.pop(key, None) is None and any(key in h for h in self._held):
                self._dropped.add(key)

    def _receive(self, timeout: Optional[float]) -> list[tuple[int, int, bool, Any]]:
        """(worker, key, ok, value) of every result ready within `timeout`; a worker that died
        gives (worker, -1, False, why)."""
        from multiprocessing.connection import wait

        live = [w for w in range(len(self._procs)) if w not in self._dead]
        sentinels = {self._procs[w].sentinel: w for w in live}
        conns = {id(self._conns[w]): w for w in live}
        got = []
        for ready in wait([self._conns[w] for w in live] + list(sentinels), timeout):
            if isinstance(ready, int):
                w = sentinels[ready]
                if not self._conns[w].poll():  # its last results are read first
                    self._dead.add(w)
                    got.append((w, -1, False, f"reading process {self._procs[w].pid} died "
                                f"(exit code {self._procs[w].exitcode})"))
                continue
            w = conns[id(ready)]
            try:
                while ready.poll():
                    got.append((w, *ready.recv()))
            except (EOFError, OSError) as exc:
                self._dead.add(w)
                got.append((w, -1, False, f"reading process {self._procs[w].pid} is gone "
                            f"({type(exc).__name__})"))
        return got

    def _settle(self, got: list[tuple[int, int, bool, Any]]) -> None:
        for w, key, ok, value in got:
            if key < 0:  # every job the dead worker held fails, and so does the pool
                self.broken = value
                for held in self._held[w] - self._dropped:
                    self._done[held] = (False, BrokenProcessPool(value))
                self._dropped -= self._held[w]
                self._held[w].clear()
                continue
            self._held[w].discard(key)
            if key in self._dropped:  # its job was let go (an interrupted pass)
                self._dropped.discard(key)
            else:
                self._done[key] = (ok, value)


def _serve(conn: Any, initializer: Optional[Callable[[], None]]) -> None:
    """A worker: run each (key, fn, args) received, send back (key, ok, result or error)."""
    if initializer is not None:
        initializer()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        key, fn, args = job
        try:
            out = (key, True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 — handed to the caller, which raises it
            out = (key, False, exc)
        try:
            conn.send(out)
        except Exception as exc:  # noqa: BLE001 — an unpicklable result or error
            conn.send((key, False, RuntimeError(f"{type(exc).__name__}: {exc}")))
