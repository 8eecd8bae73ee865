"""Process groups, devices and failure handling for asyncgen's ranks.

The group comes, in this order, from: an explicit ``process_group`` argument; an
already-initialised default group; the launcher's environment (``torchrun`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); or nothing,
in which case everything runs in this process (serial mode).

Failure handling: when a rank raises inside asyncgen it writes its traceback to the
group's store under :data:`ERROR_KEY` and aborts its groups (``destroy_process_group``
would first flush pending NCCL work, such as pre-posted receives, and can block). On
gloo that closes the connections, so every peer blocked on it fails at once; a peer
whose communication fails looks in the store and raises :class:`RemoteRankError`
carrying the failing rank's message. A rank whose transfers are ordered on CUDA streams
is blocked on the GPU, where no error arrives: its :class:`ErrorWatch` polls the
store's error key and aborts its groups, which ends the wait. Every collective also
has a timeout, so nothing hangs.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

ERROR_KEY = "asyncgen/error"
ERROR_POLL_SECONDS = 1.0
# what to check when ranks cannot reach each other, named in every communication failure
NETWORK_HINT = (
    "if the ranks run on several hosts, check that each reaches the others: set GLOO_SOCKET_IFNAME "
    "(control messages, every group) and NCCL_SOCKET_IFNAME (CUDA tensors) to the network interface "
    "that connects them (e.g. GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0), especially where the "
    "host name resolves to 127.0.1.1"
)
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


# backends that move accelerator tensors point to point themselves; gloo (and MPI builds
# that are not CUDA-aware) read the tensor's memory from the host, so it must be staged
_DEVICE_P2P_BACKENDS = ("nccl", "ucc")


def p2p_device(backend: str, device: torch.device | None) -> torch.device:
    """Where a tensor bound for ``device`` must live to travel point to point on ``backend``.

    ``backend`` is what :func:`torch.distributed.get_backend` returns for the group
    (``"gloo"``, ``"nccl"``, ``"cpu:gloo,cuda:nccl"``, ...). The answer is ``device``
    itself when the backend moves such tensors (NCCL for CUDA), else the CPU: the caller
    then stages CUDA tensors through pinned host memory.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    backends = BackendConfig(backend).get_device_backend_map()
    if device.type == "cpu" or backends.get(device.type) in _DEVICE_P2P_BACKENDS:
        if device.type not in backends:
            raise ValueError(f"process group backend {backend!r} cannot carry {device.type} tensors")
        return device
    if "cpu" not in backends:
        raise ValueError(
            f"process group backend {backend!r} can carry neither {device.type} tensors point to point "
            f"nor CPU tensors to stage them through; use 'nccl' or 'cpu:gloo,cuda:nccl' for CUDA ranks"
        )
    return torch.device("cpu")


def control_device(backend: str, device: torch.device | None) -> torch.device:
    """Where small tensors that the host reads (seeds, cut points, layout headers) travel on ``backend``.

    The CPU when the backend carries CPU tensors (gloo, also beside NCCL), so reading them
    costs no GPU sync; ``device`` on an NCCL-only group.
    """
    if "cpu" in BackendConfig(backend).get_device_backend_map():
        return torch.device("cpu")
    if device is None:
        raise ValueError(f"process group backend {backend!r} carries no CPU tensors and this rank has no device")
    return torch.device(device)


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


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # store API is private; failure reporting must not mask the real error
        return None


def _abort(group) -> None:
    """End ``group`` now, pending work dropped (``None``: every group of this process).

    torch's abort helper, which (unlike ``destroy_process_group``) does not wait for
    pending NCCL operations; on gloo it closes the connections, which peers see at once.
    """
    try:
        dist.distributed_c10d._abort_process_group(group)
    except Exception:  # private helper (torch 2.14); an older torch, or a group already gone
        try:
            dist.destroy_process_group(group)
        except Exception:
            pass


def publish_error(ctx: DistContext, exc: BaseException) -> None:
    """Tell the peers why this rank is failing, then abort the groups so they stop waiting.

    A rank failing because a peer failed passes the news on by aborting its groups too
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
        _abort(group)
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
        return RuntimeError(f"rank {ctx.rank}: communication failed ({cause}); {NETWORK_HINT}")
    return RemoteRankError(message)


class ErrorWatch:
    """Polls the store's error key from a daemon thread and aborts this rank's groups when a peer failed.

    A rank whose transfers are ordered on CUDA streams waits for a dead peer on the GPU
    (an NCCL receive that never completes), where no error reaches the host; aborting
    the communicators ends that wait, and the rank's next communication fails and finds
    the peer's message (:func:`remote_error`). Only ``ProcessGroup.abort()`` is called
    here: the group bookkeeping belongs to the main thread (:func:`publish_error`).
    """

    def __init__(self, ctx: DistContext, interval: float = ERROR_POLL_SECONDS):
        self.ctx, self.interval = ctx, interval
        self.fired = threading.Event()
        self._store = _store()
        self._groups = [*ctx.subgroups, ctx.group]
        if self._store is not None:
            threading.Thread(target=self._run, name="asyncgen-error-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                failed = self._store.check([ERROR_KEY])
            except Exception:  # store gone: the group was shut down, nothing left to watch
                return
            if failed:
                for group in self._groups:
                    try:
                        group.abort()
                    except Exception:
                        pass
                self.fired.set()
                return


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
