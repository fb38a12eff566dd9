"""Build a TensorRT engine from an ONNX file: plugins registered (EfficientNMS / BatchedNMS
resolve), one optimization profile over the batch axis, fp32 / fp16 / int8 (explicit from a
QDQ ONNX, or calibrated on the harness's own preprocessed images with a cache), a timing cache,
a workspace limit, optional layers marked as outputs for the layer diff; then the sidecar.
Written against the TensorRT 10 Python API; `tensorrt` is imported only here, when building.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from harness.backends.tensorrt_plan import (BatchProfile, calibration_batches,
                                            calibration_cache_path, profile_shapes,
                                            select_layers)
from harness.backends.tensorrt_sidecar import EngineSidecar, write_sidecar
from harness.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = "install harness[tensorrt] on a machine with an NVIDIA GPU"


def import_tensorrt() -> Any:
    """`tensorrt`, or a UserError that says why not and what to install."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install failing to load its .so
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"TensorRT is not available: {reason}; {INSTALL_HINT}") from None
    return trt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def current_gpu(device: int = 0) -> tuple[str, str]:
    """(name, "major.minor") of the CUDA device the engine is built for / runs on."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"TensorRT needs a CUDA GPU and torch sees none; {INSTALL_HINT}")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


@dataclass
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    sidecar: EngineSidecar
    seconds: float
    notes: list[str] = field(default_factory=list)


class EntropyCalibrator:
    """Factory for an IInt8EntropyCalibrator2 subclass (made when tensorrt is imported): it
    preprocesses `batches` of image paths one batch per get_batch() call into one device
    buffer, and reads/writes `cache_path` so a rebuild with the same ONNX, images and method
    skips calibration."""

    @staticmethod
    def make(trt: Any, batches: Sequence[Sequence[Path]], preprocess: Any,
             input_shape: Sequence[int], cache_path: Path) -> Any:
        import torch

        from harness.data.preprocess import read_image, transform_image
        from harness.export.calibration import fit_to_input

        class _Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self) -> None:
                trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 needs the base init
                self.batches = [list(b) for b in batches]
                self.next_index = 0
                self.size_hw = (int(input_shape[2]), int(input_shape[3]))
                self.device_input = torch.empty((len(self.batches[0]), *input_shape[1:]),
                                                dtype=torch.float32, device="cuda")

            def get_batch_size(self) -> int:
                return len(self.batches[0])

            def get_batch(self, names: Sequence[str]) -> Union[list[int], None]:
                if self.next_index >= len(self.batches):
                    return None  # tells TensorRT calibration data is exhausted
                images = []
                for path in self.batches[self.next_index]:
                    x, _ = transform_image(read_image(path), preprocess, str(path))
                    images.append(fit_to_input(x, self.size_hw, preprocess.pad_value,
                                               str(path)))
                self.next_index += 1
                self.device_input.copy_(torch.from_numpy(np.stack(images)))
                torch.cuda.synchronize()
                return [int(self.device_input.data_ptr())]

            def read_calibration_cache(self) -> Union[bytes, None]:
                return cache_path.read_bytes() if cache_path.is_file() else None

            def write_calibration_cache(self, cache: Any) -> None:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cache_path.write_bytes(bytes(cache))

        return _Calibrator()


def report_parser_errors(parser: Any, onnx_path: Path) -> str:
    """Every ONNX parser error on its own line (node index, name, operator, description),
    printed to stderr; returns the first as the one-line summary."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node()
        # node_name / node_operator exist from TensorRT 8.6 on
        name = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        lines.append(f"  node {node} {name or '?'} ({op or '?'}): {err.desc()} "
                     f"[{err.code()}]")
    for line in lines:
        print(line, file=sys.stderr)
    first = lines[0].strip() if lines else "no error reported"
    return f"TensorRT cannot parse {onnx_path.name} ({len(lines)} error(s)); first: {first}"


