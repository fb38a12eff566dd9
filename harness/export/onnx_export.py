"""`export_onnx`: a model source (harness.models.source.ModelSource) to an ONNX file through
PyTorch's TorchScript exporter (which keeps module scopes in node names), in one of the
variants users deploy, at fp32, fp16 or int8, with the settings recorded in the file's metadata.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from harness.errors import UserError
from harness.export.calibration import CalibrationSettings
from harness.export.metadata import file_sha256, write_metadata
from harness.export.quantize import PRECISIONS, to_fp16, to_int8
from harness.export.variants import NMS_CHOICES, VARIANTS, End2EndNms
from harness.models.source import SOURCE_VARIANTS, ModelSource

INPUT_NAME = "images"
MIN_OPSET = 11  # Resize with scales; NonMaxSuppression needs 10
DEFAULT_OPSET = 17
# BatchedNMS rejects topK above 4096; easydeploy's TENSORRT7 backend clamps pre_top_k to it
BATCHED_MAX_TOPK = 4096


@dataclass(frozen=True)
class ExportSettings:
    """What to export. None thresholds come from the model's test_cfg (NmsSettings).

    variant: raw | decoded | end2end | split (two-stage: an RPN graph and a head graph,
    harness.export.split_export). nms: onnx | efficient | batched (end2end only).
    pre_topk: BatchedNMS topK (default min(nms_pre, 4096)); for onnx a pre-NMS TopK over
    each box's best score (mmdeploy's pre_top_k; none by default, as in easydeploy); ignored
    by efficient (its own fixed cap). keep_topk (default max_per_img), iou_threshold,
    score_threshold (default the config's score_thr, at least 0). precision: fp32 | fp16 | int8 (int8 needs
    calibration). batch: None for a dynamic batch axis, else a fixed batch size.
    input_size: (h, w); None: the fixed size the model's preprocessing produces.
    """

    variant: str = "raw"
    nms: Union[str, None] = None
    pre_topk: Union[int, None] = None
    keep_topk: Union[int, None] = None
    iou_threshold: Union[float, None] = None
    score_threshold: Union[float, None] = None
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    batch: Union[int, None] = None
    input_size: Union[tuple[int, int], None] = None
    simplify: bool = False


@dataclass
class ExportResult:
    """What export_onnx wrote: the file, its recorded metadata, and notes for the user."""

    path: Path
    metadata: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def max_opset() -> int:
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17))


def resolve_nms(model: ModelSource, settings: ExportSettings) -> tuple[End2EndNms, list[str]]:
    """The end2end NMS with every number filled in from `settings` or the model's test_cfg,
    and notes on settings that the chosen NMS ignores or that are risky."""
    notes: list[str] = []
    kind = settings.nms
    if kind not in NMS_CHOICES:
        raise UserError(f"--variant end2end needs --nms {'|'.join(NMS_CHOICES)}")
    cfg = model.nms
    keep = settings.keep_topk if settings.keep_topk is not None else cfg.max_per_img
    iou = settings.iou_threshold if settings.iou_threshold is not None else cfg.iou_threshold
    score = settings.score_threshold if settings.score_threshold is not None \
        else max(cfg.score_thr, 0.0)
    if keep < 1:
        raise UserError(f"--keep-topk must be at least 1, got {keep}")
    if not 0 < iou <= 1:
        raise UserError(f"--iou-threshold must be in (0, 1], got {iou}")
    if not 0 <= score <= 1:
        raise UserError(f"--score-threshold must be in [0, 1], got {score}")
    pre = None
    if kind == "batched":
        pre = settings.pre_topk if settings.pre_topk is not None else cfg.nms_pre
        if pre < 1:
            raise UserError(f"--pre-topk must be at least 1, got {pre}")
        if pre > BATCHED_MAX_TOPK:
            notes.append(f"BatchedNMS topK is at most {BATCHED_MAX_TOPK}: pre-topk {pre} "
                         f"clamped to {BATCHED_MAX_TOPK}")
            pre = BATCHED_MAX_TOPK
        if keep > pre:
            notes.append(f"keep-topk {keep} > topK {pre}: TensorRT's BatchedNMS then returns "
                         "no detections at all (docs/nms-semantics.md)")
    elif settings.pre_topk is not None and kind == "onnx":
        pre = settings.pre_topk
        if pre < 1:
            raise UserError(f"--pre-topk must be at least 1, got {pre}")
    elif settings.pre_topk is not None:
        notes.append(f"--pre-topk is ignored by --nms {kind} (its fixed 5000 cap, 4096 before "
                     "TensorRT 8.5.1), as in easydeploy")
    return End2EndNms(kind=kind, keep_topk=int(keep), iou_threshold=float(iou),
                      score_threshold=float(score), pre_topk=pre), notes


def network_input_size(spec: Any) -> Union[tuple[int, int], None]:
    """(h, w) every image has after `spec`'s preprocessing, or None when it depends on the
    image (keep-ratio resizes without a fixed pad). Found by preprocessing blank images of
    three aspects, so it follows the same code every backend's inputs go through."""
    import numpy as np

    from harness.data.preprocess import stack_inputs, transform_image

    sizes = set()
    for h, w in ((480, 640), (640, 480), (97, 131)):
        x, _ = transform_image(np.zeros((h, w, 3), np.uint8), spec)
        sizes.add(stack_inputs([x], spec).shape[2:])
    return tuple(sizes.pop()) if len(sizes) == 1 else None


