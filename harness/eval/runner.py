"""The COCO experiment: every configuration of the matrix (backend × device × precision ×
batch) through a resumable pass over the split, a latency measurement and one COCO
evaluation, gathered into the `coco` section of results.json (docs/results-schema.md).

Each configuration's detections and timings live in `<cache>/runs/<key>.jsonl` (RunStore);
a second run with the same model, files and data reuses what is there and computes only
what is missing, so an interrupted experiment resumes without recomputing or duplicating.
Under torchrun (harness.eval.distributed) each rank runs its shard into
`<key>.rank<R>.jsonl` and rank 0 merges and scores; the other ranks return no results.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from harness.errors import UserError
from harness.eval.distributed import (
    Ranks, agree, first_problem, join, member, merge_records, store_view,
)
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
    # each rank's pass: {"rank", "computed", "found_stored", "wall_s"} (one entry alone)
    passes: list[dict[str, Any]] = field(default_factory=list)


def say(message: str) -> None:
    """A log line that does not break the progress bars."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def run_coco(settings: CocoSettings, log: Callable[[str], None] = say,
             on_batch: Optional[Callable[[Configuration, int], None]] = None,
             ranks: Optional[Ranks] = None
             ) -> tuple[Optional[CocoResult], list[ConfigurationRun]]:
    """Run the matrix; returns (the `coco` results section, per-configuration run info).

    on_batch(config, batches stored) runs after each stored batch (tests interrupt with it).
    ranks: this process's part of a distributed run (harness.eval.distributed); the
    results section is rank 0's only (None on the other ranks).
    """
    from harness.eval.coco_backends import ModelFiles
    from harness.eval.coco_scores import resolve_evaluator
    from harness.eval.coco_split import category_ids_for, open_split
    from harness.eval.latency import machine_info
    from harness.models.config import load_model_source

    started = time.perf_counter()
    ranks = ranks or Ranks()
    if not settings.configurations:
        raise UserError("the experiment matrix is empty: no backend has any of the precisions "
                        "asked for")
    split = open_split(settings.images_dir, settings.annotations, settings.count)
    evaluator = resolve_evaluator(settings.evaluator)
    model = load_model_source(settings.config, settings.checkpoint).with_nms(**settings.test_cfg)
    join(ranks)  # after the model is built: see harness.eval.distributed.join
    category_ids = category_ids_for(split, model.class_names)
    names_by_cat = {c: n for c, n in zip(category_ids, model.class_names) if c >= 0}
    files = ModelFiles(model, settings.cache_dir, settings.onnx, settings.engines,
                       calib_images=settings.images_dir, calib_count=settings.calib_count,
                       batches=[c.batch for c in settings.configurations], log=log)
    members = ranks.all_gather(member(ranks), "starting") if ranks.distributed else None
    rows, runs = [], []
    for config in settings.configurations:
        row, run = _run_configuration(config, model, files, split, category_ids,
                                      names_by_cat, settings, evaluator, log, on_batch, ranks)
        rows.append(row)
        runs.append(run)
    if not ranks.main:
        return None, runs
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
        latency={"unit": "ms per batch", "images_per_s": "batch / mean total latency",
                 "measured_on": "every rank in turn" if ranks.latency_per_rank else
                 f"rank {ranks.latency_rank}" if ranks.distributed else "this process"},
        rows=rows,
        distributed=None if members is None else {
            "launcher": ranks.launcher, "world_size": ranks.world, "backend": "gloo",
            "timeout_s": ranks.timeout_s, "latency_rank": ranks.latency_rank,
            "latency_per_rank": ranks.latency_per_rank, "ranks": members,
            "passes": {run.config.key: run.passes for run in runs if run.passes}})
    return doc, runs


def _empty_row(config: Configuration, status: str) -> CocoRow:
    return CocoRow(backend=config.backend, device=config.device, precision=config.precision,
                   batch=config.batch, status=status, nms_pre=config.nms_pre,
                   preprocess=config.preprocess)


