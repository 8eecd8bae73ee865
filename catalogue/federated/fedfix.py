"""FedFix (Fraboni et al., "A general theory for federated optimization with asynchronous and
heterogeneous clients updates", JMLR 2023): the server aggregates on a fixed clock. At each
t = nΔt it applies w ← w + η_g·Σ_{i∈F_n} d_i Δ_i over the clients F_n that finished in
((n−1)Δt, nΔt], with d_i = ceil(τ_i/Δt)·p_i (τ_i the client's nominal task time), so a client's
weight grows with the number of ticks it needs; only F_n restart from the new w, the others
keep training from their old base.

Also here: :class:`WeightedAsync`, the paper's fully asynchronous comparison
(w ← w + η_g d_iΔ_i at every arrival, d_i = c·τ_i·p_i). Client i arrives every τ_i, so the
total weight it applies per unit time is Σ_i d_i/τ_i = c·Σ p_i = c. With ``period`` Δt,
c = 1/Δt: FedFix's own total (Σ_i ceil(τ_i/Δt)p_i / (ceil(τ_i/Δt)Δt) = 1/Δt), so d_i = (τ_i/Δt)·p_i
is FedFix's weight without the rounding up. Without it, c = Σ_j 1/τ_j (the first statement of the
catalogue issue), which for τ in [0.2, 1] is ~2M× FedAvg's total per unit time.
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
    """Every arrival: w ← w + η_g·d_iΔ_i, d_i = (τ_i/Δt)·p_i with ``period`` Δt (else (Σ_j 1/τ_j)·τ_i·p_i)."""

    name = "async"

    def __init__(self, weights, num_clients: int, *, task_times: Sequence[float], steps: int,
                 client_weights: Sequence[float], period: float | None = None, server_lr: float = 1.0,
                 seed: int = 0):
        super().__init__(weights, num_clients, concurrency=num_clients, steps=steps, staleness_exponent=0.0,
                         server_lr=server_lr, seed=seed)
        if len(task_times) != num_clients or len(client_weights) != num_clients:
            raise CatalogueError(f"task_times and client_weights need N={num_clients} entries each")
        check_positive(**{f"task_times[{i}]": t for i, t in enumerate(task_times)})
        if period is not None:
            check_positive(period=period)
        rate = sum(1.0 / t for t in task_times) if period is None else 1.0 / period
        self.d = [rate * t * p for t, p in zip(task_times, client_weights)]

    def aggregate(self, client, delta, base_version, now) -> None:
        self.models[0] = self.weights + self.server_lr * self.d[client] * delta
        self.versions[0] += 1
