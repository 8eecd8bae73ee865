"""Seeded speed profiles: how long a client's task takes in simulated time. Durations are drawn,
never measured, so one seed reproduces a run exactly.

A task of Q steps on client i takes ``Q · t_i · u`` with u ~ U(1 − jitter, 1 + jitter)
(jitter 0.1 by default), except the ``shifted-exp`` profile (FedAST), where a task on model m
takes ``κ_m · c_i · (0.5 + Exp(1))`` whatever Q is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..frame import CatalogueError

PROFILES = ("lognormal", "two-class", "linear", "exponential", "shifted-exp", "constant")


class SpeedProfile:
    """Per-client step times and a generator for the per-task noise."""

    def __init__(self, step_times: Sequence[float], *, jitter: float = 0.1, seed: int = 0,
                 task_costs: Sequence[float] | None = None, shifted_exp: bool = False):
        self.step_times = np.asarray(step_times, dtype=np.float64)
        if not np.all(self.step_times > 0):
            raise CatalogueError("step times must all be > 0")
        if not 0 <= jitter < 1:
            raise CatalogueError(f"jitter={jitter}: must be in [0, 1)")
        self.jitter = jitter
        self.task_costs = list(task_costs) if task_costs is not None else [1.0]
        self.shifted_exp = shifted_exp
        self.rng = np.random.default_rng([seed, 23])

    def duration(self, client: int, steps: int, model: int = 0) -> float:
        if self.shifted_exp:
            return float(self.task_costs[model] * self.step_times[client] * (0.5 + self.rng.exponential(1.0)))
        u = self.rng.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1.0
        return float(steps * self.step_times[client] * u * self.task_costs[model])


def make_profile(name: str, num_clients: int, seed: int, *, steps: int = 1, jitter: float = 0.1,
                 task_costs: Sequence[float] | None = None) -> SpeedProfile:
    """The named profile for ``num_clients`` clients (its per-client draws follow ``seed``).

    ``lognormal``: t_i ~ LogNormal(0, 1). ``two-class``: a random half has t = 1, the other
    t = 10 (``slow_clients`` tells which). ``linear``: task times τ_i linearly spaced 0.2…1, so
    t_i = τ_i / steps. ``exponential``: t_i ~ Exp(1) clipped to [0.05, 20]. ``shifted-exp``:
    c_i ∈ {2, 1, 0.5} for 25/50/25 % of clients, duration κ_m·c_i·(0.5 + Exp(1)).
    """
    if num_clients <= 0:
        raise CatalogueError(f"N={num_clients}: need at least one client")
    rng = np.random.default_rng([seed, 17])
    if name == "lognormal":
        times = rng.lognormal(0.0, 1.0, num_clients)
    elif name == "two-class":
        times = np.where(slow_clients(num_clients, seed), 10.0, 1.0)
    elif name == "linear":
        times = np.linspace(0.2, 1.0, num_clients) / steps
    elif name == "exponential":
        times = np.clip(rng.exponential(1.0, num_clients), 0.05, 20.0)
    elif name == "shifted-exp":
        counts = [round(0.25 * num_clients), num_clients - 2 * round(0.25 * num_clients), round(0.25 * num_clients)]
        times = rng.permutation(np.repeat([2.0, 1.0, 0.5], counts))
        return SpeedProfile(times, jitter=0.0, seed=seed, task_costs=task_costs, shifted_exp=True)
    elif name == "constant":
        times = np.ones(num_clients)
    else:
        raise CatalogueError(f"profile={name!r}: unknown; valid profiles: {', '.join(PROFILES)}")
    return SpeedProfile(times, jitter=jitter, seed=seed, task_costs=task_costs)


def slow_clients(num_clients: int, seed: int) -> np.ndarray:
    """The ``two-class`` profile's slow half (a seeded random half)."""
    mask = np.zeros(num_clients, dtype=bool)
    mask[np.random.default_rng([seed, 19]).permutation(num_clients)[: num_clients // 2]] = True
    return mask
