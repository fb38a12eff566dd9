"""Precision variants of one fp32 graph: the int8 (Q/DQ) or fp16 conversion with a set of
layer groups kept in fp32 — for int8 their nodes are left out of quantization, for fp16 out
of the half conversion — each named by a key of everything its numbers depend on, so a
variant measured once is never converted or run again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from harness.errors import UserError
from harness.sensitivity.groups import LayerGroup
from harness.sensitivity.store import digest

PRECISIONS = ("int8", "fp16")
# bump when the conversion changes what it writes for the same inputs
CONVERSION_VERSION = 2


@dataclass(frozen=True)
class Conversion:
    """How every variant of a run is made from `fp32` (an onnx ModelProto): precision,
    the model's preprocessing spec and input size (int8 calibration), the calibration
    settings (int8), and `fingerprint`: what the variants depend on besides the groups."""

    fp32: Any
    precision: str
    spec: Any
    input_hw: tuple[int, int]
    calibration: Any = None
    fingerprint: Optional[dict[str, Any]] = None

    def key(self, groups: Sequence[LayerGroup]) -> str:
        """The variant with `groups` in fp32 (the order does not matter)."""
        nodes = sorted({n for g in groups for n in g.nodes})
        return digest({"variant": self.fingerprint, "fp32_nodes": nodes})

    def convert(self, groups: Sequence[LayerGroup]) -> Any:
        """The variant's ModelProto, its metadata saying which groups stayed in fp32."""
        from harness.export.metadata import read_metadata, write_metadata
        from harness.export.onnx_export import INPUT_NAME
        from harness.export.quantize import to_fp16, to_int8

        keep = [n for g in groups for n in g.nodes]
        calibration_record = None
        if self.precision == "int8":
            model, calibration_record = to_int8(self.fp32, self.spec, INPUT_NAME,
                                                self.input_hw, self.calibration,
                                                keep_fp32=keep)
        elif self.precision == "fp16":
            model = to_fp16(self.fp32, keep_fp32=keep)
        else:
            raise UserError(f"unknown precision '{self.precision}'; sensitivity compares "
                            f"fp32 against {'|'.join(PRECISIONS)}")
        record = dict(read_metadata(self.fp32) or {})
        record.update(precision=self.precision, calibration=calibration_record,
                      mixed_precision={"fp32_groups": [g.name for g in groups],
                                       "fp32_prefixes": [g.prefix for g in groups],
                                       "fp32_nodes": len(keep)})
        write_metadata(model, record)
        return model


def conversion_fingerprint(fp32_path: Path, precision: str, spec: Any,
                           input_hw: tuple[int, int], calibration: Any) -> dict[str, Any]:
    """What every variant depends on besides its groups: the fp32 file, the precision, the
    calibration (the same key to_int8 caches ranges under: graph, image contents, method,
    preprocessing, onnxruntime version) and the conversion's version."""
    import onnxruntime

    from harness.export.calibration import calibration_images, calibration_key
    from harness.export.metadata import file_sha256
    from harness.export.plugins import cut_at_plugins

    doc: dict[str, Any] = {"fp32_sha256": file_sha256(fp32_path), "precision": precision,
                           "onnxruntime": onnxruntime.__version__,
                           "conversion": CONVERSION_VERSION, "calibration": None}
    if precision == "int8":
        import onnx

        body = cut_at_plugins(onnx.load(str(fp32_path))).body.SerializeToString()
        paths = calibration_images(Path(calibration.images), calibration.count)
        doc["calibration"] = {"key": calibration_key(body, paths, calibration.method,
                                                     spec.describe(), input_hw),
                              "method": calibration.method, "count": len(paths)}
    return doc


def save_variant(model: Any, path: Path) -> Path:
    """Write a variant ModelProto atomically (a partial file never has the final name)."""
    import os

    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        onnx.save(model, str(partial))
        os.replace(partial, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
