"""`harness compare cfg.py ckpt [ENGINE_OR_ONNX ...] --images DIR`: PyTorch against every
target, layer by layer and detection by detection; writes `compare.md`, `layers.png` and the
`compare` section of `results.json` into `--out`."""
from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", type=Path, nargs="*", metavar="CFG CKPT [ENGINE_OR_ONNX ...]",
                   help="mmyolo config (.py), checkpoint (.pth), then the TensorRT engines and "
                        "ONNX files to compare with PyTorch (default: the raw fp32 ONNX, "
                        "exported into --out); with --experiment only the files")
    p.add_argument("--experiment", type=Path, default=None,
                   help="experiment file: model, images and [compare] settings from it "
                        "(flags override; its ONNX files and engines are the default targets)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of images (a COCO split folder works)")
    p.add_argument("--count", type=int, default=None,
                   help="images to use, first N by name (default 16)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 4)")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default reports/<config name>/)")
    p.add_argument("--layers", action="append", default=[], metavar="PATTERN",
                   help="module paths to compare (globs, repeatable; default every ConvModule "
                        "and head conv)")
    p.add_argument("--no-layers", action="store_true", help="skip the layer diff")
    p.add_argument("--provider", choices=("cpu", "cuda", "auto"), default=None,
                   help="onnxruntime provider for ONNX targets (default cpu)")
    p.add_argument("--device", default=None, help="PyTorch device, the reference (default cpu)")
    p.add_argument("--score-tol", type=float, default=None,
                   help="score change a matched detection may show before it counts as drift "
                        "(default 1e-3)")
    p.add_argument("--box-tol", type=float, default=None,
                   help="box change in pixels a matched detection may show (default 0.5)")
    p.add_argument("--iou-band", type=float, default=None,
                   help="how close to the IoU threshold a suppression is an IoU edge "
                        "(default 0.02)")


def list_images(folder: Path, count: int) -> list[Path]:
    from harness.errors import UserError

    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    return images[:count]


def default_target(model, out: Path) -> Path:
    """The raw fp32 ONNX of the model, exported into the report folder (reused when it was
    exported from the same checkpoint)."""
    from harness.export.onnx_export import ExportSettings, export_cached

    return export_cached(model, out / f"{Path(model.cfg_path).stem}_raw_fp32.onnx",
                         ExportSettings(variant="raw"))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Flags over the experiment's [model] / [data] / [compare] over the defaults: fills
    config, checkpoint, targets and every setting into `args`."""
    from harness.errors import UserError

    exp = None
    paths = list(args.paths)
    if args.experiment is not None:
        from harness.experiment import load_experiment

        exp = load_experiment(args.experiment)
        args.config, args.checkpoint = exp.model.config, exp.model.checkpoint
        args.targets = paths or [*exp.model.onnx.values(), *exp.model.engines.values()]
    else:
        if len(paths) < 2:
            raise UserError("give the config and the checkpoint (harness compare cfg.py "
                            "ckpt.pth [ENGINE_OR_ONNX ...]), or --experiment FILE")
        args.config, args.checkpoint, args.targets = paths[0], paths[1], paths[2:]
    spec = exp.compare if exp else None
    defaults = {"count": 16, "batch": 4, "provider": "cpu", "device": "cpu",
                "score_tol": 1e-3, "box_tol": 0.5, "iou_band": 0.02}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            value = getattr(spec, name, None) if spec else None
            setattr(args, name, default if value is None else value)
    if not args.layers and spec and spec.layers:
        args.layers = list(spec.layers)
    if args.images is None:
        if exp is None:
            raise UserError("give --images DIR (a folder of images, e.g. a COCO split)")
        args.images = exp.data.images
    if args.out is None:
        args.out = Path("reports") / (exp.name if exp else Path(args.config).stem)
    args.experiment_section = exp.results_section() if exp else None
    return args


def run(args: argparse.Namespace) -> int:
    from harness.align.compare import run_compare
    from harness.align.detections import Tolerances
    from harness.align.targets import target_kind
    from harness.cli import writable_dir
    from harness.errors import UserError
    from harness.models.mmyolo import load_mmyolo_model
    from harness.report.compare_report import write_compare_report

    args = resolve(args)
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    for t in args.targets:
        target_kind(t)  # refuse an unknown file type before the slow parts
        if not t.is_file():
            raise UserError(f"{target_kind(t)} file not found: {t}")
    images = list_images(args.images, args.count)
    out = writable_dir(args.out)
    model = load_mmyolo_model(args.config, args.checkpoint, device=args.device)
    paths = args.targets or [default_target(model, out)]
    targets = [_open_or_say_why(p, args.provider) for p in paths]
    for t in targets:
        print(f"{t.name}: " + (f"{t.kind}, {t.precision}" if t.available else t.reason))
    tol = Tolerances(score=args.score_tol, box_px=args.box_tol, iou_band=args.iou_band)
    doc = run_compare(model, targets, images, batch=args.batch, layer_patterns=args.layers,
                      with_layers=not args.no_layers, tol=tol, work_dir=out)
    written = write_compare_report(doc, out, args.experiment_section)
    print(doc["verdict"])
    print("wrote " + ", ".join(str(p) for p in written))
    return compare_exit_status(doc)


def _open_or_say_why(path: Path, provider: str):
    """The target behind `path`, or, when the file cannot be loaded (corrupt, of an unknown
    layout), a target row saying why: the other targets are still compared."""
    from harness.align.targets import Target, open_target, target_kind
    from harness.errors import UserError

    try:
        return open_target(path, provider=provider)
    except UserError as exc:
        return Target(Path(path), target_kind(path), reason=f"could not be compared: {exc}")


def compare_exit_status(doc: dict) -> int:
    """0 only when every requested target was compared and every image read; 1 otherwise
    (the report says which and why)."""
    missing = [t["name"] for t in doc["targets"] if not t["available"]]
    unreadable = doc["inputs"].get("unreadable") or []
    if missing:
        print(f"not compared: {', '.join(missing)} (see the report)")
    if unreadable:
        print(f"unreadable images skipped: {len(unreadable)}")
    return 1 if missing or unreadable else 0
