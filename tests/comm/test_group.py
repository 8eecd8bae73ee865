"""Each rank's CUDA device from LOCAL_RANK and the visible GPUs (asyncgen/comm/group.py), asked there by every
caller."""

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
