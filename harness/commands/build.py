"""`harness build model.onnx -o model.engine`: a TensorRT engine (fp32 / fp16 / int8, one batch
profile) with its sidecar `model.engine.json`. Without TensorRT it says so in one line."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", type=Path, help="ONNX file (from 'harness export' or your own)")
    p.add_argument("-o", "--output", type=Path, required=True, help="engine file to write")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="int8: from the ONNX's Q/DQ nodes, else calibrated on --calib "
                        "(TensorRT's calibrators are deprecated since 10.1, gone in 11)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--workspace-gb", type=float, default=4.0,
                   help="TensorRT workspace memory pool limit")
    p.add_argument("--calib", type=Path, default=None,
                   help="folder of calibration images (int8 without Q/DQ nodes)")
    p.add_argument("--calib-count", type=int, default=32, help="calibration images (int8)")
    p.add_argument("--calib-cache", type=Path, default=None,
                   help="calibration cache folder (default ~/.cache/harness/calibration)")
    p.add_argument("--config", type=Path, default=None,
                   help="mmyolo config whose preprocessing feeds calibration (int8 --calib)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="TensorRT timing cache file, read if present and written after")
    p.add_argument("--mark", nargs="+", default=None, metavar="MODULE",
                   help="debug engine: mark the ONNX output tensors of these modules' nodes "
                        "(module paths, ONNX scopes or node names) as outputs for the layer "
                        "diff")
    p.add_argument("--fp32-layers", type=Path, default=None, metavar="FILE",
                   help="keep these layers in fp32 in an fp16 / int8 engine (per-layer "
                        "precision constraints): the fp32_layers.json 'harness sensitivity' "
                        "writes, or a JSON list of layer-name prefixes")
    p.add_argument("--force", action="store_true",
                   help="build even when 'harness check' finds an error (a TopK K > 3840, an "
                        "operator the ONNX parser lacks, ...)")


def run(args: argparse.Namespace) -> int:
    from harness.backends.tensorrt_build import build_engine, import_tensorrt
    from harness.backends.tensorrt_plan import profile_shapes
    from harness.errors import UserError

    # cheap checks first, so a typo is reported even where TensorRT is missing
    profile_shapes(["batch", 3, 1, 1], args.min_batch, args.opt_batch, args.max_batch)
    if not args.onnx.is_file():
        raise UserError(f"ONNX file not found: {args.onnx}")
    if args.calib is not None and args.config is None:
        raise UserError("--calib needs --config (the model's preprocessing feeds calibration)")
    fp32_layers = None
    if args.fp32_layers is not None:
        from harness.sensitivity.constraints import read_constraints

        fp32_layers = read_constraints(args.fp32_layers)
    trt = import_tensorrt()
    if refused_by_check(args.onnx, str(trt.__version__), args.force):
        return 1
    images, preprocess = None, None
    if args.calib is not None:
        from harness.export.calibration import calibration_images
        from harness.models.mmyolo import read_config
        from harness.models.pipeline import preprocess_spec_from_config

        images = calibration_images(args.calib, args.calib_count)
        preprocess = preprocess_spec_from_config(read_config(args.config))
    result = build_engine(
        args.onnx, args.output, precision=args.precision, min_batch=args.min_batch,
        opt_batch=args.opt_batch, max_batch=args.max_batch, workspace_gb=args.workspace_gb,
        calib_images=images, preprocess=preprocess, calib_cache_dir=args.calib_cache,
        timing_cache=args.timing_cache, mark_layers=args.mark, fp32_layers=fp32_layers)
    for note in result.notes:
        print(f"note: {note}")
    side = result.sidecar
    print(f"TensorRT {side.tensorrt_version} on {side.gpu_name} ({side.compute_capability}): "
          f"{side.precision}, batch {args.min_batch}/{args.opt_batch}/{args.max_batch}")
    print(f"wrote {result.engine_path} and {result.sidecar_path} in {result.seconds:.1f} s")
    return 0


def refused_by_check(onnx_path: Path, trt_version: str, force: bool) -> bool:
    """`harness check` before building: print its errors and warnings; True (refuse) when an
    error says the build will fail and --force was not given."""
    from harness.commands.check import finding_lines
    from harness.errors import UserError
    from harness.export.check import DEFAULT_TRT_VERSION, check_file, resolve_version

    try:
        version = resolve_version(trt_version)
    except UserError:
        print(f"note: no ONNX operator list for TensorRT {trt_version}; checking against "
              f"TensorRT {DEFAULT_TRT_VERSION}'s")
        version = DEFAULT_TRT_VERSION
    result = check_file(onnx_path, version)
    for line in finding_lines(result):
        print(line)
    if result.errors and not force:
        print(f"refusing to build: {len(result.errors)} error(s) above say TensorRT cannot "
              f"build {onnx_path}; fix them, or pass --force to try anyway")
        return True
    return False
