"""Start N worker processes on this machine, the way ``torchrun`` would, without it.

The rendezvous store lives in the launching process (as torchrun's agent hosts it), so
a worker that dies does not take the store, and its error report, down with it. Each
worker gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, one
thread on CPU (or ``threads``), and a deadline. A worker failure is forwarded with its
traceback; on timeout or Ctrl-C every worker is stopped, none is left behind.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable


class WorkerFailed(RuntimeError):
    """A worker raised; the message carries its rank and traceback."""


@dataclass
class WorkerResult:
    rank: int
    ok: bool
    value: Any  # the function's return value, or the formatted traceback
    exitcode: int | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_sets(nprocs: int, threads: int) -> list[list[int] | None]:
    """Disjoint CPU sets, ``threads`` cores each, when the machine has enough cores; else no pinning.

    A pinned worker's communication threads run on its own core: they do not have to
    preempt another worker's compute thread to deliver a message.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if nprocs * threads > len(cpus):
        return [None] * nprocs
    return [cpus[r * threads : (r + 1) * threads] for r in range(nprocs)]


def _worker(fn, rank: int, world_size: int, port: int, threads: int, cpus: list[int] | None, env: dict, results, args, kwargs):
    if cpus:
        os.sched_setaffinity(0, cpus)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
    )
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_workers(
    fn: Callable,
    nprocs: int,
    *args,
    timeout: float | None = None,
    threads: int = 1,
    env: dict[str, str] | None = None,
    pin_cpus: bool = True,
    **kwargs,
) -> list[WorkerResult]:
    """Call ``fn(rank, nprocs, *args, **kwargs)`` in ``nprocs`` spawned workers; every rank's result.

    ``fn`` must be importable (a module-level function). Raises ``TimeoutError`` when a
    worker is still running after ``timeout`` seconds (all workers are killed first).
    """
    import torch.distributed as dist

    port = free_port()
    store_timeout = datetime.timedelta(seconds=timeout or 3600)
    store = dist.TCPStore("127.0.0.1", port, None, True, timeout=store_timeout, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    cpu_sets = _cpu_sets(nprocs, threads) if pin_cpus else [None] * nprocs
    procs = [
        ctx.Process(target=_worker, args=(fn, r, nprocs, port, threads, cpu_sets[r], env or {}, results, args, kwargs))
        for r in range(nprocs)
    ]
    collected: dict[int, WorkerResult] = {}
    deadline = time.monotonic() + timeout if timeout else float("inf")
    try:
        for p in procs:
            p.start()
        while len(collected) < nprocs and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.2)
                collected[rank] = WorkerResult(rank, ok, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(max(0.1, min(deadline - time.monotonic(), 30)))
    finally:  # also on KeyboardInterrupt: no orphans
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        del store
    if hung:
        raise TimeoutError(f"workers {hung} were still running after {timeout}s and were stopped")
    out = []
    for r, p in enumerate(procs):
        res = collected.get(r, WorkerResult(r, False, f"worker {r} exited with code {p.exitcode} and reported nothing"))
        res.exitcode = p.exitcode
        out.append(res)
    return out


def launch(fn: Callable, nprocs: int, *args, **kwargs) -> list[Any]:
    """Like :func:`run_workers`, but return the values, or raise the first worker failure."""
    results = run_workers(fn, nprocs, *args, **kwargs)
    failed = [r for r in results if not r.ok]
    if failed:
        # the rank that failed first is the one whose error is not a RemoteRankError
        first = next((r for r in failed if "RemoteRankError" not in r.value), failed[0])
        raise WorkerFailed(f"worker {first.rank} failed:\n{first.value}")
    return [r.value for r in results]


def launched_by_torchrun() -> bool:
    """True inside a process that ``torchrun`` (or another launcher) started as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_on_devices(fn: Callable, devices: int | None, *args, device_type: str = "cpu", **kwargs) -> Any:
    """Run ``fn(rank, world_size, *args)`` as this machine's share of a job; return rank 0's value here.

    Under ``torchrun`` this process *is* one rank: ``fn`` runs here with the launcher's
    rank and world size (the value returned is this rank's), and ``devices``, when given,
    must equal that world size. Otherwise one device runs ``fn`` in this process, and
    ``devices > 1`` spawns that many workers: one thread each on CPU (pinned to its own
    core when there are enough), one GPU each on CUDA (``cuda:LOCAL_RANK``).
    """
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if devices is not None and devices != world:
            raise ValueError(f"--devices {devices} does not match the launcher's WORLD_SIZE={world}; "
                             "under torchrun leave --devices out (or give the same number)")
        return fn(int(os.environ["RANK"]), world, *args)
    devices = 1 if devices is None else devices
    if devices < 1:
        raise ValueError(f"--devices {devices}: need at least 1")
    if device_type == "cuda":
        import torch

        available = torch.cuda.device_count()
        if devices > available:
            raise ValueError(f"--devices {devices} needs {devices} GPUs, this machine has {available}")
    if devices == 1:
        return fn(0, 1, *args)
    return launch(fn, devices, *args, **kwargs)[0]
