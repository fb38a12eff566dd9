"""`harness synth OUT --images N --seed S`: the synthetic COCO-format dataset."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output folder (COCO layout is written inside)")
    p.add_argument("--images", type=int, default=200, help="total images (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of images in val2017 (default 0.2)")


def run(args: argparse.Namespace) -> int:
    from harness.synth import generate_synthetic_coco

    s = generate_synthetic_coco(args.out, images=args.images, seed=args.seed,
                                val_fraction=args.val_fraction, progress=True)
    print(f"wrote {s.train_images} train + {s.val_images} val images "
          f"({s.train_annotations + s.val_annotations} objects) to {s.out}")
    return 0
