"""The simpy engine: clients are simpy processes in simulated time, the server is a strategy
object (:mod:`.strategy`), and local training is real torch SGD run when its event fires.

Each client process waits for a task in its inbox, then for the task's drawn duration
(a ``simpy`` timeout); the server interrupts it to collect partial work (FAVANO) or to abort
it (FedAvg's over-selection). A timer process calls ``strategy.on_timer`` at the times the
strategy asks for (FedFix ticks, FAVANO rounds, FedCompass deadlines); at equal times,
client arrivals come first, so an arrival at exactly nΔt belongs to tick n.

Training is lazy and batched: a task's result depends only on its base model, its client and
its step count, so when one result is needed every dispatched full-length task whose result is
still missing is trained in the same call (see :class:`~.local.BatchedMLPSGD`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..frame import require_extra

require_extra("federated", "simpy")

import simpy  # noqa: E402
import torch  # noqa: E402

from ..frame import CatalogueError  # noqa: E402
from .local import Job  # noqa: E402
from .profiles import SpeedProfile  # noqa: E402
from .strategy import Actions, Strategy, Task  # noqa: E402


@dataclass
class _Running:
    task: Task
    start: float
    duration: float
    process: simpy.Process | None = None
    delta: torch.Tensor | None = None
    computed: bool = False


@dataclass
class History:
    """Every model change: time, accuracy, and the transfer counters at that moment (per model)."""

    times: list[list[float]] = field(default_factory=list)
    accuracy: list[list[float]] = field(default_factory=list)
    transfers: list[list[int]] = field(default_factory=list)
    end: float = 0.0

    def time_to(self, target: float, model: int = 0) -> float:
        """First simulated time the model's accuracy reached ``target`` (nan if never)."""
        for t, acc in zip(self.times[model], self.accuracy[model]):
            if acc >= target:
                return t
        return math.nan

    def transfers_at(self, time: float, model: int = 0) -> float:
        """Downloads + uploads counted up to ``time`` (nan for nan)."""
        if math.isnan(time):
            return math.nan
        count = self.transfers[model][0]
        for t, n in zip(self.times[model], self.transfers[model]):
            if t > time:
                break
            count = n
        return float(count)

    def final_accuracy(self, model: int = 0) -> float:
        return self.accuracy[model][-1]

    def curve(self, grid: Sequence[float], model: int = 0) -> list[float]:
        """Accuracy of the latest model at each grid time (a step function)."""
        out, j = [], 0
        times, acc = self.times[model], self.accuracy[model]
        for t in grid:
            while j + 1 < len(times) and times[j + 1] <= t:
                j += 1
            out.append(acc[j])
        return out


