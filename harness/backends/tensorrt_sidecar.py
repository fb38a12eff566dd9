"""The JSON file written next to every TensorRT engine (`model.engine.json`): what the engine
was built with and from, so loading it can refuse, in one line, an engine built by another
TensorRT, for another GPU, or from an ONNX file that has changed since.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from harness.errors import UserError, first_line

SIDECAR_SUFFIX = ".json"


@dataclass
class EngineSidecar:
    """tensorrt_version: trt.__version__ at build. gpu_name / compute_capability ("9.0"): the
    device built on (engines are specific to both). profile: {"min","opt","max"} input shapes.
    inputs / outputs: name → shape as the engine reports it (-1 for the dynamic batch).
    onnx_sha256: the source file's digest. export: the ONNX's `harness.export` record (None
    for a file the harness did not export). marked_layers: the ONNX tensor names marked as
    extra outputs (the TensorRT tensors carry the ONNX names; the field keeps its old name).
    build: the build options, and for a debug engine "requested" (the tensors asked to be
    marked, in order), "layer_tensors" (every requested tensor it gives) and "unmarked"
    (requested tensor → why it could not be marked)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict[str, list[int]]
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    onnx_path: str
    onnx_sha256: str
    export: Union[dict[str, Any], None] = None
    marked_layers: list[str] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)


def sidecar_path(engine_path: Union[str, Path]) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def write_sidecar(engine_path: Union[str, Path], sidecar: EngineSidecar) -> Path:
    path = sidecar_path(engine_path)
    path.write_text(json.dumps(asdict(sidecar), indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(engine_path: Union[str, Path]) -> EngineSidecar:
    """The sidecar of `engine_path`; missing or corrupt is a UserError (rebuild the engine)."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise UserError(f"{path} is missing: the engine's build record is needed to check it; "
                        "rebuild with 'harness build'")
    try:
        doc = json.loads(path.read_text())
        return EngineSidecar(**doc)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        reason = first_line(exc)
        raise UserError(f"{path} is corrupt ({reason}); rebuild with 'harness build'") from None


def check_sidecar(sidecar: EngineSidecar, trt_version: str, gpu_name: str,
                  compute_capability: str, onnx_path: Union[str, Path, None] = None) -> None:
    """UserError, one line, when the engine cannot be trusted here: another TensorRT version
    (engines are not portable across versions), another GPU (tactics are chosen per device),
    or, when `onnx_path` is given, an ONNX file whose bytes changed since the build."""
    from harness.export.metadata import file_sha256

    if sidecar.tensorrt_version != trt_version:
        raise UserError(f"engine was built with TensorRT {sidecar.tensorrt_version}, this is "
                        f"TensorRT {trt_version}: rebuild it with 'harness build'")
    if (sidecar.gpu_name, sidecar.compute_capability) != (gpu_name, compute_capability):
        raise UserError(f"engine was built for {sidecar.gpu_name} (compute capability "
                        f"{sidecar.compute_capability}), this GPU is {gpu_name} "
                        f"({compute_capability}): rebuild it on this machine")
    if onnx_path is not None:
        p = Path(onnx_path)
        if not p.is_file():
            raise UserError(f"source ONNX {p} not found; cannot check the engine against it")
        if file_sha256(p) != sidecar.onnx_sha256:
            raise UserError(f"{p} has changed since the engine was built (sha256 "
                            f"{sidecar.onnx_sha256[:12]}… then): rebuild with 'harness build'")
