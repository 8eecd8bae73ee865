import os
import time

import pytest

import launcher_workers as lw
from asyncgen.cli import launcher
from asyncgen.cli.launcher import WorkerFailed, check_worker_count, launch, placement, run_on_devices, run_workers


def _report(rank, world_size):
    import torch

    return dict(rank=rank, world=world_size, env_rank=os.environ["RANK"], threads=torch.get_num_threads(), pid=os.getpid())


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise KeyError("worker one is broken")
    return rank


def test_workers_get_the_launcher_environment_and_one_thread():
    out = launch(_report, 2, timeout=60)
    assert [o["rank"] for o in out] == [0, 1] and all(o["world"] == 2 for o in out)
    assert [o["env_rank"] for o in out] == ["0", "1"] and all(o["threads"] == 1 for o in out)


def test_a_worker_error_is_one_line_with_its_traceback_aside():
    with pytest.raises(WorkerFailed) as caught:
        launch(_fail_on_one, 2, timeout=60)
    exc = caught.value
    assert str(exc) == exc.summary == "worker 1 raised KeyError: 'worker one is broken'"
    assert (exc.rank, exc.exc_type, exc.message, exc.exitcode) == (1, "KeyError", "'worker one is broken'", 1)
    assert "Traceback (most recent call last)" in exc.details and "KeyError: 'worker one is broken'" in exc.details


def test_timeout_stops_every_worker():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"workers \[0, 1\] were still running"):
        run_workers(lw.sleep_forever, 2, timeout=3)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("how, summary, exc_type", [
    ("sigkill", "worker 1 was killed by SIGKILL", None),
    ("exit3", "worker 1 exited with code 3", None),
    ("segfault", "worker 1 was killed by SIGSEGV", None),
    ("raise", "worker 1 raised ValueError: bad value on rank one", "ValueError"),
])
def test_the_rank_that_failed_first_is_reported_not_the_peer_it_took_down(tmp_path, how, summary, exc_type):
    # rank 0 fails with a "connection reset" right after rank 1 is gone, as a gloo peer does
    with pytest.raises(WorkerFailed) as caught:
        launch(lw.fail_on_one, 2, str(tmp_path), how, timeout=60)
    exc = caught.value
    assert (exc.rank, str(exc), exc.exc_type) == (1, summary, exc_type)
    assert "\n" not in str(exc)
    # the details keep every failure, the first one first
    assert exc.details.index(summary) < exc.details.index("worker 0 raised RuntimeError")
    assert "Connection reset by peer" in exc.details


def test_a_usage_error_in_a_worker_stays_recognisable(tmp_path):
    with pytest.raises(WorkerFailed) as caught:
        launch(lw.fail_on_one, 2, str(tmp_path), "usage", timeout=60)
    exc = caught.value
    assert exc.exc_type == "asyncgen.cli.errors.UsageError"
    assert exc.message == "--width 34 is not divisible by 8"
    assert str(exc) == "worker 1 raised UsageError: --width 34 is not divisible by 8"


def test_a_hung_worker_is_stopped_after_the_grace_period():
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"^worker 1 raised ValueError: rank one gave up$"):
        launch(lw.fail_and_hang, 2, timeout=120, grace=0.5)
    assert time.monotonic() - start < 20  # rank 0 would sleep 600 s


def test_run_workers_marks_the_rank_stopped_after_the_grace_period_from_the_environment(monkeypatch):
    monkeypatch.setenv("ASYNCGEN_GRACE_SECONDS", "0.2")
    results = run_workers(lw.fail_and_hang, 2, timeout=120)
    assert not results[0].ok and results[0].summary == "worker 0 was stopped 0.2 s after worker 1 failed"
    assert results[0].exitcode == -9 and results[1].failed_order == 0 and results[0].failed_order == 1


