"""Prompt sets: the built-in set for the miniature model, and a user's text or CSV file."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from . import shapes

PROMPT_COLUMNS = ("prompt", "caption", "text")


def miniature_prompts(count: int | None = None, seed: int = 0) -> list[str]:
    """Captions of the shapes data set: every combination of size, shape, colour and background (180).

    ``count`` picks that many of them, without repeats, by a permutation seeded with ``seed``.
    """
    prompts = shapes.all_captions()
    if count is None:
        return prompts
    if not 1 <= count <= len(prompts):
        raise ValueError(f"count={count} must be between 1 and {len(prompts)} (the number of distinct captions)")
    order = np.random.default_rng(seed).permutation(len(prompts))[:count]
    return [prompts[i] for i in sorted(order)]


def load_prompts(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """The prompts in a ``.txt`` file (one per line; blank lines skipped) or a ``.csv`` file.

    For CSV, ``column`` names the column of prompts; by default the first header among
    ``prompt``, ``caption`` and ``text`` (in any case). Empty cells are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            headers = reader.fieldnames or []
            if column is None:
                lower = {h.strip().lower(): h for h in headers}
                column = next((lower[c] for c in PROMPT_COLUMNS if c in lower), None)
                if column is None:
                    raise ValueError(f"{path} has no column named one of {list(PROMPT_COLUMNS)} "
                                     f"(headers: {headers}); pass column= to choose one")
            elif column not in headers:
                raise ValueError(f"column={column!r} is not a header of {path}; headers: {headers}")
            prompts = [(row.get(column) or "").strip() for row in reader]
    else:
        raise ValueError(f"{path} has suffix {path.suffix!r}; prompt files must be .txt (one prompt per line) or .csv")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts
