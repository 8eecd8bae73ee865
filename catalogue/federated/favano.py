"""FAVANO (Leconte et al., 2023, "FAVAS: Federated AVeraging with ASynchronous clients"):
the server never waits. Every Δ_F time units it samples s clients uniformly; each returns the
progress h_i = y_i − w_b,i of the q_i ≤ K local steps it has finished (the step in progress is
dropped; a client idles after K steps), and the server applies w ← w + η_g·(1/s)·Σ α_i h_i.
Sampled clients restart from the new w.

Unbiased reweighting: α_i = K / q̂_i, clipped to [1, K], where q̂_i is an exponential moving
average (β = 0.9) of client i's past step counts (first contact: α_i = 1). A slow client's
partial progress is scaled up by the inverse of its expected completed fraction of the K steps,
so fast clients no longer dominate the model; ``reweight=False`` is the biased variant.

Tasks are interruptible: the engine collects them (``Actions.collect``) at each tick, which
simpy implements with process interrupts. Flower cannot interrupt a client mid-fit, so beyond
one machine FAVANO needs clients that report on request (not provided by :mod:`.flower`).
"""

from __future__ import annotations

import torch

from ..frame import CatalogueError
from .strategy import Actions, Strategy, check_positive


class FAVANO(Strategy):
    name = "favano"
    interruptible = True

    def __init__(self, weights, num_clients: int, *, sample_size: int = 10, steps: int = 10, period: float = 2.0,
                 server_lr: float = 1.0, reweight: bool = True, ema: float = 0.9, seed: int = 0):
        super().__init__(weights, num_clients, steps=steps, server_lr=server_lr, seed=seed)
        if sample_size <= 0:
            raise CatalogueError(f"s={sample_size}: the number of sampled clients must be >= 1")
        if sample_size > num_clients:
            raise CatalogueError(f"s={sample_size}: cannot exceed the number of clients N={num_clients}")
        check_positive(period=period)
        if not 0 <= ema < 1:
            raise CatalogueError(f"ema={ema}: the moving-average factor β must be in [0, 1)")
        self.sample_size, self.period, self.reweight, self.ema = sample_size, float(period), reweight, ema
        self.expected_steps: dict[int, float] = {}  # q̂_i
        self._next = self.period
        self._awaiting: set[int] = set()
        self._sampled: list[int] = []
        self._sum = torch.zeros_like(self.weights)
        if not reweight:
            self.name = "favano-noreweight"

    def begin(self, now: float) -> Actions:
        return Actions(start=list(range(self.num_clients)))

    def next_timer(self) -> float | None:
        return self._next

    def on_timer(self, now: float) -> Actions:
        self._next += self.period
        self._sampled = sorted(int(c) for c in self.rng.choice(self.num_clients, self.sample_size, replace=False))
        self._awaiting = set(self._sampled)
        self._sum = torch.zeros_like(self.weights)
        return Actions(collect=list(self._sampled))

    def weight(self, client: int, q: int) -> float:
        """α_i from the past step counts, then fold ``q`` into q̂_i."""
        past = self.expected_steps.get(client)
        if not self.reweight or past is None:
            alpha = 1.0
        else:
            alpha = self.steps / past if past > 0 else float(self.steps)
            alpha = min(max(alpha, 1.0), float(self.steps))
        self.expected_steps[client] = q if past is None else self.ema * past + (1 - self.ema) * q
        return alpha

    def on_update(self, client, delta, base_version, q, now) -> Actions:
        self._received(client, delta)
        alpha = self.weight(client, q)
        if delta is not None:
            self._sum = self._sum + alpha * delta
        self._awaiting.discard(client)
        if self._awaiting:
            return Actions()
        self.models[0] = self.weights + self.server_lr * self._sum / self.sample_size
        self.versions[0] += 1
        return Actions(start=list(self._sampled))
