"""The distributed runtime: the asynchronous schedule across ranks.

Rank r runs stage ``topology.stage_of(r)`` and holds only that stage's weights (plus
the shared embedding layers). Per step it executes the task the schedule gives it:

* exact step: receive B_{k-1} (blocking, layout header included), compute, send B_k to
  every rank of stage k+1; the last stage's first replica computes eps.
* round: compute from the stale input received during the previous step or round and
  send the result with ``isend``; it is consumed in the *next* round, so the transfer
  overlaps everything until then.
* every prediction goes point to point from the replica that made it to every other
  rank, so all ranks run the same scheduler step and the latent never travels.

Communication plan: every receive is posted *before* the compute it waits behind
(the next input right after the current one arrived, each prediction before this
step's compute), so a message lands while its receiver is still busy and nobody pays a
wake-up on the critical path. Boundary states and predictions travel on two groups
of their own, so two kinds of messages never queue behind each other (NCCL runs each
communicator's operations in order).

Connections: NCCL creates a point-to-point communicator at a pair's first message and
blocks until the peer joins. Created lazily in the middle of a step, a pair can wait on
a peer that is itself blocked on another pair (rank 0 creating the prediction pair
(0, 1) while rank 1 waits for rank 0's boundary header): a deadlock at step 0. So the
constructor connects every pair the schedule uses, with one blocking message each, in
the order :func:`~asyncgen.schedules.asyncdiff.connections` gives all ranks, and a message to a
pair not connected there is refused instead of risking the hang. The group stays lazy
(no ``device_id``): eager init would put every pair of a rank on one communicator and
one stream, queueing a stage's receive of its next input behind its send.

On CUDA ranks every transfer is issued from a side stream: a send waits (on the GPU) for
an event recorded after the compute that produced its tensor, a receive is written into
a buffer allocated on the receive stream and the compute stream waits for it only when
the state is taken, so transfers overlap the compute around them and the host never
waits for the GPU on the way: a receive's ``wait()`` without a timeout only makes the
compute stream wait for it, and a send is never waited for on the host (NCCL keeps its
tensor alive and the allocator from reusing it until the transfer is done; the group's
own timeout and watchdog cover a hang). Where the group's backend cannot move CUDA
tensors point to point (gloo), tensors are staged through pinned host memory, and the
host waits for gloo, which reads and writes that memory itself.

Communication failures become :class:`~asyncgen.comm.failure.RemoteRankError` carrying
the failing rank's message; a local failure is published before it propagates.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist

from asyncgen.comm.context import DistContext
from asyncgen.comm.failure import ErrorWatch, publish_error, remote_error
from asyncgen.comm.p2p import control_device, p2p_device, wait_for
from asyncgen.cost.timing import ComputeTimer
from asyncgen.schedules.asyncdiff import AsyncSchedule, StepKind, Topology, connections
from asyncgen.schedules.cfg_parallel import batch_part
from asyncgen.split.boundary import HEADER_LEN, BoundaryLayout, BoundaryState, pack, unpack
from asyncgen.split.units import DenoiserSplit, Stage

CondFn = Callable[[int], Any]


class _Pending:
    """A posted receive and the buffer it fills."""

    def __init__(self, work, buffer: torch.Tensor, layout: BoundaryLayout | None = None):
        self.work, self.buffer, self.layout = work, buffer, layout


class DistributedRuntime:
    def __init__(self, split: DenoiserSplit, stage: Stage, topology: Topology, ctx: DistContext, cfg_parts: int = 1,
                 cache=None):
        topology.check_world_size(ctx.world_size, cfg_parts)
        # a step cache composed with the stages (runtime/step_cache.py): its message rides in the boundary state
        self.cache, self._call = cache, ""
        m = topology.world_size
        self.split, self.stage, self.topology, self.ctx = split, stage, topology, ctx
        self.schedule: AsyncSchedule | None = None
        self.cfg_parts = cfg_parts
        self.part, local = divmod(ctx.rank, m)  # which CFG half, and the rank inside it
        self.stage_index = topology.stage_of(local)
        self.replica = topology.replica_of(local)
        if stage.index != self.stage_index:
            raise ValueError(f"rank {ctx.rank} must hold stage {self.stage_index}, got stage {stage.index}")
        members = dist.get_process_group_ranks(ctx.group)
        # every member creates every group, in the same order; non-members get a placeholder
        part_groups = [
            dist.new_group(members[h * m : (h + 1) * m], timeout=ctx.timeout, use_local_synchronization=True)
            for h in range(cfg_parts)
        ]
        self.state_group = part_groups[self.part]
        self.prediction_group = dist.new_group(members, timeout=ctx.timeout, use_local_synchronization=True)
        ctx.subgroups += [g for g in (*part_groups, self.prediction_group) if isinstance(g, dist.ProcessGroup)]
        self._timer = ComputeTimer()
        # both groups inherit one backend; where it cannot move this rank's tensors they are staged
        backend = dist.get_backend(self.prediction_group)
        self._wire = p2p_device(backend, self.device)
        self._staged = self._wire.type != self.device.type
        self._header_device = control_device(backend, self._wire)
        cuda = self.device.type == "cuda"
        self._send_stream = torch.cuda.Stream(self.device) if cuda else None
        self._recv_stream = torch.cuda.Stream(self.device) if cuda else None
        self._latest_input: BoundaryState | None = None
        self._input_layout: BoundaryLayout | None = None
        self._next_input: _Pending | None = None
        self._pending_sends: list = []
        self._send_buffers: list[torch.Tensor] = []
        self._staged_copies: dict[int, torch.Tensor] = {}
        # stream-ordered transfers: NCCL moving this rank's CUDA tensors itself
        self._stream_ordered = self._wire.type == "cuda"
        self._connected: set[tuple[str, int]] = set()
        try:
            self._connect()
        except Exception as exc:
            publish_error(ctx, exc)
            raise
        # a rank blocked behind an NCCL transfer never sees a peer's failure by itself
        self._watch = ErrorWatch(ctx) if self._stream_ordered else None

    # ------------------------------------------------------------------ plumbing

    @property
    def device(self) -> torch.device:
        return self.ctx.device or torch.device("cpu")

    @property
    def compute_seconds(self) -> float:
        return self._timer.seconds

    @property
    def compute_calls(self) -> int:
        return self._timer.calls

    def _comm(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise remote_error(self.ctx, exc) from exc

    def _state_peer(self, local_rank: int) -> int:
        return dist.get_global_rank(self.state_group, local_rank)

    def _world_peer(self, rank: int) -> int:
        return dist.get_global_rank(self.prediction_group, rank)

    def _connect(self) -> None:
        """One blocking message per pair this rank is part of, in the order shared by all ranks."""
        m, rank = self.topology.world_size, self.ctx.rank
        for channel, low, high in connections(self.topology, self.cfg_parts):
            if rank not in (low, high):
                continue
            other = high if rank == low else low
            if channel == "state":
                group, peer = self.state_group, self._state_peer(other - self.part * m)
            else:
                group, peer = self.prediction_group, self._world_peer(other)
            token = torch.full((1,), low, dtype=torch.int64, device=self._wire)
            if rank == low:
                self._comm(dist.send, token, peer, group=group)
            else:
                self._comm(dist.recv, token, peer, group=group)
                if int(token.item()) != low:  # once per construction: the host may read it
                    raise RuntimeError(f"rank {rank}: connection to rank {low} delivered {int(token.item())}")
            self._connected.add((group.group_name, peer))

    def _check_connected(self, group, peer: int) -> None:
        if (group.group_name, peer) not in self._connected:
            raise RuntimeError(
                f"rank {self.ctx.rank}: no connection to rank {peer} was made before the first step "
                "(asyncgen.schedules.asyncdiff.connections misses a pair the runtime uses); on NCCL this would hang"
            )

    def _side_stream(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _isend(self, tensor: torch.Tensor, dst: int, group) -> None:
        self._check_connected(group, dst)
        if self._send_stream is None:
            self._send_buffers.append(tensor)  # must outlive the isend
            self._pending_sends.append(self._comm(dist.isend, tensor, dst, group=group))
            return
        produced = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self._send_stream):
            self._send_stream.wait_event(produced)  # the GPU waits for the compute, not the host
            if self._staged:
                tensor = self._host_copy(tensor)
            work = self._comm(dist.isend, tensor, dst, group=group)
        self._send_buffers.append(tensor)  # must outlive the isend
        if not self._stream_ordered:
            self._pending_sends.append(work)  # gloo reads the pinned copy until the host has waited

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in pinned host memory, copied once however many ranks it goes to."""
        host = self._staged_copies.get(id(tensor))
        if host is None:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            self._send_stream.synchronize()  # gloo reads host memory as soon as the send is posted
            self._staged_copies[id(tensor)] = host
            self._send_buffers.append(tensor)  # keeps the id unique while the copy is cached
        return host

    def _empty(self, numel_or_like, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A receive buffer: pinned host memory when staged, else on the receive stream's device."""
        if isinstance(numel_or_like, torch.Tensor):
            shape, dtype = numel_or_like.shape, numel_or_like.dtype
        else:
            shape = (numel_or_like,)
        if self._staged:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        with self._side_stream(self._recv_stream):
            # allocated on the receive stream: the allocator cannot hand it out while the
            # compute stream still uses the memory it held before
            return torch.empty(shape, dtype=dtype, device=self._wire)

    def _irecv(self, buffer: torch.Tensor, src: int, group, layout: BoundaryLayout | None = None) -> _Pending:
        self._check_connected(group, src)
        with self._side_stream(self._recv_stream):
            return _Pending(self._comm(dist.irecv, buffer, src, group=group), buffer, layout)

    def _arrived(self, buffer: torch.Tensor) -> torch.Tensor:
        """A received buffer, ready for this rank's compute stream."""
        if self._staged:
            # the host allocator keeps the pinned block until this copy has read it
            return buffer.to(self.device, non_blocking=True)
        if self._recv_stream is not None:
            buffer.record_stream(torch.cuda.current_stream(self.device))  # read there from now on
        return buffer

    def _wait(self, pending: _Pending) -> torch.Tensor:
        self._comm(wait_for, pending.work, self.ctx.timeout, self._stream_ordered)
        return self._arrived(pending.buffer)

    def _wait_sends(self) -> None:
        for work in self._pending_sends:
            self._comm(work.wait, self.ctx.timeout)
        self._pending_sends, self._send_buffers, self._staged_copies = [], [], {}

    def _send_state(self, state: BoundaryState, with_header: bool) -> None:
        if with_header:
            header = state.layout().encode(self.split.stream_names).to(self._header_device)
            for dst in self.topology.ranks_of(self.stage_index + 1):
                self._send_header(header, self._state_peer(dst))
        buffer = pack(state)
        for dst in self.topology.ranks_of(self.stage_index + 1):
            self._isend(buffer, self._state_peer(dst), self.state_group)

    def _send_header(self, header: torch.Tensor, dst: int) -> None:
        if header.device.type == "cuda":
            self._isend(header, dst, self.state_group)
        else:  # a CPU tensor on a mixed group travels by gloo, no stream involved
            self._check_connected(self.state_group, dst)
            self._send_buffers.append(header)
            self._pending_sends.append(self._comm(dist.isend, header, dst, group=self.state_group))

    def _recv_state_blocking(self) -> BoundaryState:
        src = self._state_peer(self.topology.rank_of(self.stage_index - 1))
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self._header_device)
        self._check_connected(self.state_group, src)
        self._comm(dist.recv, header, src, group=self.state_group)
        self._input_layout = BoundaryLayout.decode(header.cpu(), self.split.stream_names)
        pending = self._irecv(self._empty(self._input_layout.numel, self._input_layout.dtype), src, self.state_group)
        return unpack(self._wait(pending), self._input_layout)

    def _post_next_input(self) -> None:
        layout = self._input_layout
        src = self._state_peer(self.topology.rank_of(self.stage_index - 1))
        self._next_input = self._irecv(self._empty(layout.numel, layout.dtype), src, self.state_group, layout)

    def _take_next_input(self) -> BoundaryState:
        pending, self._next_input = self._next_input, None
        return unpack(self._wait(pending), pending.layout)

    def _post_predictions(self, replicas: dict[int, int], like: torch.Tensor) -> dict[tuple[int, int], _Pending]:
        """Receives for the prediction parts other ranks make this step: ``{(step, part): pending}``.

        ``replicas`` maps each step predicted now to the last-stage replica making it; each
        CFG part has its own copy of that replica.
        """
        m, last = self.topology.world_size, self.topology.last
        pending = {}
        for step, replica in replicas.items():
            for part in range(self.cfg_parts):
                src = part * m + self.topology.rank_of(last, replica)
                if src != self.ctx.rank:
                    pending[(step, part)] = self._irecv(self._empty(like), self._world_peer(src), self.prediction_group)
        return pending

    def _send_prediction(self, eps: torch.Tensor) -> None:
        eps = eps.contiguous()  # unpatchified DiT outputs are strided views
        for dst in range(self.ctx.world_size):
            if dst != self.ctx.rank:
                self._isend(eps, self._world_peer(dst), self.prediction_group)

    def _assemble(self, made: dict[int, torch.Tensor], incoming: dict[tuple[int, int], _Pending]) -> dict[int, torch.Tensor]:
        parts = {(s, self.part): eps for s, eps in made.items()}
        parts.update({key: self._wait(p) for key, p in incoming.items()})
        steps = sorted({s for s, _ in parts})
        return {s: torch.cat([parts[(s, h)] for h in range(self.cfg_parts)], dim=0) if self.cfg_parts > 1
                else parts[(s, 0)] for s in steps}

    def _compute(self, state: BoundaryState, cond: Any, step: int) -> BoundaryState:
        started = self._timer.start(self.device)
        if self.cache is None:
            out = self.stage(self.split, state, cond)
        else:
            out = self.cache.run(self.stage, self.split, state, cond, call=self._call, replica=self.replica, step=step)
        self._timer.stop(started, self.device)
        return out

    # ------------------------------------------------------------------ lifecycle

    def begin_call(self, schedule: AsyncSchedule) -> None:
        self.end_call()
        self.schedule = schedule
        self._latest_input = None
        if self.cache is not None:
            self._call = self.cache.new_call(self._call)

    def end_call(self) -> None:
        """Settle outstanding transfers (a loop that stopped earlier than planned leaves some)."""
        if self._next_input is not None:
            self._take_next_input()
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
        self._wait_sends()  # last step's sends are long done; frees their buffers
        if self.cfg_parts > 1:
            sample = batch_part(sample, self.part, self.cfg_parts, sample.shape[0])
            cond_at = partial(cond_at, part=self.part)
        # eps has the batch and spatial size of the input and the model's output channels:
        # every rank can allocate it without being told
        like = self.split.output_like(sample)

        if kind is StepKind.EXACT:
            incoming = self._post_predictions({step: 0}, like)
            cond = cond_at(step)
            if k > 0:
                self._latest_input = self._recv_state_blocking()
            made = {}
            if self.replica == 0:
                state = self.split.initial_state(sample, cond) if k == 0 else self._latest_input
                out = self._compute(state, cond, step)
                if k < last:
                    self._send_state(out, with_header=True)
                else:
                    made[step] = self.split.output(out)
                    self._send_prediction(made[step])
            elif k == last and getattr(self.cache, "shadows_exact_steps", False):
                # a signal cache's later replica computes the exact step too (it would idle), for its own residual
                self._compute(self._latest_input, cond, step)
            return self._assemble(made, incoming)

        tasks = schedule.round_tasks(step, total_steps)
        incoming = self._post_predictions({t.out_step: t.replica for t in tasks if t.out_step is not None}, like)
        last_round = schedule.is_last_round(step, total_steps)
        mine = next((t for t in tasks if (t.stage, t.replica) == (k, self.replica)), None)
        cond = cond_at(mine.cond_step) if mine is not None else None  # while the input may still be in flight
        if k > 0:
            if self._next_input is not None:
                self._latest_input = self._take_next_input()
            if not last_round:
                self._post_next_input()  # lands while this round computes
        made = {}
        if mine is not None:
            state = self.split.initial_state(sample, cond) if mine.fresh else self._latest_input
            # a task serves the round's step, or (last stage) the step it predicts
            out = self._compute(state, cond, mine.out_step if mine.out_step is not None else step)
            if mine.out_step is None:
                if not last_round:
                    self._send_state(out, with_header=False)
            else:
                made[mine.out_step] = self.split.output(out)
                self._send_prediction(made[mine.out_step])
        return self._assemble(made, incoming)
