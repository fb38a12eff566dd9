"""COCO evaluation time: pycocotools against faster-coco-eval, side by side, on the same
detections (the fixture's own on a synthetic split, from one `harness coco` pass), and
whether the two agree. faster-coco-eval's column says "not installed" where it is absent.

    python experiments/bench_coco_eval.py                 # data/synth/val2017 or generated
    python experiments/bench_coco_eval.py --images DIR --count 200 --repeats 3
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench_coco_overhead import split_folder  # this folder is on sys.path when run as a script


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=None,
                   help="COCO split folder (default: data/synth/val2017 if present, else a "
                        "generated synthetic split)")
    p.add_argument("--count", type=int, default=60, help="images of the split to use")
    p.add_argument("--repeats", type=int, default=3, help="evaluations per library (best)")
    return p.parse_args()


def main() -> None:
    args = parse()
    work = Path(tempfile.mkdtemp(prefix="bench_coco_eval_"))
    try:
        bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path) -> None:
    from harness.eval.coco_scores import evaluate, faster_coco_eval_installed
    from harness.eval.runner import run_coco
    from harness.experiment import Configuration
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
    from harness.settings import CocoSettings

    images = split_folder(args, work)
    config = Configuration("onnxruntime", "cpu", "fp32", 4)
    settings = CocoSettings(images_dir=images, annotations=None, config=FIXTURE_CONFIG,
                            checkpoint=FIXTURE_CHECKPOINT, configurations=(config,),
                            cache_dir=work / "cache", count=args.count, warmup=0, runs=1,
                            progress=False, evaluator="pycocotools")
    run_coco(settings, log=lambda m: None)  # the detections to evaluate, in the run store

    from harness.eval.coco_split import category_ids_for, open_split
    from harness.eval.store import RunStore
    from harness.models.mmyolo import load_mmyolo_model

    split = open_split(images, count=args.count)
    model = load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    names = {c: n for c, n in zip(category_ids_for(split, model.class_names),
                                  model.class_names) if c >= 0}
    jsonl = next((work / "cache" / "runs").glob("*.jsonl"))
    results = RunStore.read(jsonl).detections()
    print(f"{len(results)} detections on {len(split.images)} images of {split.images_dir}")

    timings, scores = {}, {}
    for name in ("pycocotools", "faster-coco-eval"):
        if name == "faster-coco-eval" and not faster_coco_eval_installed():
            continue
        runs = [evaluate(split.coco, results, split.image_ids, names, name)
                for _ in range(args.repeats)]
        timings[name] = min(r.seconds for r in runs)
        scores[name] = runs[0]
    faster = timings.get("faster-coco-eval")
    print(f"{'':<22} {'pycocotools':>12} {'faster-coco-eval':>17}")
    print(f"{'evaluation time (s)':<22} {timings['pycocotools']:>12.3f} "
          f"{'not installed' if faster is None else f'{faster:.3f}':>17}")
    ap = scores["pycocotools"].stats["AP"]
    other = scores.get("faster-coco-eval")
    other_ap = "not installed" if other is None else f"{other.stats['AP']:.4f}"
    print(f"{'AP':<22} {ap:>12.4f} {other_ap:>17}")


if __name__ == "__main__":
    main()
