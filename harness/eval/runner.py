"""The COCO experiment: every configuration of the matrix (backend × device × precision ×
batch) through a resumable pass over the split, a latency measurement and one COCO
evaluation, gathered into the `coco` section of results.json (docs/results-schema.md).

Each configuration's detections and timings live in `<cache>/runs/<key>.jsonl` (RunStore);
a second run with the same model, files and data reuses what is there and computes only
what is missing, so an interrupted experiment resumes without recomputing or duplicating.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Sequence

from harness.errors import UserError
from harness.experiment import Configuration
from harness.results import COCO_STATS, CocoDataset, CocoResult, CocoRow, Unreadable
from harness.settings import CocoSettings

REFERENCE = ("torch", "fp32")  # ΔAP is measured against PyTorch fp32


@dataclass
class ConfigurationRun:
    """What one configuration produced besides its row (for benchmarks and tests)."""

    config: Configuration
    pass_times: Any = None  # coco_pass.PassTimes of this invocation, None if not run
    resumed: bool = False
    unreadable: dict[int, str] = field(default_factory=dict)  # image id → why


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def run_coco(settings: CocoSettings, log: Callable[[str], None] = _say,
             on_batch: Optional[Callable[[Configuration, int], None]] = None
             ) -> tuple[CocoResult, list[ConfigurationRun]]:
    """Run the matrix; returns (the `coco` results section, per-configuration run info).

    on_batch(config, batches stored) runs after each stored batch (tests interrupt with it).
    """
    from harness.eval.coco_backends import ModelFiles
    from harness.eval.coco_scores import resolve_evaluator
    from harness.eval.coco_split import category_ids_for, open_split
    from harness.eval.latency import machine_info
    from harness.models.config import load_model_source

    started = time.perf_counter()
    if not settings.configurations:
        raise UserError("the experiment matrix is empty: no backend has any of the precisions "
                        "asked for")
    split = open_split(settings.images_dir, settings.annotations, settings.count)
    evaluator = resolve_evaluator(settings.evaluator)
    model = load_model_source(settings.config, settings.checkpoint).with_nms(**settings.test_cfg)
    category_ids = category_ids_for(split, model.class_names)
    names_by_cat = {c: n for c, n in zip(category_ids, model.class_names) if c >= 0}
    files = ModelFiles(model, settings.cache_dir, settings.onnx, settings.engines,
                       calib_images=settings.images_dir, calib_count=settings.calib_count,
                       batches=[c.batch for c in settings.configurations], log=log)
    rows, runs = [], []
    for config in settings.configurations:
        row, run = _run_configuration(config, model, files, split, category_ids,
                                      names_by_cat, settings, evaluator, log, on_batch)
        rows.append(row)
        runs.append(run)
    add_delta_ap(rows)
    unreadable = max((r.unreadable or 0 for r in rows if r.ok), default=0)
    # listed as compare lists them: the file and why it could not be read
    names = {im.image_id: im.file_name for im in split.images}
    skipped = {i: why for run in runs for i, why in run.unreadable.items()}
    doc = CocoResult(
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        seconds=round(time.perf_counter() - started, 2),
        dataset=CocoDataset(**split.describe(unreadable), unreadable_images=[
            Unreadable(image=names.get(i, str(i)), reason=why)
            for i, why in sorted(skipped.items())]),
        machine=machine_info(), model=model.describe(),
        evaluator={"name": evaluator, "max_dets": [1, 10, 100],
                   "per_class": "AP@[.50:.95], area all, maxDets 100"},
        latency={"unit": "ms per batch", "images_per_s": "batch / mean total latency"},
        rows=rows)
    return doc, runs


def _empty_row(config: Configuration, status: str) -> CocoRow:
    return CocoRow(backend=config.backend, device=config.device, precision=config.precision,
                   batch=config.batch, status=status, nms_pre=config.nms_pre,
                   preprocess=config.preprocess)


def _run_configuration(config: Configuration, model: Any, files: Any, split: Any,
                       category_ids: list[int], names_by_cat: dict[int, str],
                       settings: CocoSettings, evaluator: str, log: Callable[[str], None],
                       on_batch: Optional[Callable[[Configuration, int], None]]
                       ) -> tuple[CocoRow, ConfigurationRun]:
    from harness.eval.coco_backends import open_backend
    from harness.eval.coco_pass import run_pass
    from harness.eval.coco_scores import evaluate
    from harness.eval.latency import LatencyResult, default_settings
    from harness.eval.store import RunStore
    from harness.export.metadata import file_sha256
    from harness.export.outputs import detections_from_outputs

    run = ConfigurationRun(config)
    model = model.with_nms(nms_pre=config.nms_pre)  # the row's point on an nms_pre axis
    try:
        target = open_backend(config, model, files)
    except UserError as exc:  # an export or engine build that failed: the other rows go on
        log(f"{config.key}: failed: {exc}")
        return _empty_row(config, f"failed: {exc}"), run
    if not target.available:
        log(f"{config.key}: {target.reason}")
        return _empty_row(config, target.reason or "not available"), run
    # what the stored records depend on; not the image count, so a longer run after a
    # shorter one (--count) keeps what the shorter one computed
    header = {"configuration": config.key,
              "model": target.fingerprint,
              "nms": asdict(model.nms),  # post-processing settings (with_nms, nms_pre axis)
              "annotations_sha256": file_sha256(split.annotations),
              "images_dir": str(split.images_dir.resolve())}
    store = RunStore(RunStore.path_for(settings.cache_dir, config.key), header).open()
    run.resumed = store.resumed
    if store.resumed:
        done = sum(im.image_id in store.images for im in split.images)
        log(f"{config.key}: resuming, {done} of {len(split.images)} images already done")
    backend = target.backend
    timing = default_settings(config.device, settings.warmup, settings.runs)
    try:
        images, batch = images_for(config, split, model)
    except UserError as exc:
        log(f"{config.key}: {exc}")
        return _empty_row(config, f"not available: {exc}"), run

    def post(outputs: Any, metas: Sequence[Any]) -> list:
        return detections_from_outputs(model, outputs, metas)

    from harness.eval.delta_ap import reference_nms_post

    try:
        post_reference, split_how = reference_nms_post(model, backend)
        if post_reference is not None and store.images and not store.has("reference_nms"):
            post_reference = None  # stored before the split was kept: not split on resume
            split_how = "not split: its stored detections predate the ΔAP split"
        spec = spec_for(model, backend)
        run.pass_times = run_pass(
            images, batch, spec, backend.infer, post, category_ids,
            store, sync=target.sync, desc=config.key, progress=settings.progress,
            on_batch=None if on_batch is None else (lambda n: on_batch(config, n)),
            warn=log, post_reference=post_reference)
        stored = store.latency or {}
        if (stored.get("warmup"), stored.get("runs")) != (timing.warmup, timing.runs) or \
                "inference" not in stored:
            measured = _measure(images, batch, spec, backend, post, target.sync, timing)
            store.append_latency(measured.to_json())
    except UserError as exc:  # a backend that loads but cannot run these inputs
        log(f"{config.key}: failed: {exc}")
        return _empty_row(config, f"failed: {exc}"), run
    latency = LatencyResult.from_json(store.latency)
    ids = [im.image_id for im in split.images if im.image_id in store.images]
    readable = [i for i in ids if not store.images[i].get("unreadable")]
    run.unreadable = store.unreadable()
    scores = evaluate(split.coco, store.detections(readable), readable, names_by_cat,
                      evaluator)
    row = _empty_row(config, "ok")
    row.nms_pre = model.nms.nms_pre  # what the post-processing used (axis or config)
    for k in COCO_STATS:
        setattr(row, k, scores.stats[k])
    row.per_class = scores.per_class
    row.delta_AP_parts = {"how": split_how}
    if post_reference is not None:
        through = evaluate(split.coco, store.detections(readable, key="reference_nms"),
                           readable, names_by_cat, evaluator)
        row.AP_reference_nms = through.stats["AP"]
        row.delta_AP_parts["reference_nms"] = {
            "sizes": {k: through.stats[k] for k in SIZES}, "per_class": through.per_class}
    elif split_how.startswith("its NMS is the reference's"):
        row.AP_reference_nms = row.AP
        row.delta_AP_parts["reference_nms"] = {
            "sizes": {k: getattr(row, k) for k in SIZES}, "per_class": row.per_class}
    row.latency_ms = latency.stages
    row.latency_stability = latency.stability.to_json()
    row.images_per_s = latency.images_per_s
    row.inference = (store.latency or {}).get("inference")
    row.images = len(readable)
    row.unreadable = len(ids) - len(readable)
    log(f"{config.key}: AP {row.AP:.4f}  latency {latency.stages['total']['mean']:.2f} "
        f"ms/batch  {latency.images_per_s:.1f} img/s"
        + ("" if latency.stability else f"  ⚠ unstable latency: {latency.stability.reason}"))
    return row, run


def spec_for(model: Any, backend: Any) -> Any:
    """The row's preprocessing: the model's, with every batch padded to the file's fixed
    input size where the model's images vary in size (keep-ratio models, two-stage)."""
    import dataclasses

    from harness.export.onnx_export import network_input_size

    spec = model.preprocess
    if network_input_size(spec) is not None:
        return spec
    backend.load()  # a file's input dims are known once it is loaded
    dims = getattr(backend, "input_dims", None)
    if not dims or len(dims) != 4 or not all(isinstance(d, int) for d in dims[2:]):
        return spec
    return dataclasses.replace(spec, pad_to=(int(dims[2]), int(dims[3])))