class Simulation:
    """Run ``strategy`` with clients timed by ``profile`` and trained by ``trainers[task.model]``.

    ``evaluate(model, weights) -> accuracy`` is called at the start, after a model change at least
    ``eval_interval`` simulated time after the previous evaluation (0: after every change), and
    for the last model of the run.
    """

    def __init__(self, strategy: Strategy, trainers: Sequence, profile: SpeedProfile,
                 evaluate: Callable[[int, torch.Tensor], float], eval_interval: float = 0.0):
        self.strategy, self.trainers, self.profile, self.evaluate = strategy, list(trainers), profile, evaluate
        self.eval_interval = eval_interval
        self.env = simpy.Environment()
        n = strategy.num_clients
        if len(profile.step_times) != n:
            raise CatalogueError(f"profile has {len(profile.step_times)} clients, the strategy {n}")
        self.inbox = [simpy.Store(self.env) for _ in range(n)]
        self.clients = [self.env.process(self._client(i)) for i in range(n)]
        self.running: dict[int, _Running] = {}
        self.pending: list[int] = []  # clients whose full-length result is not trained yet
        self.history = History()
        self._timer_at: float | None = None
        self._timer = self.env.process(self._timer_loop())
        self._seen_versions = list(strategy.versions)
        self._evaluated_versions = list(strategy.versions)
        self._changed_at = [0.0] * len(strategy.models)
        for m, weights in enumerate(strategy.models):
            self.history.times.append([0.0])
            self.history.accuracy.append([evaluate(m, weights)])
            self.history.transfers.append([0])

    def run(self, until: float) -> History:
        if not until > 0:
            raise CatalogueError(f"until={until}: the simulated budget must be > 0")
        self.env.process(self._begin())
        self.env.run(until=until)
        for m, version in enumerate(self.strategy.versions):  # the last model always gets its accuracy
            if version != self._evaluated_versions[m]:
                self._record(m, self._changed_at[m])
        self.history.end = until
        return self.history

    def _record(self, m: int, time: float) -> None:
        self._evaluated_versions[m] = self.strategy.versions[m]
        self.history.times[m].append(time)
        self.history.accuracy[m].append(self.evaluate(m, self.strategy.models[m]))
        self.history.transfers[m].append(self.strategy.downloads + self.strategy.uploads)

    def _begin(self):
        # a process created after the clients': they are all waiting on their inboxes when the
        # first tasks go out, so tasks of equal duration come back in dispatch order
        self._apply(self.strategy.begin(self.env.now))
        yield self.env.timeout(0)

    # client processes -------------------------------------------------------------------
    def _client(self, i: int):
        while True:
            task = yield self.inbox[i].get()
            try:
                yield self.env.timeout(self.running[i].duration)
                if task.interruptible:
                    yield self.env.event()  # all steps done: idle until the server collects
                else:
                    self._arrive(i)
            except simpy.Interrupt:
                pass  # collected or aborted: the engine took care of the result

    def _arrive(self, i: int) -> None:
        run = self.running[i]
        if not run.computed:
            self._train_pending()
        del self.running[i]
        self._deliver(i, run, run.task.steps)

    def _deliver(self, i: int, run: _Running, q: int) -> None:
        delta = run.delta
        # the sum is NaN/inf whenever an entry is (one reduction instead of an elementwise mask)
        if delta is not None and not math.isfinite(float(delta.sum())) and not bool(torch.isfinite(delta).all()):
            raise CatalogueError(f"client {i} sent a non-finite delta (NaN/inf) at simulated time {self.env.now:.4g}")
        actions = self.strategy.on_update(i, delta, run.task.base_version, q, self.env.now)
        self._after_server_call()
        self._apply(actions)

    # training ---------------------------------------------------------------------------
    def _train_pending(self) -> None:
        by_model: dict[int, list[int]] = {}
        for c in self.pending:
            by_model.setdefault(self.running[c].task.model, []).append(c)
        self.pending = []
        for model, clients in by_model.items():
            self._train(model, clients, [self.running[c].task.steps for c in clients])

    def _train(self, model: int, clients: list[int], steps: list[int]) -> None:
        jobs = [Job(c, self.running[c].task.weights, q) for c, q in zip(clients, steps) if q > 0]
        deltas = iter(self.trainers[model].train(jobs))
        for c, q in zip(clients, steps):
            self.running[c].delta = next(deltas) if q > 0 else None
            self.running[c].computed = True

    # server actions ---------------------------------------------------------------------
    def _apply(self, actions: Actions) -> None:
        now = self.env.now
        for c in actions.abort:
            run = self.running.pop(c, None)
            if run is not None:
                if c in self.pending:
                    self.pending.remove(c)
                self.clients[c].interrupt("abort")
        if actions.collect:
            self._collect(actions.collect)
        for c in actions.start:
            if c in self.running:
                raise CatalogueError(f"strategy {self.strategy.name} started client {c}, which is still busy")
            task = self.strategy.dispatch(c, now)
            self.running[c] = _Running(task, now, self.profile.duration(c, task.steps, task.model))
            if not task.interruptible:
                self.pending.append(c)
            self.inbox[c].put(task)
        self._after_server_call()

    def _collect(self, clients: list[int]) -> None:
        """Interrupt ``clients`` and report the steps each finished (the step in progress is dropped)."""
        now = self.env.now
        runs, steps = [], []
        for c in clients:
            run = self.running[c]
            step_time = run.duration / run.task.steps
            done = min(run.task.steps, math.floor((now - run.start) / step_time + 1e-9))
            runs.append(run)
            steps.append(done)
            self.clients[c].interrupt("collect")
        by_model: dict[int, list[int]] = {}
        for k, c in enumerate(clients):
            by_model.setdefault(self.running[c].task.model, []).append(k)
        for model, ks in by_model.items():
            self._train(model, [clients[k] for k in ks], [steps[k] for k in ks])
        for c in clients:
            del self.running[c]
        for c, run, q in zip(clients, runs, steps):
            self._deliver(c, run, q)

    def _after_server_call(self) -> None:
        """Record model changes; move the timer if the strategy wants another time."""
        for m, version in enumerate(self.strategy.versions):
            if version != self._seen_versions[m]:
                self._seen_versions[m] = version
                self._changed_at[m] = self.env.now
                if self.env.now - self.history.times[m][-1] >= self.eval_interval:
                    self._record(m, self.env.now)
        wanted = self.strategy.next_timer()
        if wanted != self._timer_at and self._timer.is_alive and self._timer is not self.env.active_process:
            self._timer.interrupt("reschedule")

    def _timer_loop(self):
        while True:
            self._timer_at = self.strategy.next_timer()
            try:
                if self._timer_at is None:
                    yield self.env.event()  # until a reschedule interrupt
                    continue
                yield self.env.timeout(max(0.0, self._timer_at - self.env.now))
                yield self.env.timeout(0)  # let arrivals already scheduled for this instant come first
            except simpy.Interrupt:
                continue
            actions = self.strategy.on_timer(self.env.now)
            self._after_server_call()
            self._apply(actions)
