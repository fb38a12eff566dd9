"""PyTorch backend: a model source's module (harness.models.source.ModelSource) on CPU or CUDA
in fp32, fp16 or bf16, any batch size. Outputs carry the ONNX variants' names (raw head
outputs, decoded candidates) so the two can be compared key by key; intermediate tensors come
from forward hooks on module paths.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from harness.backends.base import Backend, check_images
from harness.errors import UserError
from harness.models.source import ModelSource

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# which named outputs infer() returns: the `raw` variant's, the `decoded` variant's, or both
OUTPUT_SETS = ("raw", "decoded", "all")


class TorchBackend(Backend):
    """model: a ModelSource (an MmyoloModel, ...), or a callable that makes one (built in
    load()).

    device: "cpu", "cuda", "cuda:1", ...; precision: fp32 | fp16 | bf16 (weights and inputs
    cast to it; outputs returned as float32). use_tf32: what CUDA fp32 matmuls and convolutions
    may use (set explicitly on CUDA and recorded; docs/nms-semantics.md "GPU numerics").
    """

    name = "torch"
    label = "PyTorch"
    precisions = tuple(PRECISIONS)
    devices = ("cpu", "cuda")
    plot_marker = "o"
    dynamic_input_size = True
    synchronous = False  # CUDA kernels run on after forward() returns

    @classmethod
    def unavailable(cls, device: str) -> Union[str, None]:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            return f"PyTorch {torch.__version__} here has no CUDA device"
        return None

    @classmethod
    def for_configuration(cls, config: Any, model: Any, files: Any):
        from harness.export.metadata import file_sha256

        backend = cls(model, device=config.device, precision=config.precision, outputs="raw")
        backend.load()
        return backend, {"config_sha256": file_sha256(model.cfg_path),
                         "checkpoint_sha256": files.checkpoint_sha256()}

    def __init__(self, model: Union[ModelSource, Callable[[], ModelSource]], *,
                 device: str = "cpu",
                 precision: str = "fp32", outputs: str = "all", use_tf32: bool = False):
        if precision not in PRECISIONS:
            raise UserError(f"unknown torch precision '{precision}'; choose "
                            f"{'|'.join(PRECISIONS)}")
        if outputs not in OUTPUT_SETS:
            raise UserError(f"unknown output set '{outputs}'; choose {'|'.join(OUTPUT_SETS)}")
        self._source = model
        self.device = device
        self.precision = precision
        self.outputs = outputs
        self.use_tf32 = use_tf32
        self._model: Optional[ModelSource] = None

    def load(self) -> None:
        if self._model is not None:
            return
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {self.device} requested but this torch has no CUDA "
                            f"(torch {torch.__version__})")
        source = self._source() if callable(self._source) else self._source
        dtype = getattr(torch, PRECISIONS[self.precision])
        if str(source.device) == self.device and dtype == torch.float32:
            model = source
        else:
            # a converted copy: the caller's model keeps its device and precision
            model = source.copy_to(self.device, dtype)
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = self.use_tf32
            torch.backends.cudnn.allow_tf32 = self.use_tf32
        self._dtype = dtype
        self._model = model

    def _tensor(self, inputs: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(check_images(inputs)).to(self.device, self._dtype)

    def infer(self, inputs: np.ndarray, metas: Optional[Sequence[Any]] = None
              ) -> dict[str, np.ndarray]:
        """inputs (B, 3, H, W) float32 → the source's `raw` outputs (mmyolo: `cls_scores.0`,
        ...) and/or its `decoded` ones (`boxes` (B, N, 4), `scores` (B, N, C), `objectness`
        (B, N)), as float32."""
        import torch

        self.load()
        x = self._tensor(inputs)
        out: dict[str, Any] = {}
        with torch.no_grad():
            head = self._model.head_outputs(x, metas)
            if self.outputs in ("raw", "all"):
                out.update(head)
            if self.outputs in ("decoded", "all"):
                out.update(self._model.decoded_outputs(head))
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def compute_runs(self, inputs: np.ndarray, metas: Optional[Sequence[Any]], warmup: int,
                     runs: int) -> tuple[list[float], str]:
        """Seconds of each of `runs` forwards (after `warmup`) on the batch already on the
        device, outputs left there: CUDA events around the forward on a GPU, the clock on a
        CPU (harness.eval.inference_timing's compute figure)."""
        import time

        import torch

        self.load()
        x = self._tensor(inputs)
        model = self._model
        decoded = self.outputs in ("decoded", "all")

        def forward() -> None:
            head = model.head_outputs(x, metas)
            if decoded:
                model.decoded_outputs(head)

        out: list[float] = []
        cuda = self.device.startswith("cuda")
        with torch.no_grad():
            for i in range(warmup + runs):
                if cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    forward()
                    end.record()
                    end.synchronize()
                    seconds = start.elapsed_time(end) / 1000.0
                else:
                    t0 = time.perf_counter()
                    forward()
                    seconds = time.perf_counter() - t0
                if i >= warmup:
                    out.append(seconds)
        return out, ("CUDA events around the forward" if cuda
                     else "the clock around the forward (CPU)")

    def intermediate_names(self) -> list[str]:
        """Module paths of the detector (`backbone.stem.conv`, ...), in definition order."""
        self.load()
        return [name for name, _ in self._model.module.named_modules() if name]

    def intermediates(self, inputs: np.ndarray, names: Sequence[str],
                      metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        """Outputs of the modules at `names` (module paths) for `inputs` (metas: the images'
        metas, for a source whose later stages use them). A module returning a tuple or list
        gives `name.0`, `name.1`, ...; its tensors are returned as float32."""
        import torch

        self.load()
        root = self._model.module
        modules = {}
        for name in names:
            try:
                modules[name] = root.get_submodule(name)
            except AttributeError:
                close = difflib.get_close_matches(name, self.intermediate_names(), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UserError(f"the model has no module '{name}'{hint}") from None
        captured: dict[str, Any] = {}
        handles = [m.register_forward_hook(_capture(name, captured))
                   for name, m in modules.items()]
        try:
            with torch.no_grad():
                self._model.head_outputs(self._tensor(inputs), metas)
        finally:
            for h in handles:
                h.remove()
        return {k: v.float().cpu().numpy() for k, v in captured.items()}

    def describe(self) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {
            "backend": self.name, "torch": torch.__version__, "device": self.device,
            "provider": "cuda" if self.device.startswith("cuda") else "cpu",
            "precision": self.precision, "outputs": self.outputs,
            "threads": torch.get_num_threads(),
            "use_tf32": self.use_tf32 if self.device.startswith("cuda") else None,
        }
        for package in ("mmcv", "mmdet", "mmyolo", "mmengine"):
            try:
                info[package] = __import__(package).__version__
            except ImportError:
                info[package] = None
        if self.device.startswith("cuda") and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(torch.device(self.device))
            info["cuda"] = torch.version.cuda
        if self._model is not None:
            info["model"] = {"config": self._model.cfg_path,
                             "checkpoint": self._model.ckpt_path,
                             "family": self._model.family}
        return info


def _capture(name: str, into: dict[str, Any]) -> Callable[..., None]:
    def hook(module: Any, args: Any, output: Any) -> None:
        _collect(name, output, into)
    return hook


def _collect(name: str, value: Any, into: dict[str, Any]) -> None:
    """Tensors of a module output by name; nested tuples/lists get `.i` suffixes."""
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _collect(f"{name}.{i}", item, into)
    elif hasattr(value, "float") and hasattr(value, "cpu"):
        # a copy now: a later in-place op (RTMDet's Hardsigmoid(inplace=True) after its
        # channel attention's fc) would otherwise overwrite the tensor the hook kept
        into[name] = value.detach().clone()
