"""Build a TensorRT engine from an ONNX file: plugins registered (EfficientNMS / BatchedNMS
resolve), one optimization profile over the batch axis, fp32 / fp16 / int8 (explicit from a
QDQ ONNX, or calibrated on the harness's own preprocessed images with a cache), a timing cache,
a workspace limit, optional ONNX tensors marked as outputs for the layer diff; then the sidecar.
Written against the TensorRT 10 Python API (each call checked against the 10.0 and 10.13
bindings, docs/tensorrt-api.md); TensorRT 11 builds only strongly typed networks, so there the
ONNX's own types decide the precision. `tensorrt` is imported only here, when building.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from harness.backends.tensorrt_plan import (calibration_batches, calibration_cache_path,
                                            extra_input_shapes, profile_shapes,
                                            select_tensors)
from harness.backends.tensorrt_sidecar import EngineSidecar, write_sidecar
from harness.errors import UserError, first_line

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = "install harness[tensorrt] on a machine with an NVIDIA GPU"
# the layer diff compares float activations; other tensors are left unmarked
MARKABLE_TYPES = ("FLOAT", "HALF")
# layers whose outputs are never marked, as Polygraphy's mark_layerwise skips them
# (tools/Polygraphy/polygraphy/backend/trt/util.py)
UNMARKABLE_LAYERS = ("SHAPE", "CONSTANT")
# layers a precision constraint is not put on: Q/DQ layers carry their own types (their
# names come from the tensor they quantize, so they share its producer's prefix), shape and
# constant layers compute no activations, plugins choose their own formats
UNCONSTRAINED_LAYERS = ("QUANTIZE", "DEQUANTIZE", "SHAPE", "CONSTANT", "PLUGIN", "PLUGIN_V2",
                        "PLUGIN_V3")
# plugins deprecated since TensorRT 9.0 and absent from 11.0's plugin/README.md
REMOVED_IN_11 = ("BatchedNMS_TRT", "BatchedNMSDynamic_TRT")


def import_tensorrt() -> Any:
    """`tensorrt`, or a UserError that says why not and what to install."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install failing to load its .so
        reason = first_line(exc)
        raise UserError(f"TensorRT is not available: {reason}; {INSTALL_HINT}") from None
    return trt


# one logger per tensorrt module for the whole process: TensorRT keeps "only a single logger
# pointer at any given time" and ignores a builder's or runtime's other logger while one
# exists (its warning, NVIDIA/TensorRT#1475), so every builder and runtime here shares this
_LOGGERS: dict[int, tuple[Any, Any]] = {}


