"""The one exception type for mistakes the user can fix (bad paths, mismatched inputs).

The CLI prints such an error as a single line and exits non-zero; anything else is a bug and
keeps its traceback (with --debug).
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): how a
    library's multi-line error becomes one line the user reads."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
