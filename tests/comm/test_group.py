"""Each rank's CUDA device from LOCAL_RANK and the visible GPUs (asyncgen/comm/group.py), asked there by every
caller."""

import os
import subprocess
import sys

import pytest
import torch

from asyncgen.comm.group import local_cuda_device


def test_local_cuda_device_names_the_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_cuda_device("cuda") == torch.device("cuda", 1)  # "cuda" means this rank's GPU, not GPU 0
    assert local_cuda_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match="LOCAL_RANK=3 asks for CUDA device 3, but this process sees 2"):
        local_cuda_device(None)


def test_one_visible_gpu_is_cuda_0_whatever_local_rank(monkeypatch):
    """SLURM/Kubernetes give each process its own CUDA_VISIBLE_DEVICES: LOCAL_RANK 3 then sees one GPU, cuda:0."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_cuda_device(None) == torch.device("cuda", 0)
    assert local_cuda_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device='cuda:1' asks for CUDA device 1, but this process sees 1"):
        local_cuda_device("cuda:1")  # an explicit index is still checked


def test_local_rank_not_the_global_rank_picks_the_gpu(monkeypatch):
    """Rank 3 of 4 on the second machine of two (torchrun: LOCAL_RANK=1) runs on cuda:1, never cuda:3."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_cuda_device() == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert local_cuda_device() == torch.device("cuda", 0)  # no LOCAL_RANK, no group yet: the first GPU


class _Moved:
    def __init__(self):
        self.devices = []

    def to(self, device):
        self.devices.append(torch.device(device))
        return self

    def set_progress_bar_config(self, **kwargs):
        pass


def test_generate_and_bench_put_the_stock_pipeline_on_the_local_rank_gpu(monkeypatch):
    """The CLI's and the benchmark's own loads ask local_cuda_device, the one place that knows the rank's GPU."""
    from types import SimpleNamespace

    import asyncgen.pipelines.loading as loading
    from asyncgen.cli import generate
    from asyncgen.evaluation import bench_asyncdiff

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    loaded = _Moved()
    monkeypatch.setattr(loading, "load_pipeline", lambda *args, **kwargs: loaded)
    monkeypatch.setattr(generate, "_quiet_loading", lambda rank: None)  # it would silence warnings process-wide
    job = SimpleNamespace(model="m", dtype="float32", allow_pickle=False, device="cuda")
    assert generate._load(job, 3) is loaded  # global rank 3
    assert bench_asyncdiff.load_on_rank("m", 3, device="cuda") is loaded
    assert loaded.devices == [torch.device("cuda", 1)] * 2


def test_no_caller_builds_a_cuda_index_of_its_own():
    """``cuda:{rank}`` strings outside comm/group.py are how a global rank ends up naming a GPU."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"""f["']cuda:\{|torch\.device\(\s*["']cuda["']\s*,\s*(int\(\s*os\.environ|rank\b)""")
    found = [f"{path.relative_to(root)}:{n}" for folder in ("cli", "evaluation", "pipelines")
             for path in sorted((root / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


_RELEASE = """
import os, socket, sys
import torch, torch.distributed as dist
from asyncgen.comm.group import release_groups_at_exit, resolve_context

def threads():
    return len(os.listdir("/proc/self/task"))

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
before = threads()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
ctx = resolve_context()  # the caller's group: asyncgen holds it, but it is not asyncgen's to destroy
total = torch.ones(1)
dist.all_reduce(total)
with_group = threads()
release_groups_at_exit()
print(before, with_group, threads(), ctx.group is None, dist.is_initialized())
dist.destroy_process_group()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_groups_are_let_go_of_before_the_interpreter_finalises():
    """The exit hook drops asyncgen's references to a group the caller destroyed, so its gloo worker threads are
    joined while the interpreter is whole (a group that lives into finalisation aborted 1 exit in ~30 with
    'terminate called without an active exception'), and it never destroys a group the caller made."""
    script = _RELEASE.replace("release_groups_at_exit()\n", "dist.destroy_process_group()\nrelease_groups_at_exit()\n"
                              ).replace("dist.is_initialized())\ndist.destroy_process_group()", "dist.is_initialized())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    before, with_group, after, dropped, initialised = done.stdout.split()
    assert int(with_group) > int(before)  # the group's worker threads ...
    assert int(after) == int(before)  # ... are gone once asyncgen lets go of it
    assert (dropped, initialised) == ("True", "False")

    kept = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.split()[3:] == ["True", "True"]  # not destroyed: the caller made it and destroys it
