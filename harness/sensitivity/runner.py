"""`harness sensitivity`'s experiment: which layer groups to keep in fp32 when the rest runs
int8 (or fp16), judged by COCO AP on a subset of the split.

fp32 ONNX → layer groups (groups.py) and their FLOPs (flops.py) → AP of fp32, of the fully
converted model, and of each group alone kept in fp32 (measure.py, stored as measured) →
ranking by AP recovered per fp32 GFLOP and the greedy search for the smallest set within the
ΔAP limit (search.py) → the mixed-precision ONNX and TensorRT's per-layer constraints of
that set, and the `sensitivity` section of results.json.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from harness.errors import UserError
from harness.results import (
    SensitivityGroup, SensitivityHoldout, SensitivityResult, SensitivityStep,
)
from harness.sensitivity.groups import LayerGroup
from harness.sensitivity.search import DeltaLimit

CONSTRAINTS_NAME = "fp32_layers.json"


@dataclass(frozen=True)
class SensitivitySettings:
    """One sensitivity run. count: the first N images of the split by id (0: all); holdout:
    the next N images, where the chosen set is checked after the search (0: none);
    calib_images: int8 calibration folder (default: the split's images); limit: the ΔAP the
    chosen set may keep; order: the greedy search's order (search.ORDERS)."""

    config: Path
    checkpoint: Optional[Path]
    images: Path
    out: Path
    annotations: Optional[Path] = None
    count: int = 100
    holdout: int = 0
    precision: str = "int8"
    level: str = "auto"
    limit: DeltaLimit = field(default_factory=lambda: DeltaLimit(0.005))
    order: str = "per-gflop"
    calib_images: Optional[Path] = None
    calib_count: int = 32
    calib_method: str = "minmax"
    batch: int = 4
    evaluator: str = "pycocotools"
    progress: bool = True

    @property
    def cache_dir(self) -> Path:
        return Path(self.out) / "cache"

    def check(self) -> None:
        """The checks that need nothing loaded, so a typo fails at once."""
        from harness.sensitivity.groups import LEVELS
        from harness.sensitivity.search import ORDERS
        from harness.sensitivity.variants import PRECISIONS

        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {'|'.join(PRECISIONS)} (the fp32 "
                            f"model is the reference), got {self.precision!r}")
        if self.level not in LEVELS:
            raise UserError(f"unknown --groups '{self.level}'; choose {'|'.join(LEVELS)}")
        if self.order not in ORDERS:
            raise UserError(f"unknown --order '{self.order}'; choose {'|'.join(ORDERS)}")
        if self.batch < 1:
            raise UserError(f"--batch must be at least 1, got {self.batch}")
        if self.count < 0:
            raise UserError(f"--count must be 0 (every image) or more, got {self.count}")
        if self.holdout < 0 or (self.holdout and not self.count):
            raise UserError("--holdout takes the images after the first --count ones: give "
                            "--count N (not 0) and --holdout M >= 0")


@dataclass
class Written:
    """The files a run writes besides results.json and the report."""

    mixed_onnx: Optional[Path] = None
    constraints: Optional[Path] = None


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


@dataclass
class Prepared:
    """What every measurement of a run shares: the model, the fp32 file, the groups, the
    conversion, the subset (and held-out images), the evaluator."""

    model: Any
    split: Any
    holdout: Any
    fp32_path: Path
    level: str
    groups: list[LayerGroup]
    gflops: dict[str, float]
    total_gflops: float
    conversion: Any
    calibration: Any
    evaluator: str


def prepare(settings: SensitivitySettings, log: Callable[[str], None]) -> Prepared:
    """Load the model and split, export (or reuse) the fp32 ONNX, derive the groups and
    their FLOPs, and set up the conversion."""
    import dataclasses

    import onnx

    from harness.eval.coco_scores import resolve_evaluator
    from harness.eval.coco_split import open_split
    from harness.export.calibration import CalibrationSettings
    from harness.export.onnx_export import ExportSettings, export_cached, network_input_size
    from harness.export.quantize import QUANTIZED_OPS
    from harness.models.config import load_model_source
    from harness.sensitivity.flops import node_flops
    from harness.sensitivity.groups import derive_groups, model_modules
    from harness.sensitivity.variants import Conversion, conversion_fingerprint

    settings.check()
    wanted = settings.count + settings.holdout if settings.count else 0
    split = open_split(settings.images, settings.annotations, wanted)
    holdout = None
    if settings.holdout:
        if len(split.images) <= settings.count:
            raise UserError(f"--holdout {settings.holdout}: {split.annotations.name} lists "
                            f"{len(split.images)} images, none after the first "
                            f"{settings.count}")
        holdout = dataclasses.replace(split, images=split.images[settings.count:])
        split = dataclasses.replace(split, images=split.images[:settings.count])
    evaluator = resolve_evaluator(settings.evaluator)
    calibration = None
    if settings.precision == "int8":
        calibration = CalibrationSettings(
            images=Path(settings.calib_images or settings.images), count=settings.calib_count,
            method=settings.calib_method, cache_dir=settings.cache_dir / "calibration")
    model = load_model_source(settings.config, settings.checkpoint)
    if getattr(model, "rpn", None) is not None:
        raise UserError("harness sensitivity handles one-stage detectors (mmyolo); "
                        f"{Path(settings.config).name} is a two-stage model")
    input_hw = network_input_size(model.preprocess)
    if input_hw is None:
        raise UserError("the model's preprocessing gives images of varying size; "
                        "sensitivity needs a fixed network input (FLOPs, calibration)")
    fp32_path = export_cached(model, settings.cache_dir / "onnx" /
                              f"{Path(model.cfg_path).stem}_raw_fp32.onnx",
                              ExportSettings(variant="raw", precision="fp32"), None, log)
    fp32 = onnx.load(str(fp32_path))
    flops = node_flops(fp32)
    level, groups = derive_groups(model_modules(model.module),
                                  [(n.name, n.op_type) for n in fp32.graph.node],
                                  QUANTIZED_OPS, settings.level)
    gflops = {g.name: sum(flops.get(n, 0) for n in g.quantized) / 1e9 for g in groups}
    fingerprint = conversion_fingerprint(fp32_path, settings.precision, model.preprocess,
                                         input_hw, calibration)
    conversion = Conversion(fp32, settings.precision, model.preprocess, input_hw,
                            calibration, fingerprint)
    return Prepared(model, split, holdout, fp32_path, level, groups, gflops,
                    sum(flops.values()) / 1e9, conversion, calibration, evaluator)


def open_meter(settings: SensitivitySettings, run: Prepared, split: Any,
               log: Callable[[str], None]) -> Any:
    """A Meter over `split`'s images, with the measurement store of exactly those images."""
    from harness.eval.coco_split import category_ids_for
    from harness.export.metadata import file_sha256
    from harness.sensitivity.measure import Meter, Subset
    from harness.sensitivity.store import MeasurementStore

    category_ids = category_ids_for(split, run.model.class_names)
    names_by_cat = {c: n for c, n in zip(category_ids, run.model.class_names) if c >= 0}
    subset = Subset(run.model, split, category_ids, names_by_cat, run.evaluator,
                    settings.batch, settings.progress, log)
    header = {"conversion": run.conversion.fingerprint, "subset": subset.describe(),
              "nms": subset.run_header("")["nms"],
              "annotations_sha256": file_sha256(split.annotations)}
    folder = settings.cache_dir / "sensitivity"
    store = MeasurementStore(MeasurementStore.path_for(folder, header), header).open()
    return Meter(subset, store, folder)


def measure_variant(run: Prepared, meter: Any, groups: Optional[Sequence[LayerGroup]],
                    label: str) -> float:
    """AP of the variant with `groups` in fp32 (the fp32 file itself for None)."""
    from harness.export.metadata import file_sha256
    from harness.sensitivity.store import digest
    from harness.sensitivity.variants import save_variant

    if groups is None:
        return meter.measure(digest({"fp32_sha256": file_sha256(run.fp32_path)}), label, [],
                             lambda _path: run.fp32_path)["AP"]

    def make(path: Path) -> Path:
        return save_variant(run.conversion.convert(groups), path)

    return meter.measure(run.conversion.key(groups), label, groups, make)["AP"]


def run_sensitivity(settings: SensitivitySettings, log: Callable[[str], None] = _say
                    ) -> tuple[SensitivityResult, Written]:
    """Measure, rank, search (and check on held-out images); write the chosen set's ONNX
    and TensorRT constraints into settings.out. Returns the `sensitivity` section and the
    files written."""
    from harness.sensitivity.search import greedy_order, greedy_search, rank_groups

    started = time.perf_counter()
    run = prepare(settings, log)
    p = settings.precision
    log(f"{len(run.groups)} layer groups ({run.level} level), {run.total_gflops:.3f} GFLOPs "
        f"per image in {sum(len(g.quantized) for g in run.groups)} quantizable ops; "
        f"{len(run.split.images)} images")
    meter = open_meter(settings, run, run.split, log)
    by_name = {g.name: g for g in run.groups}
    ap_fp32 = measure_variant(run, meter, None, "fp32")
    ap_quant = measure_variant(run, meter, [], f"{p}, every group")
    single = {g.name: measure_variant(run, meter, [g], f"{p}, {g.name} in fp32")
              for g in run.groups}
    ranked = rank_groups(single, run.gflops, ap_quant)
    loss = ap_fp32 - ap_quant
    limit = settings.limit.absolute(loss)
    outcome = greedy_search(
        greedy_order(ranked, settings.order),
        lambda names: measure_variant(run, meter, [by_name[n] for n in names],
                                      f"{p}, {' + '.join(names)} in fp32"),
        ap_fp32, ap_quant, limit)
    chosen = [by_name[n] for n in outcome.chosen]
    held = None
    if run.holdout is not None:
        check = open_meter(settings, run, run.holdout, log)
        held = SensitivityHoldout(
            images=len(run.holdout.images),
            AP_fp32=measure_variant(run, check, None, "held-out: fp32"),
            AP_quantized=measure_variant(run, check, [], f"held-out: {p}, every group"),
            AP_chosen=measure_variant(run, check, chosen, f"held-out: {p}, chosen set"))
        meter.measured += check.measured
        meter.reused += check.reused
    written = write_chosen(settings, run.model, chosen, run.conversion, log)

    share = {g: run.gflops[g] / run.total_gflops if run.total_gflops else 0.0
             for g in run.gflops}
    by_rank = {r.name: r for r in ranked}
    calibration = run.calibration
    doc = SensitivityResult(
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), seconds=0.0,
        precision=p, level=run.level, model=run.model.describe(),
        dataset=run.split.describe(),
        calibration=None if calibration is None else {
            "images": str(calibration.images), "count": calibration.count,
            "method": calibration.method},
        evaluator=run.evaluator, reference="the fp32 ONNX on onnxruntime CPU",
        total_gflops=run.total_gflops, AP_fp32=ap_fp32, AP_quantized=ap_quant,
        delta_AP_quantized=ap_quant - ap_fp32, limit=limit,
        limit_given=settings.limit.describe(), order=settings.order,
        groups=[SensitivityGroup(
            name=g.name, kind=g.kind, prefix=g.prefix, nodes=len(g.nodes),
            quantized_ops=len(g.quantized), gflops=run.gflops[g.name],
            flop_share=share[g.name], AP=single[g.name],
            recovered=by_rank[g.name].recovered,
            recovered_per_gflop=by_rank[g.name].recovered_per_gflop,
            rank=by_rank[g.name].rank) for g in run.groups],
        steps=[SensitivityStep(added=s.added, groups=list(s.groups), AP=s.AP,
                               delta_AP=s.AP - ap_fp32, kept=s.kept,
                               flop_share=sum(share[n] for n in s.groups))
               for s in outcome.steps],
        chosen=list(outcome.chosen), AP_chosen=outcome.AP,
        delta_AP_chosen=outcome.AP - ap_fp32, recovered_chosen=outcome.AP - ap_quant,
        recovered_fraction=(outcome.AP - ap_quant) / loss if loss > 0 else None,
        chosen_flop_share=sum(share[n] for n in outcome.chosen), met=outcome.met,
        verdict="", holdout=held,
        measurements={"measured": meter.measured, "stored": meter.reused},
        files={k: str(v.relative_to(settings.out)) for k, v in (
            ("mixed_onnx", written.mixed_onnx), ("constraints", written.constraints)) if v})
    doc.verdict = verdict(doc)
    doc.seconds = round(time.perf_counter() - started, 2)
    return doc, written


