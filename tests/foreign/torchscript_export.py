"""torch.onnx.export forced onto the TorchScript exporter while a foreign exporter runs.

mmdeploy 1.3.1 and mmyolo's easydeploy call `torch.onnx.export` without `dynamo`; from
PyTorch 2.9 that means the torch.export-based exporter, which on our stack stops at
`import onnxscript` (not installed) and in any case never calls the autograd Functions'
`symbolic` that write their NMS nodes. Both tools were written for the TorchScript exporter.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator


@contextlib.contextmanager
def torchscript_onnx_export() -> Iterator[None]:
    """Inside the block, every `torch.onnx.export(...)` runs with `dynamo=False`; the real
    function is put back on exit (site-packages are never edited)."""
    import torch.onnx

    real_export = torch.onnx.export

    @functools.wraps(real_export)
    def export(*args, **kwargs):
        kwargs["dynamo"] = False
        return real_export(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = real_export
