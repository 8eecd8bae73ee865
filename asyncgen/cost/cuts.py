"""Choosing where to cut a chain of units into stages.

Owns the cut rule: :func:`choose_cuts` is what every caller that needs cut points (the
wrapper, stage-only loading, ``asyncgen plan``, the GPU check, the support matrix) asks;
:func:`balanced_cuts` is the balancing it applies to per-unit costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from asyncgen.comm.context import DistContext
    from asyncgen.split.units import DenoiserSplit

# "flops": counted on shapes (the same on every rank, on meta weights too); "time": measured on rank 0 and
# broadcast; "even": the same number of units per stage (no cost model: for checks that need any valid cut)
CUT_METHODS = ("flops", "time", "even")
CutMethod = Union[str, Sequence[int]]


def choose_cuts(split: "DenoiserSplit", stages: int, method: CutMethod = "flops", *, inputs: dict | None = None,
                ctx: "DistContext | None" = None) -> list[int]:
    """Cut points ``[0, c_1, ..., n]`` splitting ``split``'s ``n`` units into ``stages`` stages.

    ``method`` is one of :data:`CUT_METHODS` or the cut points themselves (checked).
    ``inputs`` are the example inputs the costs are counted or timed on (the split's own
    example by default). With ``method="time"`` in a process group (``ctx``), rank 0 times
    the units and every rank takes its cuts, since timings differ per rank and all ranks
    must cut at the same place.
    """
    from asyncgen.cost.estimate import estimate_unit_costs, measure_unit_costs

    n = len(split.units)
    if not 1 <= stages <= n:
        raise ValueError(
            f"stages={stages} is more than the {n} units a {type(split.denoiser).__name__} of this "
            f"configuration splits into; choose stages between 1 and {n}" if stages > n else
            f"stages={stages}: choose stages between 1 and {n}"
        )
    if not isinstance(method, str):
        cuts = [int(c) for c in method]
        if len(cuts) != stages + 1:
            raise ValueError(f"split={list(method)} gives {len(cuts) - 1} stages, expected {stages}")
        return cuts
    if method not in CUT_METHODS:
        raise ValueError(f"split={method!r} is not one of {', '.join(map(repr, CUT_METHODS))} or a list of cut indices")
    if stages == 1:
        return [0, n]  # nothing to balance: skip the cost estimate (seconds on large models)
    if method == "even":
        return [round(k * n / stages) for k in range(stages + 1)]
    if method == "flops":
        return balanced_cuts(estimate_unit_costs(split, inputs), stages)
    distributed = ctx is not None and ctx.distributed
    cuts = torch.zeros(stages + 1, dtype=torch.int64)
    if not distributed or ctx.rank == 0:
        if ctx is not None and ctx.device is not None:
            # timed where it will run (the pipeline moves there later): on the CPU an SDXL
            # takes minutes while the other ranks wait, and gives the CPU's cuts
            split.denoiser.to(ctx.device)
        cuts = torch.tensor(balanced_cuts(measure_unit_costs(split, inputs), stages), dtype=torch.int64)
    if distributed:
        from asyncgen.comm.p2p import control_device

        cuts = cuts.to(control_device(dist.get_backend(ctx.group), ctx.device))
        dist.broadcast(cuts, ctx.global_rank(0), group=ctx.group)
    return cuts.tolist()


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
