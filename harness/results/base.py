"""The base of the results schema: JSON in and out of dataclasses, and where a value came from.
`from_json` is tolerant: a key a file lacks becomes None and is remembered, so a reader that
needs it (a gate) can name exactly which field is missing (`Missing`) instead of skipping.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Union

from harness.errors import UserError


class Missing(UserError):
    """A field a reader needs is absent (or null) in a results file; `field` is its path,
    e.g. `compare.targets[1].detections.match_rate`."""

    def __init__(self, path: str, why: str = "missing"):
        super().__init__(f"{path} is {why}")
        self.field = path


class Schema:
    """Base of every results dataclass: JSON in and out, and where a value came from."""

    _path: str = ""
    _missing: frozenset = frozenset()

    def to_json(self) -> dict[str, Any]:
        return _clean({f.name: _to_json(getattr(self, f.name))
                       for f in dataclasses.fields(self)})  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, value: Any, path: str = ""):
        """An instance from its JSON form; `path` names where it sits in the file (for the
        messages of `need`)."""
        return _from_json(cls, value, path)

    def need(self, name: str) -> Any:
        """The value of field `name`; Missing (naming the field's path) when the file lacked
        it or it is null."""
        where = f"{self._path}.{name}" if self._path else name
        if name in self._missing:
            raise Missing(where)
        value = getattr(self, name)
        if value is None:
            raise Missing(where, "null")
        return value


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


def _to_json(value: Any) -> Any:
    if isinstance(value, Schema):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


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


def _from_json(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise UserError(f"results: {path or cls.__name__} must be an object, got "
                        f"{type(value).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    missing = []
    for f in dataclasses.fields(cls):
        where = f"{path}.{f.name}" if path else f.name
        if f.name in value:
            kwargs[f.name] = _convert(hints[f.name], value[f.name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = None
            missing.append(f.name)
    obj = cls(**kwargs)
    obj._path = path
    obj._missing = frozenset(missing)
    return obj


def _convert(hint: Any, value: Any, path: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin is Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value, path) if len(inner) == 1 else value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(hint)
        return {k: _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Schema):
        return hint.from_json(value, path)
    return value
