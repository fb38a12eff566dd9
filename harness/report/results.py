"""The results file every report is rendered from: one JSON document per report folder
(`reports/<experiment>/results.json`) with one section per command (`compare`, `coco`), so
`compare` and `coco` can write into the same folder and a gate reads one file.

Writes are atomic (temporary file + rename): an interrupted run never leaves half a file.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Union

from harness.errors import UserError

RESULTS_NAME = "results.json"
SCHEMA_VERSION = 1


def read_results(path: Union[str, Path]) -> dict[str, Any]:
    """The whole results document; a missing file is an empty one, a corrupt one an error."""
    p = Path(path)
    if not p.exists():
        return {"schema": SCHEMA_VERSION}
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"results file {p} cannot be read ({exc}); delete it or point to "
                        "another report folder") from None
    if not isinstance(doc, dict):
        raise UserError(f"results file {p} is not a harness results document")
    return doc


def write_results(path: Union[str, Path], section: str, value: Any) -> dict[str, Any]:
    """Replace `section` of the results document at `path` (other sections kept)."""
    p = Path(path)
    doc = read_results(p)
    doc["schema"] = SCHEMA_VERSION
    doc[section] = value
    atomic_write_text(p, json.dumps(_clean(doc), indent=1, sort_keys=False) + "\n")
    return doc


def write_command_results(out: Path, section: str, value: Any,
                          experiment: Any = None) -> Path:
    """`out`/results.json with a command's section, and the experiment's section (name,
    path, gates) when the command ran from an experiment file; returns the file."""
    path = Path(out) / RESULTS_NAME
    if experiment is not None:
        write_results(path, "experiment", experiment)
    write_results(path, section, value)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python numbers, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
