"""How much a `harness coco` pass costs beyond the backend's own inference time.

For each backend × batch size it runs, on the same split and in one process:
  serial     read + preprocess → infer → decode/NMS + write, one after the other;
  harness    the pipelined pass of `harness coco` (harness.eval.coco_pass.run_pass):
             reading ahead and post-processing behind inference, in threads;
and prints side by side: the pass's wall time, the backend's summed inference time inside
that pass, their ratio (target <= 1.10), the wall time over the inference time of an
isolated run (the same batches, inference only, nothing else running in the process), and
the pass's AP (pycocotools), so a faster post-processing path shows it changed nothing.

    python experiments/bench_coco_overhead.py                    # data/synth/val2017, or a
    python experiments/bench_coco_overhead.py --images DIR --count 60   # generated split
    python experiments/bench_coco_overhead.py --device cuda --count 200 --post auto reference
        # on the GPU machine: the fast batched post-processing (auto) and the numpy
        # reference kernel side by side
    python experiments/bench_coco_overhead.py --device cuda --count 200 --graphs on off
        # the fast path's CUDA graphs (harness.eval.coco_graphs) against its eager calls
    python experiments/bench_coco_overhead.py --device cuda --count 200 --timeline 3
        # and each fastest pass's first and last 3 batches: when each was read, handed
        # over, inferred, post-processed and written (where a pass's fixed cost goes), where
        # inference sat idle, and the post's slowest and last call in their parts
    python experiments/bench_coco_overhead.py --device cuda --backends onnxruntime \
        --batches 4 --read-threads 1 4 --read-pool executor pipes --switch-interval 0.0002 \
        0.00005 --repeats 3
        # the pass's settings side by side (every combination of those given)
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

STORES = itertools.count()  # a fresh store file for every pass


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=None,
                   help="COCO split folder (default: data/synth/val2017 if present, else a "
                        "generated synthetic split)")
    p.add_argument("--count", type=int, default=60, help="images of the split to use")
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where torch and onnxruntime run (tensorrt: always cuda)")
    p.add_argument("--repeats", type=int, default=2,
                   help="passes per mode; the fastest is reported (the machine is shared)")
    p.add_argument("--post", nargs="+", default=["auto"], choices=("auto", "fast", "reference"),
                   help="post-processing paths to time (harness.eval.coco_post)")
    p.add_argument("--graphs", nargs="+", default=["on"], choices=("on", "off"),
                   help="the fast path on a GPU with CUDA graphs (on) or eager (off); both "
                        "given: side by side")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="threads (reading processes) per pool of the pass, for each given "
                        "(default: coco_pass.default_workers())")
    p.add_argument("--read-threads", type=int, nargs="+", default=None, metavar="T",
                   help="passes whose reading processes read a batch's images with T threads, "
                        "for each T given (default: coco_pass.READ_THREADS)")
    p.add_argument("--fill-rounds", type=int, nargs="+", default=None,
                   help="passes reading the first R x workers images one job each, for each R "
                        "given (default: coco_pass.FILL_ROUNDS)")
    p.add_argument("--local-encode", type=int, nargs="+", default=None, metavar="IMAGES",
                   help="passes encoding the last IMAGES images in the writer thread, for each "
                        "given (default: coco_pass.LOCAL_ENCODE_IMAGES)")
    p.add_argument("--switch-interval", type=float, nargs="+", default=None, metavar="S",
                   help="passes whose interpreter hands the GIL over every S seconds, for each "
                        "given (default: coco_pass.PROCESSES_SWITCH_INTERVAL_S on a GPU, "
                        "SWITCH_INTERVAL_S on the CPU)")
    p.add_argument("--read-pool", nargs="+", default=None, choices=("executor", "pipes"),
                   help="passes whose reading processes are a ProcessPoolExecutor / a "
                        "pipe_pool.PipePool, for each given (default: "
                        "pass_processes.READ_POOL)")
    p.add_argument("--read-nice", type=int, nargs="+", default=None, metavar="N",
                   help="passes whose reading processes run N nicer than the pass's own, for "
                        "each given (default: pass_processes.READ_NICE)")
    p.add_argument("--read-keep-memory", type=int, nargs="+", default=None, choices=(0, 1),
                   help="passes whose reading processes keep (1) or give back (0) the memory "
                        "they free, for each given (default: pass_processes.READ_KEEP_MEMORY)")
    p.add_argument("--warmup", type=int, nargs="+", default=[1], choices=(0, 1),
                   help="passes with (1, as harness coco runs them) or without (0) the "
                        "warm-up on blank images before the pass's clock starts, while the "
                        "readers read the first batches (coco_pass.run_pass(warmup)), for each "
                        "given")
    p.add_argument("--timeline", type=int, default=0, metavar="N",
                   help="after each line, the fastest pass's first and last N batches: when "
                        "each was read, handed over, inferred, post-processed and written")
    return p.parse_args()


def split_folder(args: argparse.Namespace, work: Path) -> Path:
    from harness.synth import generate_synthetic_coco

    if args.images is not None:
        return args.images
    default = Path("data/synth/val2017")
    if (default.parent / "annotations" / "instances_val2017.json").is_file():
        return default
    generate_synthetic_coco(work / "synth", images=2 * args.count, seed=1, val_fraction=0.5)
    return work / "synth" / "val2017"


def main() -> None:
    args = parse()
    work = Path(tempfile.mkdtemp(prefix="bench_coco_"))
    try:
        bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path) -> None:
    from harness.eval.coco_backends import ModelFiles, open_backend
    from harness.eval.coco_split import category_ids_for, open_split
    from harness.eval.latency import machine_info
    from harness.experiment import matrix_configurations
    from harness.models.mmyolo import load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    split = open_split(split_folder(args, work), count=args.count)
    model = load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    cat_ids = category_ids_for(split, model.class_names)
    files = ModelFiles(model, work / "cache", batches=args.batches, log=lambda m: None)
    info = machine_info()
    print(f"{len(split.images)} images of {split.images_dir}; {info['cpu']}, "
          f"{info['usable_cores']} usable cores, {info['threads']} torch threads")
    from harness.eval import coco_pass, pass_processes
    from harness.eval.coco_pass import default_workers

    print(f"{default_workers()} threads per pool by default")
    print(f"{'configuration':<24} {'post':<10} {'serial wall':>11} {'harness wall':>12} "
          f"{'infer in pass':>13} {'wall/infer':>10} {'isolated infer':>14} "
          f"{'wall/isolated':>13} {'AP':>7} {'waited read':>11} {'waited post':>11} "
          f"{'fill':>7} {'drain':>7}  drain: post end / write start / write end; "
          f"before the clock: the readers' head start (the warm-up in it)")
    for config in matrix_configurations(args.backends, ["fp32"], args.batches, [args.device]):
        target = open_backend(config, model, files)
        if not target.available:
            print(f"{config.key:<24} {target.reason}")
            continue
        settings = itertools.product(
            args.post, args.fill_rounds or [None], args.local_encode or [None],
            args.read_threads or [None], args.switch_interval or [None],
            args.read_pool or [None], args.read_nice or [None], args.read_keep_memory or [None],
            args.workers or [None], args.graphs, args.warmup)
        for (path, rounds, local, threads, switch, pool, nice, keep, workers,
             graphs, warmup) in settings:
            said = [] if args.warmup == [1] else [f"warm-up {'on' if warmup else 'off'}"]
            if keep is not None:
                pass_processes.READ_KEEP_MEMORY = bool(keep)
                said.append(f"readers {'keep' if keep else 'give back'} freed memory")
            if pool is not None:
                pass_processes.READ_POOL = pool
                said.append(f"read pool {pool}")
            if nice is not None:
                pass_processes.READ_NICE = nice
                said.append(f"read nice {nice}")
            # (the switch interval of passes in threads and of those in processes, GPU rows)
            for names, value in ((("FILL_ROUNDS",), rounds), (("LOCAL_ENCODE_IMAGES",), local),
                                 (("READ_THREADS",), threads),
                                 (("SWITCH_INTERVAL_S", "PROCESSES_SWITCH_INTERVAL_S"), switch)):
                if value is not None:
                    for name in names:
                        setattr(coco_pass, name, value)
                    said.append(f"{names[0].lower()} {value}")
            if workers is not None:
                said.append(f"workers {workers}")
            if said:
                print(", ".join(said) + ":")
            line, best, post, calls = compare_modes(
                config, target, model, split, cat_ids, work, args.repeats, path, workers,
                args.timeline > 0, graphs == "on", bool(warmup))
            print(line)
            if getattr(post, "graphs", None) is not None:
                print(f"  CUDA graphs: {post.graphs.describe()}")
                print(f"  in the fastest pass: {calls}")
            if args.timeline:
                print(timeline_table(best.timeline, args.timeline, best.read_parts))


def compare_modes(config, target, model, split, cat_ids, work: Path, repeats: int,
                  post_path: str, workers, timeline: bool = False, graphs: bool = True,
                  warmup: bool = True):
    """(One table line: serial, isolated-inference and pipelined timings of `config`, the
    fastest pass's PassTimes, the post-processing function)."""
    backend, sync = target.backend, target.sync
    from harness.eval.coco_pass import coco_entries, plan_batches, prepare_batch, run_pass
    from harness.eval.coco_post import make_post
    from harness.eval.coco_scores import evaluate
    from harness.eval.store import RunStore

    post, how = make_post(model, config.device, post_path, graphs)

    prepared = [prepare_batch(b, model.preprocess)
                for b in plan_batches(split.images, config.batch)]
    backend.infer(prepared[0].inputs)  # warm-up

    def isolated() -> float:
        total = 0.0
        for p in prepared:
            t0 = time.perf_counter()
            backend.infer(p.inputs)
            total += time.perf_counter() - t0
        return total

    def serial() -> float:
        t0 = time.perf_counter()
        name = f"{config.key}_{post_path}_serial_{next(STORES)}.jsonl"
        store = RunStore(work / name, {}).open()
        for chunk in plan_batches(split.images, config.batch):
            p = prepare_batch(chunk, model.preprocess)
            dets = post(backend.infer(p.inputs), p.metas)
            store.append_images([{"image_id": im.image_id,
                                  "detections": coco_entries(im.image_id, d, cat_ids)}
                                 for im, d in zip(p.images, dets)])
        return time.perf_counter() - t0

    graphs = getattr(post, "graphs", None)

    def pipelined():
        name = f"{config.key}_{post_path}_pass_{next(STORES)}.jsonl"
        store = RunStore(work / name, {}).open()
        if graphs is not None:  # its calls in this pass
            graphs.slowest = graphs.last = (0.0, {})
        times = run_pass(split.images, config.batch, model.preprocess, backend.infer, post,
                         cat_ids, store, progress=False, workers=workers, sync=sync,
                         processes=str(config.device).startswith("cuda"), timeline=timeline,
                         warmup=warmup)
        return times, store, graphs.describe_calls() if graphs is not None else ""

    iso = min(isolated() for _ in range(repeats))
    ser = min(serial() for _ in range(repeats))
    best, store, calls = min((pipelined() for _ in range(repeats)), key=lambda t: t[0].wall_s)
    ids = [im.image_id for im in split.images]
    names = {c: n for c, n in zip(cat_ids, model.class_names) if c >= 0}
    ap = evaluate(split.coco, store.detections(ids), ids, names).stats["AP"]
    label = "fast+graph" if "CUDA graphs" in how else how.split(" ")[0]
    return (f"{config.key:<24} {label:<10} {ser:>10.2f}s {best.wall_s:>11.2f}s "
            f"{best.infer_s:>12.2f}s {best.overhead_ratio:>10.3f} {iso:>13.2f}s "
            f"{best.wall_s / iso:>13.3f} {ap:>7.4f} {best.wait_read_s:>10.3f}s "
            f"{best.wait_post_s:>10.3f}s {best.first_infer_s:>6.3f}s {best.after_infer_s:>6.3f}s  "
            + " / ".join(f"{1e3 * v:.1f}" for v in best.drain_parts_s.values()) + " ms; "
            f"{1e3 * best.head_s:.1f} ({1e3 * best.warmup_s:.1f}) ms"), \
        best, post, calls


STAGES = ("read", "handed", "infer", "post", "write")


def timeline_table(timeline: dict, n: int, read_parts: Optional[dict] = None) -> str:
    """The first and last `n` batches of a pass: each stage's start-end in ms from the
    pass's start ("handed": from the read's submission to its hand-over to inference), and
    of those read image by image each image's read."""
    keys = sorted(timeline)
    shown = keys if len(keys) <= 2 * n else keys[:n] + keys[-n:]
    rows = [f"  {'batch':>5} " + " ".join(f"{s:>15}" for s in STAGES)]
    for k in shown:
        spans = timeline[k]
        rows.append(f"  {k:>5} " + " ".join(
            f"{1e3 * spans[s][0]:>7.1f}-{1e3 * spans[s][1]:<7.1f}" if s in spans else
            f"{'':>15}" for s in STAGES))
    for k in shown:
        if k in (read_parts or {}):
            rows.append(f"  batch {k} by image: " + ", ".join(
                f"{1e3 * a:.1f}-{1e3 * b:.1f}" for a, b in read_parts[k]))
    rows.append(gaps_line(timeline))
    return "\n".join(rows)


def gaps_line(timeline: dict, least_s: float = 0.0003) -> str:
    """Where inference sat idle after the first batch: each batch that started more than
    `least_s` after the previous one ended, as batch:gap ms (read span's end ms), in pass order."""
    keys = [k for k in sorted(timeline) if "infer" in timeline[k]]
    gaps = [(k, timeline[k]["infer"][0] - timeline[prev]["infer"][1])
            for prev, k in zip(keys, keys[1:])]
    gaps = [(k, gap) for k, gap in gaps if gap > least_s]
    said = ", ".join(f"{k}:{1e3 * gap:.1f} ({1e3 * timeline[k].get('read', (0.0, 0.0))[1]:.1f})"
                     for k, gap in gaps)
    return (f"  inference idle after batch 0: {1e3 * sum(g for _, g in gaps):.1f} ms — "
            + (said or "none"))


if __name__ == "__main__":
    main()
