"""The environment variables asyncgen reads, checked where they are read (asyncgen/comm/context.py, group.py).

``ASYNCGEN_TIMEOUT`` is read when a context is resolved, never at import; the launcher's
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) are
checked before any rendezvous, so a bad set is one line at once instead of a traceback from
torch or a wait that never ends. What only a fresh interpreter shows (an import, a rendezvous
that would hang) runs in a subprocess with a timeout.
"""

import datetime
import os
import subprocess
import sys

import pytest

from asyncgen.comm.context import DEFAULT_TIMEOUT, check_timeout, environment_timeout
from asyncgen.comm.group import LauncherEnvironmentError, launcher_environment, resolve_context

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def _env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES + ("ASYNCGEN_TIMEOUT", "TORCHELASTIC_USE_AGENT_STORE")}
    env.update({k: v for k, v in overrides.items() if v is not None})
    return env


def test_asyncgen_timeout_is_not_read_at_import():
    code = "import asyncgen.comm.group, asyncgen.pipelines, asyncgen.cli.launcher; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(ASYNCGEN_TIMEOUT="soon"))
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr


@pytest.mark.parametrize("text", ["soon", "0", "-5", "nan", "inf", "", "1e400"])
def test_a_bad_asyncgen_timeout_is_one_line_naming_it(text):
    with pytest.raises(ValueError) as caught:
        environment_timeout({"ASYNCGEN_TIMEOUT": text})
    message = str(caught.value)
    assert message.startswith(f"ASYNCGEN_TIMEOUT={text!r}: ") and "finite number of seconds > 0" in message
    assert "\n" not in message


def test_asyncgen_timeout_is_read_when_used(monkeypatch):
    assert environment_timeout({}) == DEFAULT_TIMEOUT == datetime.timedelta(seconds=600)
    assert environment_timeout({"ASYNCGEN_TIMEOUT": " 2.5 "}) == datetime.timedelta(seconds=2.5)
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ASYNCGEN_TIMEOUT", "42")
    assert resolve_context().timeout == datetime.timedelta(seconds=42)
    monkeypatch.setenv("ASYNCGEN_TIMEOUT", "-1")
    with pytest.raises(ValueError, match=r"^ASYNCGEN_TIMEOUT='-1': the timeout must be"):
        resolve_context()
    assert resolve_context(timeout=7).timeout == datetime.timedelta(seconds=7)  # given: the variable is not used


@pytest.mark.parametrize("value", [0, -5, -0.1, float("nan"), float("inf"), 1e300, True, "60", [60],
                                   datetime.timedelta(0), datetime.timedelta(seconds=-1)])
def test_a_bad_timeout_argument_is_refused(value):
    with pytest.raises(ValueError, match=r"^timeout=.*(finite number of seconds > 0|too large)"):
        check_timeout(value)


def test_good_timeout_arguments():
    assert check_timeout(None) is None
    assert check_timeout(3) == check_timeout(3.0) == check_timeout(datetime.timedelta(seconds=3))


def test_no_launcher_variables_is_one_process():
    assert launcher_environment({}) is None
    assert launcher_environment({"LOCAL_RANK": "0"}) is None  # set alone (some schedulers do): still one process


def test_a_consistent_torchrun_environment_is_accepted():
    got = launcher_environment(TORCHRUN)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port) == (1, 2, 1, "127.0.0.1", 29500)
    assert launcher_environment(dict(RANK="0", WORLD_SIZE="1")).world_size == 1  # one rank needs no rendezvous


BAD_ENVIRONMENTS = [
    (dict(TORCHRUN, MASTER_ADDR=None), r"^MASTER_ADDR is not set, but WORLD_SIZE=2 needs it"),
    (dict(TORCHRUN, MASTER_ADDR=" "), r"^MASTER_ADDR=' ' is empty, but WORLD_SIZE=2 needs it"),
    (dict(TORCHRUN, MASTER_PORT=None), r"^MASTER_PORT is not set, but WORLD_SIZE=2 needs it"),
    (dict(TORCHRUN, MASTER_PORT="http"), r"^MASTER_PORT='http': must be a port number from 1 to 65535$"),
    (dict(TORCHRUN, MASTER_PORT="70000"), r"^MASTER_PORT='70000': must be a port number from 1 to 65535$"),
    (dict(TORCHRUN, RANK="2"), r"^RANK='2': must be an integer from 0 to WORLD_SIZE - 1 = 1$"),
    (dict(TORCHRUN, RANK="-1"), r"^RANK='-1': must be an integer from 0 to WORLD_SIZE - 1 = 1$"),
    (dict(TORCHRUN, RANK="one"), r"^RANK='one': must be an integer"),
    (dict(TORCHRUN, WORLD_SIZE="0"), r"^WORLD_SIZE='0': must be an integer >= 1"),
    (dict(TORCHRUN, WORLD_SIZE="2.5"), r"^WORLD_SIZE='2.5': must be an integer >= 1"),
    (dict(TORCHRUN, LOCAL_RANK="2"), r"^LOCAL_RANK='2': must be an integer from 0 to WORLD_SIZE - 1 = 1$"),
    (dict(TORCHRUN, LOCAL_RANK="x"), r"^LOCAL_RANK='x': must be an integer >= 0"),
    (dict(TORCHRUN, LOCAL_WORLD_SIZE="1"), r"^LOCAL_RANK='1': must be an integer from 0 to LOCAL_WORLD_SIZE - 1 = 0$"),
    (dict(RANK="0"), r"^RANK='0' is set but WORLD_SIZE is not: a launcher \(torchrun\) sets both"),
    (dict(WORLD_SIZE="2"), r"^WORLD_SIZE='2' is set but RANK is not"),
]


