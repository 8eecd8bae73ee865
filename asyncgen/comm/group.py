"""Where a rank's process group comes from, and what every rank must agree on.

The group comes, in this order, from: an explicit ``process_group`` argument; an
already-initialised default group; the launcher's environment (``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); or nothing, in which case
everything runs in this process (serial mode).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from asyncgen.comm.context import DEFAULT_TIMEOUT, DistContext
from asyncgen.comm.failure import NETWORK_HINT, RemoteRankError
from asyncgen.comm.p2p import control_device


def _env_world_size() -> int | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def default_backend() -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors when CUDA is available."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def local_cuda_device(device: str | torch.device | None = None) -> torch.device:
    """The CUDA device of this rank: an explicit index wins, else ``LOCAL_RANK`` (what torchrun sets).

    ``device="cuda"`` without an index means "this rank's GPU", never GPU 0 for every rank;
    when the process sees exactly one GPU (SLURM or Kubernetes set ``CUDA_VISIBLE_DEVICES``
    per process) that GPU is ``cuda:0``, whatever ``LOCAL_RANK`` says.
    """
    count = torch.cuda.device_count()
    if device is not None and torch.device(device).index is not None:
        index = torch.device(device).index
        source = f"device={str(device)!r}"
    elif count == 1:
        return torch.device("cuda", 0)
    else:
        raw = os.environ.get("LOCAL_RANK")
        index = int(raw) if raw is not None else (dist.get_rank() % max(count, 1) if dist.is_initialized() else 0)
        source = f"LOCAL_RANK={raw}" if raw is not None else f"rank {index}"
    if index >= count:
        raise ValueError(
            f"{source} asks for CUDA device {index}, but this process sees {count} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); launch at most {count} ranks per node"
        )
    return torch.device("cuda", index)


def resolve_context(
    process_group: dist.ProcessGroup | None = None,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | float | None = None,
) -> DistContext:
    """Find (or create from the launcher's environment) the group this process works in."""
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=timeout)
    timeout = timeout or DEFAULT_TIMEOUT
    owns = False
    group = process_group
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    elif group is None and (_env_world_size() or 1) > 1:
        if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
            # before the group exists, so NCCL binds its communicators to this rank's GPU
            torch.cuda.set_device(local_cuda_device(device))
        try:
            dist.init_process_group(backend=default_backend(), timeout=timeout)
        except Exception as exc:
            raise RuntimeError(f"could not create the process group ({exc}); {NETWORK_HINT}") from exc
        group, owns = dist.group.WORLD, True
    if group is None:
        return DistContext(None, 0, 1, torch.device(device) if device is not None else None, timeout)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        device = local_cuda_device(device)
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(group, rank, world, device, timeout, owns)


def shared_randomness(ctx: DistContext, kwargs: dict) -> dict:
    """Pipeline call arguments with a generator every rank agrees on, when the caller fixed none.

    asyncgen keeps the latent replicated on every rank and never sends it, so the ranks
    must draw identical initial noise (and identical noise in stochastic schedulers):
    without a ``generator`` or ``latents``, rank 0 picks a seed and broadcasts it.
    """
    if not ctx.distributed or kwargs.get("generator") is not None or kwargs.get("latents") is not None:
        return kwargs
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    seed = seed.to(control_device(dist.get_backend(ctx.group), ctx.device))
    try:
        dist.broadcast(seed, ctx.global_rank(0), group=ctx.group)
    except Exception as exc:
        raise RemoteRankError(f"rank {ctx.rank}: could not agree on a seed ({exc})") from exc
    return {**kwargs, "generator": torch.Generator("cpu").manual_seed(int(seed.item()))}
