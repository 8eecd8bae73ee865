"""Results as files: JSON written atomically, and Markdown tables."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_image(path: str | os.PathLike, image) -> Path:
    """Save a PIL image whole or not at all, in the format its suffix names (PNG without one)."""
    import io

    buffer = io.BytesIO()
    suffix = Path(path).suffix.lower().lstrip(".") or "png"
    image.save(buffer, format={"jpg": "jpeg"}.get(suffix, suffix))
    return write_atomic(path, buffer.getvalue())


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_atomic(path, json.dumps(_jsonable(data), indent=2) + "\n")


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
