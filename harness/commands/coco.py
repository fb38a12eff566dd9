"""`harness coco DATASET_SPLIT_DIR`: COCO mAP and latency of the model across backends ×
precisions × batch sizes (flags, or an experiment file with --experiment); writes `coco.md`,
`coco.csv`, `coco_ap_vs_latency.png` and the `coco` section of `results.json` into --out.
Interrupted runs resume: run the same command again."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, nargs="?", metavar="DATASET_SPLIT_DIR",
                   help="COCO split folder, e.g. ~/coco/val2017 (default: the experiment's "
                        "data.images)")
    p.add_argument("--ann", type=Path, default=None,
                   help="annotation file (default: ../annotations/instances_<split>.json)")
    p.add_argument("--experiment", type=Path, default=None,
                   help="experiment file (TOML); flags given here override it")
    p.add_argument("--cfg", type=Path, default=None,
                   help="mmyolo config (default: the experiment's, else the bundled fixture)")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint for --cfg")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="torch onnxruntime tensorrt (default: all; missing ones are reported "
                        "as not available)")
    p.add_argument("--precisions", nargs="+", default=None, metavar="P",
                   help="fp32 fp16 bf16 int8 (default: all; each backend takes the ones it "
                        "has: torch fp32/fp16/bf16, onnxruntime and tensorrt fp32/fp16/int8)")
    p.add_argument("--batches", nargs="+", type=int, default=None, metavar="N",
                   help="batch sizes (default: 1 4)")
    p.add_argument("--devices", nargs="+", default=None, metavar="D",
                   help="cpu cuda (default: cpu); tensorrt always runs on cuda")
    p.add_argument("--count", type=int, default=None,
                   help="evaluate the first N images by id (default: every image)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed latency runs (default: GPU 50, CPU 5)")
    p.add_argument("--runs", type=int, default=None,
                   help="timed latency runs (default: GPU 1000, CPU 50)")
    p.add_argument("--calib-count", type=int, default=32,
                   help="int8 calibration images, spread over the split")
    p.add_argument("--evaluator", choices=("auto", "pycocotools", "faster-coco-eval"),
                   default="auto",
                   help="COCO evaluation (auto: faster-coco-eval when installed)")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default reports/<experiment name>/, or reports/coco/)")
    p.add_argument("--fresh", action="store_true",
                   help="discard stored per-image results and compute everything again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _split_words(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """`--backends torch,onnxruntime` and `--backends torch onnxruntime` alike."""
    if values is None:
        return None
    return [w for v in values for w in v.split(",") if w]


def settings_from_args(args: argparse.Namespace) -> tuple[Any, Path, Any]:
    """(CocoSettings, report folder, experiment or None) from flags over the experiment."""
    from harness.errors import UserError
    from harness.eval.runner import CocoSettings
    from harness.experiment import MatrixSpec, load_experiment, matrix_configurations
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    exp = load_experiment(args.experiment) if args.experiment else None
    images = args.images or (exp.data.images if exp else None)
    if images is None:
        raise UserError("give a COCO split folder (e.g. ~/coco/val2017) or --experiment FILE")
    # the experiment's annotation file belongs to its own images folder only
    ann = args.ann or (exp.data.annotations if exp and not args.images else None)
    if args.cfg is None and args.ckpt is not None:
        raise UserError("--ckpt needs --cfg (the config the checkpoint belongs to)")
    if args.cfg is not None:
        config, checkpoint, onnx, engines = args.cfg, args.ckpt, {}, {}
    elif exp is not None:
        config, checkpoint = exp.model.config, exp.model.checkpoint
        onnx, engines = exp.model.onnx, exp.model.engines
    else:
        config, checkpoint, onnx, engines = FIXTURE_CONFIG, FIXTURE_CHECKPOINT, {}, {}
    for kind, given in (("onnx", onnx), ("engines", engines)):
        for precision, path in given.items():
            if not Path(path).is_file():
                raise UserError(f"{path} not found (model.{kind}.{precision} of "
                                f"{args.experiment})")
    matrix = exp.matrix if exp else MatrixSpec()
    configurations = matrix_configurations(
        _split_words(args.backends) or matrix.backends,
        _split_words(args.precisions) or matrix.precisions,
        args.batches or matrix.batches,
        _split_words(args.devices) or matrix.devices)
    count = args.count if args.count is not None else (exp.data.count if exp else 0)
    warmup = args.warmup if args.warmup is not None else (exp.latency.warmup if exp else None)
    runs = args.runs if args.runs is not None else (exp.latency.runs if exp else None)
    if args.calib_count < 1:
        raise UserError(f"--calib-count must be at least 1, got {args.calib_count}")
    out = args.out or Path("reports") / (exp.name if exp else "coco")
    settings = CocoSettings(
        images_dir=Path(images).expanduser(), annotations=ann, config=config,
        checkpoint=checkpoint, configurations=tuple(configurations),
        cache_dir=out / "cache", count=count, onnx=onnx, engines=engines, warmup=warmup,
        runs=runs, calib_count=args.calib_count, evaluator=args.evaluator,
        progress=not args.no_progress)
    return settings, out, exp


def run(args: argparse.Namespace) -> int:
    from harness.cli import writable_dir
    from harness.eval.latency import default_settings
    from harness.eval.runner import run_coco
    from harness.report.coco_report import write_coco_report

    settings, out, exp = settings_from_args(args)
    default_settings("cpu", settings.warmup, settings.runs)  # reject bad numbers early
    writable_dir(out)
    if args.fresh:
        for c in settings.configurations:
            (settings.cache_dir / "runs" / f"{c.key}.jsonl").unlink(missing_ok=True)
    print(f"{len(settings.configurations)} configurations on {settings.images_dir}")
    try:
        doc, _ = run_coco(settings)
    except KeyboardInterrupt:
        print("finished batches are kept: run the same command again to resume",
              file=sys.stderr)
        raise
    written = write_coco_report(doc, out, exp.results_section() if exp else None)
    for r in doc["rows"]:
        label = f"{r['backend']:<11} {r['device']:<4} {r['precision']:<4} b{r['batch']}"
        if r["status"] == "ok":
            delta = "—" if r["delta_AP"] is None else f"{r['delta_AP']:+.4f}"
            steady = r.get("latency_stability") or {}
            mark = "  ⚠ unstable latency" if steady.get("stable") is False else ""
            print(f"{label}  AP {r['AP']:.3f}  ΔAP {delta}  "
                  f"{r['latency_ms']['total']['mean']:.1f} ms/batch  "
                  f"{r['images_per_s']:.1f} img/s{mark}")
        else:
            print(f"{label}  {r['status']}")
    if doc["dataset"]["unreadable"]:
        print(f"{doc['dataset']['unreadable']} unreadable images skipped")
    print("wrote " + ", ".join(str(p) for p in written))
    return coco_exit_status(doc)


def coco_exit_status(doc: dict) -> int:
    """0 only when every configuration of the matrix ran and every image was read; 1
    otherwise (the report says which and why), as for compare."""
    missing = [r for r in doc["rows"] if r["status"] != "ok"]
    if missing:
        print(f"{len(missing)} of {len(doc['rows'])} configurations did not run (see the "
              "report)")
    return 1 if missing or doc["dataset"]["unreadable"] else 0
