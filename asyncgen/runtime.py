"""The distributed runtime: the asynchronous schedule across ranks.

Rank r runs stage ``topology.stage_of(r)`` and holds only that stage's weights (plus
the shared embedding layers). Per step it executes the task the schedule gives it:

* exact step: receive B_{k-1} (blocking, layout header included), compute, send B_k to
  every rank of stage k+1; the last stage's primary replica computes eps.
* round: compute from the stale input received during the previous step/round, send
  the result with ``isend`` (it is consumed in the *next* round, so the transfer
  overlaps the broadcast, the scheduler step and the next compute), and post the
  ``irecv`` for the next input.
* every rank joins the broadcast of each prediction, so all ranks run the same
  scheduler step and the latent never travels.

Communication failures become :class:`~asyncgen.distributed.RemoteRankError` carrying
the failing rank's message; a local failure is published before it propagates.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from .boundary import HEADER_LEN, BoundaryLayout, BoundaryState, pack, unpack
from .distributed import DistContext, publish_error, remote_error
from .schedule import AsyncSchedule, StepKind, Topology
from .split import DenoiserSplit, Stage

CondFn = Callable[[int], Any]


class _PendingRecv:
    def __init__(self, work, buffer: torch.Tensor, layout: BoundaryLayout):
        self.work, self.buffer, self.layout = work, buffer, layout


class DistributedRuntime:
    def __init__(self, split: DenoiserSplit, stage: Stage, topology: Topology, ctx: DistContext, stream_names=()):
        top = topology
        if ctx.world_size != top.world_size:
            raise ValueError(
                f"world size {ctx.world_size} does not match stages + stride - 1 = "
                f"{top.stages} + {top.stride} - 1 = {top.world_size}"
            )
        self.split, self.stage, self.topology, self.ctx = split, stage, topology, ctx
        self.schedule: AsyncSchedule | None = None
        self.stream_names = tuple(stream_names)
        self.rank = ctx.rank
        self.stage_index = top.stage_of(ctx.rank)
        self.replica = top.replica_of(ctx.rank)
        if stage.index != self.stage_index:
            raise ValueError(f"rank {ctx.rank} must hold stage {self.stage_index}, got stage {stage.index}")
        self.compute_seconds = 0.0
        self.compute_calls = 0
        self._latest_input: BoundaryState | None = None
        self._input_layout: BoundaryLayout | None = None
        self._send_buffers: list[torch.Tensor] = []
        self._pending_recv: _PendingRecv | None = None
        self._pending_sends: list = []

    # ------------------------------------------------------------------ plumbing

    @property
    def device(self) -> torch.device:
        return self.ctx.device or torch.device("cpu")

    def _comm(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise remote_error(self.ctx, exc) from exc

    def _successors(self) -> list[int]:
        return self.topology.ranks_of(self.stage_index + 1)

    def _predecessor(self) -> int:
        return self.topology.rank_of(self.stage_index - 1)

    def _send(self, state: BoundaryState, with_header: bool) -> None:
        self._wait_sends()
        g = self.ctx.global_rank
        # the buffers must outlive their isends: kept until _wait_sends
        self._send_buffers = [state.layout().encode().to(self.device)] if with_header else []
        self._send_buffers.append(pack(state))
        for buffer in self._send_buffers:
            for dst in self._successors():
                self._pending_sends.append(self._comm(dist.isend, buffer, g(dst), group=self.ctx.group))

    def _wait_sends(self) -> None:
        for work in self._pending_sends:
            self._comm(work.wait, self.ctx.timeout)
        self._pending_sends, self._send_buffers = [], []

    def _recv_blocking(self) -> BoundaryState:
        src = self.ctx.global_rank(self._predecessor())
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._comm(dist.recv, header, src, group=self.ctx.group)
        self._input_layout = BoundaryLayout.decode(header.cpu(), self.stream_names)
        buffer = torch.empty(self._input_layout.numel, dtype=self._input_layout.dtype, device=self.device)
        self._comm(dist.recv, buffer, src, group=self.ctx.group)
        return unpack(buffer, self._input_layout)

    def _post_recv(self) -> None:
        src = self.ctx.global_rank(self._predecessor())
        layout = self._input_layout
        buffer = torch.empty(layout.numel, dtype=layout.dtype, device=self.device)
        work = self._comm(dist.irecv, buffer, src, group=self.ctx.group)
        self._pending_recv = _PendingRecv(work, buffer, layout)

    def _wait_recv(self) -> BoundaryState:
        pending, self._pending_recv = self._pending_recv, None
        self._comm(pending.work.wait, self.ctx.timeout)
        return unpack(pending.buffer, pending.layout)

    def _broadcast(self, eps: torch.Tensor | None, like: torch.Tensor, src: int) -> torch.Tensor:
        if eps is None:
            eps = torch.empty_like(like)
        self._comm(dist.broadcast, eps, self.ctx.global_rank(src), group=self.ctx.group)
        return eps

    def _compute(self, state: BoundaryState, cond: Any) -> BoundaryState:
        start = time.perf_counter()
        out = self.stage(self.split, state, cond)
        if out.hidden.device.type == "cuda":
            torch.cuda.synchronize(out.hidden.device)
        self.compute_seconds += time.perf_counter() - start
        self.compute_calls += 1
        return out

    # ------------------------------------------------------------------ lifecycle

    def begin_call(self, schedule: AsyncSchedule) -> None:
        self.end_call()
        self.schedule = schedule
        self._latest_input = None

    def end_call(self) -> None:
        """Settle outstanding transfers (a loop that stopped earlier than planned leaves some)."""
        if self._pending_recv is not None:
            self._wait_recv()
        self._wait_sends()

    # ------------------------------------------------------------------ one step

    def run_step(self, step: int, total_steps: int | None, sample: torch.Tensor, cond_at: CondFn) -> dict[int, torch.Tensor]:
        try:
            return self._run_step(step, total_steps, sample, cond_at)
        except Exception as exc:
            publish_error(self.ctx, exc)
            raise

    def _run_step(self, step, total_steps, sample, cond_at) -> dict[int, torch.Tensor]:
        schedule, top = self.schedule, self.topology
        kind = schedule.kind(step)
        if kind is StepKind.CACHED:
            raise RuntimeError(f"step {step} is served from the round started at {schedule.round_start(step)}")
        k, last = self.stage_index, top.last
        # eps has the shape of the denoiser's output: batch and spatial size of the input,
        # channel count of the model; every rank can allocate it without being told.
        like = self.split.output_like(sample)

        if kind is StepKind.EXACT:
            cond = cond_at(step)
            if k > 0:
                self._latest_input = self._recv_blocking()
            eps = None
            if self.replica == 0:
                state = self.split.initial_state(sample, cond) if k == 0 else self._latest_input
                out = self._compute(state, cond)
                if k < last:
                    self._send(out, with_header=True)
                else:
                    eps = self.split.output(out)
            return {step: self._broadcast(eps, like, top.rank_of(last))}

        tasks = schedule.round_tasks(step, total_steps)
        mine = next((t for t in tasks if (t.stage, t.replica) == (k, self.replica)), None)
        if k > 0 and self._pending_recv is not None:
            self._latest_input = self._wait_recv()
        last_round = schedule.is_last_round(step, total_steps)
        eps = None
        if mine is not None:
            cond = cond_at(mine.cond_step)
            state = self.split.initial_state(sample, cond) if mine.fresh else self._latest_input
            out = self._compute(state, cond)
            if k < last:
                if not last_round:
                    self._send(out, with_header=False)
            else:
                eps = self.split.output(out)
        if k > 0 and not last_round:
            self._post_recv()
        predictions = {}
        for task in tasks:
            if task.out_step is not None:
                src = top.rank_of(last, task.replica)
                predictions[task.out_step] = self._broadcast(eps if task.replica == self.replica and k == last else None, like, src)
        return predictions
