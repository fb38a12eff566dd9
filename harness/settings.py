"""What one `harness compare` or `harness coco` run does, as one settings object each, built in
one place from the experiment file with the command line's values on top. Commands parse and
call `compare_settings` / `coco_settings`; the demo calls them too, with its own values. No
default is written twice: each lives on its dataclass field.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from harness.errors import UserError
from harness.experiment import Configuration, Experiment, MatrixSpec, matrix_configurations


@dataclass(frozen=True)
class CompareSettings:
    """Everything one compare run needs. targets: ONNX files / engines (empty: the raw fp32
    ONNX exported into `out`); count: the first N images by name; score_tol / box_tol /
    iou_band: the detection tolerances (harness.align.detections.Tolerances)."""

    config: Path
    checkpoint: Optional[Path]
    images: Path
    out: Path
    targets: tuple[Path, ...] = ()
    count: int = 16
    batch: int = 4
    layers: tuple[str, ...] = ()
    with_layers: bool = True
    # every image run again alone (batch 1) against its in-batch detections
    batch_invariance: bool = True
    provider: str = "cpu"
    device: str = "cpu"
    score_tol: float = 1e-3
    box_tol: float = 0.5
    iou_band: float = 0.02
    # the PyTorch reference's test_cfg changed for this run (nms_pre, score_thr,
    # iou_threshold, max_per_img), e.g. nms_pre 3840 to align with a deployed TopK
    test_cfg: Mapping[str, Any] = field(default_factory=dict)
    # engine → its source ONNX (--onnx, one per engine in the order of the engines): names
    # the layers and NMS of an engine another tool built, which has no harness sidecar
    engine_onnx: Mapping[Path, Path] = field(default_factory=dict)
    experiment: Any = None  # harness.results.ExperimentSection when run from a file

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise UserError(f"--batch must be at least 1, got {self.batch}")
        if self.count < 1:
            raise UserError(f"--count must be at least 1, got {self.count}")


@dataclass(frozen=True)
class CocoSettings:
    """Everything one `harness coco` run needs.

    count: 0 = every image; warmup / runs: None = the device's default; cache_dir: where
    exports and per-configuration JSONL files go; evaluator: auto | pycocotools |
    faster-coco-eval; progress: tqdm bars; out: the report folder.
    """

    images_dir: Path
    annotations: Optional[Path]
    config: Path
    checkpoint: Optional[Path]
    configurations: tuple[Configuration, ...]
    cache_dir: Path
    count: int = 0
    onnx: Mapping[str, Path] = field(default_factory=dict)
    engines: Mapping[str, Path] = field(default_factory=dict)
    warmup: Optional[int] = None
    runs: Optional[int] = None
    calib_count: int = 32
    evaluator: str = "auto"
    progress: bool = True
    out: Optional[Path] = None
    # test_cfg changed for every row (score_thr, iou_threshold, max_per_img; nms_pre too
    # unless the matrix has an nms_pre axis, which sets it per row)
    test_cfg: Mapping[str, Any] = field(default_factory=dict)
    experiment: Any = None  # harness.results.ExperimentSection when run from a file

    def __post_init__(self) -> None:
        if self.calib_count < 1:
            raise UserError(f"--calib-count must be at least 1, got {self.calib_count}")


def _given(overrides: Mapping[str, Any], name: str) -> Any:
    value = overrides.get(name)
    return None if value is None or value == () or value == [] else value


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _experiment(path: Union[str, Path, None]) -> Optional[Experiment]:
    from harness.experiment import load_experiment

    return load_experiment(path) if path else None


def compare_settings(experiment: Union[str, Path, None] = None,
                     **overrides: Any) -> CompareSettings:
    """CompareSettings: the experiment's [model] / [data] / [compare] (when given), with every
    override that is not None on top (names as CompareSettings' fields; `paths`: the
    command's positional CFG CKPT [TARGET...], or only targets with an experiment)."""
    exp = _experiment(experiment)
    paths = [Path(p) for p in overrides.pop("paths", None) or []]
    if exp is not None:
        config, checkpoint = exp.model.config, exp.model.checkpoint
        targets = paths or [*exp.model.onnx.values(), *exp.model.engines.values()]
    else:
        if len(paths) < 2:
            raise UserError("give the config and the checkpoint (harness compare cfg.py "
                            "ckpt.pth [ENGINE_OR_ONNX ...]), or --experiment FILE")
        config, checkpoint, targets = paths[0], paths[1], paths[2:]
    spec = exp.compare if exp else None
    defaults = _defaults(CompareSettings)

    def pick(name: str) -> Any:
        given = _given(overrides, name)
        if given is not None:
            return given
        from_file = getattr(spec, name, None) if spec else None
        return from_file if from_file is not None else defaults[name]

    layers = tuple(_given(overrides, "layers") or (spec.layers if spec else ()))
    images = _given(overrides, "images") or (exp.data.images if exp else None)
    if images is None:
        raise UserError("give --images DIR (a folder of images, e.g. a COCO split)")
    out = _given(overrides, "out") or Path("reports") / (exp.name if exp else Path(config).stem)
    with_layers = overrides.get("with_layers")
    invariance = overrides.get("batch_invariance")
    return CompareSettings(
        config=Path(config), checkpoint=None if checkpoint is None else Path(checkpoint),
        images=Path(images), out=Path(out), targets=tuple(Path(t) for t in targets),
        count=pick("count"), batch=pick("batch"), layers=layers,
        with_layers=True if with_layers is None else bool(with_layers),
        batch_invariance=True if invariance is None else bool(invariance),
        provider=pick("provider"), device=pick("device"), score_tol=pick("score_tol"),
        box_tol=pick("box_tol"), iou_band=pick("iou_band"),
        test_cfg=test_cfg_changes(overrides),
        engine_onnx=_engine_onnx(targets, overrides.get("onnx")),
        experiment=exp.results_section() if exp else None)


def _engine_onnx(targets: Sequence[Union[str, Path]], onnx: Optional[Sequence[Any]]
                 ) -> dict[Path, Path]:
    """--onnx FILE (repeatable): the i-th names the source ONNX of the i-th engine among
    `targets`; more --onnx than engines, or one that does not exist, is a UserError."""
    if not onnx:
        return {}
    from harness.backends.registry import class_for_file

    engines = [Path(t) for t in targets if class_for_file(t).file_kind == "engine"]
    files = [Path(o) for o in onnx]
    if len(files) > len(engines):
        raise UserError(f"{len(files)} --onnx for {len(engines)} engine(s): give one --onnx "
                        "per engine, in the order of the engines")
    for f in files:
        if not f.is_file():
            raise UserError(f"--onnx {f} not found")
    return dict(zip(engines, files))


def coco_settings(experiment: Union[str, Path, None] = None, **overrides: Any) -> CocoSettings:
    """CocoSettings: the experiment's [model] / [data] / [matrix] / [latency] (when given),
    with every override that is not None on top (images, annotations, config, checkpoint,
    backends, precisions, batches, devices, count, warmup, runs, calib_count, evaluator,
    progress, out). Without an experiment or a config the model is the bundled fixture."""
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    exp = _experiment(experiment)
    images = _given(overrides, "images") or (exp.data.images if exp else None)
    if images is None:
        raise UserError("give a COCO split folder (e.g. ~/coco/val2017) or --experiment FILE")
    # the experiment's annotation file belongs to its own images folder only
    ann = _given(overrides, "annotations") or (
        exp.data.annotations if exp and not _given(overrides, "images") else None)
    config, checkpoint = _given(overrides, "config"), _given(overrides, "checkpoint")
    if config is None and checkpoint is not None:
        raise UserError("--ckpt needs --cfg (the config the checkpoint belongs to)")
    if config is not None:
        onnx, engines = {}, {}
    elif exp is not None:
        config, checkpoint = exp.model.config, exp.model.checkpoint
        onnx, engines = exp.model.onnx, exp.model.engines
    else:
        config, checkpoint, onnx, engines = FIXTURE_CONFIG, FIXTURE_CHECKPOINT, {}, {}
    for kind, given in (("onnx", onnx), ("engines", engines)):
        for precision, path in given.items():
            if not Path(path).is_file():
                raise UserError(f"{path} not found (model.{kind}.{precision} of "
                                f"{experiment})")
    matrix = exp.matrix if exp else MatrixSpec()
    # --nms-pre N [N ...] is the nms_pre axis (one value: every row at that nms_pre)
    nms_pre_axis = _given(overrides, "nms_pre") or matrix.nms_pre
    configurations = matrix_configurations(
        _words(_given(overrides, "backends")) or matrix.backends,
        _words(_given(overrides, "precisions")) or matrix.precisions,
        _given(overrides, "batches") or matrix.batches,
        _words(_given(overrides, "devices")) or matrix.devices, nms_pre_axis,
        _words(_given(overrides, "preprocess")) or matrix.preprocess)

    def pick(name: str, from_file: Any) -> Any:
        given = _given(overrides, name)
        return given if given is not None else from_file

    out = Path(pick("out", Path("reports") / (exp.name if exp else "coco")))
    defaults = _defaults(CocoSettings)
    return CocoSettings(
        images_dir=Path(images).expanduser(), annotations=ann, config=Path(config),
        checkpoint=None if checkpoint is None else Path(checkpoint),
        configurations=tuple(configurations), cache_dir=out / "cache",
        count=pick("count", exp.data.count if exp else defaults["count"]),
        onnx=onnx, engines=engines,
        warmup=pick("warmup", exp.latency.warmup if exp else None),
        runs=pick("runs", exp.latency.runs if exp else None),
        calib_count=pick("calib_count", defaults["calib_count"]),
        evaluator=pick("evaluator", defaults["evaluator"]),
        progress=pick("progress", defaults["progress"]), out=out,
        test_cfg=test_cfg_changes({k: v for k, v in overrides.items()
                                   if k not in ("nms_pre", "preprocess")}),
        experiment=exp.results_section() if exp else None)


TEST_CFG_FIELDS = ("nms_pre", "score_thr", "iou_threshold", "max_per_img")


def test_cfg_changes(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The test_cfg settings the caller changes (those given and not None), checked."""
    changes = {k: overrides[k] for k in TEST_CFG_FIELDS if overrides.get(k) is not None}
    if changes.get("nms_pre", 1) < 1 or changes.get("max_per_img", 1) < 1:
        raise UserError("--nms-pre and --max-per-img must be at least 1")
    if not 0 < changes.get("iou_threshold", 0.5) <= 1:
        raise UserError(f"--iou-threshold must be in (0, 1], got {changes['iou_threshold']}")
    return changes


def _words(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """`--backends torch,onnxruntime` and `--backends torch onnxruntime` alike."""
    if values is None:
        return None
    return [w for v in values for w in str(v).split(",") if w]
