"""The results schema: what `harness compare` and `harness coco` produce, as dataclasses that
the commands write, the reports render and the gates check — one definition of every key in
`results.json` (docs/results-schema.md describes it for readers).

`from_json` is tolerant: a key a file lacks becomes None and is remembered, so a reader that
needs it (a gate) can say exactly which field is missing (`Missing`), instead of guessing or
skipping. A file of another schema version is refused in one line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from harness.errors import UserError

RESULTS_NAME = "results.json"
# 2: compare targets gained status / ties / settings / non-finite fields, coco rows their
# latency stability (harness 0.2). Version-1 files are refused: re-run the command.
SCHEMA_VERSION = 2


class Missing(UserError):
    """A field a reader needs is absent (or null) in a results file; `field` is its path,
    e.g. `compare.targets[1].detections.match_rate`."""

    def __init__(self, path: str, why: str = "missing"):
        super().__init__(f"{path} is {why}")
        self.field = path


class Schema:
    """Base of every results dataclass: JSON in and out, and where a value came from."""

    _path: str = ""
    _missing: frozenset = frozenset()

    def to_json(self) -> dict[str, Any]:
        return _clean({f.name: _to_json(getattr(self, f.name))
                       for f in dataclasses.fields(self)})  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, value: Any, path: str = ""):
        """An instance from its JSON form; `path` names where it sits in the file (for the
        messages of `need`)."""
        return _from_json(cls, value, path)

    def need(self, name: str) -> Any:
        """The value of field `name`; Missing (naming the field's path) when the file lacked
        it or it is null."""
        where = f"{self._path}.{name}" if self._path else name
        if name in self._missing:
            raise Missing(where)
        value = getattr(self, name)
        if value is None:
            raise Missing(where, "null")
        return value


# -- compare ---------------------------------------------------------------------------

@dataclass
class Unreadable(Schema):
    image: str
    reason: str


@dataclass
class CompareInputs(Schema):
    """images: the files asked for; count: those read and compared; sha256: per batch."""

    images: list[str]
    count: int
    batch: int
    sha256: list[str]
    preprocess: dict[str, Any]
    requested: Optional[int] = None
    unreadable: list[Unreadable] = field(default_factory=list)
    note: str = "every backend received these exact bytes"


@dataclass
class LayerRow(Schema):
    """One compared layer: metrics over the elements finite on both sides."""

    module: str
    tensor: str
    depth: int
    rel_l2: float
    max_abs: float
    mean_abs: float
    cosine: float
    node: Optional[str] = None
    shape: Optional[list[int]] = None
    nonfinite: int = 0
    nonfinite_target: int = 0
    nonfinite_reference: int = 0


@dataclass
class LayerPoint(Schema):
    """The first layer past a tolerance."""

    module: str
    depth: int
    rel_l2: float
    tolerance: float
    tensor: Optional[str] = None


@dataclass
class NonfiniteLayer(Schema):
    """The first layer with inf / NaN values: how many in the target, how many in PyTorch."""

    module: str
    depth: int
    target: int
    reference: int
    tensor: Optional[str] = None


@dataclass
class LayerSummary(Schema):
    """A target's layer diff; `note` says why there is none (rows empty)."""

    rows: list[LayerRow]
    metric: str = "rel_l2"
    tolerance: Optional[float] = None
    precision: Optional[str] = None
    first_divergence: Optional[LayerPoint] = None
    first_past_tolerance: Optional[LayerPoint] = None
    first_nonfinite: Optional[NonfiniteLayer] = None
    layers_with_nonfinite: int = 0
    worst: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    # ConvModule parts asked for, compared as their ConvModule (the exporter fuses them)
    replaced: dict[str, str] = field(default_factory=dict)
    marking_changed_outputs_rel_l2: Optional[float] = None
    note: Optional[str] = None


@dataclass
class CandidateSummary(Schema):
    """Boxes and scores before NMS, target against PyTorch; `born`: where a difference
    started (none | in_nms | before_nms | unknown, with `note`)."""

    born: str
    box_max_abs: Optional[float] = None
    box_rel_l2: Optional[float] = None
    score_max_abs: Optional[float] = None
    score_rel_l2: Optional[float] = None
    score_threshold: Optional[float] = None
    above_threshold_reference: Optional[int] = None
    above_threshold_target: Optional[int] = None
    note: Optional[str] = None


@dataclass
class MismatchExample(Schema):
    image: str
    cause: str
    side: str
    score: float
    detail: str
    box: int = -1
    rank: Optional[int] = None
    limit: Optional[int] = None
    setting: Optional[str] = None
    class_name: Optional[str] = None  # "class" in JSON

    def to_json(self) -> dict[str, Any]:
        doc = super().to_json()
        doc["class"] = doc.pop("class_name")
        return doc

    @classmethod
    def from_json(cls, value: Any, path: str = ""):
        if isinstance(value, dict) and "class" in value:
            value = {**value, "class_name": value["class"]}
            value.pop("class")
        return _from_json(cls, value, path)


@dataclass
class SettingDifference(Schema):
    """One NMS setting the target sets differently, and how many mismatches it decided."""

    setting: str
    label: str
    reference: Any
    target: Any
    explains: int


@dataclass
class DetectionSummary(Schema):
    """The post-NMS diff of one target: counts, one cause per mismatch, tie groups per side,
    settings differences, and the worst examples."""

    reference: int
    target: int
    matched: int
    match_rate: float
    mismatches: int
    unexplained: int
    causes: dict[str, int]
    ties: dict[str, int] = field(default_factory=lambda: {"reference": 0, "target": 0})
    degenerate_matched: int = 0
    settings_differ: list[SettingDifference] = field(default_factory=list)
    settings_problem: Optional[str] = None
    tolerances: dict[str, float] = field(default_factory=dict)
    examples: list[MismatchExample] = field(default_factory=list)


@dataclass
class TargetResult(Schema):
    """One file compared with PyTorch; `available` False (and `reason`) when it was not
    (status not_available: nothing can run it here; failed: it could not be compared)."""

    name: str
    path: str
    kind: str
    available: bool
    precision: str
    status: str = "ok"
    reason: Optional[str] = None
    backend: dict[str, Any] = field(default_factory=dict)
    variant: Optional[str] = None
    pipeline: Optional[dict[str, Any]] = None
    layers: Optional[LayerSummary] = None
    candidates: Optional[CandidateSummary] = None
    detections: Optional[DetectionSummary] = None
    replay_disagrees: Optional[int] = None


@dataclass
class CompareResult(Schema):
    created: str
    seconds: float
    model: dict[str, Any]
    inputs: CompareInputs
    reference: dict[str, Any]
    targets: list[TargetResult]
    verdict: str


# -- coco --------------------------------------------------------------------------------

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


@dataclass
class CocoRow(Schema):
    """One configuration of the matrix; numbers are None unless status is "ok"."""

    backend: str
    device: str
    precision: str
    batch: int
    status: str
    AP: Optional[float] = None
    AP50: Optional[float] = None
    AP75: Optional[float] = None
    APs: Optional[float] = None
    APm: Optional[float] = None
    APl: Optional[float] = None
    AR1: Optional[float] = None
    AR10: Optional[float] = None
    AR100: Optional[float] = None
    delta_AP: Optional[float] = None
    per_class: Optional[dict[str, Optional[float]]] = None
    latency_ms: Optional[dict[str, dict[str, float]]] = None
    latency_stability: Optional[dict[str, Any]] = None
    images_per_s: Optional[float] = None
    images: Optional[int] = None
    unreadable: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.backend, self.device, self.precision, self.batch)