def verdict(doc: SensitivityResult) -> str:
    """One sentence: what the precision costs, which groups to keep and what they recover."""
    p = doc.precision
    loss = -doc.delta_AP_quantized
    worst = sorted((g for g in doc.groups if g.recovered is not None),
                   key=lambda g: -g.recovered)[:2]
    costly = ", ".join(f"{g.name} (+{g.recovered:.4f})" for g in worst if g.recovered > 0)
    if loss <= 0:
        return (f"{p} loses no AP on this subset (ΔAP {doc.delta_AP_quantized:+.4f}): "
                "no group needs fp32")
    if not doc.chosen:
        text = (f"{p} costs ΔAP {doc.delta_AP_quantized:+.4f}, within the limit "
                f"{doc.limit:.4f}: no group needs fp32" if doc.met else
                f"of ΔAP {doc.delta_AP_quantized:+.4f}, no group kept in fp32 recovers any "
                "AP on this subset")
        return text + (f"; alone in fp32, {costly} recover the most" if costly else "")
    names = ", ".join(doc.chosen)
    held = doc.holdout
    check = ""
    if held is not None:
        share = held.recovered_fraction
        check = (f"; on {held.images} held-out images ΔAP "
                 f"{held.AP_quantized - held.AP_fp32:+.4f} becomes "
                 f"{held.AP_chosen - held.AP_fp32:+.4f}"
                 + (f" ({100 * share:.0f} % recovered)" if share is not None else ""))
    text = (f"of ΔAP {doc.delta_AP_quantized:+.4f}, keeping {names} in fp32 recovers "
            f"{doc.recovered_chosen:.4f} ({100 * (doc.recovered_fraction or 0):.0f} %) with "
            f"{100 * doc.chosen_flop_share:.1f} % of the FLOPs in fp32: ΔAP "
            f"{doc.delta_AP_chosen:+.4f}")
    if doc.met:
        return text + f", within the limit {doc.limit:.4f}" + check
    return text + (f", not within the limit {doc.limit:.4f}: no other group raised the AP "
                   "further") + check


