"""TensorRT backend: runs an engine `harness build` made, after checking its sidecar (same
TensorRT, same GPU, unchanged ONNX). Device buffers are PyTorch CUDA tensors; inference is
`execute_async_v3` on a PyTorch CUDA stream. Written against the TensorRT 10 Python API
(named I/O tensors); `tensorrt` and `torch` are imported when the engine loads.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from harness.backends.base import Backend, check_images
from harness.backends.tensorrt_plan import (BatchProfile, check_batch, numpy_dtype,
                                            output_buffer)
from harness.backends.tensorrt_sidecar import check_sidecar, read_sidecar
from harness.errors import UserError


class TensorRTBackend(Backend):
    """path: a serialized engine with its `.json` sidecar. onnx_path: the source ONNX to check
    the engine against (default: the path the sidecar recorded, when it still exists; pass
    False to skip). device_id: the CUDA device."""

    name = "tensorrt"
    label = "TensorRT"
    precisions = ("fp32", "fp16", "int8")
    devices = ("cuda",)  # engines run on a GPU only, whatever the matrix's devices say
    file_suffixes = (".engine", ".plan", ".trt")
    file_kind = "engine"
    plot_marker = "^"
    synchronous = False

    @classmethod
    def unavailable(cls, device: str) -> Union[str, None]:
        from harness.backends.tensorrt_build import current_gpu, import_tensorrt

        try:
            import_tensorrt()
            current_gpu()
        except UserError as exc:
            return str(exc)
        return None

    @classmethod
    def for_configuration(cls, config: Any, model: Any, files: Any):
        from harness.export.metadata import file_sha256

        path = files.engine(config.precision)
        backend = cls(path)
        backend.load()
        return backend, {"engine_sha256": file_sha256(path)}

    @classmethod
    def open_file(cls, path: Path, device: str) -> "TensorRTBackend":
        backend = cls(path)
        backend.load()
        return backend

    @property
    def precision(self) -> str:
        self.load()
        return self.sidecar.precision

    def source_onnx(self) -> Union[Path, None]:
        self.load()
        onnx_path = Path(self.sidecar.onnx_path)
        return onnx_path if onnx_path.is_file() else None

    def __init__(self, path: Union[str, Path], *, onnx_path: Union[str, Path, bool, None] = None,
                 device_id: int = 0):
        self.path = Path(path)
        self.onnx_path = onnx_path
        self.device_id = device_id
        self._engine: Any = None

    def load(self) -> None:
        if self._engine is not None:
            return
        from harness.backends.tensorrt_build import current_gpu, import_tensorrt

        trt = import_tensorrt()
        import torch

        if not self.path.is_file():
            raise UserError(f"engine not found: {self.path}")
        sidecar = read_sidecar(self.path)
        gpu_name, capability = current_gpu(self.device_id)
        onnx_path = self.onnx_path
        if onnx_path is None:  # check against the recorded source when it is still there
            onnx_path = sidecar.onnx_path if Path(sidecar.onnx_path).is_file() else None
        check_sidecar(sidecar, str(trt.__version__), gpu_name, capability,
                      onnx_path=None if onnx_path is False else onnx_path)
        self.sidecar = sidecar
        self.profile = BatchProfile.from_json(sidecar.profile)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")  # engines with NMS plugins need them
        self._runtime = trt.Runtime(self._logger)
        # deserialize and allocate on the chosen device, not whichever one is current
        with torch.cuda.device(self.device_id):
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise UserError(f"TensorRT {trt.__version__} cannot deserialize {self.path} "
                                "(see its log above); rebuild it with 'harness build'")
            self._context = engine.create_execution_context()
        if self._context is None:
            raise UserError(f"TensorRT could not create an execution context for "
                            f"{self.path.name} (see its log above; often GPU memory)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise UserError(f"{self.path.name} has {len(inputs)} inputs; the harness feeds one")
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n not in inputs]
        # by DataType name, so a type numpy lacks (BF16, FP8) is a UserError, not the
        # TypeError trt.nptype raises
        self._dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n).name, n) for n in names}
        # PyTorch already owns a CUDA context, an allocator and streams; its tensors' data_ptr()
        # are the device addresses set_tensor_address wants, so pycuda (a second context and
        # allocator) is not needed.
        self._device = torch.device("cuda", self.device_id)
        self._stream = torch.cuda.Stream(device=self._device)
        self._engine = engine

    # -- inference --------------------------------------------------------------------------

    def _execute(self, inputs: np.ndarray, keep: Union[Sequence[str], None] = None
                 ) -> dict[str, np.ndarray]:
        """Every output tensor for `inputs`; only those in `keep` (default: all) are copied
        back to the host, so a debug engine's other marked tensors cost no host memory."""
        import torch

        self.load()
        x = check_images(inputs)
        check_batch(self.profile, x.shape, self.path.name)  # before anything runs
        ctx = self._context
        with torch.cuda.device(self._device):
            device_in = torch.from_numpy(x).to(self._device)
            if self._dtypes[self.input_name] == np.float16:
                device_in = device_in.half()
            device_in = device_in.contiguous()
            if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
                raise UserError(f"{self.path.name} refused input shape {tuple(x.shape)}")
            self._set_address(self.input_name, device_in)
            buffers: dict[str, Any] = {}
            for name in self.output_names:
                shape, dtype, _ = output_buffer(tuple(ctx.get_tensor_shape(name)),
                                                self._dtypes[name], x.shape[0])
                if not all(d >= 0 for d in shape):
                    raise UserError(f"output {name} has a data-dependent shape; export with "
                                    "--nms efficient or batched for TensorRT")
                torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
                buffers[name] = torch.empty(shape, dtype=torch_dtype, device=self._device)
                self._set_address(name, buffers[name])
            # the input copy ran on the current stream; ours must wait for it. A stream of our
            # own: on the default stream TensorRT adds device-wide syncs (execute_async_v3's
            # docstring)
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise UserError(f"TensorRT failed to run {self.path.name} on "
                                f"{tuple(x.shape)} (see its log above)")
            self._stream.synchronize()
        out = {}
        wanted = set(buffers) if keep is None else set(keep)
        for name, t in buffers.items():
            if name not in wanted:
                continue
            a = t.cpu().numpy()
            out[name] = a.astype(np.float32) if a.dtype == np.float16 else a
        return out

    def _set_address(self, name: str, tensor: Any) -> None:
        if not self._context.set_tensor_address(name, int(tensor.data_ptr())):
            raise UserError(f"TensorRT refused the buffer of {name} in {self.path.name} "
                            "(see its log above)")

    def infer(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """inputs (B, 3, H, W) float32 → the ONNX's outputs by name (marked tensors left out)."""
        return self.run_marked(inputs, [])[0]

    def final_output_names(self) -> list[str]:
        """The engine's outputs that are the ONNX's own (not marked for the layer diff)."""
        self.load()
        marked = set(self.sidecar.marked_layers)
        return [n for n in self.output_names if n not in marked]

    def intermediate_names(self) -> list[str]:
        """The ONNX tensors this (debug) engine gives (`harness build --mark`): those it was
        built with marked, and requested ones that were network outputs already. An ordinary
        engine has none, since marking stops fusions."""
        self.load()
        return list(self.sidecar.build.get("layer_tensors", self.sidecar.marked_layers))

    def intermediates(self, inputs: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named tensors for `inputs`. A name requested at build but left unmarked
        (folded into weights, a shape or int tensor; the sidecar's build["unmarked"] says
        why) is left out of the result, as the torch backend leaves out a module without a
        single tensor."""
        return self.run_marked(inputs, names)[1]

    def run_marked(self, inputs: np.ndarray, names: Sequence[str]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(final outputs, the named marked tensors) of one execution on `inputs`: a debug
        engine's layer tensors and the outputs to check its marking against the deployed
        engine's, without running it twice. Names as intermediates() takes them."""
        self.load()
        final = self.final_output_names()
        if not names:
            values = self._execute(inputs, keep=final)
            return {n: values[n] for n in final}, {}
        known = self.intermediate_names()
        unmarked = self.sidecar.build.get("unmarked", {})
        for name in names:
            if name not in known and name not in unmarked:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else \
                    "; build a debug engine with those layers marked"
                raise UserError(f"{self.path.name} has no marked tensor '{name}'{hint}")
        values = self._execute(inputs, keep=[*final, *names])
        tensors = {n: (values[n].astype(np.float32)
                       if np.issubdtype(values[n].dtype, np.floating) else values[n])
                   for n in names if n in values}
        return {n: values[n] for n in final}, tensors

    def unload(self) -> None:
        """Free the engine: its execution context (with its activation memory), the engine and
        the runtime, dropped by `del` as the bindings ask (`__del__` is deprecated for "del
        obj"; docs/tensorrt-api.md), then PyTorch's cached blocks of the I/O buffers, so the
        next engine loaded finds the memory free. load() brings it back."""
        if self._engine is None:
            return
        # the context keeps the engine alive and the engine the runtime (keep_alive<0, 1> in
        # the bindings): drop them in that order, and every reference to each
        del self._context
        del self._engine
        del self._runtime
        del self._stream
        self._engine = None
        import torch

        torch.cuda.empty_cache()  # a no-op where CUDA was never initialised

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.name, "model": str(self.path)}
        if self._engine is None:
            return info
        side = self.sidecar
        info.update({
            "tensorrt": side.tensorrt_version, "device": f"cuda:{self.device_id}",
            "gpu": side.gpu_name, "compute_capability": side.compute_capability,
            "precision": side.precision, "profile": side.profile,
            "input": {"name": self.input_name, "shape": side.inputs.get(self.input_name)},
            "outputs": [n for n in self.output_names if n not in side.marked_layers],
            "onnx_sha256": side.onnx_sha256, "marked_layers": len(side.marked_layers),
            "variant": (side.export or {}).get("variant"),
            "nms": (side.export or {}).get("nms"),
        })
        return info
