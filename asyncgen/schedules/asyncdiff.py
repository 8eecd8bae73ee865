"""The asynchronous denoising schedule: who computes what, from which input, when.

This module only *describes* the schedule; :mod:`asyncgen.schedules.simulator` executes it in one
process and :mod:`asyncgen.runtime` across ranks, so both run literally the same plan.

Notation: N stages, stride S, warm-up W, T steps, step indices 0..T-1.

* Steps ``i < W`` are **exact**: B_0 -> stage 0 -> ... -> stage N-1 with step i's
  conditioning; the prediction equals the stock denoiser's.
* Afterwards steps are grouped in **rounds** of S steps starting at ``W + r*S``. In a
  round every stage runs once, all at the same time: stage 0 on the fresh latent,
  stage k>0 on what stage k-1 produced in the previous round (or last exact step).
  The last stage has S replicas; replica j produces the prediction of step ``i+j``
  from the same stale state with step ``i+j``'s timestep. The other steps of a round
  are **cached**: their prediction was already made at the round's first step.
* ``time_shift``: a stage fed a stale state takes the timestep of the step before the
  one it serves (the noisier timestep its input actually belongs to). Only the
  timestep shifts; all other conditioning is the serving step's.

A stale input exists only after one exact step, so with N > 1 at least one exact step
always runs (``warmup=0`` behaves as ``warmup=1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StepKind(Enum):
    EXACT = "exact"
    ROUND = "round"
    CACHED = "cached"


@dataclass(frozen=True)
class Topology:
    """Placement of stages on ranks: stage k < N-1 on rank k; the last stage on S ranks."""

    stages: int
    stride: int = 1

    def __post_init__(self):
        if not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"stages must be a positive integer, got {self.stages!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be a positive integer (1 or 2 in practice), got {self.stride!r}")

    @property
    def world_size(self) -> int:
        return self.stages + self.stride - 1

    @property
    def last(self) -> int:
        return self.stages - 1

    def stage_of(self, rank: int) -> int:
        return min(rank, self.last)

    def replica_of(self, rank: int) -> int:
        return rank - self.last if rank >= self.last else 0

    def ranks_of(self, stage: int) -> list[int]:
        if stage == self.last:
            return list(range(self.last, self.last + self.stride))
        return [stage]

    def rank_of(self, stage: int, replica: int = 0) -> int:
        return stage + replica

    def check_world_size(self, world_size: int, cfg_parts: int = 1) -> None:
        """Refuse a process group of the wrong size: ``cfg_parts * (stages + stride - 1)`` ranks run this topology."""
        world = cfg_parts * self.world_size
        if world_size != world:
            expected = f"stages + stride - 1 = {self.stages} + {self.stride} - 1 = {world}"
            if cfg_parts > 1:
                expected = (f"{cfg_parts} * (stages + stride - 1) = {cfg_parts} * ({self.stages} + {self.stride} - 1) "
                            f"= {world} (cfg_parallel)")
            raise ValueError(f"world size {world_size} does not match {expected}; launch {world} processes")


@dataclass(frozen=True)
class Task:
    """One stage evaluation inside a round."""

    stage: int
    replica: int
    fresh: bool  # input is B_0 of the round's latent (else the predecessor's stale output)
    cond_step: int  # step whose conditioning (timestep) the stage uses
    out_step: int | None  # step whose prediction this produces (last stage only)


@dataclass(frozen=True)
class AsyncSchedule:
    topology: Topology
    warmup: int
    time_shift: bool = False

    def __post_init__(self):
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")

    @property
    def exact_steps(self) -> int:
        """Warm-up actually run: a stale input needs one exact step before it."""
        return max(self.warmup, 1) if self.topology.stages > 1 else self.warmup

    def kind(self, step: int) -> StepKind:
        if step < self.exact_steps:
            return StepKind.EXACT
        return StepKind.ROUND if (step - self.exact_steps) % self.topology.stride == 0 else StepKind.CACHED

    def round_start(self, step: int) -> int:
        if step < self.exact_steps:
            raise ValueError(f"step {step} is an exact warm-up step, not part of a round")
        return step - (step - self.exact_steps) % self.topology.stride

    def is_last_round(self, step: int, total_steps: int | None) -> bool:
        """No stage output of this round will be consumed (so nothing is sent)."""
        return total_steps is not None and step + self.topology.stride >= total_steps

    def round_tasks(self, step: int, total_steps: int | None) -> list[Task]:
        top, shift = self.topology, 1 if self.time_shift else 0
        tasks = []
        for k in range(top.last):
            fresh = k == 0
            tasks.append(Task(k, 0, fresh, step - (0 if fresh else shift), None))
        fresh = top.stages == 1
        for j in range(top.stride):
            out = step + j
            if total_steps is not None and out >= total_steps:
                break
            tasks.append(Task(top.last, j, fresh, out - (0 if fresh else shift), out))
        return tasks


def connections(topology: Topology, cfg_parts: int = 1) -> list[tuple[str, int, int]]:
    """Every point-to-point pair the runtime uses, as ``(channel, low rank, high rank)``, sorted.

    ``channel`` is ``"state"`` (boundary states from stage k to the ranks of stage k+1,
    inside one CFG part, on that part's group) or ``"prediction"`` (each last-stage
    replica of each part to every other rank, on the group of all ranks); ranks count
    from 0 in the group of ``cfg_parts * topology.world_size`` ranks. A pure function of
    the schedule's shape, so every rank computes the same list in the same order: NCCL
    creates a pair's communicator at its first use and blocks until the peer joins, so
    the runtime connects the pairs one by one in this order before the first step (the
    lowest unconnected pair always has both its ranks waiting on it; no cycle).
    """
    if not isinstance(cfg_parts, int) or cfg_parts < 1:
        raise ValueError(f"cfg_parts must be a positive integer, got {cfg_parts!r}")
    m, last = topology.world_size, topology.last
    pairs: set[tuple[str, int, int]] = set()
    for part in range(cfg_parts):
        base = part * m
        for stage in range(last):
            for dst in topology.ranks_of(stage + 1):
                pairs.add(("state", base + topology.rank_of(stage), base + dst))
        for replica in range(topology.stride):
            src = base + topology.rank_of(last, replica)
            for dst in range(cfg_parts * m):
                if dst != src:
                    pairs.add(("prediction", min(src, dst), max(src, dst)))
    return sorted(pairs)
