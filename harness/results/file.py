"""The results file: one section per command, read and written whole, versioned."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from harness.errors import UserError
from harness.results.base import Schema, atomic_write_text
from harness.results.coco import CocoResult
from harness.results.compare import CompareResult
from harness.results.sensitivity import SensitivityResult

RESULTS_NAME = "results.json"
# 2: compare targets gained status / ties / settings / non-finite fields, coco rows their
# latency stability (harness 0.2). Version-1 files are refused: re-run the command.
SCHEMA_VERSION = 2


@dataclass
class ExperimentSection(Schema):
    """Which experiment file the commands ran from, and its [gates] table verbatim."""

    name: str
    path: str
    gates: Optional[dict[str, Any]] = None


@dataclass
class Results(Schema):
    """The whole results.json: a section per command that wrote into the folder."""

    schema: int = SCHEMA_VERSION
    experiment: Optional[ExperimentSection] = None
    compare: Optional[CompareResult] = None
    coco: Optional[CocoResult] = None
    sensitivity: Optional[SensitivityResult] = None


SECTIONS = {"experiment": ExperimentSection, "compare": CompareResult, "coco": CocoResult,
            "sensitivity": SensitivityResult}


def read_results(path: Union[str, Path], missing_ok: bool = False) -> Results:
    """The results file at `path` (or in that folder). A missing file is a UserError, or an
    empty Results with `missing_ok`; a corrupt file or one of another schema version is a
    UserError that says what to do."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_NAME
    try:
        text = p.read_text()
    except FileNotFoundError:
        if missing_ok:
            return Results()
        raise UserError(f"results file {p} does not exist; run the harness command that "
                        "writes it first") from None
    except OSError as exc:
        raise UserError(f"results file {p} cannot be read: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"results file {p} is not valid JSON ({exc}); delete it or point to "
                        "another report folder") from None
    if not isinstance(doc, dict) or "schema" not in doc:
        raise UserError(f"results file {p} is not a harness results document (no 'schema')")
    if doc["schema"] != SCHEMA_VERSION:
        raise UserError(f"results file {p} has schema {doc['schema']!r}; this harness reads "
                        f"schema {SCHEMA_VERSION}: run the command again to rewrite it")
    return Results.from_json(doc)


def write_section(out: Union[str, Path], section: str, value: Schema,
                  experiment: Optional[ExperimentSection] = None) -> Path:
    """`out`/results.json with `section` replaced (the others kept, unless the file is of
    another schema version: then it starts afresh), and the experiment section when given.
    Atomic: an interrupted write never leaves half a file."""
    path = Path(out) / RESULTS_NAME
    try:
        results = read_results(path, missing_ok=True)
    except UserError:
        results = Results()  # another version or a broken file: this command's section wins
    if experiment is not None:
        results.experiment = experiment
    setattr(results, section, value)
    atomic_write_text(path, json.dumps(results.to_json(), indent=1) + "\n")
    return path