def mark_layer_outputs(network: Any, requested: Sequence[str]) -> list[str]:
    """Mark every output of the layers matching `requested` (module paths / ONNX scopes /
    node names) as network outputs; returns the tensor names marked. The parser names each
    layer after its ONNX node, so the names carry the PyTorch scopes."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    chosen = set(select_layers([layer.name for layer in layers], requested))
    marked: list[str] = []
    for layer in layers:
        if layer.name not in chosen:
            continue
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            if not tensor.is_network_output:
                network.mark_output(tensor)
                marked.append(tensor.name)
    return marked


def build_engine(onnx_path: Union[str, Path], engine_path: Union[str, Path],
                 precision: str = "fp32", min_batch: int = 1, opt_batch: int = 4,
                 max_batch: int = 4, workspace_gb: float = 4.0,
                 calib_images: Union[Sequence[Path], None] = None, preprocess: Any = None,
                 calib_cache_dir: Union[Path, None] = None, calib_batch_size: int = 4,
                 timing_cache: Union[str, Path, None] = None,
                 mark_layers: Union[Sequence[str], None] = None,
                 tf32: bool = False) -> BuildResult:
    """Build `engine_path` from `onnx_path` and write its sidecar next to it.

    precision int8: a QDQ ONNX is built as it is (explicit quantization); otherwise
    `calib_images` and `preprocess` (the model's PreprocessSpec) are required and the last
    short calibration batch is padded (tensorrt_plan.calibration_batches). tf32: TensorRT
    enables TF32 for fp32 layers by default; it is cleared unless asked for, so fp32 engines
    align with fp32 references (DEVICE.md), and recorded in the sidecar.
    """
    from harness.backends.onnxruntime_backend import _dims, graph_precision, read_onnx
    from harness.export.metadata import file_sha256, read_metadata

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; choose {'|'.join(PRECISIONS)}")
    model = read_onnx(onnx_path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{onnx_path} has {len(inputs)} inputs; the harness feeds one batch")
    input_name = inputs[0].name
    profile = profile_shapes(_dims(inputs[0]), min_batch, opt_batch, max_batch, input_name)
    explicit_int8 = graph_precision(model) == "int8"
    if precision == "int8" and not explicit_int8 and (not calib_images or preprocess is None):
        raise UserError(f"{onnx_path.name} has no Q/DQ nodes, so int8 needs calibration "
                        "images: --calib DIR (and the model's preprocessing)")
    export_record = read_metadata(model)
    del model

    trt = import_tensorrt()
    gpu_name, capability = current_gpu()
    started = time.perf_counter()
    notes: list[str] = []
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # registers EfficientNMS_TRT, BatchedNMS...
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it
    flags = 0 if trt_major(trt) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the ONNX
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(report_parser_errors(parser, onnx_path))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(trt_profile)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision in ("fp16", "int8"):
        # int8 engines keep fp16 for layers TensorRT cannot quantize, not fp32
        config.set_flag(trt.BuilderFlag.FP16)
    calib_cache = None
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if explicit_int8:
            notes.append("int8 from the ONNX's Q/DQ nodes (explicit quantization)")
        else:
            cache_dir = calib_cache_dir or Path.home() / ".cache" / "harness" / "calibration"
            calib_cache = calibration_cache_path(cache_dir, onnx_path, calib_images or [],
                                                 "entropy2")
            batches = calibration_batches(list(calib_images or []),
                                          min(calib_batch_size, max_batch), last="pad")
            calib_shape = (len(batches[0]), *profile.opt[1:])
            config.int8_calibrator = EntropyCalibrator.make(trt, batches, preprocess,
                                                            calib_shape, calib_cache)
            # the calibrator's batch must lie in a profile: calibrate at its own batch size
            calib_profile = builder.create_optimization_profile()
            calib_profile.set_shape(input_name, calib_shape, calib_shape, calib_shape)
            config.set_calibration_profile(calib_profile)
            notes.append(f"int8 calibrated (entropy2) on {len(calib_images or [])} images "
                         f"in {len(batches)} batches; cache {calib_cache}")
    cache_file = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    trt_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(trt_cache, ignore_mismatch=False)

    marked = mark_layer_outputs(network, mark_layers) if mark_layers else []
    if marked:
        notes.append(f"{len(marked)} layer outputs marked (debug engine: fusions across "
                     "them are lost)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT failed to build {engine_path.name} from {onnx_path.name} "
                        "(see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(plan))
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))

    def shapes(is_input: bool) -> dict[str, list[int]]:
        return {network.get_input(i).name if is_input else network.get_output(i).name:
                [int(d) for d in (network.get_input(i) if is_input
                                  else network.get_output(i)).shape]
                for i in range(network.num_inputs if is_input else network.num_outputs)}

    sidecar = EngineSidecar(
        tensorrt_version=str(trt.__version__), gpu_name=gpu_name,
        compute_capability=capability, precision=precision, profile=profile.to_json(),
        inputs=shapes(True), outputs=shapes(False), onnx_path=str(onnx_path.resolve()),
        onnx_sha256=file_sha256(onnx_path), export=export_record, marked_layers=marked,
        build={"workspace_gb": workspace_gb, "timing_cache": str(cache_file or ""),
               "calibration_cache": str(calib_cache or ""),
               "explicit_int8": explicit_int8, "tf32": tf32})
    side = write_sidecar(engine_path, sidecar)
    return BuildResult(engine_path, side, sidecar, time.perf_counter() - started, notes)


def profile_of(sidecar: EngineSidecar) -> BatchProfile:
    return BatchProfile.from_json(sidecar.profile)
