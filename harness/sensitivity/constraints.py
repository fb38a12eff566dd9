"""The TensorRT side of a mixed-precision choice: a small JSON file listing the layer-name
prefixes to keep in fp32 (the ONNX parser names TensorRT layers after ONNX nodes, so a
module's scope `/backbone/stage1/` is the prefix of its layers), which `harness build
--fp32-layers FILE` applies as per-layer precision constraints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from harness.errors import UserError

FORMAT = 1


def write_constraints(path: Path, groups: Sequence[Any], onnx_name: str,
                      precision: str) -> Path:
    """Write the constraints of `groups` (LayerGroups kept in fp32) for the engine built
    from `onnx_name` (relative to the file's folder) at `precision`."""
    from harness.results import atomic_write_text

    doc = {
        "format": FORMAT, "precision": "fp32",
        "prefixes": [g.prefix for g in groups],
        "groups": [{"module": g.name, "prefix": g.prefix, "nodes": len(g.nodes)}
                   for g in groups],
        "onnx": onnx_name,
        "build": f"harness build {onnx_name} -o {Path(onnx_name).with_suffix('.engine')} "
                 f"--precision {precision} --fp32-layers {path.name}",
    }
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return path


def read_constraints(path: Path) -> list[str]:
    """The layer-name prefixes of a constraints file: this module's format, or a plain JSON
    list of prefixes. Anything else is a one-line UserError."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"--fp32-layers file not found: {p}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--fp32-layers file {p} is not readable JSON ({exc})") from None
    if isinstance(doc, dict):
        if doc.get("precision", "fp32") != "fp32":
            raise UserError(f"{p}: only fp32 constraints are supported, got "
                            f"{doc.get('precision')!r}")
        doc = doc.get("prefixes")
    if not isinstance(doc, list) or not all(isinstance(x, str) and x for x in doc):
        raise UserError(f"{p} must hold a list of layer-name prefixes (or an object with "
                        "'prefixes'), as harness sensitivity writes it")
    return list(doc)
