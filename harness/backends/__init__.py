"""backends stage of the harness (see docs/design.md): one class per runtime behind one protocol
(harness.backends.base.Backend), listed in one table (harness.backends.registry.BACKENDS).
Importing this package imports no runtime; each backend imports its runtime when it loads.
"""
from __future__ import annotations

from harness.backends.base import Backend, BackendResult, input_sha256
from harness.backends.onnxruntime_backend import OnnxruntimeBackend
from harness.backends.registry import BACKENDS
from harness.backends.tensorrt_backend import TensorRTBackend
from harness.backends.torch_backend import TorchBackend

__all__ = ["BACKENDS", "Backend", "BackendResult", "OnnxruntimeBackend", "TensorRTBackend",
           "TorchBackend", "input_sha256"]
