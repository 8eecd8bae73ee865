"""Prompt sets: the built-in set for the miniature model (a user's file is read by ``asyncgen.cli.files``)."""

from __future__ import annotations

import numpy as np

from . import shapes

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
