"""The launcher leaves no worker behind: real signals to the launching process, a parent killed outright."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import launcher_workers as lw
from asyncgen.cli import launcher
from asyncgen.cli.launcher import Interrupted, exit_with_parent, run_workers


@pytest.fixture(autouse=True)
def spawned_workers(monkeypatch):
    """The users' start method: workers are the launching process's own children, and nothing else is
    (a fork server, which the rest of the suite uses, would stay behind as a child by design)."""
    monkeypatch.setattr(launcher, "START_METHOD", "spawn")


def _gone_within(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(lw.alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if lw.alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_every_worker_before_the_launch_returns(tmp_path, sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    # children this process had already (an earlier test's resource tracker, say) are not the launch's
    children_before = set(lw.children(os.getpid()))
    pids = []

    def send_when_running():
        pids.extend(lw.pid_of(tmp_path / f"pid{r}") for r in range(2))
        while not all((tmp_path / f"beat{r}").exists() for r in range(2)):
            time.sleep(0.02)
        os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send_when_running, daemon=True)
    sender.start()
    with pytest.raises(Interrupted) as caught:
        run_workers(lw.heartbeat, 2, str(tmp_path), timeout=60)
    sender.join(5)
    exc = caught.value
    assert (exc.signal_name, exc.stopped, str(exc)) == (sig.name, 2, "interrupted: stopped 2 workers")
    assert exc.exit_code == 128 + sig and isinstance(exc, KeyboardInterrupt)
    # stopped before the launch returned: no worker, and no resource tracker, is left, and nothing more is written
    assert not [p for p in pids if lw.alive(p)]
    assert set(lw.children(os.getpid())) - children_before == set()
    sizes = [(tmp_path / f"beat{r}").stat().st_size for r in range(2)]
    time.sleep(0.3)
    assert [(tmp_path / f"beat{r}").stat().st_size for r in range(2)] == sizes
    assert {s: signal.getsignal(s) for s in before} == before


def test_workers_exit_when_the_launching_process_is_killed(tmp_path):
    import torch.distributed  # noqa: F401  (imported here once, so the forked parent does not import it again)

    parent = mp.get_context("fork").Process(target=lw.launch_heartbeats, args=(str(tmp_path),))
    parent.start()
    try:
        workers = [lw.pid_of(tmp_path / f"pid{r}") for r in range(2)]
        assert all(lw.alive(p) for p in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.join(10)
        assert _gone_within(workers, 5) == []
    finally:
        if parent.is_alive():
            parent.kill()


def test_the_portable_watcher_also_ends_a_worker_whose_parent_died(tmp_path):
    parent = mp.get_context("fork").Process(target=lw.watched_by_fallback, args=(str(tmp_path),))
    parent.start()
    try:
        child = lw.pid_of(tmp_path / "pid0")
        assert lw.alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.join(10)
        assert _gone_within([child], 5) == []
    finally:
        if parent.is_alive():
            parent.kill()


def test_a_worker_whose_parent_is_already_gone_exits_at_once():
    # the race: the parent died between the fork and arming the death signal
    code = "from asyncgen.cli.launcher import exit_with_parent; exit_with_parent(1); print('still running')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "still running" not in out.stdout
