"""FedAST (Askin, Sharma, Joe-Wong, Joshi, "FedAST: Federated Asynchronous Simultaneous
Training", UAI 2024): several models trained at once on one client pool, each asynchronously with a
buffer, and the pool's capacity moved toward the models whose updates are noisiest.

M models share N clients; a client runs one job at a time; R jobs are in flight in all. Task m
holds a quota R_m of them (ΣR_m = R) and a buffer of b_m = max(1, ceil(R_m/g)) results. A task-m
result enters its buffer; once the buffer holds ≥ b_m results, w_m ← w_m + η_g·mean(buffer). Then
up to two jobs start: for task m while it has fewer than R_m in flight, else (its quota shrank, or
it is finished) for the task furthest below its quota. Every P = ⌊0.75R⌋·M_active arrivals the
quotas are reallocated: v_m = Σ_k ‖Δ_k − Δ̄‖² / (n·‖Δ̄‖²) over task m's last n = 8 deltas, and
R_m ∝ v_m in multiples of g with at least g per unfinished task (:func:`allocate_quotas`). A task
declared finished (:meth:`FedAST.finish`, e.g. when it reaches its target) releases its quota at
once; its jobs still in flight come back and are dropped.

Baselines (issue 12): ``async-st`` (b_m = 1, no reallocation), ``fedast-static`` (buffers as
above, no reallocation) — both re-split R equally over the unfinished tasks when one finishes —
and ``sync-st`` (:class:`SyncST`): the clients split equally over the tasks and each task runs
FedAvg rounds of R/M clients of its share, all tasks concurrently.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import torch

from ..frame import CatalogueError
from .strategy import Actions, Strategy, Task

#: how many of a task's latest deltas its variance v_m is computed from (the issue's 8)
VARIANCE_WINDOW = 8
#: reallocation period P = ⌊PERIOD_FACTOR·R⌋ · M_active arrivals (the issue's 0.75)
PERIOD_FACTOR = 0.75
#: at most this many jobs start per arrival (the issue's "≤ 2": lets a grown quota fill up)
STARTS_PER_ARRIVAL = 2


def check_tasks(num_tasks: int, in_flight: int, granularity: int) -> None:
    """The one-line errors for M, g and R."""
    if num_tasks <= 0:
        raise CatalogueError(f"M={num_tasks}: need at least one task")
    if not (isinstance(granularity, int) and granularity > 0):
        raise CatalogueError(f"g={granularity}: the quota granularity must be an integer >= 1")
    if in_flight < granularity * num_tasks:
        raise CatalogueError(f"R={in_flight}: must be >= g·M = {granularity}·{num_tasks} = "
                             f"{granularity * num_tasks} (every task holds at least g jobs)")
    if in_flight % granularity:
        # ΣR_m = R with every R_m a multiple of g needs R to be one too (the issue leaves this implicit)
        raise CatalogueError(f"R={in_flight}: must be a multiple of g={granularity}")


def allocate_quotas(variances: Sequence[float], in_flight: int, granularity: int,
                    finished: Sequence[bool] | None = None) -> list[int]:
    """R_m ∝ v_m in multiples of g, ≥ g per unfinished task, 0 for finished ones, ΣR_m = R.

    In units of g: every unfinished task gets one unit, and the R/g − M_active spare units are
    apportioned ∝ v_m by largest remainders (ties to the lower task index). Variances that are
    all zero or not finite give an equal split. All tasks finished: all quotas 0.
    """
    num_tasks = len(variances)
    finished = list(finished) if finished is not None else [False] * num_tasks
    check_tasks(num_tasks, in_flight, granularity)
    active = [m for m in range(num_tasks) if not finished[m]]
    units = [0] * num_tasks
    if not active:
        return units
    spare = in_flight // granularity - len(active)
    weights = [float(variances[m]) for m in active]
    if not all(math.isfinite(v) and v >= 0 for v in weights) or sum(weights) <= 0:
        weights = [1.0] * len(active)
    total = sum(weights)
    shares = [spare * v / total for v in weights]
    floors = [math.floor(s) for s in shares]
    left = spare - sum(floors)
    by_remainder = sorted(range(len(active)), key=lambda k: (-(shares[k] - floors[k]), k))
    for rank, k in enumerate(by_remainder):
        units[active[k]] = 1 + floors[k] + (1 if rank < left else 0)
    return [u * granularity for u in units]


def buffer_sizes(quotas: Sequence[int], granularity: int) -> list[int]:
    """b_m = max(1, ceil(R_m/g))."""
    return [max(1, math.ceil(q / granularity)) for q in quotas]


def normalised_variance(deltas: Sequence[torch.Tensor]) -> float:
    """Σ_k ‖Δ_k − Δ̄‖² / (n·‖Δ̄‖²): the spread of a task's recent updates relative to their mean."""
    stack = torch.stack(list(deltas)).double()
    mean = stack.mean(0)
    denominator = len(deltas) * float(mean.pow(2).sum())
    return float((stack - mean).pow(2).sum()) / denominator if denominator > 0 else math.inf


