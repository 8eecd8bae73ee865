"""Where a rank's process group comes from, and what every rank must agree on.

The group comes, in this order, from: an explicit ``process_group`` argument; an
already-initialised default group; the launcher's environment (``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); or nothing, in which case
everything runs in this process (serial mode). Where no torchrun agent has met the ranks already
(the variables set by hand or by a scheduler), they meet here (:func:`rendezvous`): each says on
standard error that it waits, and after ``ASYNCGEN_TIMEOUT`` one line names the ranks that never came.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import socket
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncgen.comm.context import TIMEOUT_VARIABLE, DistContext, check_timeout, environment_timeout
from asyncgen.comm.failure import NETWORK_HINT, RemoteRankError
from asyncgen.comm.p2p import control_device

# a child of diffusers' library logger, so diffusers.utils.logging.set_verbosity_* (and its handler) apply to us;
# named with the standard library, not diffusers.utils: the CLI imports this module before it imports diffusers
# (whose first import may write files, which must wait for the CLI's file-size-limit guard)
logger = logging.getLogger(f"diffusers.{__name__}")


# every context that holds a process group, so that the groups can be let go of before the interpreter finalises
# (by id: a DistContext compares by value, so it is not hashable; an entry goes when its context does)
_CONTEXTS_WITH_GROUPS: "weakref.WeakValueDictionary[int, DistContext]" = weakref.WeakValueDictionary()


def release_groups_at_exit() -> None:
    """Let go of every process group asyncgen holds while the interpreter is still whole (run by ``atexit``).

    ``destroy_process_group`` deregisters a group but does not stop a gloo group's worker
    threads while a Python reference to it remains, and a :class:`DistContext` (held by a
    pipeline, or by a script's global ``ctx``) is one. Such a group then lives into
    interpreter finalisation, where a worker thread that releases the last collective's
    tensors needs the GIL and is killed for it: ``terminate called without an active
    exception`` (a core dump showed ``ProcessGroupGloo::runLoop`` destroying an all-reduce's
    work during ``Py_FinalizeEx``; it struck 1 exit in ~30 under load). Dropping the
    references here frees the group now, which joins its threads cleanly. A group asyncgen
    created itself (from the launcher's environment) and the user did not destroy is
    destroyed here too; a group the caller made stays theirs to destroy.
    """
    owned = False
    for ctx in list(_CONTEXTS_WITH_GROUPS.values()):
        owned = owned or ctx.owns_group
        ctx.group, ctx.subgroups = None, []
    if owned and dist.is_available() and dist.is_initialized():
        # torch 2.6 joins a gloo group's worker threads while holding the GIL; one still releasing its last
        # collective's tensors waits for the GIL, a deadlock. Sleeping lets such a thread have it first.
        time.sleep(0.05)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - exiting: a group that cannot be destroyed is left to the OS
            pass
    gc.collect()  # a group held only by a reference cycle is freed now, not during finalisation


atexit.register(release_groups_at_exit)


class LauncherEnvironmentError(ValueError):
    """The launcher's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) disagree
    or are malformed; the message is one line naming the variable, its value and what is accepted."""


class RendezvousError(RuntimeError):
    """The ranks of a launcher's environment did not all meet: one line naming this rank, the rendezvous address,
    what did not arrive (the missing ranks, or rank 0's rendezvous) and the timeout that passed."""


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


def _agent_store() -> bool:
    """True where a launcher's agent hosts the rendezvous store (torchrun, asyncgen's own launcher): the ranks
    have met already. torch reads the same variable the same way."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


# the rendezvous' keys: a counter of the ranks that arrived (and one key each, to name the missing ones), rank 0's
# verdict once its time is up ("" when every rank came after all, else the missing ranks), and how many ranks read it
ARRIVED_KEY = "asyncgen/rendezvous/arrived"
VERDICT_KEY = "asyncgen/rendezvous/verdict"
TOLD_KEY = "asyncgen/rendezvous/told"
_POLL_SECONDS = 0.05
VERDICT_GRACE_SECONDS = 10.0  # how much longer than its own timeout a rank waits for rank 0's verdict
_TELL_SECONDS = 2.0  # how long rank 0 keeps its store open for the ranks that came to read the verdict


def _ranks_text(ranks: list[int]) -> str:
    """``rank 1``, ``ranks 1 and 3``, ``ranks 1-7 and 9``: consecutive ranks as ranges."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    parts = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs]
    text = ", ".join(parts)
    if ", " in text:
        head, _, tail = text.rpartition(", ")
        text = f"{head} and {tail}"
    return ("rank " if len(ranks) == 1 else "ranks ") + text


def _say(line: str) -> None:
    """One line for the user, through diffusers' logger (shown at its default level, warning)."""
    logger.warning(line)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _meet(store, rank: int, world: int, deadline: float, me: str, where: str, seconds: float, source: str) -> None:
    """Count this rank in, then wait until every rank is in or rank 0, at ``deadline``, says who is missing.

    Rank 0 alone decides, atomically: it adds ``2 * world`` to the counter (a count above ``world`` means
    "closed"), so no rank goes on while another gives up; the ranks that came read its verdict (the missing
    ranks and how long rank 0 waited) before its store closes.
    """
    def missing_text(missing: list[int], within: str = f"within {seconds:g} s ({source})") -> str:
        return (f"{me}: {_ranks_text(missing)} did not arrive at {where} {within}; start all {world} ranks with the "
                "same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, or unset RANK and WORLD_SIZE to run in one process")

    def missing_now() -> list[int]:
        return [r for r in range(world) if not store.check([f"{ARRIVED_KEY}/{r}"])]

    store.set(f"{ARRIVED_KEY}/{rank}", "1")
    count = store.add(ARRIVED_KEY, 1)
    closed = 2 * world
    if rank == 0:
        while count < world and time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
            count = store.add(ARRIVED_KEY, 0)
        if count == world:
            return
        missing = [] if store.add(ARRIVED_KEY, closed) - closed == world else missing_now()
        store.set(VERDICT_KEY, ",".join(map(str, missing)) + f"|{seconds:g}")
        if not missing:  # the last one came just in time
            return
        told_by = time.monotonic() + _TELL_SECONDS
        while store.add(TOLD_KEY, 0) < world - 1 - len(missing) and time.monotonic() < told_by:
            time.sleep(_POLL_SECONDS)
        raise RendezvousError(missing_text(missing))
    give_up = deadline + VERDICT_GRACE_SECONDS
    while count != world:
        if count > world and store.check([VERDICT_KEY]):
            verdict, _, waited = store.get(VERDICT_KEY).decode().partition("|")
            store.add(TOLD_KEY, 1)
            if not verdict:
                return
            missing = [int(r) for r in verdict.split(",")]
            if rank in missing:
                raise RendezvousError(f"{me}: came to {where} after rank 0 had stopped waiting; start all {world} "
                                      f"ranks within {TIMEOUT_VARIABLE} of each other")
            raise RendezvousError(missing_text(missing, f"within the {waited} s rank 0 waited"))
        if time.monotonic() >= give_up:  # rank 0 came but never decided: it hangs, or its clock does
            raise RendezvousError(missing_text(missing_now()))
        time.sleep(_POLL_SECONDS)
        count = store.add(ARRIVED_KEY, 0)


def rendezvous(launcher: LauncherEnvironment, timeout: datetime.timedelta, source: str = TIMEOUT_VARIABLE):
    """Meet the other ranks of ``launcher`` at ``MASTER_ADDR:MASTER_PORT``; the store they share.

    For a process that meets its peers itself (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
    set by hand or by a scheduler, no torchrun agent): rank 0 hosts the store, every rank says it has
    arrived and waits until all have, at most ``timeout`` (``source`` names where it came from). Before
    waiting it says so in one line on standard error; when the time has passed it raises
    :class:`RendezvousError` naming the ranks that did not arrive (or, on the other ranks, that rank 0's
    rendezvous never opened). Nothing from torch's own connection retries reaches standard error: a rank
    probes the address itself before its store connects.
    """
    rank, world, addr, port = launcher.rank, launcher.world_size, launcher.master_addr, launcher.master_port
    seconds = timeout.total_seconds()
    where = f"{addr}:{port}"
    me = f"rank {rank} of {world}"
    within = f"within {seconds:g} s ({source})"
    deadline = time.monotonic() + seconds
    _say(f"{me}: waiting up to {seconds:g} s for the other ranks at {where} ({source})")
    if rank == 0:
        try:
            store = dist.TCPStore(addr, port, world, True, timeout=timeout, wait_for_workers=False, multi_tenant=True)
        except Exception as exc:
            raise RendezvousError(f"{me}: could not open the rendezvous on port {port} (MASTER_PORT) for "
                                  f"{where}: {_first_line(exc)}; give a free port") from None
    else:
        while True:  # torch's client retries print C++ stacks: connect only once rank 0 listens
            try:
                with socket.create_connection((addr, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                    break
            except socket.gaierror as exc:
                raise RendezvousError(f"{me}: MASTER_ADDR={addr!r} cannot be resolved ({exc.strerror}); set it to "
                                      "rank 0's host") from None
            except OSError:
                if time.monotonic() >= deadline:
                    raise RendezvousError(f"{me}: rank 0 did not open the rendezvous at {where} {within}; start "
                                          "rank 0 with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE") from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        try:
            store = dist.TCPStore(addr, port, world, False, timeout=timeout)
        except Exception as exc:
            raise RendezvousError(f"{me}: could not join the rendezvous at {where}: {_first_line(exc)}") from None
    try:
        _meet(store, rank, world, deadline, me, where, seconds, source)
    except RendezvousError:
        raise
    except Exception as exc:  # rank 0 ended while this rank waited: its store is gone
        raise RendezvousError(f"{me}: the rendezvous at {where} closed before every rank arrived "
                              f"({_first_line(exc)})") from None
    return store


def resolve_context(
    process_group: dist.ProcessGroup | None = None,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | float | None = None,
) -> DistContext:
    """Find (or create from the launcher's environment) the group this process works in.

    ``timeout`` (seconds or a ``timedelta``, finite and > 0) defaults to ``ASYNCGEN_TIMEOUT``,
    else 600 s. The launcher's variables are checked (:func:`launcher_environment`) before any
    rendezvous: an inconsistent set raises :class:`LauncherEnvironmentError` at once. Without a
    torchrun agent the ranks meet through :func:`rendezvous`, which raises :class:`RendezvousError`
    naming the ranks that did not come within the timeout.
    """
    given = check_timeout(timeout)
    timeout = given or environment_timeout()
    owns = False
    group = process_group
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    elif group is None and ((launcher := launcher_environment()) is not None and launcher.world_size > 1):
        if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
            # before the group exists, so NCCL binds its communicators to this rank's GPU
            torch.cuda.set_device(local_cuda_device(device))
        if _agent_store():  # torchrun (or asyncgen's launcher) met the ranks and hosts the store
            meeting = {}
        else:
            source = ("the timeout argument" if given is not None else TIMEOUT_VARIABLE
                      if TIMEOUT_VARIABLE in os.environ else f"the default; {TIMEOUT_VARIABLE} sets it")
            meeting = dict(store=rendezvous(launcher, timeout, source), rank=launcher.rank,
                           world_size=launcher.world_size)
        try:
            dist.init_process_group(backend=default_backend(), timeout=timeout, **meeting)
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
    ctx = DistContext(group, rank, world, device, timeout, owns)
    _CONTEXTS_WITH_GROUPS[id(ctx)] = ctx
    return ctx


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