def _run_configuration(config: Configuration, model: Any, files: Any, split: Any,
                       category_ids: list[int], names_by_cat: dict[int, str],
                       settings: CocoSettings, evaluator: str, log: Callable[[str], None],
                       on_batch: Optional[Callable[[Configuration, int], None]],
                       ranks: Ranks) -> tuple[CocoRow, ConfigurationRun]:
    from harness.eval.coco_pass import run_pass
    from harness.eval.coco_post import make_post, post_record
    from harness.eval.coco_scores import evaluate
    from harness.eval.delta_ap import cause_scores, reference_nms_post, replay_disagreements
    from harness.eval.latency import LatencyResult, default_settings
    from harness.eval.store import RunStore
    from harness.export.metadata import file_sha256

    run = ConfigurationRun(config)
    model = model.with_nms(nms_pre=config.nms_pre)  # the row's point on an nms_pre axis
    target, problem = ranks.in_turn(lambda: _open(config, model, files),
                                    f"opening {config.key}")
    header, store, images, batch = None, None, [], config.batch
    split_ids = [im.image_id for im in split.images]
    if problem is None:
        # what the stored records depend on; not the image count, so a longer run after a
        # shorter one (--count) keeps what the shorter one computed
        header = {"configuration": config.key,
                  "model": target.fingerprint,
                  "nms": asdict(model.nms),  # post-processing (with_nms, nms_pre axis)
                  "annotations_sha256": file_sha256(split.annotations),
                  "images_dir": str(split.images_dir.resolve())}
        store = RunStore(RunStore.path_for(settings.cache_dir, config.key, ranks.store_rank),
                         header).open()
        try:
            images, batch = images_for(config, split, model)
        except UserError as exc:
            problem = f"not available: {exc}"
    # every rank's view of the stores: a batch any rank stored is done for all of them
    agreed = agree(ranks.all_gather(store_view(store, split_ids, header, problem),
                                    f"opening {config.key}'s run files"))
    if agreed.problem:
        log(f"{config.key}: {agreed.problem}")
        return _empty_row(config, agreed.problem), run
    store.elsewhere = agreed.stored - set(store.images)
    run.resumed = bool(agreed.stored) or store.resumed
    if run.resumed:
        log(f"{config.key}: resuming, {len(agreed.stored)} of {len(split.images)} images "
            "already done" + (f" (read from {len(store.beside) + 1} run files)"
                              if store.beside else ""))
    backend = target.backend
    timing = default_settings(config.device, settings.warmup, settings.runs)

    # on a GPU row: the batched post-processing on that GPU, and images read in processes
    post, post_how = make_post(model, config.device)
    post_ran = None
    on_gpu = str(config.device).startswith("cuda")

    spec = None
    try:
        # a TensorRT end2end engine's candidates: its debug engine built by rank 0 first
        post_reference, split_how = ranks.in_turn(
            lambda: reference_nms_post(model, backend, Path(settings.cache_dir) / "debug"),
            f"preparing {config.key}'s ΔAP split")
        if post_reference is not None and agreed.reference_nms is False:
            post_reference = None  # stored before the split was kept: not split on resume
            split_how = "not split: its stored detections predate the ΔAP split"
        spec = spec_for(model, backend)
        run.pass_times = run_pass(
            images, batch, spec, backend.infer, post, category_ids,
            store, sync=target.sync, desc=config.key if ranks.world == 1 else
            f"{config.key} [rank {ranks.rank}/{ranks.world}]",
            progress=settings.progress and ranks.main,
            on_batch=None if on_batch is None else (lambda n: on_batch(config, n)),
            warn=log, post_reference=post_reference, shard=ranks.shard, processes=on_gpu,
            warmup=True)
        post_ran = post_record(post, post_how)  # before latency timing calls it again
    except UserError as exc:  # a backend that loads but cannot run these inputs
        problem = f"failed: {exc}"
    times = run.pass_times
    reports = ranks.all_gather(
        {"rank": ranks.rank, "problem": problem,
         "computed": times.images if times else 0, "found_stored": times.skipped if times else 0,
         "wall_s": round(times.wall_s, 3) if times else None},
        f"finishing {config.key}'s accuracy pass")
    problem = first_problem(reports)
    run.passes = [{k: v for k, v in r.items() if k != "problem"} for r in reports]
    if problem is None:  # timed on one named device, or on every rank one after the other
        timed = ranks.take_turns(ranks.latency_ranks, lambda: _latency_on(
            ranks.where(config.device), store, images, batch, spec, backend, post,
            target.sync, timing), f"timing {config.key}")
        problem = first_problem([timed[r] for r in sorted(timed)])
    if problem:
        log(f"{config.key}: {problem}")
        return _empty_row(config, problem), run
    if ranks.distributed:
        merge_records(ranks, store, split_ids, f"gathering {config.key}'s detections")
    if not ranks.main:
        return _empty_row(config, "ok"), run
    chosen = timed[ranks.latency_rank]
    latency = LatencyResult.from_json(chosen["result"])
    ids = [i for i in split_ids if i in store.images]
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
        causes = cause_scores(split.coco, store.images, readable, names_by_cat, evaluator)
        if causes:
            row.delta_AP_parts["nms_causes"] = causes
        off = replay_disagreements(store.images, readable)
        row.delta_AP_parts["replay_disagrees"] = off
        if off:  # the candidates read are not quite those behind the detections
            row.delta_AP_parts["how"] += (
                f"; on {off} of {len(readable)} images those candidates through the file's "
                "own NMS did not give its detections, so the split is approximate there")
    elif split_how.startswith("its NMS is the reference's"):
        row.AP_reference_nms = row.AP
        row.delta_AP_parts["reference_nms"] = {
            "sizes": {k: getattr(row, k) for k in SIZES}, "per_class": row.per_class}
    row.latency_ms = latency.stages
    row.latency_stability = latency.stability.to_json()
    row.images_per_s = latency.images_per_s
    row.inference = chosen["result"].get("inference")
    row.latency_device = device_label(chosen["measured_on"])
    if ranks.latency_per_rank:
        row.latency_per_rank = [per_rank_latency(timed[r]) for r in sorted(timed)]
    if times is not None and times.images and times.infer_s > 0:
        row.accuracy_pass = {"images": times.images, "wall_s": round(times.wall_s, 4),
                             "inference_s": round(times.infer_s, 4),
                             "ratio": round(times.overhead_ratio, 3),
                             "waited_for_reading_s": round(times.wait_read_s, 4),
                             "waited_for_post_s": round(times.wait_post_s, 4),
                             "warmup_s": round(times.warmup_s, 4),
                             "fill_s": round(times.first_infer_s, 4),
                             "drain_s": round(times.after_infer_s, 4),
                             "drain_parts_s": times.drain_parts_s,
                             "post": post_ran}
        host = (row.inference or {}).get("host") or {}
        if host.get("median") and ranks.latency_rank == ranks.rank:
            # the same batches' inference as its own phase timed it (where the pass ran): how
            # much slower inference was inside the pass, beside reading and post-processing
            row.accuracy_pass["inference_alone_s"] = round(
                times.batches * host["median"] / 1e3, 4)
    row.images = len(readable)
    row.unreadable = len(ids) - len(readable)
    log(f"{config.key}: AP {row.AP:.4f}  latency {latency.stages['total']['mean']:.2f} "
        f"ms/batch  {latency.images_per_s:.1f} img/s"
        + ("" if latency.stability else f"  ⚠ unstable latency: {latency.stability.reason}"))
    return row, run


