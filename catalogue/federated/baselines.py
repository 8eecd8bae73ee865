"""The baselines every asynchronous method is measured against.

* :class:`FedAvg` (McMahan et al., 2017), with Papaya's over-selection: each round dispatches
  ceil(o·C) random clients, keeps the first C results and aborts the rest (their downloads
  count); w ← w + η_g·Σ_S p_iΔ_i / Σ_S p_i. o = 1 is the textbook algorithm.
* :class:`FedAsync` (Xie et al., 2019): every result is mixed in at once,
  w ← (1 − α·s(τ))·w + α·s(τ)·y; with ``client_weights`` p the mixing weight is
  min(1, α·s(τ)·p_i), so a client's update Δ_i enters with the per-client weight the other
  arms use (α then plays η_g's part and is tuned like it).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..frame import CatalogueError
from .fedbuff import SlotStrategy
from .strategy import Actions, Strategy, Task, check_client_weights


class FedAvg(Strategy):
    """Synchronous rounds of C kept clients out of ceil(o·C) dispatched (o = ``over_selection``)."""

    name = "fedavg"

    def __init__(self, weights, num_clients: int, *, cohort: int, steps: int, client_weights: Sequence[float],
                 over_selection: float = 1.0, server_lr: float = 1.0, max_rounds: int | None = None, seed: int = 0):
        super().__init__(weights, num_clients, steps=steps, server_lr=server_lr, seed=seed)
        if cohort <= 0:
            raise CatalogueError(f"C={cohort}: the round's cohort must be >= 1")
        if cohort > num_clients:
            raise CatalogueError(f"C={cohort}: cannot exceed the number of clients N={num_clients}")
        if not over_selection >= 1:
            raise CatalogueError(f"o={over_selection}: over-selection must be >= 1")
        if len(client_weights) != num_clients:
            raise CatalogueError(f"client_weights has {len(client_weights)} entries for N={num_clients}")
        self.cohort, self.over_selection, self.max_rounds = cohort, over_selection, max_rounds
        self.dispatched_per_round = min(num_clients, math.ceil(over_selection * cohort - 1e-9))
        self.p = [float(v) for v in client_weights]
        self.members: set[int] = set()
        self.results: list[tuple[int, torch.Tensor]] = []

    def begin(self, now: float) -> Actions:
        return self._new_round()

    def _new_round(self) -> Actions:
        if self.max_rounds is not None and self.version >= self.max_rounds:
            return Actions()
        chosen = self._random_idle(self.dispatched_per_round)
        self.members = set(chosen)
        self.results = []
        return Actions(start=chosen)

    def on_update(self, client, delta, base_version, q, now) -> Actions:
        self._received(client, delta)
        if client not in self.members or delta is None:
            return Actions()
        self.results.append((client, delta))
        if len(self.results) < self.cohort:
            return Actions()
        total = sum(self.p[c] for c, _ in self.results)
        step = sum(self.p[c] * d for c, d in self.results) / total
        self.models[0] = self.weights + self.server_lr * step
        self.versions[0] += 1
        late = sorted(self.members - {c for c, _ in self.results})
        self.busy.difference_update(late)
        actions = Actions(abort=late)
        actions += self._new_round()
        return actions


class FedAsync(SlotStrategy):
    """Mix every result in at once: w ← (1 − α_i)·w + α_i·(w_base + Δ), α_i = α·s(τ) (·p_i with client weights).

    The update is w ← w + α_i·(w_base − w + Δ_i): client i's Δ_i enters with weight α_i, and the
    model is also pulled back toward the stale base by the same amount. α_i is capped at 1 (the
    client's model replaces the server's).
    """

    name = "fedasync"

    def __init__(self, weights, num_clients: int, *, concurrency: int, steps: int, mixing: float = 0.6,
                 staleness_exponent: float = 0.5, client_weights: Sequence[float] | None = None, seed: int = 0):
        super().__init__(weights, num_clients, concurrency=concurrency, steps=steps,
                         staleness_exponent=staleness_exponent, seed=seed)
        self.p = check_client_weights(client_weights, num_clients)
        if self.p is None and not 0 < mixing <= 1:
            raise CatalogueError(f"alpha={mixing}: the mixing weight must be in (0, 1]")
        if not (math.isfinite(mixing) and mixing > 0):
            raise CatalogueError(f"alpha={mixing}: the mixing weight must be > 0")
        self.mixing = mixing
        self.bases: dict[int, torch.Tensor] = {}

    def dispatch(self, client: int, now: float) -> Task:
        task = super().dispatch(client, now)
        self.bases[client] = task.weights
        return task

    def aggregate(self, client, delta, base_version, now) -> None:
        alpha = min(1.0, self.mixing * self.staleness(base_version) * (1.0 if self.p is None else self.p[client]))
        self.models[0] = (1 - alpha) * self.weights + alpha * (self.bases.pop(client) + delta)
        self.versions[0] += 1
