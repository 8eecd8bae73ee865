"""Failure paths of the runtime: peers told through the store, aborted groups, missing connections."""

import datetime

import pytest
import tiny_models
import torch
import torch.distributed as dist
from tiny_models import call_kwargs

from asyncgen.cli.launcher import run_workers
from asyncgen.comm import failure
from asyncgen.comm.context import DistContext
from asyncgen.comm.failure import ERROR_KEY, ErrorWatch, remote_error
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.runtime import asyncdiff as runtime

TIMEOUT = datetime.timedelta(seconds=60)


def test_a_communication_failure_names_the_socket_variables():
    """With no peer error to report, the message says what to check on two hosts."""
    ctx = DistContext(None, 3, 4, None, TIMEOUT)
    error = remote_error(ctx, ConnectionError("Connection refused"))
    assert type(error) is RuntimeError
    assert "rank 3: communication failed (Connection refused)" in str(error)
    assert "GLOO_SOCKET_IFNAME" in str(error) and "NCCL_SOCKET_IFNAME" in str(error)


class _Group:
    def __init__(self):
        self.aborted = 0

    def abort(self):
        self.aborted += 1


class _Store:
    def __init__(self):
        self.failed, self.checks = False, 0

    def check(self, keys):
        assert keys == [ERROR_KEY]
        self.checks += 1
        return self.failed


def test_error_watch_aborts_the_groups_once_a_peer_published(monkeypatch):
    """The watch polls the store's error key and aborts this rank's groups (what ends a wait on the GPU).

    On gloo a local abort neither wakes a blocked receive nor fails the next send (the
    peer's exit and the timeout do), so this checks the polling and the aborts with
    stand-ins; that the abort ends an NCCL wait needs GPUs to show.
    """
    store, world, sub = _Store(), _Group(), _Group()
    monkeypatch.setattr(failure, "_store", lambda: store)
    watch = ErrorWatch(DistContext(world, 1, 2, None, TIMEOUT, subgroups=[sub]), interval=0.05)
    assert not watch.fired.wait(0.5) and store.checks >= 3  # polling, nothing published yet
    assert (world.aborted, sub.aborted) == (0, 0)
    store.failed = True
    assert watch.fired.wait(10)
    assert (world.aborted, sub.aborted) == (1, 1)


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
