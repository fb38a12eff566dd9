"""The layer tensors of a TensorRT engine for the layer diff, read from debug engines that each
mark one chunk of them. Marking a tensor as an output stops fusions through it, so an engine
with every layer marked can compute other numbers than the deployed one and, on large models,
run out of memory (NVIDIA/TensorRT #2571, #4444). Each chunk's engine is built once into the
work dir (keyed by its tensors, the source ONNX and the deployed engine's settings), only one
is deserialized at a time, and each one's final outputs are compared with the deployed
engine's on the same inputs, so the report can say how far marking moved the result.

The plan (chunks, cache keys and files, which engine gives which tensor, one engine alive,
the drift record) is plain Python tested without TensorRT; ChunkedDebugEngines runs it on
tensorrt_build.build_engine and TensorRTBackend.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar, Union

import numpy as np

from harness.backends.base import Backend, input_sha256
from harness.backends.tensorrt_plan import chunks
from harness.backends.tensorrt_sidecar import read_sidecar, sidecar_path
from harness.errors import UserError

# layers per debug engine: few enough that most fusions survive and memory stays bounded,
# enough that a 300-layer detector needs about ten builds
DEFAULT_CHUNK = 32
NMS_INPUTS = "NMS inputs"

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class DebugBuild:
    """What every debug engine of one deployed engine is built with: the deployed engine's own
    settings, read from its sidecar, so marking is the only difference left. The TensorRT
    version and GPU are part of it because an engine runs only where it was built."""

    onnx_sha256: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    tf32: bool
    workspace_gb: float
    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @classmethod
    def of(cls, sidecar: Any) -> "DebugBuild":
        """From a deployed engine's EngineSidecar."""
        build = sidecar.build or {}
        return cls(onnx_sha256=sidecar.onnx_sha256, precision=sidecar.precision,
                   min_batch=int(sidecar.profile["min"][0]),
                   opt_batch=int(sidecar.profile["opt"][0]),
                   max_batch=int(sidecar.profile["max"][0]),
                   tf32=bool(build.get("tf32", False)),
                   workspace_gb=float(build.get("workspace_gb", 4.0)),
                   tensorrt_version=sidecar.tensorrt_version, gpu_name=sidecar.gpu_name,
                   compute_capability=sidecar.compute_capability)

    @classmethod
    def of_foreign(cls, onnx_sha256: str, precision: str, profile: Any,
                   tensorrt_version: str, gpu_name: str, compute_capability: str
                   ) -> "DebugBuild":
        """For an engine without a sidecar (another tool built it): the batch limits from
        its optimization profile (tensorrt_plan.BatchProfile), the precision the user gave
        or the inspector read, TensorRT and GPU those it runs on here, and TF32 on, as
        TensorRT (BuilderFlag.TF32 "Enabled by default") and trtexec (without --noTF32)
        build: assumed, since nothing in the engine says. An unknown precision is a
        UserError: debug engines at another precision would explain another engine."""
        if precision not in ("fp32", "fp16", "int8"):
            raise UserError("the engine's precision is unknown (no harness sidecar, and its "
                            "inspector shows no layer formats, as an engine built without "
                            "ProfilingVerbosity.DETAILED does), so its debug engines cannot "
                            "be built like it")
        return cls(onnx_sha256=onnx_sha256, precision=precision,
                   min_batch=int(profile.min[0]), opt_batch=int(profile.opt[0]),
                   max_batch=int(profile.max[0]), tf32=True, workspace_gb=4.0,
                   tensorrt_version=tensorrt_version, gpu_name=gpu_name,
                   compute_capability=compute_capability)


@dataclass(frozen=True)
class MarkedSet:
    """One debug engine: label (`layers 33-64 of 97`, `NMS inputs`), the ONNX tensors it
    marks (graph order) and its engine file."""

    label: str
    tensors: tuple[str, ...]
    path: Path


