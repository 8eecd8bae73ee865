"""Choosing where to cut a chain of units into stages.

Owns the balanced-cuts rule; every caller that needs cut points (the wrapper, stage-only
loading, ``asyncgen plan``, the GPU check, the support matrix) asks here.
"""

from __future__ import annotations

from typing import Sequence


def balanced_cuts(costs: Sequence[float], stages: int) -> list[int]:
    """Cut points splitting ``costs`` into ``stages`` contiguous non-empty runs.

    Minimises the most expensive run (the pipeline's bottleneck), by dynamic
    programming; among equally good splits the earliest cuts win, so the result is
    deterministic. Returns ``stages + 1`` indices starting with 0 and ending with
    ``len(costs)``.
    """
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages > n:
        raise ValueError(f"cannot split {n} units into {stages} stages: stages must be between 1 and {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal bottleneck splitting the first i units into k runs
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12 * max(1.0, abs(value)):
                    best[k][i], choice[k][i] = value, j
    cuts, i = [n], n
    for k in range(stages, 0, -1):
        i = choice[k][i]
        cuts.append(i)
    return cuts[::-1]
