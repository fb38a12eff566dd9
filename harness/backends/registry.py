"""The one table of runtimes, and the questions the other stages ask it: which backends,
precisions and devices exist, which backend opens a file, how a report names and draws one.
Adding a runtime is one Backend subclass in its own file plus one line in BACKENDS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from harness.backends.base import Backend
from harness.backends.onnxruntime_backend import OnnxruntimeBackend
from harness.backends.tensorrt_backend import TensorRTBackend
from harness.backends.torch_backend import TorchBackend
from harness.errors import UserError

# name → class, in the order matrices and reports list them
BACKENDS: dict[str, type[Backend]] = {
    TorchBackend.name: TorchBackend,
    OnnxruntimeBackend.name: OnnxruntimeBackend,
    TensorRTBackend.name: TensorRTBackend,
}


def backend_class(name: str) -> type[Backend]:
    """The class registered under `name`; a UserError naming the known ones otherwise."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}'; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]


def precisions_by_backend() -> dict[str, tuple[str, ...]]:
    """The pairing rule: which precisions each backend runs."""
    return {name: cls.precisions for name, cls in BACKENDS.items()}


def all_devices() -> tuple[str, ...]:
    """Every device some backend runs on, in registration order."""
    seen: list[str] = []
    for cls in BACKENDS.values():
        seen += [d for d in cls.devices if d not in seen]
    return tuple(seen)


def device_for(name: str, device: str) -> str:
    """Where a backend runs when asked for `device`: a backend with one device always runs
    there (TensorRT on cuda)."""
    devices = backend_class(name).devices
    return devices[0] if len(devices) == 1 else device


def class_for_file(path: Union[str, Path]) -> type[Backend]:
    """The backend that opens `path`, by its suffix; a UserError listing what is known."""
    suffix = Path(path).suffix.lower()
    for cls in BACKENDS.values():
        if suffix in cls.file_suffixes:
            return cls
    known = ", ".join(f"{cls.file_kind or cls.name} ({' '.join(cls.file_suffixes)})"
                      for cls in BACKENDS.values() if cls.file_suffixes)
    raise UserError(f"{path} is a file no backend opens; known: {known}")


def label(name: str) -> str:
    """How reports name a backend ("PyTorch", "onnxruntime", "TensorRT")."""
    cls = BACKENDS.get(name)
    return (cls.label or cls.name) if cls else name


def plot_marker(name: str) -> str:
    cls = BACKENDS.get(name)
    return cls.plot_marker if cls else "D"
