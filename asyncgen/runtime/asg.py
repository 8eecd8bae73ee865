"""ASG across ranks: the simulator's phases on this rank's patches and windows, assembled by an all-reduce.

:class:`ASGRuntime` is :class:`asyncgen.schedules.asg.ASGSimulator` with one difference:
:meth:`combine` sums the ranks' partial tensors. Every rank fills in only what it
computed and leaves zeros elsewhere, so the sum assembles the whole, and adding zeros is
exact: the ranks' structure phase is bit-identical to the serial run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from asyncgen.comm.context import DistContext
from asyncgen.comm.failure import remote_error
from asyncgen.comm.p2p import wait_for
from asyncgen.schedules.asg import ASGSimulator


class ASGRuntime(ASGSimulator):
    def __init__(self, structure_guidance: float, guidance_schedule: str, mode: str, map_layers: dict,
                 vae_scale_factor: int, ctx: DistContext):
        super().__init__(structure_guidance, guidance_schedule, mode, map_layers, vae_scale_factor)
        self.ctx = ctx

    def combine(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks in place."""
        if not self.ctx.distributed or self.ctx.world_size == 1:
            return tensor
        try:
            work = dist.all_reduce(tensor, group=self.ctx.group, async_op=True)
            wait_for(work, self.ctx.timeout, stream_ordered=tensor.is_cuda)
        except Exception as exc:
            raise remote_error(self.ctx, exc) from exc
        return tensor
