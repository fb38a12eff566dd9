"""`harness export cfg.py ckpt -o model.onnx`: the detector as an ONNX file in the variant,
NMS, precision and opset deployment engineers choose, with the settings recorded inside."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="mmyolo config (.py)")
    p.add_argument("checkpoint", type=Path, nargs="?", default=None,
                   help="checkpoint (.pth); omit only with --random-init")
    p.add_argument("-o", "--output", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--random-init", action="store_true",
                   help="export mmyolo's seeded random initialisation (no checkpoint)")
    p.add_argument("--variant", choices=("raw", "decoded", "end2end", "split"), default="raw",
                   help="raw: head maps; decoded: boxes + scores before NMS; end2end: with NMS; "
                        "split (two-stage): an RPN graph and a head graph (X.head.onnx), "
                        "proposals and RoIAlign outside them")
    p.add_argument("--nms", choices=("onnx", "efficient", "batched"), default=None,
                   help="end2end NMS: ONNX NonMaxSuppression, TRT::EfficientNMS_TRT or "
                        "TRT::BatchedNMSDynamic_TRT")
    p.add_argument("--pre-topk", type=int, default=None,
                   help="BatchedNMS topK (default min(nms_pre, 4096)); with --nms onnx a "
                        "pre-NMS TopK over each box's best score (none by default); "
                        "efficient ignores it")
    p.add_argument("--keep-topk", type=int, default=None,
                   help="detections kept (default the config's max_per_img)")
    p.add_argument("--iou-threshold", type=float, default=None,
                   help="default the config's test_cfg.nms.iou_threshold")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="default the config's score_thr")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument("--calib", type=Path, default=None,
                   help="folder of calibration images (int8)")
    p.add_argument("--calib-count", type=int, default=32, help="calibration images (int8)")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"),
                   default="minmax")
    p.add_argument("--calib-cache", type=Path, default=None,
                   help="calibration cache folder (default ~/.cache/harness/calibration)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--batch", type=int, default=None,
                   help="fix the batch size (default: a dynamic batch axis)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input height and width (default: what the preprocessing produces)")
    p.add_argument("--simplify", action="store_true", help="run onnxsim (must be installed)")
    p.add_argument("--device", default="cpu", help="device the model is traced on")
    two = p.add_argument_group("two-stage detectors (mmdet Faster R-CNN): the forms a "
                               "deployment writes instead of mmdet's")
    two.add_argument("--roi-align", choices=("half_pixel", "plugin", "opset10"), default=None,
                     help="RoIAlign as ONNX RoiAlign opset 16 half_pixel (default, mmcv's "
                          "aligned=True), as TensorRT's ROIAlign_TRT plugin node (the same "
                          "numbers), or in the opset-10 form (no half-pixel offset: drifts)")
    two.add_argument("--roi-sampling-ratio", type=int, default=None,
                     help="a fixed RoIAlign sampling ratio instead of the config's")
    two.add_argument("--rpn-nms-pre", type=int, default=None,
                     help="the RPN's pre-NMS TopK per level (default the config's nms_pre)")
    two.add_argument("--rpn-max-per-img", type=int, default=None,
                     help="proposals kept after the RPN's NMS (default the config's)")
    two.add_argument("--rpn-nms-scope", choices=("level", "all"), default=None,
                     help="one proposal NMS per FPN level (mmdet) or over all levels")


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.export.calibration import CalibrationSettings
    from harness.export.onnx_export import ExportSettings, check_options, export_onnx
    from harness.models.config import load_model_source

    if args.checkpoint is None and not args.random_init:
        raise UserError("give a checkpoint, or --random-init to export untrained weights")
    if args.checkpoint is not None and args.random_init:
        raise UserError("--random-init and a checkpoint exclude each other")
    if args.precision == "int8" and args.calib is None:
        raise UserError("--precision int8 needs calibration images: --calib DIR")
    settings = ExportSettings(
        variant=args.variant, nms=args.nms, pre_topk=args.pre_topk, keep_topk=args.keep_topk,
        iou_threshold=args.iou_threshold, score_threshold=args.score_threshold,
        precision=args.precision, opset=args.opset, batch=args.batch,
        input_size=tuple(args.input_size) if args.input_size else None,
        simplify=args.simplify)
    check_options(settings)  # before the (slow) model load
    calibration = None
    if args.calib is not None:
        cache = args.calib_cache or Path.home() / ".cache" / "harness" / "calibration"
        calibration = CalibrationSettings(images=args.calib, count=args.calib_count,
                                          method=args.calib_method, cache_dir=cache)
    model = with_two_stage_forms(load_model_source(args.config, args.checkpoint,
                                                   device=args.device), args)
    result = export_onnx(model, args.output, settings, calibration)
    meta = result.metadata
    for note in result.notes:
        print(f"note: {note}")
    nms = meta["nms"]
    what = meta["variant"] if nms is None else (
        f"end2end ({nms['kind']} NMS: keep {nms['keep_topk']}, IoU {nms['iou_threshold']}, "
        f"score {nms['score_threshold']}"
        + (f", topK {nms['pre_topk']}" if nms["pre_topk"] is not None else "") + ")")
    shape = "x".join(str(d) for d in meta["input"]["shape"])
    print(f"{model.family}: {what}, {meta['precision']}, opset {meta['opset']}, "
          f"input {meta['input']['name']} {shape}")
    print(f"outputs: {', '.join(meta['outputs'])}")
    calib = meta.get("calibration")
    if calib:
        print(f"int8 calibration: {calib['method']} on {calib['count']} images "
              f"(cache {calib['cache']}: {calib['cache_file']})")
    print(f"wrote {result.path} in {result.seconds:.1f} s")
    report_check(result.path)
    return 0


def with_two_stage_forms(model, args: argparse.Namespace):
    """The model with the two-stage options applied (a copy; the source is unchanged); a
    one-line error when they are given for a single-stage model."""
    import copy
    import dataclasses

    from harness.errors import UserError

    rpn = {k: v for k, v in (("nms_pre", args.rpn_nms_pre),
                             ("max_per_img", args.rpn_max_per_img),
                             ("scope", args.rpn_nms_scope)) if v is not None}
    options = {k: v for k, v in (("roi_align_form", args.roi_align),
                                 ("sampling_ratio", args.roi_sampling_ratio)) if v is not None}
    if not (rpn or options):
        return model
    if getattr(model, "rpn", None) is None:
        raise UserError("--roi-align, --roi-sampling-ratio and --rpn-* are for two-stage "
                        f"detectors; {args.config} is a {model.family}")
    out = copy.copy(model)
    out.rpn = dataclasses.replace(model.rpn, **rpn)
    out.export_options = {**model.export_options, **options}
    return out


def report_check(path: Path) -> None:
    """`harness check` on the written file: its errors and warnings; the export stands either
    way, but the user hears now that TensorRT will not build it."""
    from harness.commands.check import finding_lines
    from harness.export.check import check_file

    result = check_file(path)
    for line in finding_lines(result):
        print(line)
    if result.errors:
        print(f"TensorRT will not build {path}: {len(result.errors)} error(s) above "
              f"(TensorRT {result.trt_version} operator list)")
