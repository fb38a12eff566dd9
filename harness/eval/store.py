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

Under torchrun each rank writes a file of its own (`<key>.rank<R>.jsonl`) and reads, besides
its own, every other file of the configuration (the single process's `<key>.jsonl` and every
rank's, whatever the world size that wrote them) without touching them: a batch any run
stored is never computed again, by any world size.
"""
from __future__ import annotations

import json
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from harness.errors import UserError
from harness.jsonl import encode_line, read_own, write_bytes, write_lines

FORMAT = 1
# `<key>.jsonl` (one process) or `<key>.rank<R>.jsonl` (rank R of a distributed run)
RUN_FILE = re.compile(r"^(?P<key>.+?)(?:\.rank(?P<rank>\d+))?\.jsonl$")


def image_line(record: dict[str, Any]) -> bytes:
    """The line an image record ({"image_id", "file", ...}) is stored as."""
    return encode_line({"kind": "image", **record})


class ImageRecords(MutableMapping):
    """image_id → record; a record added as its encoded line (RunStore.append_encoded, made in
    another process) is parsed the first time it is read."""

    def __init__(self) -> None:
        self._records: dict[int, Any] = {}

    def __getitem__(self, image_id: int) -> dict[str, Any]:
        record = self._records[image_id]
        if isinstance(record, bytes):
            record = self._records[image_id] = json.loads(record)
        return record

    def __setitem__(self, image_id: int, record: Any) -> None:
        self._records[image_id] = record

    def __delitem__(self, image_id: int) -> None:
        del self._records[image_id]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._records

    def __iter__(self) -> Iterator[int]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


class RunStore:
    """path: the JSONL file; header: plain data identifying what produces it (compared with
    the file's header on open)."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = Path(path)
        self.header = json.loads(json.dumps({"kind": "header", "format": FORMAT, **header}))
        self.images = ImageRecords()  # this file's and the other files'
        self.latency: Optional[dict[str, Any]] = None
        self.latency_measured_on: Optional[dict[str, Any]] = None
        self.resumed = False
        self.dropped_partial_line = False
        # ids done by a rank whose files this process cannot see (another host's disk)
        self.elsewhere: set[int] = set()
        self.beside: dict[Path, int] = {}  # other file of the configuration → images read
        # (result, measured_on) of the last latency line of each other file
        self.beside_latency: list[tuple[dict[str, Any], Optional[dict[str, Any]]]] = []

    # -- opening ---------------------------------------------------------------------------

    @staticmethod
    def path_for(cache_dir: Path, configuration_key: str, rank: Optional[int] = None) -> Path:
        """Where the run file of one matrix configuration lives under a report's cache; with
        `rank`, the file of that rank of a distributed run."""
        suffix = "" if rank is None else f".rank{rank}"
        return Path(cache_dir) / "runs" / f"{configuration_key}{suffix}.jsonl"

    @staticmethod
    def files_of(path: Path) -> list[Path]:
        """Every run file of the configuration `path` is a file of (the one-process file,
        then the rank files by rank), existing ones only, `path` itself included if it
        exists."""
        path = Path(path)
        match = RUN_FILE.match(path.name)
        if match is None or not path.parent.is_dir():
            return [path] if path.exists() else []
        key = match["key"]
        found = []
        for other in path.parent.iterdir():
            m = RUN_FILE.match(other.name)
            if m is not None and m["key"] == key and other.is_file():
                found.append((-1 if m["rank"] is None else int(m["rank"]), other))
        return [p for _, p in sorted(found)]

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
        if not (self.path.exists() and self._read_existing()):
            self.images, self.latency, self.latency_measured_on = ImageRecords(), None, None
            self._write_lines([self.header], truncate=True)
        self.read_beside()
        self.resumed = bool(self.images) or self.latency is not None or \
            bool(self.beside_latency)
        return self

    def read_beside(self) -> int:
        """Read what the configuration's other files (other ranks', the one-process run's)
        hold that this store does not have yet; returns how many images were new. Those files
        are only read: a torn last line is left to its writer, and a file of another header
        (another model or data) is ignored."""
        new = 0
        latency = {}
        for other in self.files_of(self.path):
            if other == self.path:
                continue
            records = self._records_of(other)
            if records is None:
                continue
            read = 0
            for record in records:
                if record.get("kind") == "image":
                    image_id = int(record["image_id"])
                    read += 1
                    if image_id not in self.images:
                        self.images[image_id] = record
                        new += 1
                elif record.get("kind") == "latency":
                    latency[other] = (record["result"], record.get("measured_on"))
            self.beside[other] = read
        self.beside_latency = list(latency.values())
        return new

    def _records_of(self, path: Path) -> Optional[list[dict[str, Any]]]:
        """The whole lines after the header of another file of this header; None when it is
        not one (or is gone)."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        lines = data[:data.rfind(b"\n") + 1].splitlines()
        try:
            if not lines or json.loads(lines[0]) != self.header:
                return None
            return [json.loads(line) for line in lines[1:]]
        except json.JSONDecodeError:
            raise UserError(f"{path} is damaged (a line is not JSON); delete it to recompute "
                            "what it holds") from None

    def _read_existing(self) -> bool:
        """True when the file belongs to this header (its records are loaded and a partial last
        line is cut off); False when it must be started anew (a stale one is set aside)."""
        records, self.dropped_partial_line = read_own(
            self.path, self.header, made_by="model, export or data set",
            redo="recompute this configuration")
        if records is None:
            return False
        for record in records:
            kind = record.get("kind")
            if kind == "image":
                self.images[int(record["image_id"])] = record
            elif kind == "latency":
                self.latency = record["result"]
                self.latency_measured_on = record.get("measured_on")
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
            self.images[image_id] = {"kind": "image", **r}
            new.append(image_line(r))
        if new:
            write_bytes(self.path, b"".join(new))

    def append_encoded(self, lines: Iterable[tuple[int, bytes]]) -> None:
        """append_images for records already encoded (image_line) elsewhere: (image_id, line)
        per image, written as they are and parsed only when read."""
        new = []
        for image_id, line in lines:
            if image_id not in self.images:
                self.images[image_id] = line
                new.append(line)
        if new:
            write_bytes(self.path, b"".join(new))

    def append_latency(self, result: dict[str, Any],
                       measured_on: Optional[dict[str, Any]] = None) -> None:
        """measured_on: which device of which host timed it (harness.eval.distributed)."""
        self.latency, self.latency_measured_on = result, measured_on
        line = {"kind": "latency", "result": result}
        if measured_on is not None:
            line["measured_on"] = measured_on
        self._write_lines([line])

    def _write_lines(self, records: list[dict[str, Any]], truncate: bool = False) -> None:
        write_lines(self.path, records, truncate)

    # -- reading ---------------------------------------------------------------------------

    def done(self, image_id: int) -> bool:
        return image_id in self.images or image_id in self.elsewhere

    def latency_records(self) -> list[tuple[dict[str, Any], Optional[dict[str, Any]], bool]]:
        """(result, measured_on, in this file) of the last latency line of this file and of
        each other file of the configuration."""
        own = [] if self.latency is None else [(self.latency, self.latency_measured_on, True)]
        return own + [(r, on, False) for r, on in self.beside_latency]

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