def _open(config: Configuration, model: Any, files: Any) -> tuple[Any, Optional[str]]:
    """(the row's backend, None) or (None, the row's status saying why it cannot run)."""
    from harness.eval.coco_backends import open_backend

    try:
        target = open_backend(config, model, files)
    except UserError as exc:  # an export or engine build that failed: the other rows go on
        return None, f"failed: {exc}"
    if not target.available:
        return None, target.reason or "not available"
    return target, None


def _latency_on(where: dict[str, Any], store: Any, images: Sequence[Any], batch: int,
                spec: Any, backend: Any, post: Callable[..., Any],
                sync: Optional[Callable[[], None]], timing: Any) -> dict[str, Any]:
    """{"result": latency JSON, "measured_on": where, "problem": None | status}: the stored
    timing of this device of this host at these settings, else a new one, stored."""
    for result, on, own in store.latency_records():  # this rank's own file first
        same_place = (on is None and own) or (
            on is not None and (on.get("host"), on.get("device")) ==
            (where["host"], where["device"]))
        if same_place and "inference" in result and \
                (result.get("warmup"), result.get("runs")) == (timing.warmup, timing.runs):
            return {"result": result, "measured_on": on or where, "problem": None}
    try:
        measured = _measure(images, batch, spec, backend, post, sync, timing).to_json()
    except UserError as exc:
        return {"result": None, "measured_on": where, "problem": f"failed: {exc}"}
    store.append_latency(measured, where)
    return {"result": measured, "measured_on": where, "problem": None}


def device_label(on: dict[str, Any]) -> str:
    """`rank 0: cuda:3 (NVIDIA H200), host gpu-a` (no rank without a launcher)."""
    device = on.get("device") or "?"
    text = f"{device} ({on['gpu']})" if on.get("gpu") else device
    text = f"{text}, host {on.get('host')}"
    return text if on.get("rank") is None else f"rank {on['rank']}: {text}"


def per_rank_latency(timed: dict[str, Any]) -> dict[str, Any]:
    """One rank's latency of a row, as results.json's `latency_per_rank` lists it."""
    from harness.eval.latency import LatencyResult

    result = LatencyResult.from_json(timed["result"])
    on = timed["measured_on"]
    inference = result.inference or {}
    return {"rank": on.get("rank"), "host": on.get("host"), "device": on.get("device"),
            "gpu": on.get("gpu"), "total_ms": result.stages["total"],
            "inference_ms": inference.get("host"), "compute_ms": inference.get("compute"),
            "images_per_s": result.images_per_s, "stable": bool(result.stability)}


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
