"""Experiment files (`experiments/*.toml`): one model, one dataset split, the matrix of backends
× precisions × batch sizes × devices to run it through, latency settings, and the tables other
tools read ([compare], [gates]). `load_experiment` turns a file into a frozen `Experiment`;
any mistake in it is one line naming the key.

Relative paths in the file are relative to the current directory (where `harness` runs),
not to the file, so one file works from the repository root as the README shows it. A path
that starts with `harness:` names a file shipped inside the harness package
(`harness:fixture/yolov5_n_synth_320.py`, `harness:experiments/demo.toml`): `resolve_path`,
the one place paths are resolved, finds it through importlib.resources, from a checkout and
from an installed wheel alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

from harness.errors import UserError

if TYPE_CHECKING:
    from harness.results import ExperimentSection

PRECISION_NAMES = ("fp32", "fp16", "bf16", "int8")
PREPROCESS_MODES = ("fixed", "batch_shapes")


def _registry() -> Any:
    """harness.backends.registry: which backends exist, their precisions and devices (the
    pairing rule: a combination a backend does not list — torch int8, onnxruntime bf16 — is
    not in the matrix; a backend with one device, TensorRT, always runs there)."""
    from harness.backends import registry

    return registry


@dataclass(frozen=True)
class Configuration:
    """One row of the matrix: a backend on a device at a precision and batch size, and the
    nms_pre its post-processing uses (None: the config's)."""

    backend: str
    device: str
    precision: str
    batch: int
    nms_pre: Union[int, None] = None
    preprocess: str = "fixed"  # or "batch_shapes": mmyolo's per-batch rectangles

    @property
    def key(self) -> str:
        """File-name-safe name: `onnxruntime_cpu_int8_b4` (`..._b4_pre3840` with nms_pre,
        `..._bs` with batch shapes)."""
        pre = "" if self.nms_pre is None else f"_pre{self.nms_pre}"
        shapes = "_bs" if self.preprocess == "batch_shapes" else ""
        return f"{self.backend}_{self.device}_{self.precision}_b{self.batch}{pre}{shapes}"


@dataclass(frozen=True)
class ModelSpec:
    """config (.py), checkpoint (.pth); onnx / engines: precision → file the user already has
    (missing ones are exported / built)."""

    config: Path
    checkpoint: Union[Path, None]
    onnx: Mapping[str, Path] = field(default_factory=dict)
    engines: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    """images: a COCO split folder; annotations: None = COCO layout
    (`<images>/../annotations/instances_<split>.json`); count: 0 = every image."""

    images: Path
    annotations: Union[Path, None] = None
    count: int = 0


@dataclass(frozen=True)
class MatrixSpec:
    backends: tuple[str, ...] = field(default_factory=lambda: tuple(_registry().BACKENDS))
    precisions: tuple[str, ...] = PRECISION_NAMES
    batches: tuple[int, ...] = (1, 4)
    devices: tuple[str, ...] = ("cpu",)
    # an axis over test_cfg.nms_pre (empty: the config's only), e.g. (30000, 3840, 1000)
    nms_pre: tuple[int, ...] = ()
    # fixed and / or batch_shapes (only backends that take any input size run those)
    preprocess: tuple[str, ...] = ("fixed",)

    def configurations(self) -> list[Configuration]:
        return matrix_configurations(self.backends, self.precisions, self.batches,
                                     self.devices, self.nms_pre, self.preprocess)


@dataclass(frozen=True)
class LatencySpec:
    """None: the device's default (harness.eval.latency.default_settings)."""

    warmup: Union[int, None] = None
    runs: Union[int, None] = None


@dataclass(frozen=True)
class CompareSpec:
    """[compare]: what `harness compare --experiment` reads (its flags of the same names)."""

    count: Union[int, None] = None
    batch: Union[int, None] = None
    layers: tuple[str, ...] = ()
    provider: Union[str, None] = None
    device: Union[str, None] = None
    score_tol: Union[float, None] = None
    box_tol: Union[float, None] = None
    iou_band: Union[float, None] = None


@dataclass(frozen=True)
class Experiment:
    """A whole experiment file. gates: the [gates] table verbatim (for the pytest plugin and
    results.json's "experiment" section)."""

    name: str
    path: Path
    model: ModelSpec
    data: DataSpec
    matrix: MatrixSpec = MatrixSpec()
    latency: LatencySpec = LatencySpec()
    compare: CompareSpec = CompareSpec()
    gates: Mapping[str, Any] = field(default_factory=dict)

    def results_section(self) -> "ExperimentSection":
        """The "experiment" section of results.json (harness.results)."""
        from harness.results import ExperimentSection

        return ExperimentSection(name=self.name, path=str(self.path), gates=dict(self.gates))


def matrix_configurations(backends: Iterable[str], precisions: Iterable[str],
                          batches: Iterable[int], devices: Iterable[str],
                          nms_pre: Iterable[int] = (),
                          preprocess: Iterable[str] = ("fixed",)) -> list[Configuration]:
    """Every (backend, device, precision, batch) the pairing rule allows, in the order given
    (backend, device, precision, batch), without duplicates."""
    registry = _registry()
    out: list[Configuration] = []
    precisions, batches, devices = list(precisions), list(batches), list(devices)
    known_devices = registry.all_devices()
    pres: list[Union[int, None]] = list(nms_pre) or [None]
    modes = list(preprocess) or ["fixed"]
    bad = [m for m in modes if m not in PREPROCESS_MODES]
    if bad:
        raise UserError(f"unknown preprocess '{bad[0]}'; choose from "
                        f"{', '.join(PREPROCESS_MODES)}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in pres if n is not None):
        raise UserError(f"nms_pre values must be whole numbers >= 1, got {list(nms_pre)}")
    for backend in backends:
        runs = registry.backend_class(backend).precisions
        for device in devices:
            if device not in known_devices:
                raise UserError(f"unknown device '{device}'; choose from "
                                f"{', '.join(known_devices)}")
            device = registry.device_for(backend, device)
            for precision in precisions:
                if precision not in PRECISION_NAMES:
                    raise UserError(f"unknown precision '{precision}'; choose from "
                                    f"{', '.join(PRECISION_NAMES)}")
                if precision not in runs:
                    continue
                for batch in batches:
                    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                        raise UserError(f"batch sizes must be whole numbers >= 1, got {batch!r}")
                    for pre in pres:
                        for mode in modes:
                            # batch shapes vary the input size: static files cannot
                            if mode == "batch_shapes" and not \
                                    registry.backend_class(backend).dynamic_input_size:
                                continue
                            c = Configuration(backend, device, precision, batch, pre, mode)
                            if c not in out:
                                out.append(c)
    return out


# -- reading the file ------------------------------------------------------------------------

def read_toml(path: Union[str, Path]) -> dict[str, Any]:
    """An experiment file as a dict; a missing, unreadable or malformed file is a one-line
    UserError."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError("reading experiment files needs Python >= 3.11 or the 'tomli' "
                            "package") from None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"experiment file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"experiment file {p} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read experiment file {p}: {exc}") from None


def load_experiment(path: Union[str, Path]) -> Experiment:
    """Read and check an experiment file; every mistake is a one-line UserError."""
    p = Path(path)
    doc = read_toml(resolve_path(p))
    r = _Reader(p)
    r.keys(doc, "", {"name", "model", "data", "matrix", "latency", "compare", "gates"})
    name = r.get(doc, "name", str, required=True)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(f"{p}: name must be a plain folder name, got {name!r}")

    m = r.table(doc, "model", required=True)
    r.keys(m, "model", {"config", "checkpoint", "onnx", "engines"})
    model = ModelSpec(
        config=resolve_path(r.get(m, "config", str, "model", required=True)),
        checkpoint=_path(r.get(m, "checkpoint", str, "model")),
        # the precisions of the backends that open such files
        onnx=r.precision_files(m, "onnx", _registry().class_for_file("m.onnx").precisions),
        engines=r.precision_files(m, "engines",
                                  _registry().class_for_file("m.engine").precisions))

    d = r.table(doc, "data", required=True)
    r.keys(d, "data", {"images", "annotations", "count"})
    count = r.get(d, "count", int, "data", default=0)
    if count < 0:
        raise UserError(f"{p}: data.count must be 0 (every image) or more, got {count}")
    data = DataSpec(images=resolve_path(r.get(d, "images", str, "data", required=True)),
                    annotations=_path(r.get(d, "annotations", str, "data")), count=count)

    mx = r.table(doc, "matrix")
    r.keys(mx, "matrix", {"backends", "precisions", "batches", "devices", "nms_pre",
                          "preprocess"})
    default = MatrixSpec()
    matrix = MatrixSpec(
        backends=r.choices(mx, "backends", tuple(_registry().BACKENDS), default.backends),
        precisions=r.choices(mx, "precisions", PRECISION_NAMES, default.precisions),
        batches=tuple(r.list_of(mx, "batches", int, "matrix", default.batches)),
        devices=r.choices(mx, "devices", _registry().all_devices(), default.devices),
        nms_pre=tuple(r.list_of(mx, "nms_pre", int, "matrix", default.nms_pre)),
        preprocess=r.choices(mx, "preprocess", PREPROCESS_MODES, default.preprocess))
    if any(b < 1 for b in matrix.batches):
        raise UserError(f"{p}: matrix.batches must be >= 1, got {list(matrix.batches)}")
    matrix.configurations()  # the pairing rule's checks, now

    la = r.table(doc, "latency")
    r.keys(la, "latency", {"warmup", "runs"})
    latency = LatencySpec(warmup=r.get(la, "warmup", int, "latency"),
                          runs=r.get(la, "runs", int, "latency"))
    if (latency.warmup is not None and latency.warmup < 0) or \
            (latency.runs is not None and latency.runs < 1):
        raise UserError(f"{p}: latency.warmup must be >= 0 and latency.runs >= 1")

    c = r.table(doc, "compare")
    r.keys(c, "compare", {f for f in CompareSpec.__dataclass_fields__})
    compare = CompareSpec(
        count=r.get(c, "count", int, "compare"), batch=r.get(c, "batch", int, "compare"),
        layers=tuple(r.list_of(c, "layers", str, "compare", ())),
        provider=r.get(c, "provider", str, "compare"), device=r.get(c, "device", str, "compare"),
        score_tol=r.get(c, "score_tol", float, "compare"),
        box_tol=r.get(c, "box_tol", float, "compare"),
        iou_band=r.get(c, "iou_band", float, "compare"))

    gates = r.table(doc, "gates")
    return Experiment(name=name, path=p, model=model, data=data, matrix=matrix,
                      latency=latency, compare=compare, gates=gates)


def _path(value: Union[str, None]) -> Union[Path, None]:
    return None if value is None else resolve_path(value)


PACKAGED = "harness:"


def resolve_path(value: Union[str, Path], base: Union[str, Path, None] = None) -> Path:
    """The file a path in an experiment file or an --experiment option names.

    `harness:<path>` is a file shipped inside the harness package (`harness:fixture/...`,
    `harness:experiments/...`), found through importlib.resources so it works wherever harness
    is installed; it must exist. Anything else is an ordinary path, relative to `base`
    (default: the current directory) when it is relative.
    """
    text = str(value)
    if not text.startswith(PACKAGED):
        return Path(text) if base is None else Path(base) / text
    from importlib.resources import files

    parts = [part for part in text[len(PACKAGED):].split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise UserError(f"{text}: name a file inside the harness package after 'harness:', "
                        "e.g. harness:experiments/demo.toml")
    root = files("harness")
    if not isinstance(root, Path):  # a zip import; pip always installs a folder
        raise UserError(f"{text}: harness is imported from an archive ({root}); packaged "
                        "files need harness installed as a folder")
    found = root.joinpath(*parts)
    if not found.exists():
        shipped = sorted(f"{PACKAGED}{folder}/{f.name}" for folder in ("experiments", "fixture")
                         for f in (root / folder).iterdir() if f.is_file())
        raise UserError(f"{text} not found in the harness package (it ships "
                        f"{', '.join(shipped)})")
    return found


_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", dict: "a table",
               list: "a list"}


class _Reader:
    """Typed access to the parsed TOML with messages that name the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str) -> UserError:
        return UserError(f"experiment file {self.path}: {message}")

    def keys(self, table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            place = f"[{where}]" if where else "the top level"
            raise self.fail(f"unknown key '{unknown[0]}' in {place} (known: "
                            f"{', '.join(sorted(allowed))})")

    def get(self, table: Mapping[str, Any], key: str, kind: type, where: str = "",
            default: Any = None, required: bool = False) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in table:
            if required:
                raise self.fail(f"missing '{name}'")
            return default
        value = table[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(f"'{name}' must be {_TYPE_NAMES[kind]}, got {value!r}")
        return value

    def table(self, doc: Mapping[str, Any], key: str, required: bool = False) -> dict[str, Any]:
        if key not in doc:
            if required:
                raise self.fail(f"missing table [{key}]")
            return {}
        value = doc[key]
        if not isinstance(value, dict):
            raise self.fail(f"'{key}' must be a table ([{key}]), got {value!r}")
        return value

    def list_of(self, table: Mapping[str, Any], key: str, kind: type, where: str,
                default: Iterable[Any]) -> list[Any]:
        if key not in table:
            return list(default)
        value = table[key]
        if not isinstance(value, list) or not all(
                isinstance(v, kind) and not (kind is int and isinstance(v, bool))
                for v in value):
            raise self.fail(f"'{where}.{key}' must be a list of {_TYPE_NAMES[kind][2:]}s, "
                            f"got {value!r}")
        return value

    def choices(self, table: Mapping[str, Any], key: str, allowed: tuple[str, ...],
                default: tuple[str, ...]) -> tuple[str, ...]:
        values = self.list_of(table, key, str, "matrix", default)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise self.fail(f"matrix.{key} has unknown '{bad[0]}'; choose from "
                            f"{', '.join(allowed)}")
        if not values:
            raise self.fail(f"matrix.{key} is empty")
        return tuple(values)

    def precision_files(self, table: Mapping[str, Any], key: str,
                        allowed: tuple[str, ...]) -> dict[str, Path]:
        files = table.get(key, {})
        if not isinstance(files, dict):
            raise self.fail(f"'model.{key}' must be a table {{ precision = \"path\" }}, "
                            f"got {files!r}")
        out = {}
        for precision, value in files.items():
            if precision not in allowed:
                raise self.fail(f"model.{key} has unknown precision '{precision}'; choose "
                                f"from {', '.join(allowed)}")
            if not isinstance(value, str):
                raise self.fail(f"'model.{key}.{precision}' must be a string path, got "
                                f"{value!r}")
            out[precision] = resolve_path(value)
        return out
