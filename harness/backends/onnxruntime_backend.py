"""onnxruntime backend: any ONNX file the harness exports (or a user brings), on the CPU or CUDA
provider. Graphs ending in TensorRT plugin nodes run up to the plugins' inputs in onnxruntime
and finish with harness.nms's reference kernel; intermediate tensors are extra graph outputs.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from harness.backends.base import Backend, check_images
from harness.errors import UserError, first_line
from harness.export.variants import IMG_SHAPE_INPUT, img_shape_rows

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


def read_onnx(path: Union[str, Path]) -> Any:
    """Parse an ONNX file; a missing, corrupt, truncated or empty one is a UserError."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"ONNX file not found: {p}")
    data = p.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{p} is not a readable ONNX file (corrupt or truncated: "
                        f"{first_line(exc)})"
                        ) from None
    # a cut-off file can still parse: its graph then lacks nodes, inputs or outputs
    graph = model.graph
    if not data or not graph.node or not graph.input or not graph.output:
        raise UserError(f"{p} is not a usable ONNX model (no graph, inputs or outputs: "
                        "corrupt or truncated?)")
    made = {t for n in graph.node for t in n.output} | {i.name for i in graph.input} \
        | {i.name for i in graph.initializer}
    lost = [o.name for o in graph.output if o.name not in made]
    if lost:
        raise UserError(f"{p} is incomplete: output {lost[0]!r} is produced by no node "
                        "(truncated file?)")
    return model


def _dims(value_info: Any) -> list[Union[int, str, None]]:
    """Declared dims of a graph input: int (static), str (symbolic) or None (unknown)."""
    out: list[Union[int, str, None]] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def graph_precision(model: Any) -> str:
    """fp32 | fp16 | int8, from the graph itself (for files without harness metadata)."""
    from onnx import TensorProto

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16"
    return "fp32"