def images_for(config: Configuration, split: Any, model: Any) -> tuple[list[Any], int]:
    """(images in evaluation order, batch size) of a row. With batch shapes, mmyolo's
    BatchShapePolicy decides both: the images sorted by aspect ratio from the annotation
    file's order, each letterboxed to its batch's rectangle, in batches of the policy's size
    (tools/test.py's evaluation); a UserError says why a row cannot evaluate that way."""
    import dataclasses

    if config.preprocess == "fixed":
        return list(split.images), config.batch
    policy = model.preprocess.batch_shapes
    if policy is None:
        raise UserError("the config has no batch_shapes_cfg (its test dataset letterboxes "
                        "every image to one size)")
    if config.batch != policy.batch_size:
        raise UserError(f"batch shapes are planned for batches of {policy.batch_size} (the "
                        f"config's batch_shapes_cfg); run this row at batch "
                        f"{policy.batch_size}")
    in_file_order = sorted(split.images, key=lambda im: im.position)
    if any(im.width <= 0 or im.height <= 0 for im in in_file_order):
        raise UserError("batch shapes need each image's width and height in the annotation "
                        "file")
    order, shapes = policy.plan([(im.width, im.height) for im in in_file_order])
    return ([dataclasses.replace(in_file_order[i], batch_shape=shape)
             for i, shape in zip(order, shapes)], policy.batch_size)


