"""`harness demo`: the main job on the embedded default — synthetic data, the bundled
fixture checkpoint through the model source, COCO mAP of its detections — printing what it
did and where the results went."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("reports/demo"), help="report folder")
    p.add_argument("--data", type=Path, default=Path("data/demo"),
                   help="where the synthetic dataset is written (reused when present)")
    p.add_argument("--images", type=int, default=120, help="synthetic images (half are val)")
    p.add_argument("--seed", type=int, default=1,
                   help="dataset seed (the fixture was trained on seed 0)")
    p.add_argument("--batch", type=int, default=4)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from harness.cli import writable_dir
    from harness.data.preprocess import preprocess_files
    from harness.data.synth import generate_synthetic_coco
    from harness.eval.coco import coco_map, detections_to_coco, load_coco
    from harness.models.mmyolo import load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    started = time.time()
    out = writable_dir(args.out)
    ann = args.data / "annotations" / "instances_val2017.json"
    if not ann.is_file():
        print(f"[1/3] writing {args.images} synthetic images (seed {args.seed}) to {args.data}")
        generate_synthetic_coco(args.data, images=args.images, seed=args.seed,
                                val_fraction=0.5, progress=True)
    else:
        print(f"[1/3] reusing synthetic data in {args.data}")

    print(f"[2/3] loading {FIXTURE_CONFIG.name} + {FIXTURE_CHECKPOINT.name}")
    model = load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    print(f"      {model.family}, classes {', '.join(model.class_names)}; NMS {model.nms}")

    coco = load_coco(ann)
    images = sorted(coco.imgs.values(), key=lambda im: im["id"])
    cat_ids = [c["id"] for c in sorted(coco.cats.values(), key=lambda c: c["id"])]
    results, n_det = [], 0
    print(f"[3/3] detecting on {len(images)} val images, batch {args.batch}")
    for i in tqdm(range(0, len(images), args.batch), unit="batch"):
        chunk = images[i:i + args.batch]
        batch = preprocess_files([args.data / "val2017" / im["file_name"] for im in chunk],
                                 model.preprocess)
        for im, det in zip(chunk, model.predict(batch)):
            results += detections_to_coco(im["id"], det.boxes, det.scores, det.labels, cat_ids)
            n_det += len(det.scores)
    stats = coco_map(coco, results)
    summary = {"model": model.describe(), "data": str(args.data), "images": len(images),
               "detections": n_det, "coco": stats, "seconds": round(time.time() - started, 1)}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"PyTorch CPU fp32: AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}  "
          f"AP75 {stats['AP75']:.3f}  ({n_det} detections on {len(images)} images)")
    print(f"wrote {out / 'results.json'} in {summary['seconds']} s")
    return 0
