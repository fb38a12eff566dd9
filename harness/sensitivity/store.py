"""The measured APs of a sensitivity run, one JSON line per precision variant, written (and
fsynced) as each is measured, so an interrupted run loses nothing it finished and a rerun
measures only what is missing.

The first line is a header naming what every AP depends on besides the variant (the fp32
graph, the calibration, the images evaluated, the NMS settings, the evaluator); a file whose
header differs is set aside as `<name>.stale` and started anew, and a torn last line is cut
off (as harness.eval.store does for per-image records).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from harness.errors import UserError

FORMAT = 1


def digest(doc: Any) -> str:
    """sha256 of a JSON document (keys sorted): how variants and headers are named."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class MeasurementStore:
    """path: the JSONL file; header: plain data identifying what the APs depend on."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = Path(path)
        self.header = json.loads(json.dumps({"kind": "header", "format": FORMAT, **header}))
        self.records: dict[str, dict[str, Any]] = {}  # variant key → its record

    @staticmethod
    def path_for(folder: Path, header: dict[str, Any]) -> Path:
        """One file per header, so runs on other subsets keep their own measurements."""
        return Path(folder) / f"ap-{digest(header)[:16]}.jsonl"

    def open(self) -> "MeasurementStore":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self._read():
            return self
        self.records = {}
        self._write([self.header], truncate=True)
        return self

    def _read(self) -> bool:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # past the last newline: a write cut short
        lines = data[:end].splitlines()
        try:
            first = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            first = None
        if first != self.header:
            if lines:
                stale = self.path.with_name(self.path.name + ".stale")
                os.replace(self.path, stale)
                warnings.warn(f"{self.path.name} was written for another model, calibration "
                              f"or subset; moved it to {stale.name}", stacklevel=3)
            return False
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{self.path} is damaged at line {number}; delete it to "
                                "measure again") from None
            if record.get("kind") == "ap":
                self.records[record["key"]] = record
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        return True

    def get(self, key: str) -> Optional[dict[str, Any]]:
        return self.records.get(key)

    def add(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        line = {"kind": "ap", "key": key, **record}
        line = json.loads(json.dumps(line))  # as it reads back
        self.records[key] = line
        self._write([line])
        return line

    def _write(self, records: list[dict[str, Any]], truncate: bool = False) -> None:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with open(self.path, "wb" if truncate else "ab") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
