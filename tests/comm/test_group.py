"""Each rank's CUDA device from LOCAL_RANK and the visible GPUs (asyncgen/comm/group.py)."""

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