def write_chosen(settings: SensitivitySettings, model: Any, chosen: Sequence[LayerGroup],
                 conversion: Any, log: Callable[[str], None]) -> Written:
    """The chosen set's mixed-precision ONNX (made again unless the file in --out already
    is this variant) and its TensorRT per-layer constraints file."""
    import onnx

    from harness.export.metadata import read_metadata, write_metadata
    from harness.sensitivity.constraints import write_constraints
    from harness.sensitivity.variants import save_variant

    key = conversion.key(chosen)
    out = Path(settings.out)
    # models/ as the other reports keep their exported files (not committed with a report)
    path = out / "models" / f"{Path(model.cfg_path).stem}_{settings.precision}_mixed.onnx"
    meta = {}
    if path.is_file():
        try:
            meta = read_metadata(onnx.load(str(path), load_external_data=False)) or {}
        except Exception:  # a damaged file is simply written again
            meta = {}
    if (meta.get("mixed_precision") or {}).get("key") != key:
        model_proto = conversion.convert(chosen)
        record = read_metadata(model_proto) or {}
        record["mixed_precision"]["key"] = key
        write_metadata(model_proto, record)
        save_variant(model_proto, path)
        log(f"wrote {path}")
    constraints = write_constraints(out / CONSTRAINTS_NAME, chosen,
                                    str(path.relative_to(out)), settings.precision)
    return Written(mixed_onnx=path, constraints=constraints)
