"""Choosing where to cut a chain of units into stages.

Owns the cut rule: :func:`choose_cuts` is what every caller that needs cut points (the
wrapper, stage-only loading, ``asyncgen plan``, the GPU check, the support matrix) asks;
:func:`balanced_cuts` is the balancing it applies to per-unit costs. For a schedule in which
some units skip some steps (a step cache composed with stages: DeepCache's deep units run
one step in ``interval``), :func:`composed_cuts` chooses the cuts that minimise the whole
schedule's time given which units run on which steps, :func:`composed_schedule_time` is
that time for given cuts, and :func:`choose_composed_cuts` applies it to a split's unit
costs.
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


def _step_kinds(runs: Sequence[Sequence[bool]], n: int) -> list[tuple[int, tuple[bool, ...]]]:
    """Identical steps grouped: ``(how many steps, which units run)``, in order of first appearance."""
    kinds: dict[tuple[bool, ...], int] = {}
    for step, row in enumerate(runs):
        row = tuple(bool(x) for x in row)
        if len(row) != n:
            raise ValueError(f"runs[{step}] names {len(row)} units, the costs {n}: give one flag per unit")
        kinds[row] = kinds.get(row, 0) + 1
    return [(count, row) for row, count in kinds.items()]


def composed_schedule_time(costs: Sequence[float], runs: Sequence[Sequence[bool]], cuts: Sequence[int]) -> float:
    """Compute time of the asynchronous steps ``runs`` with stages at ``cuts``: per step, the slowest stage's work.

    ``runs[t][u]`` says whether unit ``u`` runs on step ``t``. In an asynchronous step
    every stage works at once, so a step lasts as long as its busiest stage, counting only
    the units that run on that step; a stage none of whose units run that step idles.
    (Exact warm-up steps run the units one after the other whatever the cuts: they are not
    in ``runs``.) Communication is not counted.
    """
    n = len(costs)
    total = 0.0
    for count, row in _step_kinds(runs, n):
        total += count * max(sum(c for c, r in zip(costs[a:b], row[a:b]) if r) for a, b in zip(cuts[:-1], cuts[1:]))
    return total


def composed_cuts(costs: Sequence[float], runs: Sequence[Sequence[bool]], stages: int) -> list[int]:
    """Cut points ``[0, c_1, ..., n]`` minimising :func:`composed_schedule_time` over all cuts into ``stages`` stages.

    With every unit running on every step this is :func:`balanced_cuts`' bottleneck times
    the step count. When units skip steps the objective is a sum over kinds of step of each
    kind's bottleneck, which a bottleneck DP cannot minimise; the DP here keeps, for each
    prefix of units and number of stages, the Pareto front of per-kind bottlenecks (a
    front entry no other entry beats in every kind), which is exact. The result is
    deterministic (among equal entries of a front, and among equally good final entries,
    the earliest cuts win), so every rank computes the same cuts.
    """
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages > n:
        raise ValueError(f"cannot split {n} units into {stages} stages: stages must be between 1 and {n}")
    kinds = _step_kinds(runs, n)
    if not kinds:
        raise ValueError("runs is empty: give at least one step's flags")
    # per kind, prefix sums of the costs of the units that run on steps of that kind
    prefix = []
    for _, row in kinds:
        acc = [0.0]
        for c, r in zip(costs, row):
            acc.append(acc[-1] + (float(c) if r else 0.0))
        prefix.append(acc)
    weights = [count for count, _ in kinds]

    def add_front(front: list, vector: tuple, cuts: tuple) -> None:
        for i, (v, c) in enumerate(front):
            if all(a <= b for a, b in zip(v, vector)) and (v != vector or c <= cuts):
                return  # dominated (or equal with earlier cuts)
        front[:] = [(v, c) for v, c in front if not all(a <= b for a, b in zip(vector, v))]
        front.append((vector, cuts))

    # fronts[i]: for the first i units in k runs (k the loop's), entries (per-kind bottlenecks, cuts so far)
    fronts: list[list] = [[] for _ in range(n + 1)]
    fronts[0] = [(tuple(0.0 for _ in kinds), (0,))]
    for k in range(1, stages + 1):
        new: list[list] = [[] for _ in range(n + 1)]
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                for vector, cuts in fronts[j]:
                    stage = tuple(p[i] - p[j] for p in prefix)
                    add_front(new[i], tuple(max(a, b) for a, b in zip(vector, stage)), cuts + (i,))
        fronts = new
    best = min(fronts[n], key=lambda entry: (round(sum(w * v for w, v in zip(weights, entry[0])), 12), entry[1]))
    return list(best[1])


def choose_composed_cuts(split: "DenoiserSplit", stages: int, runs: Sequence[Sequence[bool]],
                         method: str = "flops", *, inputs: dict | None = None) -> list[int]:
    """:func:`composed_cuts` on ``split``'s unit costs (``"flops"`` counted on shapes, or ``"time"`` measured here).

    ``runs[t][u]``: whether unit ``u`` runs on asynchronous step ``t`` (for DeepCache,
    :func:`asyncgen.runtime.deep_cache.deep_cache_runs`). Unlike :func:`choose_cuts` it
    broadcasts nothing: with ``"time"`` in a process group, time on one rank and pass the cuts.
    """
    from asyncgen.cost.estimate import estimate_unit_costs, measure_unit_costs

    if method not in ("flops", "time"):
        raise ValueError(f"method={method!r}: composed cuts are chosen from 'flops' or 'time' unit costs")
    costs = estimate_unit_costs(split, inputs) if method == "flops" else measure_unit_costs(split, inputs)
    return composed_cuts(costs, runs, stages)
