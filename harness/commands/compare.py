"""`harness compare cfg.py ckpt [ENGINE_OR_ONNX ...] --images DIR`: PyTorch against every
target, layer by layer and detection by detection; writes `compare.md`, `layers.png` and the
`compare` section of `results.json` into `--out`."""
from __future__ import annotations

import argparse
from pathlib import Path


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
    p.add_argument("--no-batch-invariance", action="store_true",
                   help="skip running every image again alone (batch 1) to check that its "
                        "detections do not depend on the batch (on by default at --batch > 1)")
    p.add_argument("--onnx", action="append", default=[], type=Path, metavar="FILE",
                   help="the source ONNX of an engine another tool built (trtexec, "
                        "easydeploy, mmdeploy: no harness sidecar): names its layers and its "
                        "NMS node; repeat once per engine, in the order of the engines")
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
    add_test_cfg_arguments(p)


def add_test_cfg_arguments(p: argparse.ArgumentParser) -> None:
    """The test_cfg settings a user can change for the PyTorch reference (compare, coco)."""
    p.add_argument("--nms-pre", type=int, default=None, metavar="N",
                   help="candidates kept before NMS (test_cfg.nms_pre; e.g. 3840 to align "
                        "with TensorRT's TopK limit; default: the config's)")
    p.add_argument("--score-thr", type=float, default=None,
                   help="test_cfg.score_thr (default: the config's)")
    p.add_argument("--iou-threshold", type=float, default=None,
                   help="test_cfg.nms.iou_threshold (default: the config's)")
    p.add_argument("--max-per-img", type=int, default=None,
                   help="test_cfg.max_per_img (default: the config's)")


def run(args: argparse.Namespace) -> int:
    from harness.align.session import compare_with_settings
    from harness.cli import writable_dir
    from harness.report.compare_report import write_compare_report
    from harness.settings import compare_settings

    settings = compare_settings(
        args.experiment, paths=args.paths, images=args.images, count=args.count,
        batch=args.batch, out=args.out, layers=args.layers, with_layers=not args.no_layers,
        batch_invariance=not args.no_batch_invariance,
        provider=args.provider, device=args.device, score_tol=args.score_tol,
        nms_pre=args.nms_pre, score_thr=args.score_thr, iou_threshold=args.iou_threshold,
        max_per_img=args.max_per_img,
        box_tol=args.box_tol, iou_band=args.iou_band, onnx=args.onnx)
    writable_dir(settings.out)
    doc = compare_with_settings(settings)
    written = write_compare_report(doc, settings.out, settings.experiment)
    print(doc.verdict)
    print("wrote " + ", ".join(str(p) for p in written))
    return compare_exit_status(doc)


def compare_exit_status(doc) -> int:
    """0 only when every requested target was compared and every image read; 1 otherwise
    (the report says which and why). doc: harness.results.CompareResult."""
    missing = [t.name for t in doc.targets if not t.available]
    unreadable = doc.inputs.unreadable
    if missing:
        print(f"not compared: {', '.join(missing)} (see the report)")
    if unreadable:
        print(f"unreadable images skipped: {len(unreadable)}")
    return 1 if missing or unreadable else 0
