"""FedFix (Fraboni et al., "A general theory for federated optimization with asynchronous and
heterogeneous clients updates", JMLR 2023): the server aggregates on a fixed clock. At each
t = nΔt it applies w ← w + η_g·Σ_{i∈F_n} d_i Δ_i over the clients F_n that finished in
((n−1)Δt, nΔt], with d_i = ceil(τ_i/Δt)·p_i (τ_i the client's nominal task time), so a client's
weight grows with the number of ticks it needs; only F_n restart from the new w, the others
keep training from their old base.

Also here: :class:`WeightedAsync`, the paper's fully asynchronous comparison
(w ← w + η_g d_iΔ_i at every arrival, d_i = (Σ_j 1/τ_j)·τ_i·p_i).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..frame import CatalogueError
from .fedbuff import SlotStrategy
from .strategy import Actions, Strategy, check_positive


def fedfix_weights(task_times: Sequence[float], period: float, client_weights: Sequence[float]) -> list[float]:
    """d_i = ceil(τ_i/Δt)·p_i (the 1e-9 keeps τ = kΔt in k ticks despite float rounding)."""
    check_positive(period=period)
    return [math.ceil(t / period - 1e-9) * p for t, p in zip(task_times, client_weights)]


class FedFix(Strategy):
    name = "fedfix"

    def __init__(self, weights, num_clients: int, *, period: float, task_times: Sequence[float], steps: int,
                 client_weights: Sequence[float], server_lr: float = 1.0, seed: int = 0):
        super().__init__(weights, num_clients, steps=steps, server_lr=server_lr, seed=seed)
        check_positive(period=period)
        if len(task_times) != num_clients or len(client_weights) != num_clients:
            raise CatalogueError(f"task_times and client_weights need N={num_clients} entries each")
        self.period = float(period)
        self.d = fedfix_weights(task_times, period, client_weights)
        self._next = self.period
        self._finished: list[tuple[int, torch.Tensor]] = []

    def begin(self, now: float) -> Actions:
        return Actions(start=list(range(self.num_clients)))

    def next_timer(self) -> float | None:
        return self._next

    def on_update(self, client, delta, base_version, q, now) -> Actions:
        self._received(client, delta)
        self._finished.append((client, delta))  # waits for the next tick
        return Actions()

    def on_timer(self, now: float) -> Actions:
        self._next += self.period
        if not self._finished:
            return Actions()
        step = sum(self.d[c] * delta for c, delta in self._finished)
        self.models[0] = self.weights + self.server_lr * step
        self.versions[0] += 1
        restart = [c for c, _ in self._finished]
        self._finished = []
        return Actions(start=restart)


class WeightedAsync(SlotStrategy):
    """Every arrival: w ← w + η_g·d_iΔ_i with d_i = (Σ_j 1/τ_j)·τ_i·p_i; the client restarts at once."""

    name = "async"

    def __init__(self, weights, num_clients: int, *, task_times: Sequence[float], steps: int,
                 client_weights: Sequence[float], server_lr: float = 1.0, seed: int = 0):
        super().__init__(weights, num_clients, concurrency=num_clients, steps=steps, staleness_exponent=0.0,
                         server_lr=server_lr, seed=seed)
        rate = sum(1.0 / t for t in task_times)
        self.d = [rate * t * p for t, p in zip(task_times, client_weights)]

    def aggregate(self, client, delta, base_version, now) -> None:
        self.models[0] = self.weights + self.server_lr * self.d[client] * delta
        self.versions[0] += 1
