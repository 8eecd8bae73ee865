"""Timing a stage's compute without synchronising: CUDA events on GPUs, ``perf_counter`` on CPU."""

from __future__ import annotations

import time

import torch


class ComputeTimer:
    """Compute time of this rank's stage without making the host wait for the GPU.

    CUDA work is bracketed by events whose elapsed times are read only when someone asks
    (after the call, typically); a synchronize per step would stall the host's queueing
    of the next step behind the GPU. CPU work is timed directly.
    """

    def __init__(self):
        self._seconds, self._events = 0.0, []
        self.calls = 0

    def start(self, device: torch.device):
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def stop(self, started, device: torch.device) -> None:
        self.calls += 1
        if device.type != "cuda":
            self._seconds += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(device))
        self._events.append((started, end))

    @property
    def seconds(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1e3
        self._events = []
        return self._seconds
