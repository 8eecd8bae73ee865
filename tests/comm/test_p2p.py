"""Which device point-to-point traffic and control messages travel on, per backend (asyncgen/comm/p2p.py)."""

import pytest
import torch

from asyncgen.comm.p2p import control_device, p2p_device

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("backend, device, expected", [
    ("cpu:gloo,cuda:nccl", CUDA, CUDA),  # NCCL moves CUDA tensors itself
    ("nccl", CUDA, CUDA),
    ("gloo", CUDA, CPU),  # gloo reads host memory: stage through pinned buffers
    ("gloo", CPU, CPU),
    ("cpu:gloo,cuda:nccl", CPU, CPU),
])
def test_p2p_device(backend, device, expected):
    assert p2p_device(backend, device) == expected


def test_p2p_device_refuses_what_no_backend_carries():
    with pytest.raises(ValueError, match="backend 'nccl' cannot carry cpu tensors"):
        p2p_device("nccl", CPU)


@pytest.mark.parametrize("backend, expected", [("cpu:gloo,cuda:nccl", CPU), ("gloo", CPU), ("nccl", CUDA)])
def test_control_device(backend, expected):
    # seeds, cut points and layout headers are read by the host: CPU wherever gloo can carry them
    assert control_device(backend, CUDA) == expected
