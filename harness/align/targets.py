"""What `harness compare` compares against PyTorch: an ONNX file (run on onnxruntime) or a
TensorRT engine. A target that cannot run here (TensorRT without `tensorrt`, a GPU engine on a
CPU machine) becomes a column "not available: <reason>", never a crash of the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from harness.errors import UserError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass
class Target:
    """path: the file; kind: onnx | engine; backend: a loaded Backend (None when not
    available, with `reason`); onnx_path: the graph that names its layers (the file itself,
    or the engine's source ONNX); precision: fp32 | fp16 | int8."""

    path: Path
    kind: str
    backend: Any = None
    reason: Optional[str] = None
    onnx_path: Optional[Path] = None
    precision: str = "fp32"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def available(self) -> bool:
        return self.backend is not None


def target_kind(path: Path) -> str:
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return "engine"
    raise UserError(f"{path} is neither an ONNX file (.onnx) nor a TensorRT engine "
                    f"({', '.join(ENGINE_SUFFIXES)})")


def open_target(path: Union[str, Path], provider: str = "cpu") -> Target:
    """Load `path` behind its backend. Missing or corrupt files are UserErrors (the user
    named them); a runtime that is not installed is a Target with a reason."""
    path = Path(path)
    kind = target_kind(path)
    if not path.is_file():
        raise UserError(f"{kind} file not found: {path}")
    if kind == "onnx":
        from harness.backends.onnxruntime_backend import OnnxruntimeBackend

        backend = OnnxruntimeBackend(path, provider=provider)
        backend.load()
        return Target(path, kind, backend, onnx_path=path, precision=backend.precision,
                      info=backend.describe())
    from harness.backends.tensorrt_backend import TensorRTBackend
    from harness.backends.tensorrt_build import import_tensorrt

    backend = TensorRTBackend(path)
    try:
        import_tensorrt()
        backend.load()
    except UserError as exc:
        return Target(path, kind, reason=f"not available: {exc}")
    onnx_path = Path(backend.sidecar.onnx_path)
    return Target(path, kind, backend, onnx_path=onnx_path if onnx_path.is_file() else None,
                  precision=backend.sidecar.precision, info=backend.describe())


def layer_backend(target: Target, node_names: list[str], work_dir: Path,
                  chunk: Optional[int] = None) -> Any:
    """The backend whose intermediates() give the layer tensors: onnxruntime itself; for an
    engine, tensorrt_marking.ChunkedDebugEngines: debug engines built from its source ONNX,
    each marking `chunk` (default 32) of the layers of `node_names` in order, and, when the
    list ends with the producers of its NMS plugin's inputs, one more marking those. Every
    engine is built here (cached in `work_dir`), so a build failure is a UserError now, not
    in the middle of the run; they are loaded one at a time as they are asked for. Marking
    stops fusions, so the caller also compares the marked engines' final outputs with the
    engine's (infer(), marking_changed_outputs_rel_l2)."""
    if target.kind == "onnx":
        return target.backend
    if target.onnx_path is None:
        raise UserError(f"{target.name}: its source ONNX is gone, so its layers cannot be "
                        "named; pass the ONNX next to the engine")
    import onnx

    from harness.backends.tensorrt_marking import (DEFAULT_CHUNK, ChunkedDebugEngines,
                                                   split_marking)

    graph = onnx.load(str(target.onnx_path), load_external_data=False).graph
    layer_tensors, nms_inputs = split_marking(list(graph.node), node_names)
    del graph
    engines = ChunkedDebugEngines(target.backend, target.onnx_path, layer_tensors, nms_inputs,
                                  work_dir, chunk or DEFAULT_CHUNK)
    engines.load()
    return engines