def shared_logger(trt: Any) -> Any:
    """The process's trt.ILogger: prints warnings and errors to stderr, as
    trt.Logger(WARNING) does, and keeps every error in `.errors`, so a failed
    deserialization can say TensorRT's own reason in one line (deserialize_cuda_engine
    returns None and only the log says why). Subclassing trt.ILogger and calling its
    __init__ is how the bindings take a Python logger (pyCore.cpp PyLogger; Polygraphy's
    CustomTrtLogger; docs/tensorrt-api.md)."""
    held = _LOGGERS.get(id(trt))
    if held is not None and held[0] is trt:
        return held[1]

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(str(msg))
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR,
                             trt.ILogger.WARNING):
                print(f"[TensorRT] {getattr(severity, 'name', severity)}: {msg}",
                      file=sys.stderr)

    logger = RecordingLogger()
    _LOGGERS[id(trt)] = (trt, logger)
    return logger


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
    buffer (float32, as calibration inputs must be), and reads/writes `cache_path` so a
    rebuild with the same ONNX, images and method skips calibration.

    IInt8EntropyCalibrator2, IBuilderConfig.int8_calibrator and set_calibration_profile are
    deprecated since TensorRT 10.1 ("Superseded by explicit quantization": python/docstrings/
    infer/pyInt8Doc.h, python/src/infer/pyCore.cpp) and removed in 11.0; a Q/DQ ONNX is the
    int8 path that lasts. The bindings catch an exception raised in get_batch, print it and end
    calibration as if the data ran out (python/src/infer/pyInt8.cpp), so the calibrator keeps
    it in `error` and build_engine raises it after the build."""

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
                self.shape = (len(self.batches[0]), *(int(d) for d in input_shape[1:]))
                self.size_hw = (int(input_shape[2]), int(input_shape[3]))
                self.device_input: Any = None  # allocated with the first batch
                self.error: Union[BaseException, None] = None

            def get_batch_size(self) -> int:
                # deprecated since 10.0 (no implicit batch): the calibration profile's shape
                # is what TensorRT feeds; kept equal to it
                return self.shape[0]

            def get_batch(self, names: Sequence[str]) -> Union[list[int], None]:
                if self.error is not None or self.next_index >= len(self.batches):
                    return None  # tells TensorRT calibration data is exhausted
                try:
                    images = []
                    for path in self.batches[self.next_index]:
                        x, _ = transform_image(read_image(path), preprocess, str(path))
                        images.append(fit_to_input(x, self.size_hw, preprocess.pad_value,
                                                   str(path)))
                    if self.device_input is None:
                        self.device_input = torch.empty(self.shape, dtype=torch.float32,
                                                        device="cuda")
                    self.device_input.copy_(torch.from_numpy(np.stack(images)))
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - re-raised by build_engine
                    self.error = exc
                    return None
                self.next_index += 1
                return [int(self.device_input.data_ptr())]

            def read_calibration_cache(self) -> Union[bytes, None]:
                # an empty file means "calibrate", as Polygraphy's calibrator treats it
                data = cache_path.read_bytes() if cache_path.is_file() else b""
                return data or None

            def write_calibration_cache(self, cache: Any) -> None:
                try:  # cache: a memoryview over TensorRT's bytes
                    cache_path.parent.mkdir(parents=True, exist_ok=True)
                    cache_path.write_bytes(bytes(cache))
                except Exception as exc:  # noqa: BLE001 - swallowed by the bindings otherwise
                    self.error = exc

        return _Calibrator()


def report_parser_errors(parser: Any, onnx_path: Path) -> str:
    """Every ONNX parser error on its own line (node index, name, operator, description),
    printed to stderr; returns the first as the one-line summary."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node()
        # node_name / node_operator are bound from TensorRT 9 on (in 9.1's pyOnnx.cpp, not
        # in 8.6.1's)
        name = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        lines.append(f"  node {node} {name or '?'} ({op or '?'}): {err.desc()} "
                     f"[{err.code()}]")
    for line in lines:
        print(line, file=sys.stderr)
    first = lines[0].strip() if lines else "no error reported"
    return f"TensorRT cannot parse {onnx_path.name} ({len(lines)} error(s)); first: {first}"


def network_tensors(network: Any) -> dict[str, tuple[Any, Any]]:
    """name → (tensor, the layer that writes it, or None for a network input) of every tensor
    the network's layers read or write (as Polygraphy's get_all_tensors, backend/trt/util.py;
    an omitted optional input comes back as None and is left out)."""
    found: dict[str, tuple[Any, Any]] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None and tensor.name not in found:
                found[tensor.name] = (tensor, None)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            if tensor is not None:
                found[tensor.name] = (tensor, layer)
    return found