def test_the_grace_period_is_checked(monkeypatch):
    assert launcher.grace_seconds() == launcher.DEFAULT_GRACE
    monkeypatch.setenv("ASYNCGEN_GRACE_SECONDS", "2.5")
    assert launcher.grace_seconds() == 2.5 and launcher.grace_seconds(1) == 1
    monkeypatch.setenv("ASYNCGEN_GRACE_SECONDS", "soon")
    with pytest.raises(ValueError, match="^ASYNCGEN_GRACE_SECONDS='soon': must be a finite number of seconds >= 0"):
        launcher.grace_seconds()
    for text in ("-1", "nan", "inf"):  # refused by name too, not as "grace period nan s"
        monkeypatch.setenv("ASYNCGEN_GRACE_SECONDS", text)
        with pytest.raises(ValueError, match=f"^ASYNCGEN_GRACE_SECONDS='{text}': must be a finite number"):
            launcher.grace_seconds()
    with pytest.raises(ValueError, match="grace period -1 s"):
        launcher.grace_seconds(-1)


def test_cpu_workers_get_one_thread_on_their_own_core_and_cuda_workers_no_pin():
    assert placement(2, "cpu", [0, 1, 2, 3]) == (1, [[0], [1]])
    assert placement(2, "cpu", [4, 5, 6, 7], threads=2) == (2, [[4, 5], [6, 7]])
    assert placement(3, "cpu", [0, 1]) == (1, [None, None, None])  # not enough cores: no pinning
    assert placement(2, "cuda", list(range(16))) == (8, [None, None])
    assert placement(4, "cuda:0", [0, 1]) == (1, [None] * 4)
    assert placement(2, "cuda", list(range(16)), threads=3) == (3, [None, None])


def test_the_worker_count_is_checked_in_one_line(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"^--devices must be at least 1 \(got {bad}\)$"):
            check_worker_count(bad, "cpu")
    with pytest.raises(ValueError, match=rf"^--devices {cores + 1} on CPU: this machine has {cores} usable cores?; "
                                         "pass --oversubscribe to run more workers than cores$"):
        check_worker_count(cores + 1, "cpu")
    check_worker_count(cores + 1, "cpu", oversubscribe=True)
    check_worker_count(cores, "cpu")
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="^--device cuda but no CUDA device is available$"):
        check_worker_count(1, "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="^--devices 3 needs 3 GPUs, this machine has 2$"):
        check_worker_count(3, "cuda")
    check_worker_count(3, "cpu", oversubscribe=True)


def test_run_on_devices_checks_before_spawning(monkeypatch):
    calls = []
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: calls.append((a, k)) or [None])
    too_many = len(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match="pass --oversubscribe"):
        run_on_devices(_fail_on_one, too_many)
    assert calls == []
    run_on_devices(_fail_on_one, too_many, oversubscribe=True, grace=1)
    assert calls[0][0][1] == too_many and calls[0][1] == {"device_type": "cpu", "grace": 1}


def test_devices_must_match_torchrun_world_size(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what torchrun sets with them: a consistent environment
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match=r"^--devices 3 does not match the launcher's WORLD_SIZE=2; [^\n]*$"):
        run_on_devices(_fail_on_one, 3)
    assert run_on_devices(_fail_on_one, 2) == 0


def test_tensor_results_arrive_after_the_workers_exited():
    import torch

    values = launch(lw.return_tensor, 2, timeout=120)
    assert [v.tolist() for v in values] == [[0.0] * 3, [1.0] * 3] and all(isinstance(v, torch.Tensor) for v in values)


def test_a_worker_whose_teardown_would_hold_the_gil_still_reports_and_exits():
    # the report is flushed before the worker ends, and the worker ends without a teardown that can block:
    # each rank returns its all-reduced value and exits 0, long before the timeout
    results = run_workers(lw.teardown_holds_the_gil, 2, timeout=60)
    assert [(r.ok, r.value, r.exitcode) for r in results] == [(True, 2.0, 0), (True, 2.0, 0)]


def test_a_worker_releases_what_multiprocessing_registered_before_it_ends():
    # a worker ends with os._exit; the semaphore it made is still unlinked, so the launching process's
    # resource tracker has no "leaked semaphore" to warn about when it stops
    import subprocess
    import sys
    from pathlib import Path

    script = ("import launcher_workers as lw\nfrom asyncgen.cli.launcher import launch\n"
              "if __name__ == '__main__':\n    print(launch(lw.make_a_process_lock, 2, timeout=60))\n")
    fixtures = str(Path(lw.__file__).parent)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": fixtures})
    assert done.returncode == 0 and done.stdout.strip() == "[0, 1]", done.stderr
    assert "leaked semaphore" not in done.stderr, done.stderr
