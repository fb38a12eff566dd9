"""Small markdown pieces every report uses: tables and number formatting."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant places (scientific when tiny or huge),
    None/NaN as an em dash, everything else as str."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value == 0:
            return "0"
        if abs(value) < 10 ** -(digits) or abs(value) >= 10 ** 6:
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
          align: Optional[str] = None, digits: int = 3) -> str:
    """A GitHub markdown table. align: one letter per column, l / r / c (default: numbers
    right, text left, decided from the first row)."""
    if align is None:
        first = rows[0] if rows else [""] * len(headers)
        align = "".join("r" if isinstance(v, (int, float)) and not isinstance(v, bool)
                        else "l" for v in first)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        cells = [fmt(v, digits).replace("|", "\\|").replace("\n", " ") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