class OnnxruntimeBackend(Backend):
    """path: an ONNX file. provider: auto (CUDA when onnxruntime-gpu has it, else CPU) | cpu |
    cuda. use_tf32: the CUDA provider's `use_tf32` option, set explicitly and recorded.
    threads: intra-op threads (None: onnxruntime's default). optimization: graph optimization
    level. allow_spinning: let idle intra-op threads busy-wait (lower latency, but they keep
    cores busy between runs and slow down any other backend in the same process; the latency
    measurement turns it on). plugin_trace: keep per-candidate traces from the plugin
    reference kernels.
    """

    name = "onnxruntime"
    label = "onnxruntime"
    precisions = ("fp32", "fp16", "int8")
    devices = ("cpu", "cuda")
    file_suffixes = (".onnx",)
    file_kind = "onnx"
    plot_marker = "s"
    synchronous = True  # session.run returns host arrays, on CUDA too

    @classmethod
    def unavailable(cls, device: str) -> Union[str, None]:
        import onnxruntime as ort

        provider = PROVIDERS.get(device)
        if provider is None or provider not in ort.get_available_providers():
            return (f"onnxruntime {ort.__version__} here has no {provider or device} "
                    "(install onnxruntime-gpu)")
        return None

    @classmethod
    def for_configuration(cls, config: Any, model: Any, files: Any):
        backend = cls(files.onnx(config.precision), provider=config.device)
        backend.load()
        return backend, {"onnx_sha256": backend.model_sha256}

    @classmethod
    def open_file(cls, path: Path, device: str) -> Any:
        """The loaded backend of `path`; for the RPN graph of a split two-stage export, the
        pair run as one (harness.backends.split_twostage)."""
        backend = cls(path, provider=device)
        backend.load()
        split = (backend.metadata or {}).get("split") or {}
        if split.get("role") == "rpn":
            from harness.backends.split_twostage import SplitTwoStageBackend

            return SplitTwoStageBackend(backend, provider=device)
        if split.get("role") == "head":
            raise UserError(f"{path.name} is the head graph of a split export: give its RPN "
                            f"graph {split.get('rpn_file')}")
        return backend

    def compute_runs(self, inputs: np.ndarray, metas: Optional[Sequence[Any]], warmup: int,
                     runs: int) -> Optional[tuple[list[float], str]]:
        """Seconds of each of `runs` session runs (after `warmup`) through IO binding, the
        inputs bound once on the session's device and the outputs left there
        (harness.eval.inference_timing's compute figure); None for a graph with plugin
        nodes, whose reference kernels run on the host anyway."""
        import time

        import onnxruntime as ort

        self.load()
        if self._cut.plugins:
            return None
        cuda = "CUDAExecutionProvider" in self._session.get_providers()
        where = "cuda" if cuda else "cpu"
        binding = self._session.io_binding()
        for name, value in self._feed(inputs, metas).items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
                value, where, self.device_id))
        for out in self._session.get_outputs():
            binding.bind_output(out.name, where, self.device_id)
        seconds: list[float] = []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            self._session.run_with_iobinding(binding)
            if cuda:
                binding.synchronize_outputs()
            if i >= warmup:
                seconds.append(time.perf_counter() - t0)
        return seconds, f"onnxruntime IO binding, inputs and outputs on the {where}"

    def run_named(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's outputs for inputs fed by name, unchecked (a split export's head
        graph, whose input is RoI features, not images)."""
        self.load()
        return dict(zip(self._body_output_names, self._run(self._session, feeds)))

    def source_onnx(self) -> Path:
        return self.path

    # intra-op threads of a backend made without `threads`: None is onnxruntime's default
    # (every core); a torchrun rank sets its share of the host (harness.eval.distributed)
    default_threads: Optional[int] = None

    def __init__(self, path: Union[str, Path], *, provider: str = "auto", device_id: int = 0,
                 use_tf32: bool = False, threads: Union[int, None] = None,
                 optimization: str = "all", allow_spinning: bool = False,
                 plugin_trace: bool = False):
        if provider not in ("auto", *PROVIDERS):
            raise UserError(f"unknown onnxruntime provider '{provider}'; choose auto|"
                            f"{'|'.join(PROVIDERS)}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise UserError(f"unknown optimization level '{optimization}'; choose "
                            f"{'|'.join(OPTIMIZATION_LEVELS)}")
        self.path = Path(path)
        self.provider = provider
        self.device_id = device_id
        self.use_tf32 = use_tf32
        self.threads = threads if threads is not None else self.default_threads
        self.optimization = optimization
        self.allow_spinning = allow_spinning
        self.plugin_trace = plugin_trace
        self._session: Any = None
        self._intermediate_sessions: dict[tuple[str, ...], Any] = {}
        # node name → the reference kernel's full output of the last infer (with traces)
        self.plugin_results: dict[str, Any] = {}

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        if self._session is not None:
            return
        from harness.nms.plugin_nodes import PLUGIN_KERNELS
        from harness.export.metadata import file_sha256, read_metadata
        from harness.export.plugins import custom_nodes, cut_at_plugins, op_name

        model = read_onnx(self.path)
        unknown = sorted({op_name(n) for n in custom_nodes(model)
                          if (n.domain, n.op_type) not in PLUGIN_KERNELS})
        if unknown:
            raise UserError(f"{self.path} uses custom op {', '.join(unknown)}, which neither "
                            "onnxruntime nor the harness's plugin emulation implements")
        self.metadata = read_metadata(model)
        self.model_sha256 = file_sha256(self.path)
        self.precision = (self.metadata or {}).get("precision") or graph_precision(model)
        self._cut = cut_at_plugins(model)
        self._model_proto = model  # the tail's initializers, when it has one
        # the tail's sessions, per set of extra tensors asked of it (_run_tail)
        self._tail_sessions: dict[tuple[str, ...], Any] = {}
        initializers = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        # an image batch, and the images' shapes where the graph takes them (two-stage)
        self.takes_img_shape = any(i.name == IMG_SHAPE_INPUT for i in inputs)
        inputs = [i for i in inputs if i.name != IMG_SHAPE_INPUT]
        if len(inputs) != 1:
            raise UserError(f"{self.path} has {len(inputs)} inputs "
                            f"({', '.join(i.name for i in inputs)}); the harness feeds one "
                            f"image batch (and {IMG_SHAPE_INPUT}, the images' shapes)")
        self.input_name = inputs[0].name
        self.input_dims = _dims(inputs[0])
        self._input_elem_type = inputs[0].type.tensor_type.elem_type
        self._session = self._make_session(self._cut.body)
        # read once: protobuf fields are slow to walk on every run
        self._body_output_names = [o.name for o in self._cut.body.graph.output]
        self._output_names = [o.name for o in self._cut.outputs]

    def _providers(self) -> list[Any]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = self.provider
        if wanted == "auto":
            wanted = "cuda" if PROVIDERS["cuda"] in available else "cpu"
        if PROVIDERS[wanted] not in available:
            raise UserError(f"onnxruntime {ort.__version__} here has no {PROVIDERS[wanted]} "
                            f"(available: {', '.join(available)}); install onnxruntime-gpu "
                            "or use --provider cpu")
        self._resolved_provider = wanted
        if wanted == "cuda":
            options = {"device_id": str(self.device_id),
                       "use_tf32": "1" if self.use_tf32 else "0"}
            return [(PROVIDERS["cuda"], options), PROVIDERS["cpu"]]
        return [PROVIDERS["cpu"]]

    def _make_session(self, model: Any) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        options.log_severity_level = 3  # errors only: no per-node placement chatter
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        providers = self._providers()
        try:
            return ort.InferenceSession(model.SerializeToString(), options,
                                        providers=providers)
        except Exception as exc:  # onnxruntime's pybind exceptions share no useful base
            first = first_line(exc)
            raise UserError(f"onnxruntime cannot load {self.path}: {first}") from exc

    # -- inference --------------------------------------------------------------------------

    def check_fits(self, inputs: np.ndarray) -> None:
        """UserError, before running, when `inputs` (B, 3, H, W) does not fit the file's
        declared input: a static batch of another size, or another rank / channel / size."""
        self.load()
        dims = self.input_dims

        def shown() -> str:  # only for the messages: not built on every run
            return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"

        if len(dims) != inputs.ndim:
            raise UserError(f"{self.path.name} takes {self.input_name} {shown()} "
                            f"({len(dims)}-D); got a {inputs.ndim}-D input "
                            f"{tuple(inputs.shape)}")
        if isinstance(dims[0], int) and dims[0] != inputs.shape[0]:
            raise UserError(f"{self.path.name} has a static batch of {dims[0]} "
                            f"({self.input_name} {shown()}); it cannot take a batch of "
                            f"{inputs.shape[0]} (export with a dynamic batch, or use batch "
                            f"{dims[0]})")
        for axis, (want, got) in enumerate(zip(dims[1:], inputs.shape[1:]), start=1):
            if isinstance(want, int) and want != got:
                raise UserError(f"input shape {tuple(inputs.shape)} does not fit "
                                f"{self.path.name}, which takes {self.input_name} {shown()} "
                                f"(axis {axis} must be {want}): preprocess for this file's "
                                "input size")

    def _feed(self, inputs: np.ndarray,
              metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        from onnx import TensorProto

        x = check_images(inputs)
        self.check_fits(x)
        if self._input_elem_type == TensorProto.FLOAT16:
            x = x.astype(np.float16)  # a foreign fp16-input file; recorded in describe()
        elif self._input_elem_type != TensorProto.FLOAT:
            raise UserError(f"{self.path.name} takes {self.input_name} of ONNX type "
                            f"{TensorProto.DataType.Name(self._input_elem_type)}, not float")
        feeds = {self.input_name: x}
        if self.takes_img_shape:
            feeds[IMG_SHAPE_INPUT] = img_shape_rows(metas, x.shape[0], x.shape[2:])
        return feeds

    def _run(self, session: Any, feeds: dict[str, np.ndarray],
             names: Union[list[str], None] = None) -> list[np.ndarray]:
        try:
            return session.run(names, feeds)
        except Exception as exc:
            first = first_line(exc)
            shape = tuple(next(iter(feeds.values())).shape)
            raise UserError(f"onnxruntime failed to run {self.path.name} on input {shape}: "
                            f"{first}") from exc

    def infer(self, inputs: np.ndarray, metas: Optional[Sequence[Any]] = None
              ) -> dict[str, np.ndarray]:
        """inputs (B, 3, H, W) float32 → every graph output by name, in graph order (plugin
        outputs computed by the reference kernels)."""
        values = self._values(inputs, metas)
        return {name: values[name] for name in self._output_names}

    def _values(self, inputs: np.ndarray, metas: Optional[Sequence[Any]] = None,
                late: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Every tensor a run makes available: the body's outputs, the plugins' outputs, the
        tail's outputs and the tail tensors `late` (made after a plugin)."""
        from harness.nms.plugin_nodes import PLUGIN_KERNELS

        self.load()
        feeds = self._feed(inputs, metas)
        values = dict(zip(self._body_output_names, self._run(self._session, feeds)))
        values.update(feeds)
        self.plugin_results = {}
        for node in self._cut.plugins:
            kernel = PLUGIN_KERNELS[(node.domain, node.op_type)]
            outs, full = kernel(node, [values[n] for n in node.input if n], self.plugin_trace)
            values.update(zip(node.output, outs))
            self.plugin_results[node.name or node.op_type] = full
        if self._cut.tail:
            values.update(self._run_tail(values, late))
        return values

    def _run_tail(self, values: dict[str, np.ndarray],
                  late: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """The nodes after the plugins (another exporter's Cast / Reshape / Concat; the box
        head after a RoIAlign plugin), in a session of their own per set of extra tensors,
        made on first use."""
        from onnx import numpy_helper

        key = tuple(sorted(set(late)))
        if key not in self._tail_sessions:
            inits = {i.name: numpy_helper.to_array(i)
                     for i in self._model_proto.graph.initializer
                     if i.name in set(self._cut.tail_inputs())}
            tail = self._cut.tail_model(values, inits, key)
            self._tail_sessions[key] = (tail, self._make_session(tail))
        tail, session = self._tail_sessions[key]
        feeds = {i.name: values[i.name] for i in tail.graph.input}
        names = [o.name for o in tail.graph.output]
        return dict(zip(names, self._run(session, feeds, names)))

    # -- intermediates ----------------------------------------------------------------------

    def intermediate_names(self) -> list[str]:
        """Every tensor a node of the onnxruntime-run part produces, in graph order
        (`/backbone/stem/conv/Conv_output_0`, ...)."""
        self.load()
        return [t for n in self._cut.body.graph.node for t in n.output if t]

    def intermediates(self, inputs: np.ndarray, names: Sequence[str],
                      metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        """The tensors `names` for `inputs` (metas: fed as the img_shape input of a graph
        that takes one), by making them outputs of a copy of the graph (one session per set
        of names, kept); a tensor made after a plugin node (a RoIAlign plugin's box head) by
        a run through the plugins and the tail. Float tensors come back as float32."""
        self.load()
        known = set(self.intermediate_names()) | {self.input_name}
        late_known = {t for n in [*self._cut.plugins, *self._cut.tail] for t in n.output if t}
        for name in names:
            if name not in known and name not in late_known:
                close = difflib.get_close_matches(name, sorted(known | late_known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UserError(f"{self.path.name} has no tensor '{name}'{hint}")
        found: dict[str, np.ndarray] = {}
        late = [n for n in names if n not in known]
        if late:
            values = self._values(inputs, metas, late)
            found.update({n: values[n] for n in late})
        found.update(self._body_tensors(self._feed(inputs, metas), set(names) - set(late)))
        return {n: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
                for n, v in found.items()}

    def intermediates_named(self, feeds: dict[str, np.ndarray],
                            names: Sequence[str]) -> dict[str, np.ndarray]:
        """The body tensors `names` for inputs fed by name, unchecked (a split export's head
        graph, fed RoI features)."""
        self.load()
        return {n: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
                for n, v in self._body_tensors(feeds, set(names)).items()}

    def _body_tensors(self, feeds: dict[str, np.ndarray], names: set) -> dict[str, Any]:
        """Body tensors by making them outputs of a copy of the graph (one session per set
        of names, kept)."""
        import onnx

        key = tuple(sorted(names))
        if not key:
            return {}
        session = self._intermediate_sessions.get(key)
        if session is None:
            model = onnx.ModelProto()
            model.CopyFrom(self._cut.body)
            existing = {o.name for o in model.graph.output}
            model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in key
                                      if n not in existing)
            session = self._make_session(model)
            self._intermediate_sessions[key] = session
        return dict(zip(key, self._run(session, feeds, list(key))))

    # -- description ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        import onnx
        import onnxruntime as ort

        info: dict[str, Any] = {"backend": self.name, "onnxruntime": ort.__version__,
                                "onnx": onnx.__version__, "model": str(self.path),
                                "optimization": self.optimization, "threads": self.threads,
                                "allow_spinning": self.allow_spinning}
        if self._session is None:
            info["provider_requested"] = self.provider
            return info
        from harness.export.plugins import op_name

        cuda = self._resolved_provider == "cuda"
        meta = self.metadata or {}
        info.update({
            "providers": self._session.get_providers(),
            "provider": self._session.get_providers()[0],
            "device": f"cuda:{self.device_id}" if cuda else "cpu",
            "use_tf32": self.use_tf32 if cuda else None,
            "precision": self.precision,
            "model_sha256": self.model_sha256,
            "input": {"name": self.input_name, "shape": self.input_dims},
            "variant": meta.get("variant"), "nms": meta.get("nms"),
            "plugins_emulated": [{"node": n.name, "op": op_name(n),
                                  "kernel": "harness.nms reference (numpy, CPU)"}
                                 for n in self._cut.plugins],
        })
        return info
