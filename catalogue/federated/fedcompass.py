"""FedCompass (Li, Chard, Foster, Kinnison, ICLR 2024): a computing-power-aware scheduler. The
server estimates each client's step time and gives it a number of local steps Q ∈ [Qmin, Qmax]
chosen so that clients of similar speed finish together; each such group is aggregated at once,
which keeps staleness low without waiting for the slowest client.

Speeds: t̂_i ← (1−μ)·t̂_i + μ·(elapsed/Q) (μ = 0.9; the first observation as is).
Assigning client j at ``now``: among open groups expected later than now (T_g > now), take
Q = ⌊(T_g − now)/t̂_j⌋ and join the group with the largest Q in [Qmin, Qmax]. Otherwise open a
new group with Q = the largest value ≤ Qmax of ⌊(L_g + Qmax·t̂_fastest(g) − now)/t̂_j⌋ over open
groups with now < L_g, raised to Qmin (Qmax if there is none); T = now + Q·t̂_j, L = now + λ·Q·t̂_j.
A group aggregates at its last arrival or at its deadline L_g: w ← w + η_g·Σ s(τ_i)·p_i·Δ_i over
its arrived members plus the general buffer (results that came after their group's deadline);
the arrived members are reassigned at once, a late client as soon as it arrives.

At t = 0 speeds are unknown: every client starts Qmax steps in one initial group, whose
deadline is set when its first member arrives, to λ × that arrival time (the rule above with
Q·t̂ = the first arrival's duration). With equal speeds that group — and every later one — holds
all clients, and FedCompass is FedAvg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..frame import CatalogueError
from .strategy import Actions, Strategy, Task, check_positive, staleness_weight


@dataclass
class Group:
    expected: float  # T_g
    latest: float  # L_g
    members: dict[int, int] = field(default_factory=dict)  # client -> Q
    arrived: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (client, Δ, base version)
    open: bool = True


class FedCompass(Strategy):
    name = "fedcompass"

    def __init__(self, weights, num_clients: int, *, client_weights: Sequence[float], max_steps: int = 50,
                 min_steps: int | None = None, latest_factor: float = 1.5, speed_momentum: float = 0.9,
                 staleness_exponent: float = 0.5, server_lr: float = 1.0, seed: int = 0):
        super().__init__(weights, num_clients, steps=max_steps, server_lr=server_lr, seed=seed)
        min_steps = max(1, math.floor(0.2 * max_steps)) if min_steps is None else min_steps
        if min_steps < 1:
            raise CatalogueError(f"Qmin={min_steps}: must be >= 1")
        if min_steps > max_steps:
            raise CatalogueError(f"Qmin={min_steps}: cannot exceed Qmax={max_steps}")
        if not latest_factor >= 1:
            raise CatalogueError(f"lambda={latest_factor}: the deadline factor λ must be >= 1")
        if not 0 < speed_momentum <= 1:
            raise CatalogueError(f"mu={speed_momentum}: the speed update factor μ must be in (0, 1]")
        if staleness_exponent < 0:
            raise CatalogueError(f"a={staleness_exponent}: the staleness exponent must be >= 0")
        if len(client_weights) != num_clients:
            raise CatalogueError(f"client_weights has {len(client_weights)} entries for N={num_clients}")
        self.max_steps, self.min_steps, self.latest_factor = max_steps, min_steps, latest_factor
        self.speed_momentum, self.staleness_exponent = speed_momentum, staleness_exponent
        self.p = [float(v) for v in client_weights]
        self.speed: dict[int, float] = {}  # t̂_i
        self.groups: list[Group] = []
        self.open_groups: list[int] = []  # indices of groups not aggregated yet (the only ones scanned)
        self.group_of: dict[int, int] = {}
        self.started: dict[int, tuple[float, int]] = {}  # client -> (dispatch time, Q)
        self.buffer: list[tuple[int, torch.Tensor, int]] = []  # late results
        self.assignments: list[tuple[float, int, int, int]] = []  # (now, client, group, Q), for inspection

    # assignment -------------------------------------------------------------------------
    def begin(self, now: float) -> Actions:
        initial = Group(math.inf, math.inf, {c: self.max_steps for c in range(self.num_clients)})
        self.groups.append(initial)
        self.open_groups.append(0)
        for c in range(self.num_clients):
            self.group_of[c] = 0
        return Actions(start=list(range(self.num_clients)))

    def assign(self, client: int, now: float) -> tuple[int, int]:
        """Choose (group, Q) for ``client`` at ``now`` and register it."""
        speed = self.speed[client]
        best = None
        for g in self.open_groups:
            group = self.groups[g]
            if group.expected > now and math.isfinite(group.expected):
                q = math.floor((group.expected - now) / speed)
                if self.min_steps <= q <= self.max_steps and (best is None or q > best[1]):
                    best = (g, q)
        if best is not None:
            g, q = best
            self.groups[g].members[client] = q
        else:
            candidates = []
            for group in (self.groups[g] for g in self.open_groups):
                if now < group.latest and math.isfinite(group.latest):
                    fastest = min(self.speed.get(c, math.inf) for c in group.members)
                    candidates.append(math.floor((group.latest + self.max_steps * fastest - now) / speed))
            fitting = [q for q in candidates if q <= self.max_steps]
            q = max(max(fitting), self.min_steps) if fitting else self.max_steps
            self.groups.append(Group(now + q * speed, now + self.latest_factor * q * speed, {client: q}))
            g = len(self.groups) - 1
            self.open_groups.append(g)
        self.group_of[client] = g
        self.assignments.append((now, client, g, q))
        return g, q

    def dispatch(self, client: int, now: float) -> Task:
        self.downloads += 1
        self.busy.add(client)
        q = self.groups[self.group_of[client]].members[client]
        self.started[client] = (now, q)
        return Task(client, self.version, q, self.weights)

    # results ----------------------------------------------------------------------------
    def on_update(self, client, delta, base_version, q, now) -> Actions:
        self._received(client, delta)
        start, steps = self.started.pop(client)
        observed = (now - start) / steps
        old = self.speed.get(client)
        self.speed[client] = observed if old is None else (1 - self.speed_momentum) * old \
            + self.speed_momentum * observed
        g = self.group_of[client]
        group = self.groups[g]
        if g == 0 and not math.isfinite(group.latest):  # first arrival of the initial group sets its deadline
            group.latest = self.latest_factor * now
            group.expected = now
        if not group.open:  # after the deadline: wait in the general buffer, reassign at once
            self.buffer.append((client, delta, base_version))
            self.assign(client, now)
            return Actions(start=[client])
        group.arrived.append((client, delta, base_version))
        if len(group.arrived) == len(group.members):
            return self._aggregate(g, now)
        return Actions()

    def next_timer(self) -> float | None:
        deadlines = [self.groups[g].latest for g in self.open_groups if math.isfinite(self.groups[g].latest)]
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> Actions:
        actions = Actions()
        for g in list(self.open_groups):
            if self.groups[g].open and self.groups[g].latest <= now:
                actions += self._aggregate(g, now)
        return actions

    def _aggregate(self, g: int, now: float) -> Actions:
        group = self.groups[g]
        group.open = False
        self.open_groups.remove(g)
        results = group.arrived + self.buffer
        self.buffer = []
        if results:
            step = sum(staleness_weight(self.version - base, self.staleness_exponent) * self.p[c] * delta
                       for c, delta, base in results)
            self.models[0] = self.weights + self.server_lr * step
            self.versions[0] += 1
        restart = [c for c, _, _ in group.arrived]
        for c in restart:
            self.assign(c, now)
        return Actions(start=restart)
