"""Failure paths of the runtime: peers told through the store, aborted groups, missing connections."""

import datetime
import time

import pytest
import torch
import torch.distributed as dist

import tiny_models
from asyncgen import runtime
from asyncgen.cli.launcher import run_workers
from asyncgen.distributed import ERROR_KEY, DistContext, ErrorWatch, remote_error
from asyncgen.pipelines import AsyncDiffPipeline
from tiny_models import call_kwargs

TIMEOUT = datetime.timedelta(seconds=60)


def test_a_communication_failure_names_the_socket_variables():
    """With no peer error to report, the message says what to check on two hosts."""
    ctx = DistContext(None, 3, 4, None, TIMEOUT)
    error = remote_error(ctx, ConnectionError("Connection refused"))
    assert type(error) is RuntimeError
    assert "rank 3: communication failed (Connection refused)" in str(error)
    assert "GLOO_SOCKET_IFNAME" in str(error) and "NCCL_SOCKET_IFNAME" in str(error)


def _blocked_until_watched(rank, world_size):
    dist.init_process_group("gloo", timeout=TIMEOUT)
    group = dist.new_group([0, 1], timeout=TIMEOUT)
    ctx = DistContext(dist.group.WORLD, rank, world_size, None, TIMEOUT, subgroups=[group])
    if rank == 0:
        # a rank failing while its peer waits on something no error reaches (a receive on
        # the GPU): it only publishes, it sends nothing and stays alive
        dist.distributed_c10d._get_default_store().set(ERROR_KEY, "rank 0 failed:\nValueError: injected")
        time.sleep(8)
        return None
    watch = ErrorWatch(ctx, interval=0.2)
    started = time.perf_counter()
    with pytest.raises(Exception) as raised:
        dist.irecv(torch.empty(4), 0, group=group).wait(TIMEOUT)
    error = remote_error(ctx, raised.value)
    return dict(seconds=time.perf_counter() - started, fired=watch.fired.is_set(), type=type(error).__name__,
                message=str(error))


def test_error_watch_ends_a_wait_on_a_failed_peer():
    """The watch polls the store's error key and aborts the groups: the wait ends in seconds with the peer's error."""
    results = run_workers(_blocked_until_watched, 2, timeout=120)
    assert all(r.ok for r in results), [r.value for r in results]
    seen = results[1].value
    assert seen["fired"] and seen["type"] == "RemoteRankError"
    assert "ValueError: injected" in seen["message"]
    assert seen["seconds"] < 6  # long before the 60 s timeout, and before rank 0 gives up


def _missing_pair(rank, world_size, sd_path):
    # the prediction pair left out: the runtime must refuse to use it (on NCCL it would hang)
    real = runtime.connections
    runtime.connections = lambda top, parts: [p for p in real(top, parts) if p[0] != "prediction"]
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1)
    wrapped(**call_kwargs(num_inference_steps=2))


def test_a_pair_not_connected_up_front_is_refused(sd_path):
    results = run_workers(_missing_pair, 2, str(sd_path), timeout=120)
    assert all(not r.ok for r in results)
    # the first rank to need the pair says which; the other ends with its message
    assert all("no connection to rank" in r.value and "was made before the first step" in r.value for r in results)