def check_options(settings: ExportSettings) -> None:
    """The checks that need no model (so the CLI can fail before loading one)."""
    if settings.variant not in VARIANTS:
        raise UserError(f"unknown variant '{settings.variant}'; choose {'|'.join(VARIANTS)}")
    if settings.variant != "end2end" and settings.nms is not None:
        raise UserError(f"--nms applies to --variant end2end only (got --variant "
                        f"{settings.variant})")
    if settings.variant == "end2end" and settings.nms not in NMS_CHOICES:
        raise UserError(f"--variant end2end needs --nms {'|'.join(NMS_CHOICES)}")
    if settings.precision not in PRECISIONS:
        raise UserError(f"unknown precision '{settings.precision}'; choose "
                        f"{'|'.join(PRECISIONS)}")
    top = max_opset()
    if not MIN_OPSET <= settings.opset <= top:
        raise UserError(f"--opset {settings.opset} is not supported: the TorchScript exporter "
                        f"of this torch writes opsets {MIN_OPSET} to {top}")
    if settings.batch is not None and settings.batch < 1:
        raise UserError(f"--batch must be at least 1, got {settings.batch}")
    if settings.input_size is not None and any(s < 32 or s % 32 for s in settings.input_size):
        raise UserError(f"input size {settings.input_size[1]}x{settings.input_size[0]} must be "
                        "a multiple of 32 (the largest feature stride)")
    if settings.simplify:
        try:
            import onnxsim  # noqa: F401
        except ImportError:
            raise UserError("--simplify needs onnxsim, which is not installed (pip install "
                            "onnxsim), or export without --simplify") from None


def check_settings(model: ModelSource, settings: ExportSettings) -> ExportSettings:
    """Validate `settings` and fill input_size; UserError names the option at fault."""
    check_options(settings)
    size = settings.input_size or network_input_size(model.preprocess) \
        or model.preprocess.largest_input()
    if size is None:
        raise UserError("the model's preprocessing gives images of varying size; pass "
                        "--input-size H W")
    if any(s < 32 or s % 32 for s in size):
        raise UserError(f"input size {size[1]}x{size[0]} must be a multiple of 32 (the "
                        "largest feature stride)")
    return replace(settings, input_size=(int(size[0]), int(size[1])))


def build_module(model: ModelSource, settings: ExportSettings,
                 nms: Union[End2EndNms, None] = None) -> Any:
    """The nn.Module whose graph the variant holds: the source's own export module for raw
    and decoded, that decoded module plus the NMS for end2end (harness.export.wrappers)."""
    from harness.export.wrappers import End2EndModule

    if settings.variant in SOURCE_VARIANTS:
        return model.export_module(settings.variant).eval()
    if getattr(model, "rpn", None) is not None:  # two-stage: its own end2end graph
        return model.export_module(settings.variant, nms).eval()
    return End2EndModule(model, nms).eval()


