"""harness: one detector checkpoint through PyTorch, ONNX Runtime and TensorRT, compared.

Importing this package is cheap: torch, mmyolo, onnxruntime and tensorrt are imported only
inside the code that needs them.
"""
from __future__ import annotations

__version__ = "0.1.0"
