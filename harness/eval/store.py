"""The per-configuration record of a COCO pass: one JSONL file that receives each image's
detections (as COCO result entries) and timings as they are produced, one write + flush +
fsync per batch, so an interrupted run (Ctrl-C, kill, crash) loses at most the batch in
flight and resumes where it stopped.

Lines: first a header (what produced the file: configuration, model and data fingerprints),
then `image` lines ({"image_id", "file", "detections": [COCO result entries], "ms": the
image's share of its batch's preprocess / infer / post milliseconds} or {"image_id", "file",
"unreadable": reason}), and a `latency` line when timing finished (the last one counts).
A file whose header differs (another checkpoint, export or annotation file) is set aside
as `<name>.stale` and started anew; a truncated last line is dropped.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from harness.errors import UserError

FORMAT = 1


class RunStore:
    """path: the JSONL file; header: plain data identifying what produces it (compared with
    the file's header on open)."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = Path(path)
        self.header = json.loads(json.dumps({"kind": "header", "format": FORMAT, **header}))
        self.images: dict[int, dict[str, Any]] = {}
        self.latency: Optional[dict[str, Any]] = None
        self.resumed = False
        self.dropped_partial_line = False

    # -- opening ---------------------------------------------------------------------------

    @staticmethod
    def path_for(cache_dir: Path, configuration_key: str) -> Path:
        """Where the run file of one matrix configuration lives under a report's cache."""
        return Path(cache_dir) / "runs" / f"{configuration_key}.jsonl"

    @classmethod
    def read(cls, path: Path) -> "RunStore":
        """The records of an existing file, whatever its header (for reading them only)."""
        path = Path(path)
        try:
            first = json.loads(path.read_bytes().split(b"\n", 1)[0])
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is not a harness run file ({exc})") from None
        store = cls(path, {k: v for k, v in first.items() if k not in ("kind", "format")})
        if not store._read_existing():
            raise UserError(f"{path} is not a harness run file")
        return store

    def open(self) -> "RunStore":
        """Read what a previous run left (if it was made by the same header), else start the
        file with the header."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self._read_existing():
            self.resumed = bool(self.images) or self.latency is not None
            return self
        self.images, self.latency = {}, None
        self._write_lines([self.header], truncate=True)
        return self

    def _read_existing(self) -> bool:
        """True when the file belongs to this header (its records are loaded and a partial last
        line is cut off); False when it must be started anew (a stale one is set aside)."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if end < len(data):
            self.dropped_partial_line = True
        lines = data[:end].splitlines()
        try:
            first = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            first = None
        if first != self.header:
            if lines:  # another run's file: keep it aside rather than mix the two
                stale = self.path.with_name(self.path.name + ".stale")
                os.replace(self.path, stale)
                warnings.warn(f"{self.path.name} was written by another model, export or "
                              f"data set; moved it to {stale.name} and started over",
                              stacklevel=3)
            return False
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{self.path} is damaged at line {number} (not JSON); delete "
                                "it to recompute this configuration") from None
            kind = record.get("kind")
            if kind == "image":
                self.images[int(record["image_id"])] = record
            elif kind == "latency":
                self.latency = record["result"]
        if self.dropped_partial_line:
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        return True

    # -- appending -------------------------------------------------------------------------

    def append_images(self, records: Iterable[dict[str, Any]]) -> None:
        """Add image records (one batch) in one write; records of images already stored are
        not written again."""
        new = []
        for r in records:
            image_id = int(r["image_id"])
            if image_id in self.images:
                continue
            record = {"kind": "image", **r}
            self.images[image_id] = record
            new.append(record)
        if new:
            self._write_lines(new)

    def append_latency(self, result: dict[str, Any]) -> None:
        self.latency = result
        self._write_lines([{"kind": "latency", "result": result}])

    def _write_lines(self, records: list[dict[str, Any]], truncate: bool = False) -> None:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with open(self.path, "wb" if truncate else "ab") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())

    # -- reading ---------------------------------------------------------------------------

    def done(self, image_id: int) -> bool:
        return image_id in self.images

    def detections(self, image_ids: Optional[Iterable[int]] = None,
                   key: str = "detections") -> list[dict[str, Any]]:
        """The stored COCO result entries (of `image_ids`, default all), in image-id order;
        key "reference_nms": the same candidates through the reference's NMS, where stored."""
        wanted = sorted(self.images if image_ids is None else
                        (i for i in set(image_ids) if i in self.images))
        out: list[dict[str, Any]] = []
        for image_id in wanted:
            out.extend(self.images[image_id].get(key) or [])
        return out

    def has(self, key: str) -> bool:
        """Whether every stored readable image carries `key`."""
        readable = [r for r in self.images.values() if not r.get("unreadable")]
        return bool(readable) and all(key in r for r in readable)

    def unreadable(self) -> dict[int, str]:
        return {i: r["unreadable"] for i, r in self.images.items() if r.get("unreadable")}
