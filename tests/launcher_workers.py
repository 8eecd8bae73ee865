"""Worker functions for the launcher tests (spawned workers import them by module name).

Nothing here imports torch at module level: a spawned worker that does not need it
starts in a fraction of a second instead of paying torch's import.
"""

import ctypes
import os
import signal
import sys
import time
from pathlib import Path


def pid_of(path: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"{path} was not written within {timeout} s")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no longer runs: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid and alive(int(entry.name)):
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


def _write_pid(folder: str, rank: int) -> None:
    tmp = Path(folder) / f"pid{rank}.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(Path(folder) / f"pid{rank}")


def heartbeat(rank, world_size, folder):
    """Append to ``beat<rank>`` forever: anything written after the launch returned shows a survivor."""
    _write_pid(folder, rank)
    with open(Path(folder) / f"beat{rank}", "a") as out:
        while True:
            out.write(".")
            out.flush()
            time.sleep(0.05)


def sleep_forever(rank, world_size):
    time.sleep(600)


def launch_heartbeats(folder):
    """The launching process of the dead-parent test."""
    from asyncgen.cli.launcher import launch

    launch(heartbeat, 2, folder, timeout=120)


def fail_on_one(rank, world_size, folder, how):
    """Rank 1 fails as ``how`` says; rank 0 then fails the way a peer of a dead rank does.

    Rank 0's error is raised only after rank 1 is gone, as gloo's would be, so the
    launcher sees both and has to tell which came first.
    """
    if rank == 1:
        _write_pid(folder, rank)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "exit3":
            os._exit(3)
        elif how == "segfault":
            ctypes.string_at(0)
        elif how == "usage":
            from asyncgen.cli.errors import UsageError

            raise UsageError("--width 34 is not divisible by 8")
        raise ValueError("bad value on rank one\nsecond line")
    peer = pid_of(Path(folder) / "pid1")
    deadline = time.monotonic() + 30
    while alive(peer) and time.monotonic() < deadline:
        time.sleep(0.01)
    raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer")


def fail_and_hang(rank, world_size):
    """Rank 1 fails; rank 0 never returns, as if blocked in a collective that rank 1 will never join."""
    if rank == 1:
        raise ValueError("rank one gave up")
    time.sleep(600)


def watched_by_fallback(folder):
    """An intermediate parent whose child watches it with the portable watcher, then both wait."""
    import subprocess

    code = ("import os, sys, time; from asyncgen.cli.launcher import exit_with_parent; "
            "exit_with_parent(os.getppid(), use_prctl=False, interval=0.05); "
            f"open({str(Path(folder) / 'pid0')!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    subprocess.Popen([sys.executable, "-c", code])
    time.sleep(120)


def return_tensor(rank: int, world_size: int):
    """A tensor result, returned the moment the worker is done (the worker then exits at once)."""
    import torch

    return torch.full((3,), float(rank))
