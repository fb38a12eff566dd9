"""The export settings an ONNX file carries: one JSON document in the model's `metadata_props`,
so a file found later says how it was made (variant, NMS and thresholds, precision, source
checkpoint and its hash, preprocessing) and the backends can report it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union

METADATA_KEY = "harness.export"


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_metadata(model: Any, record: dict[str, Any]) -> None:
    """Store `record` (JSON-serialisable) in `model.metadata_props`, replacing an earlier one."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(record, sort_keys=True)


def read_metadata(model: Any) -> Union[dict[str, Any], None]:
    """The export record of an onnx ModelProto, or None for a file the harness did not write."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError:
                return None
    return None
