"""Which device a rank's point-to-point tensors and control messages travel on, and how to wait for them.

CUDA tensors go over NCCL, everything else over gloo on the host; the wait rule follows
from it (:func:`wait_for`: a transfer on a CUDA stream is waited for by the compute
stream, one on the host by the host, with the timeout).
"""

from __future__ import annotations

import datetime

import torch
from torch.distributed.distributed_c10d import BackendConfig

# backends that move accelerator tensors point to point themselves; gloo (and MPI builds
# that are not CUDA-aware) read the tensor's memory from the host, so it must be staged
_DEVICE_P2P_BACKENDS = ("nccl", "ucc")


def p2p_device(backend: str, device: torch.device | None) -> torch.device:
    """Where a tensor bound for ``device`` must live to travel point to point on ``backend``.

    ``backend`` is what :func:`torch.distributed.get_backend` returns for the group
    (``"gloo"``, ``"nccl"``, ``"cpu:gloo,cuda:nccl"``, ...). The answer is ``device``
    itself when the backend moves such tensors (NCCL for CUDA), else the CPU: the caller
    then stages CUDA tensors through pinned host memory.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    backends = BackendConfig(backend).get_device_backend_map()
    if device.type == "cpu" or backends.get(device.type) in _DEVICE_P2P_BACKENDS:
        if device.type not in backends:
            raise ValueError(f"process group backend {backend!r} cannot carry {device.type} tensors")
        return device
    if "cpu" not in backends:
        raise ValueError(
            f"process group backend {backend!r} can carry neither {device.type} tensors point to point "
            f"nor CPU tensors to stage them through; use 'nccl' or 'cpu:gloo,cuda:nccl' for CUDA ranks"
        )
    return torch.device("cpu")


def control_device(backend: str, device: torch.device | None) -> torch.device:
    """Where small tensors that the host reads (seeds, cut points, layout headers) travel on ``backend``.

    The CPU when the backend carries CPU tensors (gloo, also beside NCCL), so reading them
    costs no GPU sync; ``device`` on an NCCL-only group.
    """
    if "cpu" in BackendConfig(backend).get_device_backend_map():
        return torch.device("cpu")
    if device is None:
        raise ValueError(f"process group backend {backend!r} carries no CPU tensors and this rank has no device")
    return torch.device(device)


def wait_for(work, timeout: datetime.timedelta, stream_ordered: bool) -> None:
    """Wait for an asynchronous transfer the way its transport needs.

    ``stream_ordered`` (the tensor travels on a CUDA stream: NCCL): the current compute
    stream waits for the transfer and the host does not; with a timeout, ``wait`` would
    block the host until the GPU got there, and the group's own timeout covers a hang.
    Otherwise (gloo: the host sends and receives) the host waits, at most ``timeout``.
    """
    if stream_ordered:
        work.wait()
    else:
        work.wait(timeout)