class FedAST(Strategy):
    """Buffered asynchronous training of ``len(weights)`` models with variance-driven quotas.

    ``buffered=False`` is async-st (b_m = 1); ``reallocate=False`` keeps the equal split
    (fedast-static; with ``buffered=False`` too: async-st).
    """

    name = "fedast"

    def __init__(self, weights: list[torch.Tensor], num_clients: int, *, in_flight: int = 48, granularity: int = 4,
                 steps: int = 5, server_lr: float = 0.5, buffered: bool = True, reallocate: bool = True,
                 seed: int = 0):
        if not isinstance(weights, list) or not weights:
            raise CatalogueError(f"M={len(weights) if isinstance(weights, list) else weights}: "
                                 f"need a list of at least one model")
        check_tasks(len(weights), in_flight, granularity)
        super().__init__(weights, num_clients, steps=steps, server_lr=server_lr, seed=seed)
        if in_flight > num_clients:
            raise CatalogueError(f"R={in_flight}: cannot exceed the number of clients N={num_clients} "
                                 f"(one job per client at a time)")
        self.in_flight, self.granularity = in_flight, granularity
        self.buffered, self.reallocate = buffered, reallocate
        m = len(self.models)
        self.finished = [False] * m
        self.quotas = allocate_quotas([1.0] * m, in_flight, granularity)
        self.running = [0] * m  # jobs in flight per task
        self.assigned: dict[int, int] = {}  # client -> task of its job
        self.sums = [torch.zeros_like(w) for w in self.models]  # buffered deltas, summed in arrival order
        self.counts = [0] * m
        self.recent = [deque(maxlen=VARIANCE_WINDOW) for _ in range(m)]
        self.arrivals = 0  # since the last reallocation
        self.reallocations: list[list[int]] = []  # the quotas after each, for inspection
        self.dropped = 0  # results of finished tasks

    @property
    def buffer_sizes(self) -> list[int]:
        return buffer_sizes(self.quotas, self.granularity) if self.buffered else [1] * len(self.models)

    @property
    def period(self) -> int:
        """P = ⌊0.75R⌋·M_active arrivals between reallocations."""
        return math.floor(PERIOD_FACTOR * self.in_flight) * sum(not f for f in self.finished)

    # jobs -------------------------------------------------------------------------------
    def begin(self, now: float) -> Actions:
        start = []
        for m, quota in enumerate(self.quotas):
            chosen = self._random_idle(quota)
            self.busy.update(chosen)  # so the next task draws from the clients still idle
            for c in chosen:
                self.assigned[c] = m
            self.running[m] += len(chosen)
            start += chosen
        return Actions(start=start)

    def dispatch(self, client: int, now: float) -> Task:
        self.downloads += 1
        self.busy.add(client)
        m = self.assigned[client]
        return Task(client, self.versions[m], self.steps, self.models[m], model=m)

    def _fill(self, arrived_task: int) -> list[int]:
        """Start up to two jobs: for the arrived task while under quota, then for the tasks furthest below theirs."""
        started: list[int] = []
        order = sorted(range(len(self.models)), key=lambda k: (k != arrived_task, self.running[k] - self.quotas[k], k))
        for m in order:
            while (len(started) < STARTS_PER_ARRIVAL and not self.finished[m] and self.running[m] < self.quotas[m]
                   and sum(self.running) < self.in_flight):
                chosen = self._random_idle(1)
                if not chosen:
                    return started
                self.busy.add(chosen[0])
                self.assigned[chosen[0]] = m
                self.running[m] += 1
                started += chosen
        return started

    # results ----------------------------------------------------------------------------
    def on_update(self, client, delta, base_version, q, now) -> Actions:
        self._received(client, delta)
        m = self.assigned.pop(client)
        self.running[m] -= 1
        if self.finished[m]:
            self.dropped += 1
        elif delta is not None:
            self.sums[m] = self.sums[m] + delta
            self.counts[m] += 1
            self.recent[m].append(delta)
            if self.counts[m] >= self.buffer_sizes[m]:
                self.models[m] = self.models[m] + self.server_lr * (self.sums[m] / self.counts[m])
                self.versions[m] += 1
                self.sums[m] = torch.zeros_like(self.models[m])
                self.counts[m] = 0
            self.arrivals += 1
            if self.reallocate and self.arrivals >= self.period:
                self._reallocate()
        return Actions(start=self._fill(m))

    def variances(self) -> list[float]:
        """v_m of every task from its recent deltas (nan while a task has fewer than two)."""
        return [normalised_variance(r) if len(r) >= 2 else math.nan for r in self.recent]

    def _reallocate(self) -> None:
        self.arrivals = 0
        active = [m for m in range(len(self.models)) if not self.finished[m]]
        v = self.variances() if self.reallocate else [1.0] * len(self.models)
        if any(math.isnan(v[m]) for m in active):  # too few results to compare: keep an equal split
            v = [1.0] * len(self.models)
        self.quotas = allocate_quotas(v, self.in_flight, self.granularity, self.finished)
        self.reallocations.append(list(self.quotas))

    def finish(self, task: int) -> None:
        """Task ``task`` is done (e.g. reached its target): drop its buffer and release its quota now."""
        if self.finished[task]:
            return
        self.finished[task] = True
        self.sums[task] = torch.zeros_like(self.models[task])
        self.counts[task] = 0
        self._reallocate()


