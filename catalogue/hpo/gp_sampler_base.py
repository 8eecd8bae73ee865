"""What AEGiS and its GP baselines share as optuna samplers: the relative search space (float and
int parameters of every trial), Latin-hypercube start-up trials, the unit-cube encoding, and a
GP fit on the study's COMPLETE trials whose hyperparameters are refitted every ``refit_every``
results and warm-started in between.

Like every optuna sampler, these keep no study state of their own: each proposal reads the
trials from the study, so any storage and any number of worker processes work (each process
may keep its own cache of GP hyperparameters, which changes speed, not correctness). Randomness
comes from a generator seeded by (seed, trial number), so a proposal does not depend on which
process makes it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from ..frame import require_extra

require_extra("hpo", "optuna", "botorch", "torch")

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.samplers import BaseSampler, RandomSampler  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from .gp import DTYPE, FittedGP, fit_gp, hyperparameters_of  # noqa: E402


def _numeric(distribution: BaseDistribution) -> bool:
    return isinstance(distribution, (FloatDistribution, IntDistribution)) and not distribution.single()


def to_unit(value: float, distribution) -> float:
    low, high = distribution.low, distribution.high
    if distribution.log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def from_unit(u: float, distribution) -> float:
    u = min(1.0, max(0.0, float(u)))
    low, high = distribution.low, distribution.high
    value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if distribution.log else low + u * (high - low)
    if isinstance(distribution, IntDistribution):
        step = distribution.step
        value = low + round((value - low) / step) * step
        return int(min(high, max(low, value)))
    if distribution.step is not None:
        value = low + round((value - low) / distribution.step) * distribution.step
    return float(min(high, max(low, value)))


class GPSamplerBase(BaseSampler):
    """Base class: subclasses implement ``propose(fitted, x, losses, running, rng, trial_number) -> unit point``.

    Args:
        n_startup_trials: trials numbered below this go to a Latin hypercube over that many points (default
            2 d, with d the number of float/int parameters of trial 0, which is then drawn by the independent
            sampler because d is not known while it is sampled; pass the number to get a full design).
        seed: seeds the start-up design, the independent sampler and every proposal.
        refit_every: refit GP hyperparameters when this many new results arrived since the last fit (default 1).
        independent_sampler: for categorical or conditional parameters (default ``RandomSampler(seed)``).
    """

    def __init__(self, n_startup_trials: int | None = None, seed: int | None = None, refit_every: int = 1,
                 independent_sampler: BaseSampler | None = None):
        if n_startup_trials is not None and n_startup_trials < 0:
            raise ValueError(f"n_startup_trials={n_startup_trials!r}: need >= 0")
        if refit_every < 1:
            raise ValueError(f"refit_every={refit_every!r}: need >= 1")
        self.n_startup_trials = n_startup_trials
        self.seed = 0 if seed is None else int(seed)
        self.refit_every = int(refit_every)
        self._independent = independent_sampler or RandomSampler(seed=seed)
        self._hyper_cache: dict[Any, tuple[int, dict]] = {}  # (study, space) -> (n results at fit, hyperparameters)

    # -- optuna's sampler interface -----------------------------------------------------
    def reseed_rng(self) -> None:
        self._independent.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        if len(study.directions) != 1:
            raise ValueError(f"study: {type(self).__name__} supports single-objective studies only, "
                             f"got {len(study.directions)} objectives")
        space = optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))
        return {name: dist for name, dist in sorted(space.items()) if _numeric(dist)}

    def _startup(self, d: int) -> int:
        return 2 * d if self.n_startup_trials is None else self.n_startup_trials

    def sample_relative(self, study, trial: FrozenTrial, search_space) -> dict[str, Any]:
        if not search_space:
            return {}
        names = list(search_space)
        d = len(names)
        if trial.number < self._startup(d):
            return {}  # Latin hypercube, per parameter, in sample_independent
        complete, running = [], []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.number == trial.number or not all(n in t.params for n in names):
                continue
            point = [to_unit(t.params[n], search_space[n]) for n in names]
            (complete if t.state == TrialState.COMPLETE else running).append((point, t.value))
        if len(complete) < 2:
            return {}  # not enough data for a GP: the start-up sampler decides
        x = np.array([p for p, _ in complete])
        losses = np.array([v for _, v in complete], dtype=float)
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            losses = -losses
        running_x = np.array([p for p, _ in running]).reshape(-1, d)
        rng = np.random.default_rng([self.seed, trial.number])
        with torch.random.fork_rng():
            torch.manual_seed(int(rng.integers(2**31)))
            fitted = self._fit(study, names, x, losses)
            point = self.propose(fitted, x, losses, running_x, rng, trial.number - self._startup(d))
        return {n: from_unit(u, search_space[n]) for n, u in zip(names, np.asarray(point, dtype=float).ravel())}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if _numeric(param_distribution):
            startup = self.n_startup_trials
            if startup is None and trial.number > 0:
                # 2 d with d taken from trial 0; trial 0 itself (d not known yet) goes to the independent sampler
                first = study.get_trials(deepcopy=False)[0]
                startup = 2 * max(1, sum(_numeric(dist) for dist in first.distributions.values()))
            if startup is not None and trial.number < startup:
                return from_unit(self._lhs_coordinate(param_name, trial.number, startup), param_distribution)
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def _lhs_coordinate(self, name: str, number: int, n: int) -> float:
        """Coordinate ``name`` of start-up point ``number``: one permutation per parameter, so the design is a LHS."""
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
        rng = np.random.default_rng([self.seed, key])
        strata = rng.permutation(n)
        jitter = rng.random(n)
        return float((strata[number] + jitter[number]) / n)

    # -- the GP with cached hyperparameters ----------------------------------------------
    def _fit(self, study, names, x, losses) -> FittedGP:
        key = (study._study_id, study.study_name, tuple(names))
        cached = self._hyper_cache.get(key)
        refit = cached is None or len(losses) - cached[0] >= self.refit_every
        fitted = fit_gp(x, losses, hyperparameters=None if cached is None else cached[1], refit=refit)
        if refit:
            self._hyper_cache[key] = (len(losses), hyperparameters_of(fitted))
        return fitted

    def propose(self, fitted: FittedGP, x: np.ndarray, losses: np.ndarray, running: np.ndarray,
                rng: np.random.Generator, proposal_index: int) -> np.ndarray:
        raise NotImplementedError


def as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=DTYPE)
