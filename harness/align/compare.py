"""The compare run: the same preprocessed batches through PyTorch (the reference) and every
target, then per target the layer diff, the candidates before NMS, and the post-NMS diff with
a cause for every mismatch. Returns the `compare` section of results.json as
harness.results.CompareResult; rendering is harness.report's business.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from harness.align.detections import DetectionDiff, Tolerances
from harness.align.layers import LayerDiff, layers_for
from harness.align.file_pipelines import FilePipeline
from harness.align.pipelines import Candidates, SourcePipeline, pipeline_for
from harness.align.reference import ReplayCheck, adopt_mmyolo_output
from harness.align.targets import Target, layer_backend
from harness.align.layers import DIVERGENCE, TOLERANCES
from harness.align.tensor_diff import DiffAccumulator, relative_l2 as rel_l2
from harness.align.twostage import (ROI_FEATURES, TwoStagePipeline, is_two_stage, same_rows,
                                    with_split_roi_features)
from harness.align.verdict import verdict
from harness.errors import UserError
from harness.models.source import ModelSource
from harness.results import (
    CandidateSummary, CompareInputs, CompareResult, LayerSummary,
    TargetResult, Unreadable,
)

# candidates this close count as the same set: a difference was then born in NMS
SAME_CANDIDATES = {"box_max_abs": 1e-2, "score_max_abs": 1e-4}


@dataclass
class CandidateDiff:
    """Boxes and scores before NMS, target against reference, over all images."""

    score_thr: float
    boxes: DiffAccumulator = field(default_factory=DiffAccumulator)
    scores: DiffAccumulator = field(default_factory=DiffAccumulator)
    above_ref: int = 0
    above_tgt: int = 0
    note: Optional[str] = None
    coding_note: Optional[str] = None

    def add(self, ref: Candidates, tgt: Candidates) -> None:
        if ref.boxes.shape != tgt.boxes.shape or ref.scores.shape != tgt.scores.shape:
            self.note = (f"candidate shapes differ: reference {list(ref.scores.shape)}, "
                         f"target {list(tgt.scores.shape)}")
            return
        if self.coding_note is None:
            self.coding_note = box_coding_mismatch(ref.boxes, tgt.boxes)
        self.boxes.add(tgt.boxes, ref.boxes)
        self.scores.add(tgt.scores, ref.scores)
        self.above_ref += int(np.count_nonzero(ref.scores > self.score_thr))
        self.above_tgt += int(np.count_nonzero(tgt.scores > self.score_thr))

    def result(self, mismatches: int) -> CandidateSummary:
        if self.note:
            return CandidateSummary(born="unknown", note=self.note)
        b, s = self.boxes.summary(), self.scores.summary()
        same = b["max_abs"] <= SAME_CANDIDATES["box_max_abs"] and \
            s["max_abs"] <= SAME_CANDIDATES["score_max_abs"]
        born = "none" if not mismatches else ("in_nms" if same else "before_nms")
        return CandidateSummary(
            born=born, box_coding=self.coding_note or None,
            box_max_abs=b["max_abs"], box_rel_l2=b["rel_l2"],
            score_max_abs=s["max_abs"], score_rel_l2=s["rel_l2"],
            score_threshold=self.score_thr, above_threshold_reference=self.above_ref,
            above_threshold_target=self.above_tgt)


def box_coding_mismatch(ref: np.ndarray, tgt: np.ndarray) -> str:
    """Why the target's candidate boxes differ from PyTorch's when they are the same boxes in
    the other coding: the NMS is fed centre-size boxes and told they are corners (mmyolo
    0.6.0's mmdeploy EfficientNMS path, box_coding 0), or the other way round; "" when not."""
    from harness.align.pipelines import centre_size_to_corners

    if np.allclose(tgt, ref, atol=1e-2, rtol=0):
        return ""
    as_corners = centre_size_to_corners(tgt)
    if np.allclose(as_corners, ref, atol=1e-2, rtol=1e-4):
        return ("the file feeds its NMS centre-size boxes (x, y, w, h) while the NMS reads "
                "them as corners: its box_coding does not fit its boxes, every IoU it computes "
                "is wrong")
    return ""


class TargetRun:
    """Everything accumulated for one available target."""

    def __init__(self, model: ModelSource, target: Target, layer_patterns: Sequence[str],
                 with_layers: bool, tol: Tolerances, work_dir: Path, batch: int = 1,
                 batch_invariance: bool = True):
        import onnx

        from harness.align.batch_invariance import BatchInvariance

        self.target = target
        self.model = model
        self.invariance = BatchInvariance(tol, batch, model.preprocess.pad_value) \
            if batch_invariance and batch > 1 else None
        proto = onnx.load(str(target.onnx_path), load_external_data=False) \
            if target.onnx_path else None
        self.two_stage = is_two_stage(model)
        if self.two_stage:
            from harness.align.proposals import ProposalDiff
            from harness.align.twostage import TwoStagePipeline, settings_from_file
            from harness.export.metadata import read_metadata

            record = read_metadata(proto) if proto is not None else None
            self.pipeline: Any = TwoStagePipeline(model, **settings_from_file(model, record))
            self.proposals: Any = ProposalDiff()
            self.proposal_replay_misses = 0
            # per image whose RPN outputs agree: their worst rel-L2 and the rows whose
            # proposal is the same on both sides
            self.upstream_same: dict[str, tuple[float, set]] = {}
            self.rpn_outputs: dict[str, float] = {}  # worst rel-L2 of each RPN output
        else:
            self.pipeline = pipeline_for(model, proto) if proto is not None \
                else SourcePipeline(model)
        self.detections = DetectionDiff(tol)
        self.candidates = CandidateDiff(model.nms.score_thr)
        self.replay_disagrees = 0
        self.marking: Optional[float] = None
        self.layer_note: Optional[str] = None
        self.layers: Optional[LayerDiff] = None
        self.unmapped: list[str] = []
        self.replaced: dict[str, str] = {}
        self.mapped: dict[str, int] = {}
        self.position_note: Optional[str] = None
        self.layer_backend: Any = None
        layers: list[Any] = []
        if with_layers and proto is not None:
            if hasattr(target.backend, "graph_nodes"):  # a split pair: both graphs name layers
                del proto.graph.node[:]
                proto.graph.node.extend(target.backend.graph_nodes())
            found = layers_for(model, proto.graph, layer_patterns)
            if hasattr(target.backend, "graph_nodes"):
                found = with_split_roi_features(found, target.backend)
            layers, self.unmapped, self.replaced = found.layers, found.unmapped, found.replaced
            self.mapped = {**found.counts, "not mapped": len(found.unmapped)}
            self.position_note = found.position_note
        elif with_layers:
            self.layer_note = ("layer diff not available: no ONNX graph names this target's "
                               "layers (give the engine's source ONNX with --onnx)")
        # an engine keeps its NMS candidates inside: a debug engine marks them too
        plugin_nodes = producers(proto, self.pipeline.inputs) \
            if target.kind == "engine" and isinstance(self.pipeline, FilePipeline) else []
        if layers or plugin_nodes:
            from harness.errors import UserError

            try:
                self.layer_backend = layer_backend(
                    target, [lay.node for lay in layers] + plugin_nodes, work_dir)
                if layers:
                    self.layers = LayerDiff(layers)
            except UserError as exc:
                self.layer_note = f"layer diff not available: {exc}"
        # where the NMS candidates are read: the target itself, or its debug engine
        self.candidate_backend = self.layer_backend if plugin_nodes else target.backend

    def add_batch(self, reference: Any, ref_out: dict[str, np.ndarray], ref_replays: list[Any],
                  ref_cands: Candidates, batch: Any) -> None:
        from harness.export.outputs import detections_from_outputs

        backend = self.target.backend
        outputs = backend.infer(batch.inputs, batch.metas)
        if self.two_stage:
            self._add_two_stage(reference, ref_out, ref_replays, outputs, batch)
            return
        if isinstance(self.pipeline, SourcePipeline):  # raw / decoded: the source's names
            check_outputs_fit(outputs, ref_out)
        if self.candidate_backend is None:
            raise UserError(f"{self.layer_note}; its NMS inputs cannot be read without a "
                            "debug engine")
        cands = self.pipeline.candidates(outputs, self.candidate_backend, batch.inputs)
        if cands.scores.shape != ref_cands.scores.shape:
            raise UserError(f"its NMS candidates have shape {list(cands.scores.shape)} but "
                            f"PyTorch's have {list(ref_cands.scores.shape)}: is it exported "
                            "from another model, class count or input size?")
        replays = self.pipeline.replay(cands, batch.metas)
        if not isinstance(self.pipeline, SourcePipeline):
            # the backend ran its own NMS: check the replay reproduces it (for raw / decoded
            # outputs the harness's NMS *is* the replay)
            actual = detections_from_outputs(self.model, outputs, batch.metas)
            for rep, act in zip(replays, actual):
                same = len(rep.result) == len(act) and np.allclose(
                    rep.result.boxes, act.boxes, atol=1e-3)
                self.replay_disagrees += int(not same)
        self.candidates.add(ref_cands, cands)
        for meta, ref, tgt in zip(batch.metas, ref_replays, replays):
            self.detections.add_image(Path(meta.path).name, ref, tgt)
        if self.invariance is not None:
            self.invariance.add_batch(
                lambda x, m: self.pipeline.replay(self.pipeline.candidates(
                    backend.infer(x, m), self.candidate_backend, x), m),
                batch.inputs, batch.metas, replays)
        if self.layers is not None:
            self.layers.add_batch(reference, self.layer_backend, batch.inputs)

    def _add_two_stage(self, reference: Any, ref_out: dict[str, np.ndarray],
                       ref_replays: list[Any],
                       outputs: dict[str, np.ndarray], batch: Any) -> None:
        """One batch of a two-stage detector: proposals matched by anchor, both sides'
        second-stage candidates on shared rows, then the post-NMS diff."""
        from harness.align.twostage import VARIABLE_OUTPUTS, proposal_replay_misses, unite

        check_outputs_fit({k: v for k, v in outputs.items() if k not in VARIABLE_OUTPUTS},
                          ref_out)
        if np.shape(outputs["roi_cls"])[-1] != np.shape(ref_out["roi_cls"])[-1]:
            raise UserError(f"its roi_cls has {np.shape(outputs['roi_cls'])[-1]} columns but "
                            f"PyTorch's has {np.shape(ref_out['roi_cls'])[-1]}: is it exported "
                            "from a model of another class count?")
        cands = self.pipeline.candidates(outputs, self.target.backend, batch.inputs)
        replays = self.pipeline.replay(cands, batch.metas)
        if self.pipeline.nms_pixels == "input":  # the file ran its own box-head NMS
            from harness.export.outputs import detections_from_outputs

            actual = detections_from_outputs(self.model, outputs, batch.metas)
            for rep, act in zip(replays, actual):
                same = len(rep.result) == len(act) and np.allclose(
                    rep.result.boxes, act.boxes, atol=1e-2)
                self.replay_disagrees += int(not same)
        pairs = []
        for i, (meta, ref, tgt) in enumerate(zip(batch.metas, ref_replays, replays)):
            image = Path(meta.path).name
            self.proposal_replay_misses += proposal_replay_misses(tgt)
            ref_u, tgt_u = unite(image, ref, tgt, self.proposals)
            pairs.append(self.proposals.last_pairs)
            self.detections.add_image(image, ref_u, tgt_u)
            rpn = {k: rel_l2(outputs[k][i], ref_out[k][i]) for k in ref_out
                   if k.startswith("rpn_")}
            for k, v in rpn.items():
                self.rpn_outputs[k] = max(self.rpn_outputs.get(k, 0.0), v)
            worst = max(rpn.values())
            if worst <= DIVERGENCE:
                self.upstream_same[image] = (worst, self.proposals.last_same_rows)
        if self.layers is not None:
            self.layers.add_batch(reference, self.layer_backend, batch.inputs, batch.metas,
                                  rows=lambda module, r, t: same_rows(module, r, t, pairs))
        if self.invariance is not None:
            from harness.align.proposals import ProposalDiff

            backend = self.target.backend
            self.invariance.add_batch(
                lambda x, m: self.pipeline.replay(self.pipeline.candidates(
                    backend.infer(x, m), backend, x), m),
                batch.inputs, batch.metas, replays,
                unite=lambda image, a, b: unite(image, a, b, ProposalDiff()))

    def _born_in_roi_align(self, layers: LayerSummary) -> None:
        """Two-stage: relabel the numeric mismatches (drift, score / IoU edges) of images
        whose RPN outputs and proposals agree as `roi_align` when the RoI features are the
        first layer past the target's tolerance: the difference was born in RoIAlign."""
        rows = {r.module: r for r in layers.rows}
        roi = rows.get(ROI_FEATURES)
        tol = TOLERANCES.get(self.target.precision, DIVERGENCE)
        if roi is None or not roi.rel_l2 > tol or \
                any(r.rel_l2 > tol for r in layers.rows if r.depth < roi.depth):
            return
        for m in self.detections.mismatches:
            rpn, same = self.upstream_same.get(m.image, (None, ()))
            if m.box in same and m.cause in ("drift", "score_edge", "iou_edge"):
                m.detail = (f"born in RoIAlign: the RPN outputs agree (rel-L2 {rpn:.2g}) and "
                            "its proposal is the same on both sides, the RoI features do not "
                            f"(rel-L2 {roi.rel_l2:.2g} > {tol:g}); shows as "
                            f"{m.cause.replace('_', ' ')}: {m.detail}")
                m.cause = "roi_align"

    def result(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The TargetResult fields this run measured."""
        # debug engines measure how far marking moved the final outputs, over every batch
        # and every chunk engine (harness.backends.tensorrt_marking)
        self.marking = getattr(self.layer_backend, "marking_changed_outputs_rel_l2",
                               self.marking)
        if self.two_stage and self.layers is not None:
            self._born_in_roi_align(self.layers.result(self.target.precision))
        det = self.detections.summary(class_names)
        if self.layers is not None:
            layers = self.layers.result(self.target.precision)
            layers.unmapped = self.unmapped
            layers.replaced = self.replaced
            layers.mapped = self.mapped
            layers.mapping_note = self.position_note
            layers.marking_changed_outputs_rel_l2 = self.marking
        else:
            layers = LayerSummary(rows=[], note=self.layer_note)
        invariance = None if self.invariance is None else self.invariance.to_json()
        if self.two_stage:
            return {"pipeline": self.pipeline.describe(), "detections": det, "layers": layers,
                    "batch_invariance": invariance,
                    "replay_disagrees": self.replay_disagrees, "proposals": {**self.proposals.summary(),
                                  "not_replayed": self.proposal_replay_misses,
                                  "rpn_outputs_rel_l2": self.rpn_outputs},
                    "tensorrt_check": self.preflight()}
        return {"pipeline": self.pipeline.describe(), "detections": det,
                "batch_invariance": invariance,
                "candidates": self.candidates.result(det.mismatches), "layers": layers,
                "replay_disagrees": self.replay_disagrees, "tensorrt_check": self.preflight()}

    def preflight(self) -> Optional[dict[str, Any]]:
        """`harness check` of the target's ONNX: what would stop or change a TensorRT build
        of it, with the config values a TopK's K may come from."""
        from harness.errors import UserError
        from harness.export.check import check_file

        if not self.target.onnx_path:
            return None
        nms = self.model.nms
        named = {f"model.test_cfg.{k}": getattr(nms, k) for k in ("nms_pre", "max_per_img")
                 if type(getattr(nms, k, None)) is int}
        try:
            return check_file(self.target.onnx_path, config_values=named).to_json()
        except UserError as exc:
            return {"error": str(exc)}


class _LastChunk:
    """The reference's intermediates, kept for the last chunk of layers asked for in the
    current batch: every target asking for the same layers gets them from one forward pass
    (targets of one model share their layer list), and only one chunk is alive at a time."""

    def __init__(self, backend: Any):
        self.backend = backend
        self._key: Optional[tuple[str, ...]] = None
        self._values: dict[str, np.ndarray] = {}

    def new_batch(self) -> None:
        self._key, self._values = None, {}

    def intermediates(self, inputs: np.ndarray, names: Sequence[str],
                      **metas: Any) -> dict[str, np.ndarray]:
        if tuple(names) != self._key:
            self._values = {}  # free the previous chunk before computing the next
            self._values = self.backend.intermediates(inputs, names, **metas)
            self._key = tuple(names)
        return self._values


def check_outputs_fit(outputs: dict[str, np.ndarray], ref_out: dict[str, np.ndarray]) -> None:
    """UserError when an output the reference also has (head maps, decoded boxes / scores)
    has another shape: the file was exported from another model or input size, and decoding
    it with this model's priors would crash or compare unrelated numbers."""
    for name, value in outputs.items():
        if name in ref_out and np.shape(value) != np.shape(ref_out[name]):
            raise UserError(f"its output {name} has shape {list(np.shape(value))} but "
                            f"PyTorch's has {list(np.shape(ref_out[name]))}: is it exported "
                            "from another model, class count or input size?")


def producers(proto: Any, tensors: Sequence[str]) -> list[str]:
    """Names of the nodes that produce `tensors` (what the debug engine marks)."""
    made_by = {out: node.name for node in proto.graph.node for out in node.output}
    return [made_by[t] for t in tensors if t in made_by]


def compare_spec(model: ModelSource, targets: Sequence[Target]) -> Any:
    """The preprocessing every side gets: the model's; where its images vary in size
    (keep-ratio models, two-stage ones), padded to the first target's fixed input size (the
    zeros a padded batch gets anyway, right and bottom; a target of another size is a row
    saying so)."""
    from harness.eval.runner import spec_for

    for t in targets:
        spec = spec_for(model, t.backend)
        if spec is not model.preprocess:
            return spec
    return model.preprocess


def _batches(images: Sequence[Path], spec: Any, batch: int,
             unreadable: list[dict[str, str]]) -> Iterator[Any]:
    """Preprocessed batches of `batch` readable images; an image that cannot be read is set
    aside in `unreadable` (image, reason) and the next one takes its place."""
    from harness.data.preprocess import Batch, read_image, stack_inputs, transform_image

    arrays: list[np.ndarray] = []
    metas: list[Any] = []
    for path in images:
        try:
            x, meta = transform_image(read_image(path), spec, str(path))
        except UserError as exc:
            unreadable.append({"image": str(path), "reason": str(exc)})
            continue
        arrays.append(x)
        metas.append(meta)
        if len(arrays) == batch:
            yield Batch(inputs=stack_inputs(arrays, spec), metas=metas)
            arrays, metas = [], []
    if arrays:
        yield Batch(inputs=stack_inputs(arrays, spec), metas=metas)


def run_compare(model: ModelSource, targets: Sequence[Target], images: Sequence[Path], batch: int = 4,
                layer_patterns: Sequence[str] = (), with_layers: bool = True,
                tol: Tolerances = Tolerances(), work_dir: Path = Path("."),
                progress: bool = True, batch_invariance: bool = True) -> CompareResult:
    """The compare section for `targets` against PyTorch on `images`. The reference's
    detections are mmyolo's own (`predict_by_feat`); a target that cannot be compared (it
    fails to run, or its outputs do not fit the model) gets a row saying why, and the others
    go on; unreadable images are skipped and listed. batch_invariance (batch > 1): every
    image run again alone on every side, its detections diffed against its in-batch ones."""
    from tqdm import tqdm

    from harness.backends.torch_backend import TorchBackend

    started = time.perf_counter()
    two_stage = is_two_stage(model)  # its outputs are every stage's, there is no decoded
    reference = TorchBackend(model, device=str(model.device),
                             outputs="raw" if two_stage else "all")
    reference.load()
    ref_layers = _LastChunk(reference)
    ref_pipeline: Any = TwoStagePipeline(model) if two_stage else SourcePipeline(model)
    not_replayed = 0  # two-stage: PyTorch's proposals its RPN replay does not keep
    from harness.align.batch_invariance import BatchInvariance

    ref_invariance = BatchInvariance(tol, batch, model.preprocess.pad_value) \
        if batch_invariance and batch > 1 else None

    def ref_alone(x: np.ndarray, metas: Sequence[Any]) -> list[Any]:
        out = reference.infer(x, metas)
        reps = ref_pipeline.replay(ref_pipeline.candidates(out, reference, x), metas)
        adopt_mmyolo_output(reps, model.framework_detections(out, metas), metas, ReplayCheck())
        return reps
    failed: dict[int, str] = {}
    runs: dict[int, TargetRun] = {}
    for t in targets:
        if not t.available:
            continue
        try:
            runs[id(t)] = TargetRun(model, t, layer_patterns, with_layers, tol, work_dir,
                                    batch, batch_invariance)
        except UserError as exc:
            failed[id(t)] = str(exc)
    digests: list[str] = []
    unreadable: list[dict[str, str]] = []
    check = ReplayCheck()
    ranked: list[dict[str, Any]] = []  # per image: candidates above score_thr, before TopK
    total = -(-len(images) // batch)
    spec = compare_spec(model, [t for t in targets if id(t) in runs])
    for data in tqdm(_batches(images, spec, batch, unreadable), total=total,
                     desc="compare", unit="batch", disable=not progress):
        digests.append(data.sha256)
        ref_out = reference.infer(data.inputs, data.metas)
        ref_cands = ref_pipeline.candidates(ref_out, reference, data.inputs)
        ref_replays = ref_pipeline.replay(ref_cands, data.metas)
        if two_stage:
            from harness.align.twostage import proposal_replay_misses

            not_replayed += sum(proposal_replay_misses(r) for r in ref_replays)
        found = model.framework_detections(ref_out, data.metas)
        adopt_mmyolo_output(ref_replays, found, data.metas, check)
        if ref_invariance is not None:
            ref_united = None
            if two_stage:
                from harness.align.proposals import ProposalDiff
                from harness.align.twostage import unite

                ref_united = lambda image, a, b: unite(image, a, b, ProposalDiff())  # noqa: E731
            ref_invariance.add_batch(ref_alone, data.inputs, data.metas, ref_replays,
                                     ref_united)
        ranked += [{"image": Path(meta.path).name, "candidates": ranked_candidates(rep)}
                   for meta, rep in zip(data.metas, ref_replays)]
        ref_layers.new_batch()
        for key, run in list(runs.items()):
            try:
                run.add_batch(ref_layers, ref_out, ref_replays, ref_cands, data)
            except UserError as exc:
                failed[key] = str(exc)
                del runs[key]  # its partial results would mislead: the row says why instead

    results = []
    for t in targets:
        status = "ok" if id(t) in runs else "failed" if id(t) in failed or \
            (t.reason or "").startswith("could not be compared") else "not_available"
        reason = f"could not be compared: {failed[id(t)]}" if id(t) in failed else t.reason
        results.append(TargetResult(
            name=t.name, path=str(t.path), kind=t.kind, available=id(t) in runs,
            status=status, reason=reason, precision=t.precision, backend=t.info or {},
            variant=(t.info or {}).get("variant"),
            **(runs[id(t)].result(model.class_names) if id(t) in runs else {})))
    compared = len(images) - len(unreadable)
    skipped = [Unreadable(**u) for u in unreadable]
    return CompareResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - started, 1),
        model=model.describe(),
        inputs=CompareInputs(images=[str(p) for p in images], count=compared, batch=batch,
                             requested=len(images), unreadable=skipped, sha256=digests,
                             preprocess=model.preprocess.describe()),
        reference={**reference.describe(), "pipeline": ref_pipeline.describe(),
                   "detections": f"{model.framework} {FRAMEWORK_OUTPUT.get(model.framework)} "
                                 "(what model.test_step outputs)",
                   **({"proposals_not_replayed": not_replayed} if two_stage else {}),
                   "batch_invariance": None if ref_invariance is None
                   else ref_invariance.to_json(),
                   "replay_check": check.to_json(),
                   "candidates_before_topk": topk_pressure(ranked, model.nms.nms_pre)},
        targets=results, verdict=verdict(results, check.to_json(), skipped,
                                         None if ref_invariance is None
                                         else ref_invariance.to_json()))


# the framework code whose detections are the PyTorch column
FRAMEWORK_OUTPUT = {"mmyolo": "predict_by_feat", "mmdet": "bbox_head.predict_by_feat"}

# TensorRT's TopK layer takes K <= 3840 (docs/nms-semantics.md "TopK"): the limit a deployed
# pre-NMS TopK cannot exceed
TENSORRT_TOPK_LIMIT = 3840


def ranked_candidates(side: Any) -> int:
    """How many (box, class) candidates of one image passed the score threshold and entered
    the pre-NMS ranking (before the nms_pre / TopK cut)."""
    from harness.align.ties import RANKED

    return int(np.isin(side.result.trace.code, RANKED).sum())


def topk_pressure(per_image: list[dict[str, Any]], nms_pre: int) -> dict[str, Any]:
    """Per image, the candidates a pre-NMS TopK sees, and on how many images the reference's
    nms_pre and TensorRT's TopK limit (3840) would cut: whether aligning the reference with a
    deployed TopK (--nms-pre) matters on these images."""
    counts = [p["candidates"] for p in per_image]
    return {"nms_pre": nms_pre, "tensorrt_topk_limit": TENSORRT_TOPK_LIMIT,
            "max": max(counts, default=0),
            "images_cut_by_nms_pre": sum(c > nms_pre for c in counts),
            "images_cut_at_tensorrt_limit": sum(c > TENSORRT_TOPK_LIMIT for c in counts),
            "per_image": per_image}
