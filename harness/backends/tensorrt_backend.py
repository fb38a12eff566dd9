"""TensorRT backend: runs a TensorRT engine. An engine `harness build` made is checked against
its sidecar first (same TensorRT, same GPU, unchanged ONNX); an engine another tool made
(trtexec, mmyolo's easydeploy, mmdeploy) has none, and is accepted with a warning: its I/O,
shapes and optimization profiles are read from the engine, its NMS settings and precision
from the engine inspector, the source ONNX the user names, or assumed, and describe() says
which (harness.backends.tensorrt_engine_info). Device buffers are PyTorch CUDA tensors;
inference is `execute_async_v3` on a PyTorch CUDA stream. Written against the TensorRT 10
Python API (named I/O tensors); `tensorrt` and `torch` are imported when the engine loads.
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from harness.backends.base import Backend, check_images
from harness.backends.tensorrt_engine_info import (NO_SIDECAR_WARNING, EngineIO,
                                                   ForeignSettings, check_onnx_io,
                                                   decide_settings, nms_plugin_from_onnx,
                                                   parse_inspector_json, read_engine_io)
from harness.backends.tensorrt_plan import (BatchProfile, check_batch, numpy_dtype,
                                            output_buffer)
from harness.backends.tensorrt_sidecar import (EngineSidecar, check_sidecar, read_sidecar,
                                               sidecar_path)
from harness.errors import UserError, first_line


class TensorRTBackend(Backend):
    """path: a serialized engine, with its `.json` sidecar when the harness built it.
    onnx_path: the source ONNX to check the engine against (default: the path the sidecar
    recorded, when it still exists; pass False to skip); checking needs the sidecar, so an
    engine without one is refused when it is given. given_onnx: the ONNX the user says the
    engine was built from (`harness compare --onnx`): checked like onnx_path when there is a
    sidecar, otherwise taken as the source of its layer names and NMS settings (its I/O must
    be the engine's). precision: the precision the user says a sidecar-less engine has
    (else read from its inspector, or "unknown"). device_id: the CUDA device."""

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
        # an engine the experiment names may come without a sidecar: its row's precision is
        # then the user's word for it
        backend = cls(path, precision=config.precision)
        backend.load()
        return backend, {"engine_sha256": file_sha256(path)}

    @classmethod
    def open_file(cls, path: Path, device: str, onnx: Optional[Path] = None
                  ) -> "TensorRTBackend":
        """A loaded backend for `harness compare`; onnx: the engine's source ONNX (--onnx)."""
        backend = cls(path, given_onnx=onnx)
        backend.load()
        return backend

    @property
    def precision(self) -> str:
        self.load()
        return self._precision

    def source_onnx(self) -> Union[Path, None]:
        """The ONNX that names this engine's layers: the one the user gave, else the one the
        sidecar recorded while it still exists; None for an engine without either."""
        self.load()
        return self._source_onnx

    def __init__(self, path: Union[str, Path], *, onnx_path: Union[str, Path, bool, None] = None,
                 given_onnx: Union[str, Path, None] = None, precision: Optional[str] = None,
                 device_id: int = 0):
        self.path = Path(path)
        self.onnx_path = onnx_path
        self.given_onnx = None if given_onnx is None else Path(given_onnx)
        self.requested_precision = precision
        self.device_id = device_id
        self.sidecar: Optional[EngineSidecar] = None
        self.foreign: Optional[ForeignSettings] = None
        self.warnings: list[str] = []
        self._engine: Any = None

    def load(self) -> None:
        if self._engine is not None:
            return
        from harness.backends.tensorrt_build import current_gpu, import_tensorrt

        trt = import_tensorrt()
        if not self.path.is_file():
            raise UserError(f"engine not found: {self.path}")
        sidecar = self._checked_sidecar(trt, *current_gpu(self.device_id))
        onnx_model = None
        if sidecar is None and self.given_onnx is not None:
            from harness.backends.onnxruntime_backend import read_onnx

            onnx_model = read_onnx(self.given_onnx)  # a bad --onnx fails before TensorRT works
        engine, context = self._deserialize(trt, sidecar is not None)
        io = read_engine_io(engine, trt)
        inputs = [t.name for t in io.inputs]
        from harness.export.variants import IMG_SHAPE_INPUT

        if not inputs or any(n != IMG_SHAPE_INPUT for n in inputs[1:]) or \
                inputs[0] == IMG_SHAPE_INPUT:
            raise UserError(f"{self.path.name} has inputs {', '.join(inputs) or 'none'}; the "
                            f"harness feeds the images and, to a two-stage engine, "
                            f"{IMG_SHAPE_INPUT}")
        self.input_name = inputs[0]
        # a two-stage engine's second input: each image's img_shape (B, 2)
        self.extra_inputs = inputs[1:]
        self.output_names = [t.name for t in io.outputs]
        # by DataType name, so a type numpy lacks (BF16, FP8) is a UserError, not the
        # TypeError trt.nptype raises
        self._dtypes = {t.name: numpy_dtype(t.dtype, t.name) for t in io.tensors}
        self.engine_io = io
        self.sidecar = sidecar
        if sidecar is not None:
            self.profile = BatchProfile.from_json(sidecar.profile)
            self._precision = sidecar.precision
            self._export = sidecar.export
            self.settings_source = "sidecar"
            self.warnings = []
            if self.requested_precision and self.requested_precision != sidecar.precision:
                self.warnings.append(f"asked for {self.requested_precision}, but the sidecar "
                                     f"says the engine is {sidecar.precision}")
        else:
            self._read_foreign(trt, engine, context, io, onnx_model)
        self._trt = trt
        self._context = context
        self._cuda_setup()
        self._engine = engine
        for warning in self.warnings:
            print(f"{self.path.name}: warning: {warning}", file=sys.stderr)

    def _checked_sidecar(self, trt: Any, gpu_name: str, capability: str
                         ) -> Optional[EngineSidecar]:
        """The engine's sidecar, checked against this TensorRT, this GPU and the source ONNX
        (onnx_path, else given_onnx, else the recorded one while it exists); None for an
        engine without one, unless onnx_path asks for a check only a sidecar allows."""
        self.trt_version, self.gpu_name, self.capability = \
            str(trt.__version__), gpu_name, capability
        if not sidecar_path(self.path).is_file():
            if self.onnx_path not in (None, False):
                raise UserError(f"{sidecar_path(self.path)} is missing: the engine's build "
                                f"record is needed to check it against {self.onnx_path}; "
                                "rebuild with 'harness build'")
            self._source_onnx = self.given_onnx
            return None
        sidecar = read_sidecar(self.path)
        onnx_path = self.onnx_path if self.onnx_path is not None else self.given_onnx
        if onnx_path is None:  # check against the recorded source when it is still there
            onnx_path = sidecar.onnx_path if Path(sidecar.onnx_path).is_file() else None
        check_sidecar(sidecar, self.trt_version, gpu_name, capability,
                      onnx_path=None if onnx_path is False else onnx_path)
        recorded = Path(sidecar.onnx_path)
        self._source_onnx = self.given_onnx or (recorded if recorded.is_file() else None)
        return sidecar

    def _deserialize(self, trt: Any, has_sidecar: bool) -> tuple[Any, Any]:
        """(engine, execution context) on this backend's device. A failed deserialization
        (another TensorRT version, another GPU, a plugin not loaded, corrupt bytes) is a
        UserError with TensorRT's own first error line, from the process's one logger
        (tensorrt_build.shared_logger), counting only what this call logged."""
        from harness.backends.tensorrt_build import shared_logger

        self._logger = shared_logger(trt)
        trt.init_libnvinfer_plugins(self._logger, "")  # engines with NMS plugins need them
        self._runtime = trt.Runtime(self._logger)
        seen = len(self._logger.errors)
        # deserialize and allocate on the chosen device, not whichever one is current
        with self._on_device():
            try:
                engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            except RuntimeError as exc:  # the bindings return None; guarded all the same
                self._logger.errors.append(first_line(exc))
                engine = None
            if engine is None:
                errors = self._logger.errors[seen:]
                said = first_line(Exception(errors[0])) if errors else \
                    "TensorRT logged no error to the harness (see its log above)"
                tail = "; rebuild it with 'harness build'" if has_sidecar else ""
                raise UserError(f"TensorRT {trt.__version__} cannot deserialize "
                                f"{self.path.name}: {said}{tail}")
            context = engine.create_execution_context()
        if context is None:
            raise UserError(f"TensorRT could not create an execution context for "
                            f"{self.path.name} (see its log above; often GPU memory)")
        return engine, context

    def _read_foreign(self, trt: Any, engine: Any, context: Any, io: EngineIO,
                      onnx_model: Any) -> None:
        """What a sidecar would have said, for an engine without one: the batch profile from
        its profile 0, NMS settings and precision as decide_settings finds them, the export
        record of the given ONNX (when the harness exported it), and the warnings."""
        from harness.export.metadata import read_metadata

        self.profile = io.profile(self.input_name, 0)
        onnx_nms = None
        self._export = None
        if onnx_model is not None:
            graph = onnx_model.graph
            initializers = {i.name for i in graph.initializer}
            check_onnx_io(io, [i.name for i in graph.input if i.name not in initializers],
                          [o.name for o in graph.output], self.given_onnx.name, self.path.name)
            onnx_nms = nms_plugin_from_onnx(list(graph.node))
            self._export = read_metadata(onnx_model)
        text, failed = self._inspector_json(trt, engine, context)
        inspector = parse_inspector_json(text)
        foreign = decide_settings(inspector, onnx_model is not None, onnx_nms,
                                  self.requested_precision)
        self.foreign = foreign
        self.inspector = inspector
        self.profiling_verbosity = getattr(getattr(engine, "profiling_verbosity", None),
                                           "name", None)
        self._precision = foreign.precision
        self.settings_source = foreign.settings_source
        self.warnings = [NO_SIDECAR_WARNING]
        if failed:
            self.warnings.append(f"engine inspector failed: {failed}")
        self.warnings += list(foreign.notes)
        if len(io.profiles) > 1:
            self.warnings.append(f"the engine has {len(io.profiles)} optimization profiles; "
                                 "the harness runs profile 0")

    def _inspector_json(self, trt: Any, engine: Any, context: Any
                        ) -> tuple[Optional[str], Optional[str]]:
        """(the engine inspector's JSON, why it failed). With the context's input shape set
        to the profile's opt shape the inspector resolves dynamic dims and shows tensor
        formats, which it leaves out otherwise (IEngineInspector::setExecutionContext)."""
        try:
            inspector = engine.create_engine_inspector()
            if context.set_input_shape(self.input_name, tuple(self.profile.opt)):
                inspector.execution_context = context
            return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON)), None
        except (AttributeError, RuntimeError, TypeError) as exc:
            return None, first_line(exc)

    def _on_device(self) -> Any:
        """A context manager making this backend's CUDA device current."""
        import torch

        return torch.cuda.device(self.device_id)

    def _cuda_setup(self) -> None:
        # PyTorch already owns a CUDA context, an allocator and streams; its tensors'
        # data_ptr() are the device addresses set_tensor_address wants, so pycuda (a second
        # context and allocator) is not needed.
        import torch

        self._device = torch.device("cuda", self.device_id)
        self._stream = torch.cuda.Stream(device=self._device)

    def debug_build(self) -> Any:
        """What the layer diff's debug engines are built with (tensorrt_marking.DebugBuild):
        the sidecar's settings, or for an engine without one its profile, its precision
        (a UserError when unknown) and TF32 assumed on; needs the source ONNX."""
        from harness.backends.tensorrt_marking import DebugBuild

        self.load()
        if self.sidecar is not None:
            return DebugBuild.of(self.sidecar)
        if self._source_onnx is None:
            raise UserError(f"{self.path.name}: no source ONNX names its layers; give --onnx")
        return DebugBuild.of_foreign(self._onnx_sha256(), self._precision,
                                     self.profile, self.trt_version, self.gpu_name,
                                     self.capability)

    def _onnx_sha256(self) -> Optional[str]:
        """The given source ONNX's sha256 (hashed once: an ONNX can be hundreds of MB)."""
        from harness.export.metadata import file_sha256

        if self._source_onnx is None:
            return None
        if getattr(self, "_onnx_digest", None) is None:
            self._onnx_digest = file_sha256(self._source_onnx)
        return self._onnx_digest

    # -- inference --------------------------------------------------------------------------

    def _execute(self, inputs: np.ndarray, keep: Union[Sequence[str], None] = None,
                 metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        """Every output tensor for `inputs`; only those in `keep` (default: all) are copied
        back to the host, so a debug engine's other marked tensors cost no host memory. metas:
        the images' metas, fed as a two-stage engine's img_shape."""
        import torch

        self.load()
        x = check_images(inputs)
        # before anything runs
        if self.sidecar is not None:
            check_batch(self.profile, x.shape, self.path.name)
        else:
            lo, hi = self.profile.min[0], self.profile.max[0]
            check_batch(self.profile, x.shape, self.path.name,
                        f"it takes batches of {lo} to {hi} at {list(self.profile.max[1:])}; "
                        f"run batches of at most {hi} (compare --batch {hi})")
        ctx = self._context
        with torch.cuda.device(self._device):
            device_in = torch.from_numpy(x).to(self._device)
            if self._dtypes[self.input_name] == np.float16:
                device_in = device_in.half()
            device_in = device_in.contiguous()
            if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
                raise UserError(f"{self.path.name} refused input shape {tuple(x.shape)}")
            self._set_address(self.input_name, device_in)
            fed = [device_in]  # alive until the run ends
            for name in self.extra_inputs:
                from harness.export.variants import img_shape_rows

                rows = img_shape_rows(metas, x.shape[0], x.shape[2:])
                value = torch.from_numpy(rows.astype(self._dtypes[name])).to(self._device)
                if not ctx.set_input_shape(name, tuple(value.shape)):
                    raise UserError(f"{self.path.name} refused {name} of shape "
                                    f"{tuple(value.shape)}")
                self._set_address(name, value.contiguous())
                fed.append(value)
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

    def infer(self, inputs: np.ndarray, metas: Optional[Sequence[Any]] = None
              ) -> dict[str, np.ndarray]:
        """inputs (B, 3, H, W) float32 → the ONNX's outputs by name (marked tensors left out);
        metas: the images' metas, for a two-stage engine's img_shape input."""
        return self.run_marked(inputs, [], metas)[0]

    def final_output_names(self) -> list[str]:
        """The engine's outputs that are the ONNX's own (not marked for the layer diff)."""
        self.load()
        marked = set(self._marked_layers())
        return [n for n in self.output_names if n not in marked]

    def _marked_layers(self) -> list[str]:
        return list(self.sidecar.marked_layers) if self.sidecar is not None else []

    def intermediate_names(self) -> list[str]:
        """The ONNX tensors this (debug) engine gives (`harness build --mark`): those it was
        built with marked, and requested ones that were network outputs already. An ordinary
        engine has none, since marking stops fusions."""
        self.load()
        if self.sidecar is None:
            return []  # another tool's engine marks nothing for the harness
        return list(self.sidecar.build.get("layer_tensors", self.sidecar.marked_layers))

    def intermediates(self, inputs: np.ndarray, names: Sequence[str],
                      metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        """The named tensors for `inputs` (metas: a two-stage engine's img_shape). A name requested at build but left unmarked
        (folded into weights, a shape or int tensor; the sidecar's build["unmarked"] says
        why) is left out of the result, as the torch backend leaves out a module without a
        single tensor."""
        return self.run_marked(inputs, names, metas)[1]

    def run_marked(self, inputs: np.ndarray, names: Sequence[str],
                   metas: Optional[Sequence[Any]] = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(final outputs, the named marked tensors) of one execution on `inputs`: a debug
        engine's layer tensors and the outputs to check its marking against the deployed
        engine's, without running it twice. Names as intermediates() takes them."""
        self.load()
        final = self.final_output_names()
        if not names:
            values = self._execute(inputs, keep=final, metas=metas)
            return {n: values[n] for n in final}, {}
        known = self.intermediate_names()
        unmarked = self.sidecar.build.get("unmarked", {}) if self.sidecar is not None else {}
        for name in names:
            if name not in known and name not in unmarked:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else \
                    "; build a debug engine with those layers marked"
                raise UserError(f"{self.path.name} has no marked tensor '{name}'{hint}")
        values = self._execute(inputs, keep=[*final, *names], metas=metas)
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
        """Plain data for results.json (the target's `backend`): what the engine is and, for
        each fact, where it came from: `settings_source` (sidecar | engine inspector |
        source onnx | assumed) and `warnings`, one line each."""
        info: dict[str, Any] = {"backend": self.name, "model": str(self.path)}
        if self._engine is None:
            return info
        io = self.engine_io
        info.update({
            "tensorrt": self.trt_version, "device": f"cuda:{self.device_id}",
            "sidecar": self.sidecar is not None, "settings_source": self.settings_source,
            "warnings": list(self.warnings),
            "io": [t.to_json() for t in io.tensors], "profiles": io.profiles_json(),
            "profile": self.profile.to_json(),
            "input": {"name": self.input_name,
                      "shape": next(list(t.shape) for t in io.inputs
                                    if t.name == self.input_name)},
            "outputs": self.final_output_names(),
        })
        side = self.sidecar
        if side is not None:
            info.update({
                "gpu": side.gpu_name, "compute_capability": side.compute_capability,
                "tensorrt": side.tensorrt_version, "precision": side.precision,
                "profile": side.profile,
                "input": {"name": self.input_name, "shape": side.inputs.get(self.input_name)},
                "onnx_sha256": side.onnx_sha256, "marked_layers": len(side.marked_layers),
                "variant": (side.export or {}).get("variant"),
                "nms": (side.export or {}).get("nms"),
            })
            return info
        foreign = self.foreign
        plugin = foreign.nms if foreign is not None else None
        export = self._export or {}
        onnx = self._source_onnx
        info.update({
            "gpu": self.gpu_name, "compute_capability": self.capability,
            "precision": self._precision,
            "precision_source": foreign.precision_source if foreign else "unknown",
            "onnx": str(onnx) if onnx else None,
            "onnx_sha256": self._onnx_sha256(),
            "marked_layers": 0,
            "variant": export.get("variant") or ("end2end" if plugin else "unknown"),
            "nms": export.get("nms") or (plugin.op_type if plugin else "unknown"),
            "nms_plugin": plugin.to_json() if plugin else None,
            "profiling_verbosity": self.profiling_verbosity,
            "inspector": {"detailed": self.inspector.detailed,
                          "layers": len(self.inspector.records)},
        })
        return info