def export_onnx(model: ModelSource, output: Union[str, Path], settings: ExportSettings,
                calibration: Union[CalibrationSettings, None] = None) -> ExportResult:
    """Export `model` to `output` as `settings` says.

    The file's input is `images` (B, 3, H, W) float32, the harness's preprocessed batch;
    outputs are named as the source's export modules (raw, decoded) and
    harness.export.wrappers (end2end) document. int8 needs `calibration`. Returns the path,
    the metadata written into the file, and notes.
    """
    import onnx
    import torch

    if settings.variant == "split":  # two graphs, the steps between them outside
        from harness.export.split_export import export_split

        return export_split(model, output, settings)
    started = time.perf_counter()
    output = Path(output)
    settings = check_settings(model, settings)
    notes: list[str] = []
    nms = None
    if settings.variant == "end2end":
        nms, nms_notes = resolve_nms(model, settings)
        notes += nms_notes
    if settings.precision == "int8" and calibration is None:
        raise UserError("--precision int8 needs calibration images: --calib DIR")
    if settings.precision != "int8" and calibration is not None:
        notes.append("calibration images are used only for --precision int8; ignored")

    module = build_module(model, settings, nms)
    h, w = settings.input_size
    batch = settings.batch or 2  # trace with 2 so nothing specialises to a batch of 1
    gen = torch.Generator().manual_seed(0)
    dummy = torch.rand(batch, 3, h, w, generator=gen).to(model.device)
    # a graph that takes more than the images (two-stage: each image's img_shape)
    extra = module.extra_inputs(batch, h, w, dummy.device) \
        if hasattr(module, "extra_inputs") else {}
    if extra and settings.precision == "int8":
        raise UserError("int8 export of a graph with inputs besides the images "
                        f"({', '.join(extra)}) is not supported")
    with torch.no_grad():
        names = list(module.forward_named(dummy, *extra.values()))
    axes = None
    if settings.batch is None:
        axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in extra}}
        for name in names:
            axes[name] = {0: "num_selected" if name == "selected_indices" else "batch"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic are expected
        torch.onnx.export(module, (dummy, *extra.values()), buffer, dynamo=False,
                          opset_version=settings.opset,
                          input_names=[INPUT_NAME, *extra], output_names=names, dynamic_axes=axes,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    if not any(n.name.startswith("/backbone/") for n in proto.graph.node):
        raise RuntimeError("exported node names lost their module scopes (/backbone/...); "
                           "the layer diff depends on them")
    _fold_initializer_identities(proto)
    if settings.simplify:
        proto = _simplify(proto)

    calib_record = None
    if settings.precision == "fp16":
        proto = to_fp16(proto)
    elif settings.precision == "int8":
        proto, calib_record = to_int8(proto, model.preprocess, INPUT_NAME, (h, w), calibration)

    # as JSON stores it (tuples become lists), so the result equals what the file holds
    record = json.loads(json.dumps(_metadata(model, settings, nms, names, calib_record, proto,
                                             calibration)))
    write_metadata(proto, record)
    _save(proto, output)
    return ExportResult(path=output, metadata=record, notes=notes,
                        seconds=time.perf_counter() - started)


def _fold_initializer_identities(proto: Any) -> None:
    """Drop the Identity nodes the exporter puts between a deduplicated initializer and its
    second user: consumers then read the weight directly, which int8 quantization needs to
    see it as a weight (per-channel), and which TensorRT's parser prefers."""
    graph = proto.graph
    weights = {i.name for i in graph.initializer}
    kept_outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in weights
             and n.output[0] not in kept_outputs}
    if not alias:
        return
    nodes = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(nodes)


def _simplify(proto: Any) -> Any:
    import onnxsim

    from harness.export.plugins import cut_at_plugins

    cut = cut_at_plugins(proto)
    simplified, ok = onnxsim.simplify(cut.body)
    if not ok:
        raise UserError("onnxsim could not validate the simplified graph; export without "
                        "--simplify")
    return cut.reattach(simplified)


def _metadata(model: ModelSource, settings: ExportSettings, nms: Union[End2EndNms, None],
              names: list[str], calibration: Union[dict, None], proto: Any,
              calibration_settings: Union[CalibrationSettings, None]) -> dict[str, Any]:
    import onnx
    import torch

    import harness

    opset = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    h, w = settings.input_size
    ckpt = model.ckpt_path
    return {
        "harness_version": harness.__version__,
        "torch": torch.__version__, "onnx": onnx.__version__,
        "variant": settings.variant,
        "nms": None if nms is None else asdict(nms),
        "precision": settings.precision,
        "opset": int(opset),
        "opset_requested": settings.opset,
        "simplified": settings.simplify,
        "input": {"name": INPUT_NAME, "dtype": "float32",
                  "shape": [settings.batch or "batch", 3, h, w]},
        "outputs": names,
        "source": {
            "config": str(model.cfg_path),
            "config_sha256": file_sha256(model.cfg_path),
            "checkpoint": None if ckpt is None else str(ckpt),
            "checkpoint_sha256": None if ckpt is None else file_sha256(ckpt),
        },
        "model": {"family": model.family, "head": model.head_type,
                  "num_classes": model.num_classes, "class_names": list(model.class_names),
                  "test_cfg": asdict(model.nms)},
        "preprocess": model.preprocess.describe(),
        "calibration": calibration,
        "export_key": export_key(model, settings, calibration_settings),
        **_stage_settings(model),
    }


def _stage_settings(model: ModelSource) -> dict[str, Any]:
    """What a two-stage graph holds besides the weights: its proposal settings (written into
    the graph) and the forms the export wrote instead of the framework's (RoIAlign's); empty
    for a one-stage source."""
    rpn = getattr(model, "rpn", None)
    if rpn is None:
        return {}
    return {"rpn": asdict(rpn), "export_options": dict(getattr(model, "export_options", {}))}


def _save(proto: Any, output: Path) -> None:
    import onnx

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".partial")
        onnx.save(proto, str(partial))
        os.replace(partial, output)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None


