"""How long a job takes to reach a reading process and its result to come back, for the two
pools a COCO pass can read with (harness.eval.pass_processes.READ_POOL): a
ProcessPoolExecutor and harness.eval.pipe_pool.PipePool, side by side in one run.

For each pool, with the submitting process idle and with `--busy` threads running Python
beside (a pass's writer and post threads take the interpreter's lock the same way):
  in     submitted → the worker starts the job (median, p90);
  out    the worker ends it → the submitting thread has the result;
  burst  `--workers` jobs submitted at once → the last one starts (a pass's first batches).
perf_counter is the same clock in every process here (CLOCK_MONOTONIC).

    python experiments/bench_read_pool.py                 # 4 workers, 300 jobs
    python experiments/bench_read_pool.py --workers 8 --busy 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--busy", type=int, default=2, help="busy Python threads in the second run")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="seconds (default: coco_pass.PROCESSES_SWITCH_INTERVAL_S)")
    return p.parse_args()


def stamp(payload: bytes) -> tuple[float, float]:
    """(start, end) in the worker: a job of about the size of a reading job's arguments."""
    start = time.perf_counter()
    return start, time.perf_counter()


def measure(pool, jobs: int, workers: int) -> dict[str, float]:
    payload = b"x" * 1500
    ins, outs = [], []
    for _ in range(jobs):
        t0 = time.perf_counter()
        start, end = pool.submit(stamp, payload).result()
        ins.append(start - t0)
        outs.append(time.perf_counter() - end)
    bursts = []
    for _ in range(max(5, jobs // 20)):
        t0 = time.perf_counter()
        futures = [pool.submit(stamp, payload) for _ in range(workers)]
        bursts.append(max(f.result()[0] for f in futures) - t0)
    q = lambda v, p: sorted(v)[int(p * (len(v) - 1))]  # noqa: E731
    return {"in": statistics.median(ins), "in p90": q(ins, 0.9),
            "out": statistics.median(outs), "out p90": q(outs, 0.9),
            "burst": statistics.median(bursts)}


def main() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from bench_fast_post import busy_threads  # (experiments/ is this script's folder)
    from harness.eval.coco_pass import PROCESSES_SWITCH_INTERVAL_S
    from harness.eval.pipe_pool import PipePool

    args = parse()
    pools = {
        "executor": ProcessPoolExecutor(args.workers,
                                        mp_context=multiprocessing.get_context("spawn")),
        "pipes": PipePool(args.workers),
    }
    for pool in pools.values():  # every worker started
        pool.map(stamp, [b""] * args.workers) if isinstance(pool, PipePool) else \
            list(pool.map(stamp, [b""] * args.workers))
    switch = sys.getswitchinterval()
    sys.setswitchinterval(args.switch_interval or PROCESSES_SWITCH_INTERVAL_S)
    print(f"{args.workers} workers, {args.jobs} jobs one at a time; ms")
    print(f"{'pool':<10} {'busy':>4} {'in':>7} {'in p90':>7} {'out':>7} {'out p90':>7} "
          f"{'burst':>7}")
    rows = {}
    try:
        for busy in (0, args.busy):
            stop = threading.Event()
            threads = busy_threads(busy, stop)
            try:
                for name, pool in pools.items():
                    r = rows[name, busy] = measure(pool, args.jobs, args.workers)
                    print(f"{name:<10} {busy:>4} " + " ".join(f"{1e3 * r[k]:>7.3f}" for k in
                                                          ("in", "in p90", "out", "out p90",
                                                           "burst")))
            finally:
                stop.set()
                for t in threads:
                    t.join()
    finally:
        sys.setswitchinterval(switch)
        for pool in pools.values():
            pool.shutdown()
    for busy in (0, args.busy):
        e, p = rows["executor", busy], rows["pipes", busy]
        print(f"executor / pipes, {busy} busy threads: in {e['in'] / p['in']:.1f}x, "
              f"out {e['out'] / p['out']:.1f}x, burst {e['burst'] / p['burst']:.1f}x")


if __name__ == "__main__":
    main()
