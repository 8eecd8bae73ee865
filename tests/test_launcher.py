import os
import time

import pytest

from asyncgen.cli.launcher import WorkerFailed, launch, run_workers


def _report(rank, world_size):
    import torch

    return dict(rank=rank, world=world_size, env_rank=os.environ["RANK"], threads=torch.get_num_threads(), pid=os.getpid())


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise KeyError("worker one is broken")
    return rank


def _sleep_forever(rank, world_size):
    time.sleep(600)


def test_workers_get_the_launcher_environment_and_one_thread():
    out = launch(_report, 2, timeout=60)
    assert [o["rank"] for o in out] == [0, 1] and all(o["world"] == 2 for o in out)
    assert [o["env_rank"] for o in out] == ["0", "1"] and all(o["threads"] == 1 for o in out)


def test_a_worker_error_is_forwarded_with_its_traceback():
    with pytest.raises(WorkerFailed, match=r"worker 1 failed:(.|\n)*KeyError: 'worker one is broken'"):
        launch(_fail_on_one, 2, timeout=60)


def test_timeout_stops_every_worker():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"workers \[0, 1\] were still running"):
        run_workers(_sleep_forever, 2, timeout=5)
    assert time.monotonic() - start < 60
