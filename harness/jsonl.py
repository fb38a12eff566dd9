"""The append-only JSON-lines files that long runs save into as they go (harness.eval.store's
per-image records, harness.sensitivity.store's measured APs): a header line naming what every
record depends on, then one record per line, each write flushed and fsynced.

Reading one back keeps it only when its header is the one asked for: another run's file is
moved aside as `<name>.stale` (with a warning) rather than mixed in, and a last line cut short
by a kill is cut off the file.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from harness.errors import UserError


def write_lines(path: Path, records: list[dict[str, Any]], truncate: bool = False) -> None:
    """Append `records` (or start the file with them) in one write, flushed and fsynced."""
    write_bytes(path, b"".join(encode_line(r) for r in records), truncate)


def encode_line(record: dict[str, Any]) -> bytes:
    """One record as the line the files hold."""
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


def write_bytes(path: Path, data: bytes, truncate: bool = False) -> None:
    """Append already encoded lines (or start the file with them) in one write, flushed and
    fsynced."""
    with open(path, "wb" if truncate else "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_own(path: Path, header: dict[str, Any], *, made_by: str, redo: str
             ) -> tuple[Optional[list[dict[str, Any]]], bool]:
    """(the records after `header`, whether a torn last line was cut off) of the file at
    `path`; (None, …) when it belongs to another header — then it is moved aside as
    `<name>.stale` and the warning says it was written for another `made_by` — or is empty.
    A line that is not JSON is a UserError telling the user to delete the file to `redo`."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    torn = end < len(data)
    lines = data[:end].splitlines()
    try:
        first = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        first = None
    if first != header:
        if lines:  # another run's file: keep it aside rather than mix the two
            stale = path.with_name(path.name + ".stale")
            os.replace(path, stale)
            warnings.warn(f"{path.name} was written for another {made_by}; moved it to "
                          f"{stale.name} and started over", stacklevel=3)
        return None, torn
    records = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path} is damaged at line {number} (not JSON); delete it to "
                            f"{redo}") from None
    if torn:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return records, torn
