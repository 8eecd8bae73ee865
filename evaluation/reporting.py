"""Results as files: JSON written atomically, and Markdown tables."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from asyncgen.cli.files import write_atomic, write_image  # noqa: F401  (the writers evaluation shares with the CLI)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """``data`` as the JSON text :func:`write_json` writes (inf and nan as strings)."""
    return json.dumps(_jsonable(data), indent=2) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_atomic(path, json_text(data))


def markdown_table(rows: Sequence[dict], columns: Sequence[str], formats: dict[str, str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts) with the given columns, in order."""
    formats = formats or {}

    def cell(row, col):
        value = row.get(col, "")
        fmt = formats.get(col)
        return format(value, fmt) if fmt and isinstance(value, (int, float)) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
