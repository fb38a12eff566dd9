"""What `harness compare` compares against PyTorch: a file opened by the backend its suffix
names (an ONNX file on onnxruntime, a TensorRT engine). A target that cannot run here (TensorRT without `tensorrt`, a GPU engine on a
CPU machine) becomes a column "not available: <reason>", never a crash of the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from harness.errors import UserError

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
    """What results call the file (onnx, engine): the kind of the backend that opens it."""
    from harness.backends.registry import class_for_file

    cls = class_for_file(path)
    return cls.file_kind or cls.name


def open_target(path: Union[str, Path], provider: str = "cpu",
                onnx: Union[str, Path, None] = None) -> Target:
    """Load `path` behind the backend its suffix names (harness.backends.registry). A missing
    or corrupt file is a UserError (the user named it); a runtime that cannot run here is a
    Target with the reason. onnx: an engine's source ONNX (`--onnx`), which names its layers
    and NMS node when the engine has no harness sidecar (its describe() says where its
    settings came from: settings_source)."""
    from harness.backends.registry import class_for_file

    path = Path(path)
    cls = class_for_file(path)
    kind = cls.file_kind or cls.name
    if not path.is_file():
        raise UserError(f"{kind} file not found: {path}")
    if onnx is not None and kind != "engine":
        raise UserError(f"--onnx names an engine's source ONNX; {path.name} is not an "
                        f"engine but an {kind} file")
    device = cls.devices[0] if len(cls.devices) == 1 else provider
    reason = cls.unavailable(device) if provider != "auto" or len(cls.devices) == 1 else None
    if reason is not None:
        return Target(path, kind, reason=f"not available: {reason}")
    backend = cls.open_file(path, device, onnx=Path(onnx)) if onnx is not None \
        else cls.open_file(path, device)
    return Target(path, kind, backend, onnx_path=backend.source_onnx(),
                  precision=backend.precision, info=backend.describe())


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
        raise UserError(f"{target.name}: no source ONNX names its layers; give --onnx")
    # the deployed engine's own settings (its sidecar's, or for another tool's engine its
    # profile and precision): a UserError now when they cannot be known
    settings = target.backend.debug_build()
    import onnx

    from harness.backends.tensorrt_marking import (DEFAULT_CHUNK, ChunkedDebugEngines,
                                                   split_marking)

    graph = onnx.load(str(target.onnx_path), load_external_data=False).graph
    layer_tensors, nms_inputs = split_marking(list(graph.node), node_names)
    del graph
    engines = ChunkedDebugEngines(target.backend, target.onnx_path, layer_tensors, nms_inputs,
                                  work_dir, chunk or DEFAULT_CHUNK, settings=settings)
    engines.load()
    return engines