def mark_tensor_outputs(network: Any, names: Sequence[str]
                        ) -> tuple[list[str], list[str], dict[str, str]]:
    """Mark the ONNX tensors `names` (tensorrt_plan.select_tensors) as network outputs.
    Returns (marked: newly marked, in order; available: marked or already network outputs,
    in order; unmarked: name → why it was left out). Marking forces TensorRT to write the
    tensor, so fusions (Myelin's included) across it are lost and the debug engine is not the
    engine: compare its final outputs too."""
    tensors = network_tensors(network)
    marked: list[str] = []
    available: list[str] = []
    unmarked: dict[str, str] = {}
    for name in names:
        tensor, layer = tensors.get(name, (None, None))
        if tensor is None:
            unmarked[name] = "not in the TensorRT network (the parser folded it into weights)"
        elif tensor.is_network_output:
            available.append(name)
        elif tensor.is_network_input:
            unmarked[name] = "a network input"  # marking an input is an error (NvInfer.h)
        elif layer is not None and layer.type.name in UNMARKABLE_LAYERS:
            unmarked[name] = f"the output of a {layer.type.name} layer"
        elif tensor.is_shape_tensor:
            unmarked[name] = "a shape tensor (computed at build time)"
        elif tensor.dtype.name not in MARKABLE_TYPES:
            unmarked[name] = f"a {tensor.dtype.name} tensor, not a float activation"
        else:
            network.mark_output(tensor)
            marked.append(name)
            available.append(name)
    return marked, available, unmarked


def constrain_fp32_layers(trt: Any, network: Any, prefixes: Sequence[str]
                          ) -> tuple[list[str], dict[str, int]]:
    """Keep the layers whose names start with any of `prefixes` in fp32: `layer.precision =
    trt.float32` and `set_output_type(i, trt.float32)` on each float output (both are
    honoured only with BuilderFlag.OBEY_PRECISION_CONSTRAINTS, which build_engine sets).
    Layers of UNCONSTRAINED_LAYERS types and non-float outputs are left alone. Returns the
    constrained layer names in network order and how many layers each prefix matched."""
    constrained: list[str] = []
    matched = dict.fromkeys(prefixes, 0)
    wanted = tuple(prefixes)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not layer.name.startswith(wanted) or layer.type.name in UNCONSTRAINED_LAYERS:
            continue
        outputs = [j for j in range(layer.num_outputs)
                   if layer.get_output(j) is not None
                   and layer.get_output(j).dtype.name in MARKABLE_TYPES]
        if not outputs:  # integer / bool arithmetic: its precision is not float's
            continue
        layer.precision = trt.float32
        for j in outputs:
            layer.set_output_type(j, trt.float32)
        constrained.append(layer.name)
        for prefix in prefixes:
            if layer.name.startswith(prefix):
                matched[prefix] += 1
    return constrained, matched


