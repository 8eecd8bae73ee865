"""How fast one device computes: arithmetic and memory rates, measured, to turn counted work into seconds.

The layout chooser (:mod:`asyncgen.cost.layout`) can take per-unit times measured on real
weights, or, from configs alone, each unit's FLOPs and bytes moved (counted on shapes) divided
by this device's rates. :func:`measure_device_rate` measures both with the operations denoisers
spend their time in: a square matmul (FLOPs per second) and a large elementwise add (bytes read
and written per second), in the dtype the model runs in, on the thread count the caller set.
A unit's time is then ``flops / flop_rate + bytes / byte_rate``: the two costs added, not
overlapped, which suits CPUs and the small kernels of small models; on a GPU's large kernels
it over-estimates. The caller keeps the result (the CLI caches it on disk).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class DeviceRate:
    """``flops_per_s`` of a square matmul and ``bytes_per_s`` of an elementwise add on one device."""

    flops_per_s: float
    bytes_per_s: float
    device: str
    dtype: str
    threads: int

    def seconds(self, flops: float, bytes_moved: float) -> float:
        return flops / self.flops_per_s + bytes_moved / self.bytes_per_s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceRate":
        return cls(flops_per_s=float(data["flops_per_s"]), bytes_per_s=float(data["bytes_per_s"]),
                   device=str(data["device"]), dtype=str(data["dtype"]), threads=int(data["threads"]))


def measure_device_rate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, side: int = 512,
                        elements: int = 4 * 2**20, repeats: int = 5) -> DeviceRate:
    """Median rates over ``repeats`` timed runs (after one untimed): a ``side``-square matmul, an add of ``elements``."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least 1")
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def median_seconds(fn) -> float:
        times = []
        for trip in range(repeats + 1):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if trip > 0:
                times.append(time.perf_counter() - start)
        return max(statistics.median(times), 1e-9)

    with torch.no_grad():
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        matmul = median_seconds(lambda: torch.mm(a, b))
        x = torch.randn(elements, device=device).to(dtype)
        y = torch.randn(elements, device=device).to(dtype)
        add = median_seconds(lambda: torch.add(x, y))
    element = torch.empty((), dtype=dtype).element_size()
    return DeviceRate(flops_per_s=2 * side**3 / matmul, bytes_per_s=3 * elements * element / add,
                      device=device.type, dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads())
