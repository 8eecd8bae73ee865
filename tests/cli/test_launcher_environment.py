"""``asyncgen generate`` under a bad environment: one line, exit 2, before any worker or rendezvous (cli/launcher.py)."""

import os
import subprocess
import sys

import pytest

from asyncgen.cli.launcher import check_environment, launched_by_torchrun
from asyncgen.cli.errors import UsageError
from asyncgen.cli.main import main

PROMPT = "a large red circle on a blue background"
VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ASYNCGEN_TIMEOUT",
             "ASYNCGEN_GRACE_SECONDS", "ASYNCGEN_START_METHOD")


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


CASES = [
    (dict(RANK="0", WORLD_SIZE="2"), "MASTER_ADDR is not set, but WORLD_SIZE=2 needs it"),
    (dict(RANK="3", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"),
     "RANK='3': must be an integer from 0 to WORLD_SIZE - 1 = 1"),
    (dict(RANK="1"), "RANK='1' is set but WORLD_SIZE is not"),
    (dict(RANK="0", WORLD_SIZE="two", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"), "WORLD_SIZE='two': must be an integer"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", LOCAL_RANK="5"),
     "LOCAL_RANK='5': must be an integer from 0 to WORLD_SIZE - 1 = 1"),
    (dict(ASYNCGEN_TIMEOUT="soon"), "ASYNCGEN_TIMEOUT='soon': not a number"),
    (dict(ASYNCGEN_TIMEOUT="0"), "ASYNCGEN_TIMEOUT='0': the timeout must be a finite number of seconds > 0"),
    (dict(ASYNCGEN_TIMEOUT="-5"), "ASYNCGEN_TIMEOUT='-5': the timeout must be a finite number of seconds > 0"),
    (dict(ASYNCGEN_GRACE_SECONDS="-1"), "ASYNCGEN_GRACE_SECONDS='-1': must be a finite number of seconds >= 0"),
    (dict(ASYNCGEN_START_METHOD="fork"), "ASYNCGEN_START_METHOD='fork': must be 'spawn' or 'forkserver'"),
]


@pytest.mark.parametrize("environ, message", CASES)
def test_check_environment_names_the_variable(clean_env, environ, message):
    for name, value in environ.items():
        clean_env.setenv(name, value)
    if "ASYNCGEN_START_METHOD" in environ:  # read when the launcher is imported: set it as the import would
        clean_env.setattr("asyncgen.cli.launcher.START_METHOD", environ["ASYNCGEN_START_METHOD"])
    with pytest.raises(ValueError) as caught:
        check_environment()
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("environ, message", [c for c in CASES if "ASYNCGEN_START_METHOD" not in c[0]])
def test_generate_under_a_bad_environment_is_one_line_and_exit_2(clean_env, tmp_path, capsys, environ, message):
    for name, value in environ.items():
        clean_env.setenv(name, value)
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.png"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asyncgen generate: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_launched_by_torchrun_refuses_a_partial_set(clean_env):
    assert launched_by_torchrun() is False
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="WORLD_SIZE='2' is set but RANK is not"):
        launched_by_torchrun()


def test_the_command_refuses_a_torchrun_environment_without_rendezvous_at_once(tmp_path):
    """A fresh ``asyncgen`` process: RANK/WORLD_SIZE without MASTER_ADDR used to hang or print 47 lines."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(RANK="1", WORLD_SIZE="2", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "asyncgen.cli", "generate", PROMPT, "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "asyncgen generate: error: MASTER_ADDR is not set, but WORLD_SIZE=2 needs it: the address of rank 0's machine "
        "for the rendezvous (torchrun sets it; or unset RANK and WORLD_SIZE to run in one process)"]


def test_generate_without_its_peers_says_it_waits_then_names_them(tmp_path):
    """RANK=0 of WORLD_SIZE=2, no rank 1 (issue 30, class 5): it used to wait ASYNCGEN_TIMEOUT in silence, then
    print torch's error with a hint about network interfaces."""
    from asyncgen.cli.launcher import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES + ("TORCHELASTIC_USE_AGENT_STORE",)}
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ASYNCGEN_TIMEOUT="3",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "asyncgen.cli", "generate", PROMPT, "-o", str(tmp_path / "x.png"),
                           "--steps", "1"], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"rank 0 of 2: waiting up to 3 s for the other ranks at 127.0.0.1:{port} (ASYNCGEN_TIMEOUT)",
        f"asyncgen generate: error: rank 0 of 2: rank 1 did not arrive at 127.0.0.1:{port} within 3 s "
        "(ASYNCGEN_TIMEOUT); start all 2 ranks with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, or unset RANK "
        "and WORLD_SIZE to run in one process"]
    assert not (tmp_path / "x.png").exists()
