"""FedBuff (Nguyen et al., AISTATS 2022), the algorithm behind Papaya (Huba et al., MLSys 2022):
C clients train at once; each result enters a buffer weighted by its staleness; every K results
the server applies the buffer's mean. A freed slot goes to a random idle client at once, so no
one waits for stragglers.

On one machine :class:`~.engine.Simulation` drives it in simulated time; beyond one machine
the same object runs under Flower (:func:`~.flower.run_async_server`), one reply at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..frame import CatalogueError
from .strategy import Actions, Strategy, check_client_weights, staleness_weight


class SlotStrategy(Strategy):
    """C tasks in flight; each result frees a slot that goes to a random idle client (C = N: the same client)."""

    def __init__(self, weights, num_clients: int, *, concurrency: int, steps: int, staleness_exponent: float = 0.5,
                 server_lr: float = 1.0, seed: int = 0):
        super().__init__(weights, num_clients, steps=steps, server_lr=server_lr, seed=seed)
        if concurrency <= 0:
            raise CatalogueError(f"C={concurrency}: the number of tasks in flight must be >= 1")
        if concurrency > num_clients:
            raise CatalogueError(f"C={concurrency}: cannot exceed the number of clients N={num_clients}")
        if staleness_exponent < 0:
            raise CatalogueError(f"a={staleness_exponent}: the staleness exponent must be >= 0")
        self.concurrency, self.staleness_exponent = concurrency, staleness_exponent

    def begin(self, now: float) -> Actions:
        return Actions(start=self._random_idle(self.concurrency))

    def on_update(self, client, delta, base_version, q, now) -> Actions:
        self._received(client, delta)
        if delta is not None:
            self.aggregate(client, delta, base_version, now)
        return Actions(start=self._random_idle(1))

    def aggregate(self, client: int, delta: torch.Tensor, base_version: int, now: float) -> None:
        raise NotImplementedError

    def staleness(self, base_version: int) -> float:
        return staleness_weight(self.version - base_version, self.staleness_exponent)


class FedBuff(SlotStrategy):
    """buf += s(τ)·Δ; after K results: w ← w + η_g·buf/K (with optional server momentum β_s).

    With ``client_weights`` p (Σp = 1) each result is weighted like a FedAvg or FedCompass client:
    buf += s(τ)·p_i·Δ_i and after K results w ← w + η_g·buf, so a client's update enters with
    η_g·s(τ)·p_i, the per-client weighting the catalogue's federated experiments give every
    asynchronous arm (η_g is then tuned per arm; uniform p gives the paper's step at η_g = N/K).
    FedFix's baseline is FedBuff with a = 0 (s ≡ 1).
    """

    name = "fedbuff"

    def __init__(self, weights, num_clients: int, *, buffer_size: int = 10, concurrency: int = 100, steps: int = 5,
                 staleness_exponent: float = 0.5, server_lr: float = 1.0, server_momentum: float = 0.0,
                 client_weights: Sequence[float] | None = None, seed: int = 0):
        super().__init__(weights, num_clients, concurrency=concurrency, steps=steps,
                         staleness_exponent=staleness_exponent, server_lr=server_lr, seed=seed)
        if buffer_size <= 0:
            raise CatalogueError(f"K={buffer_size}: the buffer size must be >= 1")
        if not 0 <= server_momentum < 1:
            raise CatalogueError(f"server_momentum={server_momentum}: must be in [0, 1)")
        self.p = check_client_weights(client_weights, num_clients)
        self.buffer_size, self.server_momentum = buffer_size, server_momentum
        self.buffer = torch.zeros_like(self.weights)
        self.count = 0
        self.momentum = torch.zeros_like(self.weights)

    def aggregate(self, client, delta, base_version, now) -> None:
        weight = self.staleness(base_version) * (1.0 if self.p is None else self.p[client])
        self.buffer = self.buffer + weight * delta
        self.count += 1
        if self.count == self.buffer_size:
            step = self.buffer / self.buffer_size if self.p is None else self.buffer
            if self.server_momentum:
                self.momentum = self.server_momentum * self.momentum + step
                step = self.momentum
            self.models[0] = self.weights + self.server_lr * step
            self.versions[0] += 1
            self.buffer = torch.zeros_like(self.weights)
            self.count = 0


__all__ = ["FedBuff", "SlotStrategy"]
