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
from pathlib import Path
from typing import Any, Optional

from harness.jsonl import read_own, write_lines

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
        records, _ = read_own(self.path, self.header,
                              made_by="model, calibration or subset", redo="measure again")
        if records is None:
            return False
        self.records = {r["key"]: r for r in records if r.get("kind") == "ap"}
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
        write_lines(self.path, records, truncate)