def _measure(images: Sequence[Any], batch: int, spec: Any, backend: Any,
             post: Callable[..., Any], sync: Optional[Callable[[], None]],
             latency: Any) -> Any:
    """Latency on the first readable images of the row's evaluation order, cycled in its
    batches (with their batch shapes, where the row has them)."""
    from harness.data.preprocess import read_image
    from harness.eval.coco_pass import plan_batches, prepare_batch
    from harness.eval.inference_timing import time_inference
    from harness.eval.latency import measure_latency

    readable = []
    for im in images[: max(8 * batch, 32)]:
        try:
            read_image(im.path)
        except UserError:
            continue
        readable.append(im)
    batches = [b for b in plan_batches(readable, batch) if len(b) == batch]
    if not batches:
        batches = [readable] if readable else []
    result = measure_latency(
        batches, lambda ims: prepare_batch(ims, spec),
        lambda prepared: backend.infer(prepared.inputs, prepared.metas),
        lambda prepared, outputs: post(outputs, prepared.metas), latency,
        batch_size=len(batches[0]) if batches else batch, sync=sync)
    if batches:  # inference in its own phase, on the first batch kept resident
        prepared = prepare_batch(batches[0], spec)
        result.inference = time_inference(backend, prepared.inputs, prepared.metas, latency,
                                          sync).to_json()
        if getattr(backend, "name", "") == "tensorrt":
            result.inference.update(_trtexec_beside(backend, prepared.inputs,
                                                    result.inference))
    return result


def _trtexec_beside(backend: Any, inputs: Any, ours: dict[str, Any]) -> dict[str, Any]:
    """trtexec on the same engine at the same shapes, with the ratios of the harness's
    figures to its; nothing where trtexec is not on the PATH."""
    from harness.eval.trtexec import beside, run_trtexec

    shapes = {backend.input_name: inputs.shape}
    shapes.update({name: (inputs.shape[0], 2) for name in getattr(backend, "extra_inputs", [])})
    try:
        found = run_trtexec(backend.path, shapes)
    except UserError as exc:
        return {"trtexec": {"error": str(exc)}}
    if found is None:
        return {}
    return {"trtexec": found, "versus_trtexec": beside(ours, found)}


# the COCO size ranges the ΔAP split is given for
SIZES = ("APs", "APm", "APl")


def add_delta_ap(rows: list[CocoRow]) -> None:
    """delta_AP = AP − AP of PyTorch fp32 at the same batch and nms_pre (on any device, the
    row's own first), else of any PyTorch fp32 row; None without one."""
    refs = [r for r in rows if (r.backend, r.precision) == REFERENCE and r.ok]
    for row in rows:
        if not row.ok or not refs:
            continue
        same = [r for r in refs if (r.batch, r.nms_pre, r.preprocess) ==
                (row.batch, row.nms_pre, row.preprocess)]
        same.sort(key=lambda r: r.device != row.device)
        ref = (same or refs)[0]
        row.delta_AP = row.AP - ref.AP
        from harness.eval.delta_ap import split

        parts = split(row, ref)
        if parts is not None:
            row.delta_AP_parts = {**(row.delta_AP_parts or {}), **parts}