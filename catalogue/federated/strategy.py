"""What every server strategy shares: the task it hands out, the actions it asks of whatever
engine runs the clients, polynomial staleness, and transfer counting.

A strategy is engine-free: it holds flat float32 model vectors and reacts to three calls,

* ``dispatch(client, now) -> Task`` — the work for a client it asked to start (a download),
* ``on_update(client, delta, base_version, q, now) -> Actions`` — a client's result (an upload;
  ``q`` is the number of local steps behind ``delta``; ``delta is None`` when ``q == 0``),
* ``on_timer(now) -> Actions`` — the time it asked for with ``next_timer()`` has come,

plus ``begin(now) -> Actions`` once at the start. :class:`Actions` names the clients to start,
to collect early (interrupt and report the steps done so far) and to abort (drop, no upload).
The simpy engine (:mod:`.engine`) and the Flower adapter (:mod:`.flower`) both drive strategies
through exactly these calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..frame import CatalogueError


@dataclass
class Task:
    """Work for one client: ``steps`` local SGD steps from ``weights`` (model version ``base_version``)."""

    client: int
    base_version: int
    steps: int
    weights: torch.Tensor
    model: int = 0  # which model, for strategies that train several (FedAST)
    interruptible: bool = False  # FAVANO: the server may collect it before all steps are done


@dataclass
class Actions:
    """What the server asks of the engine after a call."""

    start: list[int] = field(default_factory=list)
    collect: list[int] = field(default_factory=list)
    abort: list[int] = field(default_factory=list)

    def __iadd__(self, other: "Actions") -> "Actions":
        self.start += other.start
        self.collect += other.collect
        self.abort += other.abort
        return self


def staleness_weight(tau: int, a: float = 0.5) -> float:
    """Polynomial staleness discount s(τ) = (1 + τ)^(−a)."""
    if a < 0:
        raise CatalogueError(f"a={a}: the staleness exponent must be >= 0")
    if tau < 0:
        raise CatalogueError(f"tau={tau}: staleness cannot be negative")
    return (1.0 + tau) ** (-a)


def check_positive(**values) -> None:
    """One-line errors for parameters that must be > 0."""
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise CatalogueError(f"{name}={value}: must be > 0")


def check_client_weights(client_weights, num_clients: int) -> list[float] | None:
    """``client_weights`` as floats (None stays None): N non-negative values."""
    if client_weights is None:
        return None
    p = [float(v) for v in client_weights]
    if len(p) != num_clients:
        raise CatalogueError(f"client_weights has {len(p)} entries for N={num_clients}")
    if any(not (math.isfinite(v) and v >= 0) for v in p):
        raise CatalogueError("client_weights: every weight must be a finite number >= 0")
    return p


class Strategy:
    """Base class: one or more global models, their versions, and the transfer counters."""

    name = "strategy"
    interruptible = False

    def __init__(self, weights: torch.Tensor | list[torch.Tensor], num_clients: int, *, steps: int,
                 server_lr: float = 1.0, seed: int = 0):
        if num_clients <= 0:
            raise CatalogueError(f"N={num_clients}: need at least one client")
        check_positive(server_lr=server_lr, steps=steps)
        models = weights if isinstance(weights, list) else [weights]
        self.models = [w.detach().to(torch.float32).clone() for w in models]
        self.versions = [0] * len(self.models)
        self.num_clients, self.steps, self.server_lr = num_clients, int(steps), float(server_lr)
        self.rng = np.random.default_rng([seed, 31])
        self.downloads = 0
        self.uploads = 0
        self.busy: set[int] = set()

    # the model and version of single-model strategies
    @property
    def weights(self) -> torch.Tensor:
        return self.models[0]

    @property
    def version(self) -> int:
        return self.versions[0]

    def begin(self, now: float) -> Actions:
        raise NotImplementedError

    def dispatch(self, client: int, now: float) -> Task:
        """Hand ``client`` the current model (one download)."""
        self.downloads += 1
        self.busy.add(client)
        return Task(client, self.version, self.steps, self.weights, interruptible=self.interruptible)

    def on_update(self, client: int, delta: torch.Tensor | None, base_version: int, q: int, now: float) -> Actions:
        raise NotImplementedError

    def on_timer(self, now: float) -> Actions:
        return Actions()

    def next_timer(self) -> float | None:
        """Absolute simulated time of the next ``on_timer`` call wanted, or None."""
        return None

    def _received(self, client: int, delta: torch.Tensor | None) -> None:
        self.busy.discard(client)
        if delta is not None:
            self.uploads += 1

    def _random_idle(self, count: int) -> list[int]:
        idle = [i for i in range(self.num_clients) if i not in self.busy]
        count = min(count, len(idle))
        if count == 1:  # the common case (a freed slot): one integer draw instead of a permutation
            return [idle[int(self.rng.integers(len(idle)))]]
        return [idle[j] for j in self.rng.choice(len(idle), size=count, replace=False)] if count else []