@pytest.mark.parametrize("environ, message", BAD_ENVIRONMENTS)
def test_an_inconsistent_launcher_environment_is_one_line(environ, message):
    with pytest.raises(LauncherEnvironmentError, match=message) as caught:
        launcher_environment({k: v for k, v in environ.items() if v is not None})
    assert "\n" not in str(caught.value)


_RESOLVE_EACH = """
import os, sys, time
from asyncgen.comm.group import LauncherEnvironmentError, resolve_context
cases = {cases!r}
for case in cases:
    for name in {names!r}:
        os.environ.pop(name, None)
    os.environ.update({{k: v for k, v in case.items() if v is not None}})
    start = time.monotonic()
    try:
        resolve_context()
        print("ACCEPTED", case)
    except LauncherEnvironmentError as exc:
        print(f"{{time.monotonic() - start:.2f}} {{exc}}")
"""


def test_resolve_context_refuses_them_before_any_rendezvous():
    """In a fresh interpreter (no default group): each bad set is refused at once, none waits for peers."""
    cases = [environ for environ, _ in BAD_ENVIRONMENTS]
    code = _RESOLVE_EACH.format(cases=cases, names=LAUNCHER_VARIABLES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(ASYNCGEN_TIMEOUT="60"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(cases) and not [line for line in lines if line.startswith("ACCEPTED")], done.stdout
    for line, (_, message) in zip(lines, BAD_ENVIRONMENTS):
        seconds, text = line.split(" ", 1)
        assert float(seconds) < 1.0, line
        assert __import__("re").search(message, text), line


# --- a hand-set environment whose peers never come (issue 30, class 5) --------------------------------------------

_MEET = """
import sys
import torch, torch.distributed as dist
from asyncgen.comm.group import RendezvousError, resolve_context
try:
    ctx = resolve_context()
except RendezvousError as exc:
    print("REFUSED", exc)
    sys.exit(3)
total = torch.tensor([ctx.rank + 1.0])
dist.all_reduce(total)
print("MET", ctx.rank, ctx.world_size, total.item())
dist.destroy_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, timeout: str) -> subprocess.Popen:
    """One rank of a hand-set environment (no torchrun agent: the ranks meet by themselves)."""
    env = _env(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               ASYNCGEN_TIMEOUT=timeout, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _MEET], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _first_line(process: subprocess.Popen, seconds: float = 120) -> str:
    import select

    ready, _, _ = select.select([process.stderr], [], [], seconds)
    assert ready, f"no line on standard error within {seconds} s"
    return process.stderr.readline().rstrip("\n")


def test_ranks_that_never_come_are_named_after_the_timeout():
    """Ranks 0 and 1 of 3, no rank 2: each says it waits; rank 0 gives up after its 3 s and both end with one line
    naming rank 2 (rank 1, started first with a longer timeout, ends on rank 0's word)."""
    port = _free_port()
    first = _rank(1, 3, port, "60")
    assert _first_line(first) == (f"rank 1 of 3: waiting up to 60 s for the other ranks at 127.0.0.1:{port} "
                                  "(ASYNCGEN_TIMEOUT)")
    zero = _rank(0, 3, port, "3")
    for rank, within in ((zero, "within 3 s (ASYNCGEN_TIMEOUT)"), (first, "within the 3 s rank 0 waited")):
        out, err = rank.communicate(timeout=120)
        assert rank.returncode == 3, err
        r = 1 if rank is first else 0
        lines = err.strip().splitlines()
        assert lines == ([] if rank is first else [
            f"rank 0 of 3: waiting up to 3 s for the other ranks at 127.0.0.1:{port} (ASYNCGEN_TIMEOUT)"]), err
        assert out.strip() == (
            f"REFUSED rank {r} of 3: rank 2 did not arrive at 127.0.0.1:{port} {within}; start all 3 ranks with the "
            "same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, or unset RANK and WORLD_SIZE to run in one process")


def test_a_rank_without_rank_0_says_so_without_torchs_retries():
    port = _free_port()
    rank = _rank(1, 2, port, "2")
    out, err = rank.communicate(timeout=120)
    assert rank.returncode == 3, err
    assert err.strip().splitlines() == [
        f"rank 1 of 2: waiting up to 2 s for the other ranks at 127.0.0.1:{port} (ASYNCGEN_TIMEOUT)"]  # no C++ log
    assert out.strip() == (f"REFUSED rank 1 of 2: rank 0 did not open the rendezvous at 127.0.0.1:{port} within 2 s "
                           "(ASYNCGEN_TIMEOUT); start rank 0 with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE")


def test_ranks_that_come_late_still_meet():
    """Rank 1 starts first and waits for rank 0; the group they make works."""
    port = _free_port()
    first = _rank(1, 2, port, "60")
    second = _rank(0, 2, port, "60")
    for r, rank in ((1, first), (0, second)):
        out, err = rank.communicate(timeout=120)
        # both streams in the message: whether the rank met before it failed (seen once in a full run: rank 1
        # aborted with "terminate called without an active exception", not reproduced alone)
        assert rank.returncode == 0, f"stdout: {out!r}; stderr: {err}"
        assert out.strip() == f"MET {r} 2 3.0"


def test_missing_ranks_are_named_in_runs():
    from asyncgen.comm.group import _ranks_text

    assert _ranks_text([1]) == "rank 1"
    assert _ranks_text([1, 3]) == "ranks 1 and 3"
    assert _ranks_text([1, 2, 3, 4, 7]) == "ranks 1-4 and 7"
    assert _ranks_text([1, 2, 3, 5, 6]) == "ranks 1-3, 5 and 6"
