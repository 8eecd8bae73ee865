"""The numbers the layout chooser needs, measured on the ranks the work will run on, inside their group.

``asyncgen plan --parallel auto`` and ``asyncgen generate --parallel auto`` start their own
workers to measure the link and one rank's compute rate, and keep the answer in a cache file
(the CLI's business). A Python user's ``AsyncDiffPipeline(..., parallel="auto")`` is already
one rank of a group: :func:`measure_ranks` measures the same two things there, collectively,
and every rank gets the same answer, in the same form as the CLI's cache entry
(``{"link": LinkMeasurement.to_dict() or None, "rate": DeviceRate.to_dict()}``), so both
paths hand the chooser the same kind of numbers. The engine keeps nothing on disk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from asyncgen.comm.context import DistContext


def measure_ranks(ctx: DistContext, dtype: torch.dtype = torch.float32) -> dict:
    """The link between ``ctx``'s ranks and one rank's compute rate; every rank calls this and gets the same dict.

    One rank (no group): no link to measure (``link`` is None), the rate measured here. In a
    group: :func:`~asyncgen.comm.link_probe.probe_link` on it, then rank 0 alone measures the
    rate while the others wait (a layout's compute is priced as one device alone, with the
    probe's ``parallel_slowdown`` for all ranks at once), and broadcasts it.
    """
    from asyncgen.comm.link_probe import probe_link
    from asyncgen.cost.device_rate import measure_device_rate

    where = ctx.device if ctx.device is not None else torch.device("cpu")
    if not ctx.distributed or ctx.world_size == 1:
        return dict(link=None, rate=measure_device_rate(where, dtype).to_dict())
    link = probe_link(ctx.group, where)
    answer = [measure_device_rate(where, dtype).to_dict() if ctx.rank == 0 else None]
    # the object travels through the group's backend: on its device for NCCL, the CPU for gloo
    device = where if dist.get_backend(ctx.group) == "nccl" else None
    dist.broadcast_object_list(answer, src=ctx.global_rank(0), group=ctx.group, device=device)
    return dict(link=link.to_dict(), rate=answer[0])
