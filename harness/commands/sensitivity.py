"""`harness sensitivity CFG CKPT --images DIR --precision int8`: which layer groups to keep in
fp32, judged by COCO AP on a subset — each group's AP alone in fp32, the ranking by AP
recovered per fp32 GFLOP, the greedy search for the smallest set within --max-delta-ap;
writes `sensitivity.md`, `sensitivity.png`, the mixed-precision ONNX (models/), TensorRT's
`fp32_layers.json` and the `sensitivity` section of results.json into --out. Interrupted
runs resume: run the same command again."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="mmyolo config (harness:fixture/... for the "
                                             "bundled fixture)")
    p.add_argument("checkpoint", type=Path, help="checkpoint of the config")
    p.add_argument("--images", type=Path, required=True, metavar="DATASET_SPLIT_DIR",
                   help="COCO split folder, e.g. ~/coco/val2017")
    p.add_argument("--ann", type=Path, default=None,
                   help="annotation file (default: ../annotations/instances_<split>.json)")
    p.add_argument("--count", type=int, default=100,
                   help="evaluate the first N images by id (default 100; 0: every image)")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="check the chosen set on the next N images by id, which the search "
                        "does not see (default 0: no check)")
    p.add_argument("--precision", choices=("int8", "fp16"), default="int8",
                   help="the precision the rest of the network runs in (default int8)")
    p.add_argument("--groups", choices=("stage", "module", "auto"), default="auto",
                   help="stage: backbone stages, neck blocks, head branches; module: one "
                        "level finer; auto: the first level with 6-20 groups (default)")
    p.add_argument("--max-delta-ap", default="0.005", metavar="LIMIT",
                   help="the AP the mixed model may lose against fp32: an AP difference "
                        "(0.005, the default) or a share of the quantized model's loss "
                        "(50%%: recover at least half)")
    p.add_argument("--order", choices=("per-gflop", "recovered"), default="per-gflop",
                   help="greedy order: by AP recovered per fp32 GFLOP (default) or by AP "
                        "recovered")
    p.add_argument("--calib", type=Path, default=None, metavar="DIR",
                   help="int8 calibration images (default: the split's images)")
    p.add_argument("--calib-count", type=int, default=32,
                   help="int8 calibration images, spread over the folder (default 32)")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"),
                   default="minmax", help="int8 calibration (default minmax)")
    p.add_argument("--batch", type=int, default=4, help="inference batch size (default 4)")
    p.add_argument("--evaluator", choices=("auto", "pycocotools", "faster-coco-eval"),
                   default="pycocotools",
                   help="COCO evaluation (default pycocotools; auto: faster-coco-eval when "
                        "installed)")
    p.add_argument("--out", type=Path, default=Path("reports/sensitivity"),
                   help="report folder (default reports/sensitivity/)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the stored measurements and measure everything again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import shutil

    from harness.cli import writable_dir
    from harness.sensitivity.report import write_sensitivity_report
    from harness.sensitivity.runner import SensitivitySettings, run_sensitivity
    from harness.sensitivity.search import DeltaLimit

    settings = SensitivitySettings(
        config=args.config, checkpoint=args.checkpoint, images=args.images, out=args.out,
        annotations=args.ann, count=args.count, holdout=args.holdout,
        precision=args.precision, level=args.groups,
        limit=DeltaLimit.parse(args.max_delta_ap), order=args.order,
        calib_images=args.calib, calib_count=args.calib_count,
        calib_method=args.calib_method, batch=args.batch, evaluator=args.evaluator,
        progress=not args.no_progress)
    settings.check()
    out = writable_dir(settings.out)
    if args.fresh:
        shutil.rmtree(settings.cache_dir / "sensitivity", ignore_errors=True)
    try:
        doc, _ = run_sensitivity(settings)
    except KeyboardInterrupt:
        print("measured variants are kept: run the same command again to resume",
              file=sys.stderr)
        raise
    written = write_sensitivity_report(doc, out)
    print_summary(doc)
    print("wrote " + ", ".join(str(p) for p in written)
          + "".join(f", {out / name}" for key, name in doc.files.items() if key != "plot"))
    return 0 if doc.met else 1


def print_summary(doc) -> None:
    """The verdict, the three APs and the top of the ranking. doc: SensitivityResult."""
    print(f"fp32 AP {doc.AP_fp32:.4f}; {doc.precision} AP {doc.AP_quantized:.4f} (ΔAP "
          f"{doc.delta_AP_quantized:+.4f}); with {', '.join(doc.chosen) or 'no group'} in "
          f"fp32 AP {doc.AP_chosen:.4f} (ΔAP {doc.delta_AP_chosen:+.4f})")
    for g in sorted(doc.groups, key=lambda g: g.rank or 0)[:5]:
        per = "—" if g.recovered_per_gflop is None else f"{g.recovered_per_gflop:+.4f}"
        print(f"  {g.rank:>2}. {g.name:<40} recovers {g.recovered:+.4f}  "
              f"{g.gflops:.3f} GFLOPs  ({per} per GFLOP)")
    held = doc.holdout
    if held is not None:
        print(f"held-out ({held.images} images): fp32 AP {held.AP_fp32:.4f}; "
              f"{doc.precision} AP {held.AP_quantized:.4f}; chosen set AP {held.AP_chosen:.4f}")
    print(f"verdict: {doc.verdict}")