def debug_engine_key(build: DebugBuild, tensors: Sequence[str]) -> str:
    """sha256 over the build settings (the source ONNX's digest among them) and the marked
    tensors in order: the same chunk of the same engine maps to the same file on every run."""
    doc = {"build": asdict(build), "tensors": list(tensors)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def debug_engine_path(work_dir: Union[str, Path], stem: str, build: DebugBuild,
                      tensors: Sequence[str]) -> Path:
    """`<work_dir>/<stem>.marked-<key[:16]>.engine` (its sidecar beside it)."""
    return Path(work_dir) / f"{stem}.marked-{debug_engine_key(build, tensors)[:16]}.engine"


def marking_plan(layer_tensors: Sequence[str], nms_inputs: Sequence[str], build: DebugBuild,
                 work_dir: Union[str, Path], stem: str, chunk: int = DEFAULT_CHUNK
                 ) -> list[MarkedSet]:
    """The debug engines for `layer_tensors` (graph order, repeats dropped), `chunk` per engine
    in order, then one more of its own for the NMS plugin's inputs `nms_inputs` (none when
    empty): a handful of tensors read every batch, never mixed into the layer chunks."""
    layers = list(dict.fromkeys(layer_tensors))
    sets = []
    first = 1
    for part in chunks(layers, chunk):
        label = f"layers {first}-{first + len(part) - 1} of {len(layers)}"
        sets.append(MarkedSet(label, tuple(part),
                              debug_engine_path(work_dir, stem, build, part)))
        first += len(part)
    nms = list(dict.fromkeys(nms_inputs))
    if nms:
        sets.append(MarkedSet(NMS_INPUTS, tuple(nms), debug_engine_path(work_dir, stem, build,
                                                                        nms)))
    return sets


def route(names: Sequence[str], sets: Sequence[MarkedSet]) -> list[tuple[int, list[str]]]:
    """Which debug engines give `names`: (index into `sets`, the names it gives, in request
    order), in the order of `sets`, so a request walks the chunks front to back. A request for
    exactly the NMS inputs goes to their engine alone (the candidates come from one run); any
    other name goes to the first layer chunk that marks it, else to the NMS-inputs engine. A
    name no engine marks is a UserError."""
    nms = [i for i, s in enumerate(sets) if s.label == NMS_INPUTS]
    if names and nms and set(names) == set(sets[nms[0]].tensors):
        return [(nms[0], list(names))]
    owner: dict[str, int] = {}
    for index, s in sorted(enumerate(sets), key=lambda item: item[1].label == NMS_INPUTS):
        for tensor in s.tensors:
            owner.setdefault(tensor, index)
    missing = [n for n in names if n not in owner]
    if missing:
        raise UserError(f"no debug engine marks {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + ": it is not among the layers the compare run planned to mark")
    parts: dict[int, list[str]] = {}
    for name in names:
        parts.setdefault(owner[name], []).append(name)
    return sorted(parts.items())


def split_marking(nodes: Sequence[Any], node_names: Sequence[str]
                  ) -> tuple[list[str], list[str]]:
    """(layer tensors, NMS plugin inputs) to mark for `node_names`, as the compare run asks
    for them: its layers' nodes, then the nodes producing the NMS plugin's boxes and scores
    inputs (harness.align.compare). nodes: onnx NodeProtos in graph order. Each layer node
    gives its first output (the tensor the layer diff reads, layers.Layer.tensor); the plugin
    is the first TRT-domain node, unless an ONNX NonMaxSuppression comes first
    (pipelines.pipeline_for), and its inputs are its first two inputs that a node produces.
    A node name not in the graph is a UserError."""
    made_by = {out: node.name for node in nodes for out in node.output if out}
    plugin_inputs: list[str] = []
    for node in nodes:
        if node.op_type == "NonMaxSuppression":
            break
        if node.domain == "TRT":
            plugin_inputs = [t for t in list(node.input)[:2] if t and t in made_by]
            break
    producers = [made_by[t] for t in plugin_inputs]
    names = list(node_names)
    if producers and names[-len(producers):] == producers:
        names = names[:-len(producers)]
    else:
        plugin_inputs = []  # the caller did not ask for them
    first_output = {node.name: node.output[0] for node in nodes if node.output}
    missing = [n for n in names if n not in first_output]
    if missing:
        raise UserError(f"no ONNX node named {missing[0]!r} produces a tensor to mark")
    return list(dict.fromkeys(first_output[n] for n in names)), plugin_inputs


def cached_engine_found(marked: MarkedSet) -> bool:
    """True when `marked`'s engine and sidecar are both on disk and the sidecar says it was
    built marking exactly its tensors (build_engine writes the sidecar last, so a build that
    was interrupted leaves none and is built again)."""
    if not (marked.path.is_file() and sidecar_path(marked.path).is_file()):
        return False
    try:
        side = read_sidecar(marked.path)
    except UserError:
        return False
    return list(side.build.get("requested", [])) == list(marked.tensors)


class OneAtATime(Generic[K, V]):
    """At most one opened object: asking for another key closes the current one before the
    next is opened (one debug engine deserialized, with its buffers, at a time). The same key
    again reuses the open object."""

    def __init__(self, open_: Callable[[K], V], close: Callable[[V], None]):
        self._open = open_
        self._close = close
        self._key: Optional[K] = None
        self._value: Optional[V] = None

    @property
    def key(self) -> Optional[K]:
        """The key of the object now open, or None."""
        return self._key if self._value is not None else None

    def get(self, key: K) -> V:
        if self._value is not None and self._key == key:
            return self._value
        self.close()
        value = self._open(key)
        self._key, self._value = key, value
        return value

    def close(self) -> None:
        value, self._key, self._value = self._value, None, None
        if value is not None:
            self._close(value)


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64 (harness.align.tensor_diff's
    definition; backends may not import align): the plain norm of the difference when
    `expected` is all zeros, inf when the shapes differ."""
    if np.shape(actual) != np.shape(expected):
        return float("inf")
    diff = float(np.linalg.norm(np.asarray(actual, np.float64) - np.asarray(expected,
                                                                            np.float64)))
    scale = float(np.linalg.norm(np.asarray(expected, np.float64)))
    return diff / scale if scale else diff


class MarkingDrift:
    """How far marking moved the final outputs: per debug engine, the largest rel-L2 of a
    float output against the deployed engine's on the same inputs, kept as the max over every
    batch it ran on; and, for the latest inputs, per output the debug engine's value furthest
    from the deployed one (what ChunkedDebugEngines.infer returns)."""

    def __init__(self) -> None:
        self.by_engine: dict[str, float] = {}
        self._digest: Optional[str] = None
        self._seen: set[str] = set()
        self._worst: dict[str, tuple[float, np.ndarray]] = {}

    def add(self, label: str, digest: str, marked: dict[str, np.ndarray],
            deployed: dict[str, np.ndarray]) -> float:
        """Record one run of debug engine `label` on the inputs with sha256 `digest`: its
        final outputs `marked` against the deployed engine's `deployed`. Returns its figure."""
        if digest != self._digest:
            self._digest, self._seen, self._worst = digest, set(), {}
        figure = 0.0
        for name, value in deployed.items():
            if name not in marked or not np.issubdtype(np.asarray(value).dtype, np.floating):
                continue
            moved = relative_l2(marked[name], value)
            figure = max(figure, moved)
            if name not in self._worst or moved > self._worst[name][0]:
                self._worst[name] = (moved, marked[name])
        self._seen.add(label)
        self.by_engine[label] = max(self.by_engine.get(label, 0.0), figure)
        return figure

    def seen(self, digest: str) -> set[str]:
        """Labels of the debug engines already run on the inputs with sha256 `digest`."""
        return set(self._seen) if digest == self._digest else set()

    def worst_outputs(self, digest: str) -> dict[str, np.ndarray]:
        """Per float output, the debug-engine value furthest from the deployed one on the
        inputs with sha256 `digest` (empty for other inputs)."""
        if digest != self._digest:
            return {}
        return {name: value for name, (_, value) in self._worst.items()}

    @property
    def largest(self) -> Optional[float]:
        """The largest figure of any debug engine, or None before any ran."""
        return max(self.by_engine.values()) if self.by_engine else None


def open_debug_engine(path: Path, device_id: int = 0) -> Any:
    """A loaded TensorRTBackend of a debug engine."""
    from harness.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend(path, device_id=device_id)
    backend.load()
    return backend


class ChunkedDebugEngines(Backend):
    """The layer tensors of a deployed TensorRT engine, from debug engines built from its
    source ONNX with its own settings, each marking one chunk of `layer_tensors` (graph order,
    `chunk` per engine), plus one marking the NMS plugin's inputs `nms_inputs` (end2end
    engines). The calls are those of a backend in the compare run: intermediates() for the
    layer diff and the NMS candidates, infer() for the marking check.

    deployed: the loaded TensorRTBackend of the engine itself. build / open_engine: how a
    debug engine is built (tensorrt_build.build_engine's signature) and loaded (an object with
    run_marked(inputs, names) and unload()); the defaults are TensorRT's. settings: what the
    debug engines are built with (default: DebugBuild.of the deployed engine's sidecar; an
    engine without one gives TensorRTBackend.debug_build())."""

    name = "tensorrt-debug"

    def __init__(self, deployed: Any, onnx_path: Union[str, Path], layer_tensors: Sequence[str],
                 nms_inputs: Sequence[str] = (), work_dir: Union[str, Path] = ".",
                 chunk: int = DEFAULT_CHUNK, *, build: Optional[Callable[..., Any]] = None,
                 open_engine: Optional[Callable[[Path], Any]] = None,
                 settings: Optional[DebugBuild] = None):
        self.deployed = deployed
        self.onnx_path = Path(onnx_path)
        self.work_dir = Path(work_dir)
        self.chunk = chunk
        self.settings = settings or DebugBuild.of(deployed.sidecar)
        stem = Path(deployed.path).stem
        self.sets = marking_plan(layer_tensors, nms_inputs, self.settings, self.work_dir, stem,
                                 chunk)
        # chunk builds share one timing cache: the same layers get the same tactics, faster
        self.timing_cache = self.work_dir / f"{stem}.marked.timing.cache"
        if build is None:
            from harness.backends.tensorrt_build import build_engine as build
        device_id = int(getattr(deployed, "device_id", 0))
        self._build = build
        self._open = open_engine or (lambda path: open_debug_engine(path, device_id))
        self._loaded: OneAtATime[int, Any] = OneAtATime(
            lambda index: self._open(self.sets[index].path), lambda engine: engine.unload())
        self.drift = MarkingDrift()
        self.built: list[Path] = []  # engines this object built (the rest were on disk)
        self._deployed_outputs: tuple[Optional[str], dict[str, np.ndarray]] = (None, {})

    # -- building -----------------------------------------------------------------------------

    def load(self) -> None:
        """Build every debug engine not already in the work dir (none is deserialized)."""
        for index in range(len(self.sets)):
            self._ensure_built(index)

    def _ensure_built(self, index: int) -> None:
        marked = self.sets[index]
        if cached_engine_found(marked):
            return
        b = self.settings
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._build(self.onnx_path, marked.path, precision=b.precision, min_batch=b.min_batch,
                    opt_batch=b.opt_batch, max_batch=b.max_batch, workspace_gb=b.workspace_gb,
                    timing_cache=self.timing_cache, mark_tensors=list(marked.tensors),
                    tf32=b.tf32)
        self.built.append(marked.path)

    # -- running ------------------------------------------------------------------------------

    def intermediates(self, inputs: np.ndarray, names: Sequence[str],
                      metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        """The named ONNX tensors for `inputs`, each from the debug engine that marks it (the
        engines a request spans are loaded in turn, the previous one freed first). A tensor
        TensorRT could not mark is left out, as TensorRTBackend.intermediates leaves it out.
        metas: the images' metas, for two-stage engines' img_shape."""
        digest = input_sha256(inputs)
        found: dict[str, np.ndarray] = {}
        for index, part in route(names, self.sets):
            found.update(self._run(index, inputs, digest, part, metas))
        return {n: found[n] for n in names if n in found}

    def infer(self, inputs: np.ndarray, metas: Optional[Sequence[Any]] = None
              ) -> dict[str, np.ndarray]:
        """The debug engines' final outputs on `inputs`, per float output the value furthest
        (rel-L2) from the deployed engine's, running any debug engine not yet run on these
        inputs: so the largest rel-L2 of infer(x) against the deployed engine's outputs on x
        is the most any one chunk's marking moved them (marking_changed_outputs_rel_l2 is the
        same figure over every batch)."""
        digest = input_sha256(inputs)
        seen = self.drift.seen(digest)
        for index, marked in enumerate(self.sets):
            if marked.label not in seen:
                self._run(index, inputs, digest, [], metas)
        return self.drift.worst_outputs(digest)

    def _run(self, index: int, inputs: np.ndarray, digest: str, names: Sequence[str],
             metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        self._ensure_built(index)
        engine = self._loaded.get(index)
        outputs, tensors = engine.run_marked(inputs, list(names), metas)
        self.drift.add(self.sets[index].label, digest, outputs,
                       self._deployed(inputs, digest, metas))
        return tensors

    def _deployed(self, inputs: np.ndarray, digest: str,
                  metas: Optional[Sequence[Any]] = None) -> dict[str, np.ndarray]:
        """The deployed engine's outputs on `inputs`, computed once per batch."""
        if self._deployed_outputs[0] != digest:
            self._deployed_outputs = (None, {})  # free the last batch's before the next
            self._deployed_outputs = (digest, self.deployed.infer(inputs, metas))
        return self._deployed_outputs[1]

    def close(self) -> None:
        """Free the debug engine now loaded, if any."""
        self._loaded.close()

    # -- what it is ---------------------------------------------------------------------------

    @property
    def marking_changed_outputs_rel_l2(self) -> Optional[float]:
        """The largest rel-L2 by which any debug engine's final outputs moved from the
        deployed engine's, over every batch run so far (None before any ran)."""
        return self.drift.largest

    def intermediate_names(self) -> list[str]:
        return list(dict.fromkeys(t for s in self.sets for t in s.tensors))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": str(self.deployed.path), "chunk": self.chunk,
                "marking_changed_outputs_rel_l2": self.drift.largest,
                "debug_engines": [{"label": s.label, "tensors": len(s.tensors),
                                   "path": str(s.path),
                                   "marking_changed_outputs_rel_l2":
                                       self.drift.by_engine.get(s.label)}
                                  for s in self.sets]}