def export_key(model: ModelSource, settings: ExportSettings,
               calibration: Union[CalibrationSettings, None] = None) -> str:
    """sha256 of everything an exported file depends on: the export settings (input size and
    NMS resolved), the config and checkpoint files, the model's preprocessing and, for an
    end2end file, its test_cfg as loaded (its NMS defaults come from there, even when changed
    in code; raw and decoded files do not depend on it), the calibration settings for int8,
    and the harness, torch and onnx versions. Recorded in the file's metadata; a cached file
    is reused only when its key is this one."""
    import onnx
    import torch

    import harness

    settings = check_settings(model, settings)
    nms = resolve_nms(model, settings)[0] if settings.variant == "end2end" else None
    ckpt = model.ckpt_path
    doc = {
        "settings": asdict(settings), "nms": None if nms is None else asdict(nms),
        "config_sha256": file_sha256(model.cfg_path),
        "checkpoint_sha256": None if ckpt is None else file_sha256(ckpt),
        "test_cfg": asdict(model.nms) if settings.variant == "end2end" else None,
        "preprocess": model.preprocess.describe(),
        "calibration": None if calibration is None or settings.precision != "int8" else {
            "images": str(Path(calibration.images).resolve()), "count": calibration.count,
            "method": calibration.method},
        "versions": [harness.__version__, torch.__version__, onnx.__version__],
        **_stage_settings(model),
    }
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def export_cached(model: ModelSource, output: Union[str, Path], settings: ExportSettings,
                  calibration: Union[CalibrationSettings, None] = None,
                  log: Any = print) -> Path:
    """`output` as it is when it already holds this export (its metadata's export_key is
    this one: same settings, config, checkpoint, test_cfg, input size, opset, calibration),
    else exported now. A file that cannot be read is made again."""
    import onnx

    from harness.export.metadata import read_metadata

    output = Path(output)
    key = export_key(model, settings, calibration)
    if output.is_file():
        try:
            meta = read_metadata(onnx.load(str(output), load_external_data=False)) or {}
        except Exception:  # a damaged file is simply made again
            meta = {}
        if meta.get("export_key") == key:
            return output
    log(f"exporting {output}")
    export_onnx(model, output, settings, calibration)
    return output