def build_engine(onnx_path: Union[str, Path], engine_path: Union[str, Path],
                 precision: str = "fp32", min_batch: int = 1, opt_batch: int = 4,
                 max_batch: int = 4, workspace_gb: float = 4.0,
                 calib_images: Union[Sequence[Path], None] = None, preprocess: Any = None,
                 calib_cache_dir: Union[Path, None] = None, calib_batch_size: int = 4,
                 timing_cache: Union[str, Path, None] = None,
                 mark_layers: Union[Sequence[str], None] = None,
                 mark_tensors: Union[Sequence[str], None] = None,
                 tf32: bool = False,
                 fp32_layers: Union[Sequence[str], None] = None) -> BuildResult:
    """Build `engine_path` from `onnx_path` and write its sidecar next to it.

    precision int8: a QDQ ONNX is built as it is (explicit quantization); otherwise
    `calib_images` and `preprocess` (the model's PreprocessSpec) are required and the last
    short calibration batch is padded (tensorrt_plan.calibration_batches). tf32: TensorRT
    enables TF32 for fp32 layers by default; it is cleared unless asked for, so fp32 engines
    align with fp32 references (docs/gpu-machine.md), and recorded in the sidecar.

    mark_layers: module paths / scopes / node names whose nodes' output tensors are marked as
    extra outputs (`harness build --mark`); mark_tensors: ONNX tensor names marked exactly as
    given, in that order (the layer diff's chunked debug engines, tensorrt_marking); the
    sidecar's build["requested"] records the tensors asked for, in order.

    fp32_layers: layer-name prefixes (ONNX node scopes, `harness sensitivity`'s
    fp32_layers.json) kept in fp32 in an fp16 / int8 engine as per-layer precision
    constraints (constrain_fp32_layers, OBEY_PRECISION_CONSTRAINTS); a prefix no ONNX node
    has is an error before TensorRT is loaded. TensorRT 11 networks are strongly typed: the
    ONNX's own types decide there, and no constraint is set.
    """
    from harness.backends.onnxruntime_backend import _dims, graph_precision, read_onnx
    from harness.export.metadata import file_sha256, read_metadata

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; choose {'|'.join(PRECISIONS)}")
    model = read_onnx(onnx_path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    input_name = inputs[0].name if inputs else ""
    profile = profile_shapes(_dims(inputs[0]) if inputs else [], min_batch, opt_batch,
                             max_batch, input_name)
    extra = extra_input_shapes(onnx_path, inputs)
    onnx_precision = graph_precision(model)
    explicit_int8 = onnx_precision == "int8"
    if precision == "int8" and not explicit_int8 and extra:
        raise UserError(f"{onnx_path.name} takes {', '.join(extra)} besides the images: "
                        "TensorRT's int8 calibration here feeds images only; build fp32 / "
                        "fp16, or export an int8 (Q/DQ) ONNX")
    if precision == "int8" and not explicit_int8 and (not calib_images or preprocess is None):
        raise UserError(f"{onnx_path.name} has no Q/DQ nodes, so int8 needs calibration "
                        "images: --calib DIR (and the model's preprocessing)")
    # the layer diff's names are ONNX tensor names; resolved here so a typo fails early
    nodes = [(n.name, list(n.output)) for n in model.graph.node]
    wanted = select_tensors(nodes, mark_layers) if mark_layers else []
    if mark_tensors:
        made = {t for _, outputs in nodes for t in outputs if t}
        missing = [t for t in mark_tensors if t not in made]
        if missing:
            raise UserError(f"{onnx_path.name} has no node output named {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        wanted = list(dict.fromkeys([*wanted, *mark_tensors]))
    if fp32_layers:
        stray = [p for p in fp32_layers if not any(name.startswith(p) for name, _ in nodes)]
        if stray:
            raise UserError(f"no node of {onnx_path.name} starts with {stray[0]!r} (fp32 "
                            "layers); were the constraints written for this ONNX?")
    plugins = sorted({n.op_type for n in model.graph.node if n.domain == "TRT"})
    export_record = read_metadata(model)
    del model, nodes

    trt = import_tensorrt()
    major = trt_major(trt)
    if major >= 11 and precision != onnx_precision:
        # 11.0 removed BuilderFlag.FP16/INT8 and the int8 calibrators: networks are strongly
        # typed, so an engine has the precision its ONNX has (docs: "Migrating from TensorRT
        # 10.x to 11.x", python/src/infer/pyCore.cpp at v11.0)
        raise UserError(f"TensorRT {trt.__version__} builds only strongly typed networks, so "
                        f"{onnx_path.name} ({onnx_precision}) gives a {onnx_precision} engine, "
                        f"not {precision}: export a {precision} ONNX (fp16 weights or Q/DQ "
                        "nodes), or build with TensorRT 10")
    removed = [op for op in plugins if op in REMOVED_IN_11]
    if major >= 11 and removed:
        raise UserError(f"{onnx_path.name} uses {', '.join(removed)}, which TensorRT 11.0 "
                        "removed (plugin/README.md): export with --nms efficient")
    gpu_name, capability = current_gpu()
    started = time.perf_counter()
    notes: list[str] = []
    logger = shared_logger(trt)
    trt.init_libnvinfer_plugins(logger, "")  # registers EfficientNMS_TRT, BatchedNMS...
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit batch (EXPLICIT_BATCH is "[DEPRECATED] Ignored",
    # and gone in 11); 8.x needs it
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the ONNX
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(report_parser_errors(parser, onnx_path))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    for name, rest in extra.items():  # a two-stage graph's img_shape: the images' batches
        trt_profile.set_shape(name, (profile.min[0], *rest), (profile.opt[0], *rest),
                              (profile.max[0], *rest))
    config.add_optimization_profile(trt_profile)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # "Enabled by default" (BuilderFlag.TF32)
    calib_cache = None
    calibrator: Any = None
    batches: list[list[Path]] = []
    if major >= 11:
        if precision != "fp32":
            notes.append(f"{precision} from the ONNX's own types (strongly typed network)")
    elif precision in ("fp16", "int8"):
        # weakly typed precision flags (deprecated in 10.12, removed in 11.0); int8 engines
        # keep fp16 for layers TensorRT does not quantize, not fp32 (trtexec advises --fp16
        # with --int8: samples/common/sampleEngines.cpp)
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and major < 11:
        # set for Q/DQ networks too, as Polygraphy's int8=True and trtexec --int8 do
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
            calibrator = EntropyCalibrator.make(trt, batches, preprocess, calib_shape,
                                                calib_cache)
            config.int8_calibrator = calibrator  # deprecated in 10.1: a DeprecationWarning
            # TensorRT calibrates at the calibration profile's opt shape; min = opt = max, as
            # trtexec's --calibProfile does (samples/common/sampleEngines.cpp)
            calib_profile = builder.create_optimization_profile()
            calib_profile.set_shape(input_name, calib_shape, calib_shape, calib_shape)
            config.set_calibration_profile(calib_profile)
            notes.append(f"int8 calibrated (entropy2, deprecated since TensorRT 10.1 in favour "
                         f"of Q/DQ ONNX) on {len(calib_images or [])} images in "
                         f"{len(batches)} batches; cache {calib_cache}")
    cache_file = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    trt_cache = config.create_timing_cache(cache_bytes)
    # set_timing_cache returns False for a cache made on another device (ignore_mismatch=False)
    if trt_cache is None or not config.set_timing_cache(trt_cache, ignore_mismatch=False):
        notes.append(f"timing cache {cache_file} does not fit this GPU / TensorRT; "
                     "starting a new one")
        trt_cache = config.create_timing_cache(b"")
        config.set_timing_cache(trt_cache, ignore_mismatch=False)

    constrained: list[str] = []
    if fp32_layers and major >= 11:
        notes.append("fp32 layers: TensorRT 11 networks are strongly typed, so the ONNX's "
                     "own types keep them in fp32 (no per-layer constraints)")
    elif fp32_layers and precision == "fp32":
        notes.append("fp32 layers: an fp32 engine keeps every layer in fp32 already")
    elif fp32_layers:
        constrained, matched = constrain_fp32_layers(trt, network, fp32_layers)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        idle = [p for p, n in matched.items() if not n]
        notes.append(f"{len(constrained)} layers under {len(fp32_layers)} prefixes kept in "
                     "fp32 (OBEY_PRECISION_CONSTRAINTS)"
                     + (f"; no float layer under {', '.join(idle)}" if idle else ""))
    marked, layer_tensors, unmarked = mark_tensor_outputs(network, wanted) if wanted \
        else ([], [], {})
    if wanted:
        notes.append(f"{len(marked)} ONNX tensors marked as outputs (debug engine: fusions "
                     f"across them are lost); {len(unmarked)} left unmarked")
    plan = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.error is not None:
        exc = calibrator.error
        reason = first_line(exc)
        where = f"stopped at batch {calibrator.next_index + 1} of {len(batches)}" \
            if calibrator.next_index < len(batches) else f"failed after {len(batches)} batches"
        raise UserError(f"int8 calibration of {onnx_path.name} {where}: {reason}")
    if not plan:  # None when the build fails (Polygraphy's loader tests it the same way)
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
               "explicit_int8": explicit_int8, "tf32": tf32,
               "requested": wanted, "layer_tensors": layer_tensors, "unmarked": unmarked,
               **({"fp32_layers": {"prefixes": list(fp32_layers), "layers": constrained}}
                  if fp32_layers else {})})
    side = write_sidecar(engine_path, sidecar)
    return BuildResult(engine_path, side, sidecar, time.perf_counter() - started, notes)
