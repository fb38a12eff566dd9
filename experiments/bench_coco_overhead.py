"""How much a `harness coco` pass costs beyond the backend's own inference time.

For each backend × batch size it runs, on the same split and in one process:
  serial     read + preprocess → infer → decode/NMS + write, one after the other;
  harness    the pipelined pass of `harness coco` (harness.eval.coco_pass.run_pass):
             reading ahead and post-processing behind inference, in threads;
and prints side by side: the pass's wall time, the backend's summed inference time inside
that pass, their ratio (target <= 1.10), and the wall time over the inference time of an
isolated run (the same batches, inference only, nothing else running in the process).

    python experiments/bench_coco_overhead.py                    # data/synth/val2017, or a
    python experiments/bench_coco_overhead.py --images DIR --count 60   # generated split
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


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
    print(f"{'configuration':<24} {'serial wall':>11} {'harness wall':>12} "
          f"{'infer in pass':>13} {'wall/infer':>10} {'isolated infer':>14} "
          f"{'wall/isolated':>13}")
    for config in matrix_configurations(args.backends, ["fp32"], args.batches, [args.device]):
        target = open_backend(config, model, files)
        if not target.available:
            print(f"{config.key:<24} {target.reason}")
            continue
        print(compare_modes(config, target.backend, model, split, cat_ids, work, args.repeats))


def compare_modes(config, backend, model, split, cat_ids, work: Path, repeats: int) -> str:
    """One table line: serial, isolated-inference and pipelined timings of `config`."""
    from harness.eval.coco_pass import coco_entries, plan_batches, prepare_batch, run_pass
    from harness.eval.store import RunStore
    from harness.export.outputs import detections_from_outputs

    def post(outputs, metas):
        return detections_from_outputs(model, outputs, metas)

    stores = iter(range(10 ** 6))  # a fresh store file for every pass
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
        store = RunStore(work / f"{config.key}_serial_{next(stores)}.jsonl", {}).open()
        for chunk in plan_batches(split.images, config.batch):
            p = prepare_batch(chunk, model.preprocess)
            dets = post(backend.infer(p.inputs), p.metas)
            store.append_images([{"image_id": im.image_id,
                                  "detections": coco_entries(im.image_id, d, cat_ids)}
                                 for im, d in zip(p.images, dets)])
        return time.perf_counter() - t0

    def pipelined():
        store = RunStore(work / f"{config.key}_pass_{next(stores)}.jsonl", {}).open()
        return run_pass(split.images, config.batch, model.preprocess, backend.infer, post,
                        cat_ids, store, progress=False)

    iso = min(isolated() for _ in range(repeats))
    ser = min(serial() for _ in range(repeats))
    best = min((pipelined() for _ in range(repeats)), key=lambda t: t.wall_s)
    return (f"{config.key:<24} {ser:>10.2f}s {best.wall_s:>11.2f}s {best.infer_s:>12.2f}s "
            f"{best.overhead_ratio:>10.3f} {iso:>13.2f}s {best.wall_s / iso:>13.3f}")


if __name__ == "__main__":
    main()