class SyncST(Strategy):
    """sync-st: the N clients split equally over the M tasks; each task runs FedAvg rounds of
    ``cohort`` clients drawn from its share (w_m ← w_m + η_g·Σ_S p_iΔ_i/Σ_S p_i), all tasks at once."""

    name = "sync-st"

    def __init__(self, weights: list[torch.Tensor], num_clients: int, *, cohort: int, steps: int,
                 client_weights: Sequence[float], server_lr: float = 0.5, max_rounds: int | None = None,
                 seed: int = 0):
        if not isinstance(weights, list) or not weights:
            raise CatalogueError("M=0: need a list of at least one model")
        super().__init__(weights, num_clients, steps=steps, server_lr=server_lr, seed=seed)
        m = len(self.models)
        if num_clients < m:
            raise CatalogueError(f"N={num_clients}: fewer clients than tasks M={m}")
        share = num_clients // m
        if not 1 <= cohort <= share:
            raise CatalogueError(f"cohort={cohort}: must be in [1, N/M = {share}]")
        if len(client_weights) != num_clients:
            raise CatalogueError(f"client_weights has {len(client_weights)} entries for N={num_clients}")
        order = self.rng.permutation(num_clients)
        self.shares = [sorted(int(c) for c in order[k * share:(k + 1) * share]) for k in range(m)]
        self.task_of = {c: k for k, members in enumerate(self.shares) for c in members}
        self.cohort, self.max_rounds = cohort, max_rounds
        self.p = [float(v) for v in client_weights]
        self.results: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(m)]

    def begin(self, now: float) -> Actions:
        actions = Actions()
        for m in range(len(self.models)):
            actions += self._round(m)
        return actions

    def _round(self, m: int) -> Actions:
        if self.max_rounds is not None and self.versions[m] >= self.max_rounds:
            return Actions()
        members = self.shares[m]
        chosen = [members[j] for j in self.rng.choice(len(members), size=self.cohort, replace=False)]
        self.results[m] = []
        return Actions(start=chosen)

    def dispatch(self, client: int, now: float) -> Task:
        self.downloads += 1
        self.busy.add(client)
        m = self.task_of[client]
        return Task(client, self.versions[m], self.steps, self.models[m], model=m)

    def on_update(self, client, delta, base_version, q, now) -> Actions:
        self._received(client, delta)
        m = self.task_of[client]
        self.results[m].append((client, delta))
        if len(self.results[m]) < self.cohort:
            return Actions()
        total = sum(self.p[c] for c, _ in self.results[m])
        step = sum(self.p[c] * d for c, d in self.results[m]) / total
        self.models[m] = self.models[m] + self.server_lr * step
        self.versions[m] += 1
        return self._round(m)


__all__ = ["FedAST", "SyncST", "allocate_quotas", "buffer_sizes", "normalised_variance", "check_tasks"]