@dataclass
class CocoDataset(Schema):
    images_dir: str
    annotations: str
    images: int
    unreadable: int = 0
    unreadable_images: list[Unreadable] = field(default_factory=list)


@dataclass
class CocoResult(Schema):
    created: str
    seconds: float
    dataset: CocoDataset
    machine: dict[str, Any]
    model: dict[str, Any]
    evaluator: dict[str, Any]
    latency: dict[str, Any]
    rows: list[CocoRow]


# -- the file ----------------------------------------------------------------------------

@dataclass
class ExperimentSection(Schema):
    """Which experiment file the commands ran from, and its [gates] table verbatim."""

    name: str
    path: str
    gates: Optional[dict[str, Any]] = None


@dataclass
class Results(Schema):
    """The whole results.json: a section per command that wrote into the folder."""

    schema: int = SCHEMA_VERSION
    experiment: Optional[ExperimentSection] = None
    compare: Optional[CompareResult] = None
    coco: Optional[CocoResult] = None


SECTIONS = {"experiment": ExperimentSection, "compare": CompareResult, "coco": CocoResult}


def read_results(path: Union[str, Path], missing_ok: bool = False) -> Results:
    """The results file at `path` (or in that folder). A missing file is a UserError, or an
    empty Results with `missing_ok`; a corrupt file or one of another schema version is a
    UserError that says what to do."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_NAME
    try:
        text = p.read_text()
    except FileNotFoundError:
        if missing_ok:
            return Results()
        raise UserError(f"results file {p} does not exist; run the harness command that "
                        "writes it first") from None
    except OSError as exc:
        raise UserError(f"results file {p} cannot be read: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"results file {p} is not valid JSON ({exc}); delete it or point to "
                        "another report folder") from None
    if not isinstance(doc, dict) or "schema" not in doc:
        raise UserError(f"results file {p} is not a harness results document (no 'schema')")
    if doc["schema"] != SCHEMA_VERSION:
        raise UserError(f"results file {p} has schema {doc['schema']!r}; this harness reads "
                        f"schema {SCHEMA_VERSION}: run the command again to rewrite it")
    return Results.from_json(doc)


def write_section(out: Union[str, Path], section: str, value: Schema,
                  experiment: Optional[ExperimentSection] = None) -> Path:
    """`out`/results.json with `section` replaced (the others kept, unless the file is of
    another schema version: then it starts afresh), and the experiment section when given.
    Atomic: an interrupted write never leaves half a file."""
    path = Path(out) / RESULTS_NAME
    try:
        results = read_results(path, missing_ok=True)
    except UserError:
        results = Results()  # another version or a broken file: this command's section wins
    if experiment is not None:
        results.experiment = experiment
    setattr(results, section, value)
    atomic_write_text(path, json.dumps(results.to_json(), indent=1) + "\n")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- conversion --------------------------------------------------------------------------

def _to_json(value: Any) -> Any:
    if isinstance(value, Schema):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python numbers, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _from_json(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise UserError(f"results: {path or cls.__name__} must be an object, got "
                        f"{type(value).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    missing = []
    for f in dataclasses.fields(cls):
        where = f"{path}.{f.name}" if path else f.name
        if f.name in value:
            kwargs[f.name] = _convert(hints[f.name], value[f.name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = None
            missing.append(f.name)
    obj = cls(**kwargs)
    obj._path = path
    obj._missing = frozenset(missing)
    return obj


def _convert(hint: Any, value: Any, path: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin is Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value, path) if len(inner) == 1 else value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(hint)
        return {k: _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Schema):
        return hint.from_json(value, path)
    return value
