"""The reference simulator: the asynchronous schedule executed serially in one process.

It is the specification of the algorithm. It holds every stage, runs the tasks of a
round one after the other on the same inputs the distributed ranks would see, and keeps
each stage's latest output as the next round's stale input. The distributed runtime
must reproduce it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from asyncgen.split.boundary import BoundaryState
from asyncgen.schedules.cfg_parallel import batch_part
from asyncgen.schedules.asyncdiff import AsyncSchedule, StepKind, Topology
from asyncgen.split.units import DenoiserSplit, Stage

CondFn = Callable[[int], Any]


class SerialSimulator:
    """``cache``: a step cache composed with the stages (:class:`asyncgen.runtime.step_cache.StagedCache`), run
    task by task with one state per stage and replica, as the ranks run it."""

    def __init__(self, split: DenoiserSplit, stages: list[Stage], topology: Topology, cache=None):
        if len(stages) != topology.stages:
            raise ValueError(f"{len(stages)} stages given for a topology of {topology.stages}")
        self.split, self.stages, self.topology = split, stages, topology
        self.cache = cache
        self.schedule: AsyncSchedule | None = None
        self._latest: dict[int, BoundaryState] = {}
        self._call = ""

    def begin_call(self, schedule: AsyncSchedule) -> None:
        self.schedule = schedule
        self._latest = {}
        if self.cache is not None:
            self._call = self.cache.new_call(self._call)

    def _stage(self, stage: Stage, state: BoundaryState, cond, replica: int, step: int) -> BoundaryState:
        if self.cache is None:
            return stage(self.split, state, cond)
        return self.cache.run(stage, self.split, state, cond, call=self._call, replica=replica, step=step)

    def end_call(self) -> None:
        self._latest = {}

    def run_step(self, step: int, total_steps: int | None, sample: torch.Tensor, cond_at: CondFn) -> dict[int, torch.Tensor]:
        """Predictions made at ``step``: ``{step: eps}``, or S of them at a round start."""
        kind = self.schedule.kind(step)
        if kind is StepKind.CACHED:
            raise RuntimeError(f"step {step} is served from the round started at {self.schedule.round_start(step)}")
        split, last = self.split, self.topology.last
        if kind is StepKind.EXACT:
            cond = cond_at(step)
            state = split.initial_state(sample, cond)
            for stage in self.stages:
                if stage.index == last and getattr(self.cache, "shadows_exact_steps", False):
                    # the last stage's other replicas run the exact step too, for their cache state only
                    for replica in range(1, self.topology.stride):
                        self._stage(stage, state, cond, replica, step)
                state = self._stage(stage, state, cond, 0, step)
                if stage.index < last:
                    self._latest[stage.index] = state
            return {step: split.output(state)}

        produced: dict[int, BoundaryState] = {}
        predictions: dict[int, torch.Tensor] = {}
        for task in self.schedule.round_tasks(step, total_steps):
            cond = cond_at(task.cond_step)
            inp = split.initial_state(sample, cond) if task.fresh else self._latest[task.stage - 1]
            # a task serves the round's step, or (last stage) the step it predicts
            served = task.out_step if task.out_step is not None else step
            out = self._stage(self.stages[task.stage], inp, cond, task.replica, served)
            if task.out_step is None:
                produced[task.stage] = out
            else:
                predictions[task.out_step] = split.output(out)
        self._latest.update(produced)  # only after the round: every task read last round's states
        return predictions


class CfgSerialSimulator:
    """CFG parallelism's specification: each half of the batch through its own simulator.

    The halves never interact until their predictions are concatenated, exactly as the
    two rank groups of the distributed runtime only meet to exchange predictions.
    """

    def __init__(self, simulators: list[SerialSimulator]):
        self.simulators = simulators

    def begin_call(self, schedule: AsyncSchedule) -> None:
        for sim in self.simulators:
            sim.begin_call(schedule)

    def end_call(self) -> None:
        for sim in self.simulators:
            sim.end_call()

    def run_step(self, step: int, total_steps: int | None, sample: torch.Tensor, cond_at) -> dict[int, torch.Tensor]:
        parts, batch = len(self.simulators), sample.shape[0]
        per_part = [
            sim.run_step(step, total_steps, batch_part(sample, h, parts, batch), lambda m, h=h: cond_at(m, h))
            for h, sim in enumerate(self.simulators)
        ]
        return {s: torch.cat([p[s] for p in per_part], dim=0) for s in per_part[0]}


def run_loop(executor, schedule: AsyncSchedule, total_steps: int, sample: torch.Tensor,
             cond_at: Callable[[int, torch.Tensor], Any],
             update: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A whole denoising loop through an executor (a simulator or the distributed runtime), without a pipeline.

    ``cond_at(m, sample)`` is the conditioning of step ``m`` for the current sample and
    ``update(step, sample, eps)`` the scheduler's step. A round start yields several
    predictions; the steps it covers are served from them, as the pipelines' staged
    denoiser serves them when a pipeline drives the calls.
    """
    executor.begin_call(schedule)
    predictions: dict[int, torch.Tensor] = {}
    for step in range(total_steps):
        if step not in predictions:
            predictions.update(executor.run_step(step, total_steps, sample, lambda m, x=sample: cond_at(m, x)))
        sample = update(step, sample, predictions.pop(step))
    executor.end_call()  # settles the last transfers (not after a failure: the error already ends the ranks)
    return sample
