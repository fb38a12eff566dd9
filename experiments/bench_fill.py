"""Why a COCO pass's first images take longer to read than the images after them.

On the H200's host a reader's image takes 2.7 ms in a loop (bench_preprocess.py) but the
four images of a pass's first batch, each read by its own idle reader, 3.5-6 ms each — also
with nothing else in flight (bench_coco_overhead.py --timeline 1 prints each one's read;
reports/coco-overhead-h200, "The first batch's images, one by one"). This
times the readers' first batch after an idle gap of each length given, image by image: the
wall time in the reader, its CPU time, the page faults it took and how often it was
preempted; for readers whose allocator keeps the memory they free
(pass_processes.READ_KEEP_MEMORY, the default) and readers whose allocator gives it back.

    python experiments/bench_fill.py                     # on the GPU machine's host
    python experiments/bench_fill.py --idle 1 0.1 0 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=64, help="images of the generated split")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--idle", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.0],
                   help="seconds the readers sit idle before each first batch")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args()


def timed_read(chunk, spec, slots_path, slot, capacity, index):
    """prepare_into, with this reader's wall and CPU seconds and minor page faults."""
    from harness.eval.pass_processes import prepare_into

    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu, wall = time.process_time(), time.perf_counter()
    prepare_into(chunk, spec, slots_path, slot, capacity, index)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, cpu, after.ru_minflt - before.ru_minflt, after.ru_nivcsw - before.ru_nivcsw


def main() -> None:
    args = parse()
    from harness.eval import pass_processes as pp
    from harness.eval.coco_split import open_split
    from harness.models.mmyolo import read_config
    from harness.models.pipeline import preprocess_spec_from_config
    from harness.models.zoo import FIXTURE_CONFIG
    from harness.synth import generate_synthetic_coco

    work = Path(tempfile.mkdtemp(prefix="bench_fill_"))
    try:
        generate_synthetic_coco(work / "synth", images=2 * args.count, seed=1, val_fraction=0.5)
        split = open_split(work / "synth" / "val2017", count=args.count)
        spec = preprocess_spec_from_config(read_config(FIXTURE_CONFIG))
        slots = pp.InputSlots(4, pp.slot_capacity(4, spec))
        print(f"{len(split.images)} images, {args.workers} readers, {os.cpu_count()} cores; "
              "per image of a first batch of 4, each read by its own reader: median "
              "(max) over the repeats")
        print(f"{'readers':<14} {'idle s':>7} {'wall ms':>14} {'cpu ms':>14} "
              f"{'page faults':>12} {'preempted':>9}")
        for keep in (False, True):
            pp.READ_KEEP_MEMORY = keep
            pool = pp.process_pool(args.workers, "read")
            pp.warm(pool, args.workers)
            list(pool.map(pp._map_in, [slots.path] * args.workers))

            def read(images):  # each image by its own reader, into its place of slot 0
                jobs = [pool.submit(timed_read, [im], spec, slots.path, 0, slots.capacity,
                                    i % 4) for i, im in enumerate(images)]
                return [job.result() for job in jobs]

            read(split.images[:args.workers])  # untimed: a reader's very first images are slower
            at = 0
            for idle in args.idle:
                rows = []
                for _ in range(args.repeats):
                    chunk = [split.images[(at + i) % len(split.images)] for i in range(4)]
                    at += 4
                    time.sleep(idle)
                    rows += read(chunk)
                cols = list(zip(*rows))
                cell = [f"{1e3 * statistics.median(c):.2f} ({1e3 * max(c):.2f})"
                        for c in cols[:2]]
                print(f"{'keep memory' if keep else 'give it back':<14} {idle:>7.2f} "
                      f"{cell[0]:>14} {cell[1]:>14} {statistics.median(cols[2]):>12.0f} "
                      f"{statistics.median(cols[3]):>9.0f}")
            pool.shutdown()
        slots.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
