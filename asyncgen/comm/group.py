"""Where a rank's process group comes from, and what every rank must agree on.

The group comes, in this order, from: an explicit ``process_group`` argument; an
already-initialised default group; the launcher's environment (``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); or nothing, in which case
everything runs in this process (serial mode).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncgen.comm.context import DistContext, check_timeout, environment_timeout
from asyncgen.comm.failure import NETWORK_HINT, RemoteRankError
from asyncgen.comm.p2p import control_device


class LauncherEnvironmentError(ValueError):
    """The launcher's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) disagree
    or are malformed; the message is one line naming the variable, its value and what is accepted."""


@dataclass(frozen=True)
class LauncherEnvironment:
    """What ``torchrun`` (or another launcher) told this process, checked."""

    rank: int
    world_size: int
    local_rank: int | None
    master_addr: str | None
    master_port: int | None


def _integer(environ, name: str, accepted: str, low: int, high: int | None = None) -> int | None:
    text = environ.get(name)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value >= high):
        raise LauncherEnvironmentError(f"{name}={text!r}: must be {accepted}")
    return value


def env_local_rank(environ=None) -> int | None:
    """``LOCAL_RANK`` when set (an integer >= 0), else None."""
    environ = os.environ if environ is None else environ
    return _integer(environ, "LOCAL_RANK", "an integer >= 0 (this process's index on its machine)", 0)


def launcher_environment(environ=None) -> LauncherEnvironment | None:
    """The launcher's environment, checked before anything connects; None when no launcher started this process.

    A process with neither ``RANK`` nor ``WORLD_SIZE`` runs alone. Otherwise both must be
    integers with ``0 <= RANK < WORLD_SIZE``; ``WORLD_SIZE > 1`` needs ``MASTER_ADDR`` and
    ``MASTER_PORT`` (1-65535) for the rendezvous; ``LOCAL_RANK``, when set, must be an integer
    ``>= 0`` below ``LOCAL_WORLD_SIZE`` (when set) and ``WORLD_SIZE``. Anything else raises
    :class:`LauncherEnvironmentError` here, instead of a rendezvous that fails deep in torch
    or waits forever for a rank that will never come.
    """
    environ = os.environ if environ is None else environ
    local_rank = env_local_rank(environ)
    present = [name for name in ("RANK", "WORLD_SIZE") if name in environ]
    if not present:
        return None
    if len(present) == 1:
        other = "WORLD_SIZE" if present[0] == "RANK" else "RANK"
        raise LauncherEnvironmentError(
            f"{present[0]}={environ[present[0]]!r} is set but {other} is not: a launcher (torchrun) sets both; "
            f"set {other} too, or unset {present[0]} to run in one process")
    world = _integer(environ, "WORLD_SIZE", "an integer >= 1 (the number of processes)", 1)
    rank = _integer(environ, "RANK", f"an integer from 0 to WORLD_SIZE - 1 = {world - 1}", 0, world)
    local_world = _integer(environ, "LOCAL_WORLD_SIZE", f"an integer from 1 to WORLD_SIZE = {world}", 1, world + 1)
    if local_rank is not None:
        limit = local_world if local_world is not None else world
        source = "LOCAL_WORLD_SIZE" if local_world is not None else "WORLD_SIZE"
        _integer(environ, "LOCAL_RANK", f"an integer from 0 to {source} - 1 = {limit - 1}", 0, limit)
    addr = environ.get("MASTER_ADDR")
    port = _integer(environ, "MASTER_PORT", "a port number from 1 to 65535", 1, 65536)
    if world > 1:
        if addr is None or not addr.strip():
            shown = " is not set" if addr is None else f"={addr!r} is empty"
            raise LauncherEnvironmentError(
                f"MASTER_ADDR{shown}, but WORLD_SIZE={world} needs it: the address of rank 0's machine for the "
                "rendezvous (torchrun sets it; or unset RANK and WORLD_SIZE to run in one process)")
        if port is None:
            raise LauncherEnvironmentError(
                f"MASTER_PORT is not set, but WORLD_SIZE={world} needs it: a free port from 1 to 65535 on "
                f"MASTER_ADDR={addr} for the rendezvous (torchrun sets it)")
    return LauncherEnvironment(rank, world, local_rank, addr, port)


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
        local = env_local_rank()
        index = local if local is not None else (dist.get_rank() % max(count, 1) if dist.is_initialized() else 0)
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
    """Find (or create from the launcher's environment) the group this process works in.

    ``timeout`` (seconds or a ``timedelta``, finite and > 0) defaults to ``ASYNCGEN_TIMEOUT``,
    else 600 s. The launcher's variables are checked (:func:`launcher_environment`) before any
    rendezvous: an inconsistent set raises :class:`LauncherEnvironmentError` at once.
    """
    timeout = check_timeout(timeout) or environment_timeout()
    owns = False
    group = process_group
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    elif group is None and ((launcher := launcher_environment()) is not None and launcher.world_size > 1):
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
