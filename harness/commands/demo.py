"""`harness demo`: the main job on the embedded default — synthetic data, the bundled fixture
checkpoint, its ONNX exports, `compare` and the `coco` matrix on this machine, then the
experiment's gates — writing `reports/demo/` (compare.md, coco.md, results.json, plots)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

# Shipped inside the package (harness/experiments/demo.toml), so the demo runs from any folder
# and from an installed wheel; it writes data/ and reports/ under the current folder.
DEMO_EXPERIMENT = "harness:experiments/demo.toml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default=DEMO_EXPERIMENT,
                   help="the demo's experiment file (model, data, matrix, gates); "
                        "harness:experiments/NAME.toml is one shipped with harness "
                        f"(default {DEMO_EXPERIMENT})")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default reports/<experiment name>/)")
    p.add_argument("--images", type=int, default=120,
                   help="synthetic images to make when the experiment's data is missing "
                        "(half are val)")
    p.add_argument("--seed", type=int, default=1,
                   help="dataset seed (the fixture was trained on seed 0)")
    p.add_argument("--compare-count", type=int, default=None,
                   help="images for compare (default the experiment's [compare] count)")


def _step(i: int, text: str) -> None:
    print(f"[{i}/5] {text}", flush=True)


def export_targets(model, folder: Path, calib_dir: Path) -> dict[str, Path]:
    """The files the demo compares: raw fp32 / fp16 / int8 and an end2end file with
    EfficientNMS at mmyolo's own thresholds. Made once, reused while the checkpoint is the
    same."""
    from harness.export.calibration import CalibrationSettings
    from harness.export.onnx_export import ExportSettings, export_cached

    stem = Path(model.cfg_path).stem
    wanted = {
        f"{stem}_raw_fp32.onnx": ExportSettings(variant="raw"),
        f"{stem}_raw_fp16.onnx": ExportSettings(variant="raw", precision="fp16"),
        f"{stem}_raw_int8.onnx": ExportSettings(variant="raw", precision="int8"),
        f"{stem}_end2end_efficient.onnx": ExportSettings(variant="end2end", nms="efficient"),
    }
    calib = CalibrationSettings(images=calib_dir, count=16, cache_dir=folder / "calib")
    log = (lambda message: print(f"      {message}", flush=True))  # noqa: E731
    return {name: export_cached(model, folder / name, settings,
                                calib if settings.precision == "int8" else None, log)
            for name, settings in wanted.items()}


def run(args: argparse.Namespace) -> int:
    from harness.align.session import compare_with_settings
    from harness.cli import writable_dir
    from harness.commands.coco import print_rows
    from harness.eval.runner import run_coco
    from harness.experiment import load_experiment
    from harness.gates.limits import plan_gates
    from harness.models.config import load_model_source
    from harness.report.coco_report import write_coco_report
    from harness.report.compare_report import write_compare_report
    from harness.settings import coco_settings, compare_settings
    from harness.synth import generate_synthetic_coco

    started = time.time()
    exp = load_experiment(args.experiment)
    out = writable_dir(args.out or Path("reports") / exp.name)
    images = exp.data.images
    data_root = images.parent
    if not images.is_dir() or not any(images.iterdir()):
        _step(1, f"writing {args.images} synthetic images (seed {args.seed}) to {data_root}")
        generate_synthetic_coco(data_root, images=args.images, seed=args.seed,
                                val_fraction=0.5, progress=True)
    else:
        _step(1, f"reusing the synthetic data in {data_root}")

    _step(2, f"loading {exp.model.config.name} + {exp.model.checkpoint.name} and exporting "
             "ONNX files")
    model = load_model_source(exp.model.config, exp.model.checkpoint)
    files = export_targets(model, writable_dir(out / "models"), images)

    compare = compare_settings(args.experiment, paths=list(files.values()),
                               count=args.compare_count, out=out)
    _step(3, f"compare: PyTorch vs {len(files)} ONNX files on {compare.count} images")
    doc = compare_with_settings(compare, say=lambda m: print(f"      {m}", flush=True))
    write_compare_report(doc, out, compare.experiment)
    print(f"      {doc.verdict}")

    _step(4, "coco: mAP and latency across the experiment's matrix")
    coco = coco_settings(args.experiment, out=out, progress=False)
    coco_doc, _ = run_coco(coco)
    write_coco_report(coco_doc, out, coco.experiment)
    print_rows(coco_doc)

    _step(5, f"gates of {args.experiment}")
    plan = plan_gates(str(out / "results.json"), str(args.experiment), ".")
    failed = [c for c in plan.checks if c.skipped is None and not c]
    for c in plan.checks:
        state = "skip" if c.skipped is not None else ("pass" if c else "FAIL")
        value = (c.skipped.removeprefix(f"{c.test_name}: ") if c.skipped is not None
                 else f"cannot be checked: {c.error}" if c.error is not None
                 else f"{c.value:.4g} (limit {c.limit:g})")
        print(f"      {state:4}  {c.test_name:<48} {value}")
    print(f"demo finished in {time.time() - started:.0f} s; reports: {out / 'compare.md'}, "
          f"{out / 'coco.md'}")
    if failed:  # exit 1: checks failed (2 is for bad input)
        print(f"{len(failed)} of {len(plan.checks)} gates failed: "
              + ", ".join(c.test_name for c in failed))
        return 1
    print(f"all {sum(1 for c in plan.checks if c)} gates passed "
          f"({sum(1 for c in plan.checks if c.skipped is not None)} skipped); the same gates "
          f"as tests: pytest --harness-experiment {args.experiment}")
    return 0
