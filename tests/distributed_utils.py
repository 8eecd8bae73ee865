"""Run a function on several gloo ranks spawned from a test, the way torchrun would.

The store lives in this (the parent) process, as torchrun's agent hosts it, so a rank
that dies does not take the store, and its error report, down with it. Every worker
gets one thread, the launcher's environment variables, and a deadline; a run that
overstays is killed and reported, never left hanging.
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

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    ok: bool
    value: Any  # the function's return value, or the formatted traceback
    exitcode: int | None = None


def _worker(fn, rank: int, world_size: int, port: int, results, args, kwargs):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ASYNCGEN_TIMEOUT=os.environ.get("ASYNCGEN_TIMEOUT", "60"),
    )
    import torch

    torch.set_num_threads(1)
    try:
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 240, **kwargs) -> list[RankResult]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned ranks."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, None, True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args, kwargs)) for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.5)
                collected[rank] = RankResult(rank, ok, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        del store
    if hung:
        raise TimeoutError(f"ranks {hung} still running after {timeout}s (results so far: {collected})")
    out = []
    for r, p in enumerate(procs):
        res = collected.get(r, RankResult(r, False, f"rank {r} exited with code {p.exitcode} and reported nothing"))
        res.exitcode = p.exitcode
        out.append(res)
    return out


def values(results: list[RankResult]) -> list[Any]:
    """Return values, or fail with every rank's traceback."""
    failed = [r for r in results if not r.ok]
    if failed:
        raise AssertionError("\n".join(f"--- rank {r.rank}:\n{r.value}" for r in failed))
    return [r.value for r in results]
