"""harness.eval.pipe_pool.PipePool, the readers' pool where READ_POOL is "pipes": results
come back to the job that asked, errors with their type, one job per worker in a map of as
many, a worker's death fails what it held and marks the pool broken (process_pool then starts
a new one), and a whole pass reading through it stores what threads do."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from harness.errors import UserError
from harness.eval.pipe_pool import PipePool


def _slow_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _refuse(what: str) -> None:
    raise UserError(f"refused {what}")


def _big(n: int) -> bytes:
    return bytes(range(256)) * n


@pytest.fixture(scope="module")
def pool():
    p = PipePool(3)
    yield p
    p.shutdown()


def test_results_come_back_to_their_jobs_in_any_order(pool):
    jobs = [pool.submit(_slow_pid, s) for s in (0.3, 0.0, 0.1)]
    pids = [job.result(timeout=30) for job in reversed(jobs)]
    assert len(set(pids)) == 3, "three jobs at once went to three workers"
    assert pool.map(pow, [2, 3, 4], [10, 2, 0]) == [1024, 9, 1]
    assert len(set(pool.map(_slow_pid, [0.2] * 3))) == 3  # a map of 3: one job per worker
    # a large result (a batch that did not fit its slot comes back through the pipe)
    assert pool.submit(_big, 40_000).result(timeout=30) == bytes(range(256)) * 40_000


def test_errors_keep_their_type_and_the_pool_goes_on(pool):
    with pytest.raises(UserError, match="refused the image"):
        pool.submit(_refuse, "the image").result(timeout=30)
    assert pool.submit(pow, 2, 5).result(timeout=30) == 32 and not pool._broken


def test_threads_waiting_for_different_jobs_each_get_theirs(pool):
    jobs = {k: pool.submit(pow, k, 2) for k in range(12)}
    got, errors = {}, []

    def wait_for(k):
        try:
            got[k] = jobs[k].result(timeout=30)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=wait_for, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and got == {k: k * k for k in jobs}


def test_a_worker_that_dies_fails_its_jobs_and_the_pool_is_started_anew(monkeypatch):
    from harness.eval import pass_processes

    monkeypatch.setattr(pass_processes, "READ_POOL", "pipes")
    pool = pass_processes.process_pool(1)
    assert isinstance(pool, PipePool)
    pid = pool.submit(os.getpid).result(timeout=30)
    held = pool.submit(_slow_pid, 30)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool, match=f"reading process {pid}"):
        held.result(timeout=30)
    assert pool._broken
    with pytest.raises(BrokenProcessPool):
        pool.submit(os.getpid)
    again = pass_processes.process_pool(1)
    assert again is not pool and again.submit(os.getpid).result(timeout=30) != pid


def test_a_result_nobody_will_ask_for_is_not_kept(pool):
    """An interrupted pass lets its reading jobs go: their results (a batch's inputs, where
    it came through the pipe) must not pile up in the pool."""
    import gc

    job = pool.submit(_big, 4000)
    del job
    gc.collect()
    assert pool.submit(_slow_pid, 0.3).result(timeout=30)  # results read meanwhile
    time.sleep(0.2)
    assert pool.submit(pow, 3, 3).result(timeout=30) == 27
    assert not pool._done and not pool._dropped


def test_a_job_not_done_in_time_says_so(pool):
    with pytest.raises(TimeoutError):
        pool.submit(_slow_pid, 2).result(timeout=0.2)
