"""A two-stage detector exported as a split deployment writes it: an RPN graph (images → FPN
levels and RPN maps) and a head graph (RoI features → box head outputs), with proposal
selection and RoIAlign left to the code around the engines. The RPN file's metadata holds
everything that outside code needs (`split`: the proposal settings, the anchors' base boxes
and strides, the box coder, the RoI extractor's levels), and names its head file; the
harness runs the pair as one backend (harness.backends.split_twostage).
"""
from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from harness.errors import UserError

HEAD_SUFFIX = ".head.onnx"
HEAD_INPUT = "roi_feats"


def head_path_for(rpn_path: Path) -> Path:
    """`X.onnx` → `X.head.onnx`, the head graph beside the RPN graph."""
    return rpn_path.with_name(rpn_path.name[:-len(".onnx")] + HEAD_SUFFIX
                              if rpn_path.name.endswith(".onnx") else rpn_path.name + HEAD_SUFFIX)


def outside_steps(model: Any) -> dict[str, Any]:
    """What runs between the two graphs, as JSON: the RPN's settings, box coder and anchors
    (each level's base anchors and stride: mmdet's grid_priors adds the grid shifts), the
    proposal padding, and the RoI extractor (finest_scale, each level's RoIAlign)."""
    head = model.module.rpn_head
    gen = head.prior_generator
    extractor = model.module.roi_head.bbox_roi_extractor
    return {
        "rpn": asdict(model.rpn),
        "rpn_coder": {"means": [float(v) for v in head.bbox_coder.means],
                      "stds": [float(v) for v in head.bbox_coder.stds]},
        "base_anchors": [b.cpu().float().numpy().tolist() for b in gen.base_anchors],
        "strides": [[float(s[0]), float(s[1])] for s in gen.strides],
        "roi_extractor": {
            "finest_scale": float(extractor.finest_scale),
            "levels": [{"output_size": [int(v) for v in layer.output_size],
                        "spatial_scale": float(layer.spatial_scale),
                        "sampling_ratio": int(model.export_options.get(
                            "sampling_ratio", layer.sampling_ratio)),
                        "aligned": bool(layer.aligned), "pool_mode": str(layer.pool_mode)}
                       for layer in extractor.roi_layers]},
    }


def export_split(model: Any, output: Path, settings: Any) -> Any:
    """Write the RPN graph to `output` and the head graph beside it (head_path_for); fp32 or
    fp16. Returns the RPN file's ExportResult (its notes name the head file)."""
    import onnx
    import torch

    from harness.export.metadata import write_metadata
    from harness.export.onnx_export import (INPUT_NAME, ExportResult, _metadata, _save,
                                            check_settings, to_fp16)
    from harness.models.mmdet_twostage_modules import HeadPartModule, RpnPartModule

    if getattr(model, "rpn", None) is None:
        raise UserError("--variant split is for two-stage detectors (an RPN and a box head)")
    if settings.precision == "int8":
        raise UserError("--variant split exports fp32 or fp16")
    started = time.perf_counter()
    settings = check_settings(model, settings)
    output = Path(output)
    h, w = settings.input_size
    batch = settings.batch or 2
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, h, w, generator=gen).to(model.device)
    rpn_part = RpnPartModule(model).eval()
    with torch.no_grad():
        traced = rpn_part.forward_named(images)
    names = list(traced)
    levels = [v for k, v in traced.items() if k.startswith("feats.")]
    head_part = HeadPartModule(model).eval()
    size = model.module.roi_head.bbox_roi_extractor.roi_layers[0].output_size
    roi_feats = torch.rand(8, levels[0].shape[1], int(size[0]), int(size[1]), generator=gen)
    head_names = list(head_part.forward_named(roi_feats.to(model.device)))
    protos = []
    for module, inputs, in_name, out_names, axis in (
            (rpn_part, images, INPUT_NAME, names, "batch"),
            (head_part, roi_feats.to(model.device), HEAD_INPUT, head_names, "rois")):
        axes = {in_name: {0: axis}, **{n: {0: axis} for n in out_names}} \
            if settings.batch is None or axis == "rois" else None
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (inputs,), buffer, dynamo=False,
                              opset_version=settings.opset, input_names=[in_name],
                              output_names=out_names, dynamic_axes=axes,
                              do_constant_folding=True)
        proto = onnx.load_from_string(buffer.getvalue())
        if settings.precision == "fp16":
            proto = to_fp16(proto)
        protos.append(proto)
    head_path = head_path_for(output)
    record = json.loads(json.dumps(_metadata(model, replace(settings, variant="split"), None,
                                             names, None, protos[0], None)))
    record["split"] = {"role": "rpn", "head_file": head_path.name, **outside_steps(model)}
    write_metadata(protos[0], record)
    head_record = {**record, "outputs": head_names,
                   "input": {"name": HEAD_INPUT, "dtype": "float32",
                             "shape": ["rois", int(levels[0].shape[1]), *map(int, size)]},
                   "split": {"role": "head", "rpn_file": output.name}}
    write_metadata(protos[1], head_record)
    _save(protos[0], output)
    _save(protos[1], head_path)
    return ExportResult(path=output, metadata=record,
                        notes=[f"the head graph is {head_path} (RoI features → box head); "
                               "proposal selection and RoIAlign run outside both graphs"],
                        seconds=time.perf_counter() - started)
