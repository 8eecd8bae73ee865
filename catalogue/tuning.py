"""The catalogue's tuning protocol (issue 24, §1) for experiments outside the federated family: every arm gets
the same grid of hyperparameter values and the same tuning seeds (>= 100, never an evaluation seed), and the
grid's best value on those seeds becomes the arm's committed default.

The federated family runs the same protocol with its own η_g search (a geometric grid re-centred once at an
edge, ``federated/experiments.py``); this module is the plain case: a fixed, finite grid searched in full.

What an experiment supplies: its arms, the grid (one list of values per hyperparameter; every arm searches the
same product), its tuning seeds and ``score(arm, params, seed) -> float`` (higher is better). What it gets back is
what ``tuning.json`` and ``results.json`` record under ``tuning``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

from .frame import CatalogueError

TUNING_SEED_FLOOR = 100  # evaluation seeds are 0..k-1 (k <= 100 in every experiment); tuning starts here


def check_tune_seeds(seeds: Sequence[int]) -> list[int]:
    """The tuning seeds as ints; a seed below 100 (an evaluation seed's range) is refused."""
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < TUNING_SEED_FLOOR for s in seeds):
        raise CatalogueError(f"tune_seeds={seeds}: tuning runs only on seeds >= {TUNING_SEED_FLOOR} "
                             f"(evaluation seeds are 0..k-1)")
    return seeds


def grid_points(grid: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the grid's values, first parameter slowest, each list in its given order."""
    names = list(grid)
    for name, values in grid.items():
        if not values:
            raise CatalogueError(f"tuning grid for {name} is empty: give at least one value")
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def point_label(params: Mapping) -> str:
    """``lr=0.05,momentum=0.9``: a grid point as a JSON key."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def grid_search(arms: Sequence[str], grid: Mapping[str, Sequence], seeds: Sequence[int],
                score: Callable[[str, dict, int], float], criterion: str, progress=None) -> dict:
    """Search ``grid`` in full for every arm on ``seeds``; the best mean score wins.

    Ties (equal means) go to the earlier grid point, so a grid listed from the most conservative value (the
    smallest step) picks that one. A NaN score counts as the worst. Returns ``{arm: params, "grid": {arm: grid},
    "seeds": seeds, "scores": {arm: {label: mean}}, "criterion": criterion}``.
    """
    seeds = check_tune_seeds(seeds)
    points = grid_points(grid)
    if progress is not None:
        progress.set_total(len(arms) * len(points) * len(seeds))
    chosen, scores = {}, {}
    for arm in arms:
        means = []
        for params in points:
            values = []
            for seed in seeds:
                values.append(float(score(arm, dict(params), seed)))
                if progress is not None:
                    progress.update()
            means.append(math.fsum(values) / len(values))
        rank = [m if math.isfinite(m) else -math.inf for m in means]
        best = max(range(len(points)), key=lambda i: (rank[i], -i))
        chosen[arm] = dict(points[best])
        scores[arm] = {point_label(p): m for p, m in zip(points, means)}
    return {**chosen, "grid": {arm: {k: list(v) for k, v in grid.items()} for arm in arms}, "seeds": seeds,
            "scores": scores, "criterion": criterion}
