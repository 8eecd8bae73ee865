"""Process groups, devices and failure handling for asyncgen's ranks.

The group comes, in this order, from: an explicit ``process_group`` argument; an
already-initialised default group; the launcher's environment (``torchrun`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); or nothing,
in which case everything runs in this process (serial mode).

Failure handling: when a rank raises inside asyncgen it writes its traceback to the
group's store under :data:`ERROR_KEY` and tears its group down, which makes every peer
blocked on it fail at once (instead of waiting for the timeout). A peer whose
communication fails looks in the store and raises :class:`RemoteRankError` carrying
the failing rank's message. Every collective also has a timeout, so nothing hangs.
"""

from __future__ import annotations

import datetime
import os
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ERROR_KEY = "asyncgen/error"
DEFAULT_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("ASYNCGEN_TIMEOUT", "600")))


class RemoteRankError(RuntimeError):
    """Another rank failed; the message carries its error."""


@dataclass
class DistContext:
    """Where this process sits: its group (None in serial mode), rank and device."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    device: torch.device | None
    timeout: datetime.timedelta
    owns_group: bool = False
    subgroups: list = field(default_factory=list)  # groups asyncgen made inside ``group``

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.distributed else group_rank


def _env_world_size() -> int | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def default_backend() -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors when CUDA is available."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


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
        dist.init_process_group(backend=default_backend(), timeout=timeout)
        group, owns = dist.group.WORLD, True
    if group is None:
        return DistContext(None, 0, 1, torch.device(device) if device is not None else None, timeout)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(group, rank, world, device, timeout, owns)


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # store API is private; failure reporting must not mask the real error
        return None


def publish_error(ctx: DistContext, exc: BaseException) -> None:
    """Tell the peers why this rank is failing, then drop the group so they stop waiting.

    A rank failing because a peer failed passes the news on by dropping its group too
    (a third rank may be waiting on *it*), but leaves the original message in place.
    """
    if not ctx.distributed:
        return
    store = _store() if not isinstance(exc, RemoteRankError) else None
    if store is not None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            if not store.check([ERROR_KEY]):
                store.set(ERROR_KEY, f"rank {dist.get_rank()} failed:\n{text}")
        except Exception:
            pass
    for group in [*ctx.subgroups, None if ctx.owns_group else ctx.group]:
        try:
            dist.destroy_process_group(group)
        except Exception:
            pass
    ctx.group, ctx.subgroups = None, []


def remote_error(ctx: DistContext, cause: BaseException) -> BaseException:
    """The error to raise after a failed collective: the failing peer's, when it left one."""
    store = _store()
    message = None
    if store is not None:
        try:
            store.wait([ERROR_KEY], datetime.timedelta(seconds=5))
            message = store.get(ERROR_KEY).decode()
        except Exception:
            message = None
    if message is None:
        # nobody else failed first: the failure is this rank's own, and it is published as such
        return RuntimeError(f"rank {ctx.rank}: communication failed ({cause})")
    return RemoteRankError(message)
