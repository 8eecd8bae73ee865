"""Hyperband and Iterative Deepening Hyperband (Brandt, Wever, Iliadis, Bengs, Hüllermeier 2023)
as an ask/tell scheduler.

Hyperband(eta, r_min, R): s_max = floor(log_eta(R / r_min)), B = (s_max + 1) R; bracket s
(s_max .. 0) starts n = ceil((B / R) eta^s / (s + 1)) configurations at r = R eta^-s; rung i
(0 .. s) evaluates n_i = floor(n eta^-i) configurations at r_i = r eta^i and promotes the best
floor(n_i / eta).

``extend()`` raises R to eta R without discarding anything: every bracket keeps its r and its
configurations, its s grows by one, n is recomputed for the new s_max and only the missing
configurations are sampled; a bracket s = 0 at r = eta R is added, and the brackets run again.
Every result is cached per (configuration, budget), so no pair is ever evaluated twice. The
variants differ in how a rung promotes once earlier promotions exist:

- ``"eid"``: configurations already holding an r_{i+1} result stay promoted; the free slots go to
  the best of the rest;
- ``"cid"``: rank the rung plus every configuration of the bracket already holding an r_i result;
- ``"dcid"``: rank the rung only (the picks of Hyperband at eta R on the same configurations);
- ``"hb"``: plain Hyperband (no extension semantics needed; ranks the rung).

Why not an optuna pruner: optuna's ``HyperbandPruner`` fixes ``max_resource`` at the start,
assigns brackets by a crc32 hash of study name and trial number, keeps bracket state private
and cannot resume a pruned trial, so neither raising R nor reusing results is possible there.
This scheduler is standalone; workers call ``ask()`` whenever they are free and ``tell()`` when
done, in any order. ``optuna_adapter.OptunaJobRecorder`` stores every job as an optuna trial so
that any optuna storage (RDB, journal file, gRPC proxy) holds the results for many machines;
``IDHyperband.load_results`` seeds a new scheduler's cache from them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..frame import require_extra

require_extra("hpo", "numpy")

import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)

VARIANTS = ("hb", "eid", "cid", "dcid")


@dataclass(frozen=True)
class Job:
    """One evaluation to run: configuration ``config_id`` with ``params`` at ``budget``."""

    config_id: int
    params: dict
    budget: float
    bracket: int  # index of the bracket (its base budget r never changes)
    rung: int


def max_bracket(eta: int, r_min: float, max_budget: float) -> int:
    """s_max = floor(log_eta(R / r_min)), computed with integer powers (no log rounding)."""
    s = 0
    while r_min * eta ** (s + 1) <= max_budget * (1 + 1e-12):
        s += 1
    return s


def bracket_size(eta: int, s_max: int, s: int) -> int:
    """n = ceil((B / R) eta^s / (s + 1)) with B / R = s_max + 1, in exact integer arithmetic."""
    return -(-((s_max + 1) * eta**s) // (s + 1))


def hyperband_schedule(eta: int, r_min: float, max_budget: float) -> list[list[tuple[int, float]]]:
    """Per bracket s = s_max .. 0, the (n_i, r_i) of each rung."""
    s_max = max_bracket(eta, r_min, max_budget)
    plan = []
    for s in range(s_max, -1, -1):
        n, r = bracket_size(eta, s_max, s), max_budget / eta**s
        plan.append([(n // eta**i, r * eta**i) for i in range(s + 1)])
    return plan


@dataclass
class _Bracket:
    base_budget: float  # r
    s: int
    configs: list[int] = field(default_factory=list)
    rung: int = 0
    members: list[int] = field(default_factory=list)  # configurations of the current rung
    done: bool = False

    def budget(self, rung: int) -> float:
        return self.base_budget * self._eta**rung

    _eta: int = 3


class IDHyperband:
    """Hyperband with iterative deepening (``extend``) and a per-(configuration, budget) result cache.

    Args:
        sample_config: draws one configuration's params from a ``numpy.random.Generator``.
        eta: reduction factor (int >= 2, default 3).
        r_min: smallest budget (> 0, default 1).
        max_budget: R (>= eta * r_min, default 27).
        variant: ``"eid"`` (default), ``"cid"``, ``"dcid"`` or ``"hb"``.
        seed: seeds the configuration sampler.
    """

    def __init__(self, sample_config: Callable[[np.random.Generator], dict], eta: int = 3, r_min: float = 1.0,
                 max_budget: float = 27.0, variant: str = "eid", seed: int = 0):
        if int(eta) != eta or eta < 2:
            raise ValueError(f"eta={eta!r}: need an integer reduction factor >= 2")
        if not r_min > 0:
            raise ValueError(f"r_min={r_min!r}: the smallest budget must be > 0")
        if not max_budget >= eta * r_min:
            raise ValueError(f"max_budget={max_budget!r}: R must be >= eta * r_min = {eta * r_min}")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: expected one of {', '.join(VARIANTS)}")
        self.eta, self.r_min, self.max_budget, self.variant = int(eta), float(r_min), float(max_budget), variant
        self._sample = sample_config
        self._rng = np.random.default_rng(seed)
        self.params: list[dict] = []  # config_id -> params
        self.results: dict[tuple[int, float], float] = {}
        self.evaluated: list[tuple[int, float]] = []  # pairs evaluated through ask/tell, in tell order
        self._running: dict[tuple[int, float], Job] = {}
        self._queue: list[Job] = []
        self.brackets: list[_Bracket] = []
        self.s_max = max_bracket(self.eta, self.r_min, self.max_budget)
        for s in range(self.s_max, -1, -1):
            self._add_bracket(self.max_budget / self.eta**s, s)
        self._start_all()

    # -- construction -------------------------------------------------------------------
    def _new_config(self) -> int:
        self.params.append(dict(self._sample(self._rng)))
        return len(self.params) - 1

    def _add_bracket(self, base_budget: float, s: int) -> None:
        bracket = _Bracket(base_budget=base_budget, s=s, _eta=self.eta)
        bracket.configs = [self._new_config() for _ in range(bracket_size(self.eta, self.s_max, s))]
        self.brackets.append(bracket)

    def _start_all(self) -> None:
        self._picks: set[tuple[int, float]] = set()
        for index, bracket in enumerate(self.brackets):
            bracket.rung, bracket.done, bracket.members = 0, False, list(bracket.configs)
            self._picks.update((cid, bracket.base_budget) for cid in bracket.members)
            self._enqueue_rung(index)

    def extend(self) -> None:
        """R -> eta R: grow every bracket by one rung, add a bracket s = 0 at eta R, run the brackets again."""
        if self._running:
            raise ValueError(f"extend(): {len(self._running)} job(s) still running; tell their results first")
        self.max_budget *= self.eta
        self.s_max += 1
        for bracket in self.brackets:
            bracket.s += 1
            missing = bracket_size(self.eta, self.s_max, bracket.s) - len(bracket.configs)
            bracket.configs += [self._new_config() for _ in range(missing)]
        self._add_bracket(self.max_budget, 0)
        self._queue.clear()
        self._start_all()

    def load_results(self, results: Iterable[tuple[dict, float, float]]) -> int:
        """Seed the cache with (params, budget, loss) triples (e.g. from an optuna storage); returns how many matched."""
        index = {tuple(sorted(p.items())): cid for cid, p in enumerate(self.params)}
        matched = 0
        for params, budget, loss in results:
            cid = index.get(tuple(sorted(params.items())))
            if cid is not None:
                self.results[(cid, float(budget))] = float(loss)
                matched += 1
        self._queue.clear()
        self._start_all()
        return matched

    # -- the rung logic -----------------------------------------------------------------
    def _enqueue_rung(self, index: int) -> None:
        bracket = self.brackets[index]
        budget = bracket.budget(bracket.rung)
        for cid in bracket.members:
            if (cid, budget) not in self.results and (cid, budget) not in self._running:
                self._queue.append(Job(cid, self.params[cid], budget, index, bracket.rung))
        self._advance(index)

    def _advance(self, index: int) -> None:
        """Promote while the current rung is complete (cached results complete rungs at once)."""
        bracket = self.brackets[index]
        while not bracket.done:
            budget = bracket.budget(bracket.rung)
            if any((cid, budget) not in self.results for cid in bracket.members):
                return
            if bracket.rung == bracket.s:
                bracket.done = True
                return
            bracket.members = self._promote(bracket)
            bracket.rung += 1
            self._picks.update((cid, bracket.budget(bracket.rung)) for cid in bracket.members)
            budget = bracket.budget(bracket.rung)
            for cid in bracket.members:
                if (cid, budget) not in self.results and (cid, budget) not in self._running:
                    self._queue.append(Job(cid, self.params[cid], budget, index, bracket.rung))

    def _promote(self, bracket: _Bracket) -> list[int]:
        here, there = bracket.budget(bracket.rung), bracket.budget(bracket.rung + 1)
        keep = len(bracket.members) // self.eta

        def rank(candidates):  # by loss at r_i, ties by configuration id (deterministic)
            return sorted(candidates, key=lambda cid: (self.results[(cid, here)], cid))

        if self.variant == "eid":
            stay = [cid for cid in bracket.members if (cid, there) in self.results]
            rest = [cid for cid in rank(bracket.members) if (cid, there) not in self.results]
            return (stay + rest)[:keep] if len(stay) <= keep else rank(stay)[:keep]
        if self.variant == "cid":
            extra = [cid for cid in bracket.configs if cid not in bracket.members and (cid, here) in self.results]
            return rank(bracket.members + extra)[:keep]
        return rank(bracket.members)[:keep]  # "hb" and "dcid"

    # -- ask / tell ---------------------------------------------------------------------
    def ask(self) -> Job | None:
        """The next job, or None when every ready job is running (wait for a tell) or all brackets are done."""
        if not self._queue:
            return None
        job = self._queue.pop(0)
        self._running[(job.config_id, job.budget)] = job
        return job

    def tell(self, job: Job, loss: float) -> None:
        key = (job.config_id, job.budget)
        if self._running.get(key) != job:
            raise ValueError(f"tell(): job {job.config_id}@{job.budget:g} is unknown or was already told")
        loss = float(loss)
        if math.isnan(loss):
            logger.warning("loss of configuration %d at budget %g is NaN; recorded as +inf", job.config_id, job.budget)
            loss = math.inf
        del self._running[key]
        self.results[key] = loss
        self.evaluated.append(key)
        self._advance(job.bracket)

    @property
    def finished(self) -> bool:
        return not self._queue and not self._running and all(b.done for b in self.brackets)

    @property
    def cost(self) -> float:
        """Sum of the budgets evaluated through ask/tell."""
        return float(sum(budget for _, budget in self.evaluated))

    def incumbent(self) -> tuple[int, dict, float] | None:
        """(config_id, params, loss) of the best result at the largest budget evaluated so far."""
        if not self.results:
            return None
        top = max(budget for _, budget in self.results)
        cid, loss = min(((c, v) for (c, b), v in self.results.items() if b == top), key=lambda t: (t[1], t[0]))
        return cid, self.params[cid], loss

    def picks(self) -> set[tuple[int, float]]:
        """The (configuration, budget) pairs of the current run's rungs (for comparing variants)."""
        return set(self._picks)


class Hyperband(IDHyperband):
    """Plain Hyperband (Li et al. 2018) with the same ask/tell interface (variant ``"hb"``)."""

    def __init__(self, sample_config: Callable[[np.random.Generator], dict], eta: int = 3, r_min: float = 1.0,
                 max_budget: float = 27.0, seed: int = 0):
        super().__init__(sample_config, eta=eta, r_min=r_min, max_budget=max_budget, variant="hb", seed=seed)


def run_sequential(scheduler: IDHyperband, objective: Callable[[dict, float], float]) -> None:
    """Drive ``scheduler`` to the end with one worker: ask, evaluate, tell."""
    while (job := scheduler.ask()) is not None:
        scheduler.tell(job, objective(job.params, job.budget))
    if not scheduler.finished:
        raise RuntimeError("scheduler stopped with unfinished brackets")


__all__ = ["Hyperband", "IDHyperband", "Job", "VARIANTS", "hyperband_schedule", "max_bracket", "bracket_size",
           "run_sequential"]
