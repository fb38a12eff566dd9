"""backends stage of the harness (see DESIGN.md): one class per runtime behind one protocol
(harness.backends.base.Backend). Importing this package imports no runtime; each backend
imports its runtime when it loads.
"""
from __future__ import annotations

from harness.backends.base import Backend, BackendResult, input_sha256
from harness.backends.onnxruntime_backend import OnnxruntimeBackend
from harness.backends.tensorrt_backend import TensorRTBackend
from harness.backends.torch_backend import TorchBackend

# The backends by the name results and the CLI use. Adding a runtime = one file + one line.
BACKENDS: dict[str, type[Backend]] = {
    TorchBackend.name: TorchBackend,
    OnnxruntimeBackend.name: OnnxruntimeBackend,
    TensorRTBackend.name: TensorRTBackend,
}

__all__ = ["BACKENDS", "Backend", "BackendResult", "OnnxruntimeBackend", "TensorRTBackend",
           "TorchBackend", "input_sha256"]
