"""Seeded LEO link traces at 1 ms resolution: capacity, one-way delay, random loss and
handover outages (Gottipati and Qiu 2025, sparse constellations).

- capacity 2–8 Mbit/s, a lognormal step every second;
- one-way delay 20–40 ms; each handover steps it by ±5–30 ms (kept inside 20–40 ms);
- a handover is a 100–400 ms outage followed by 5–20% random loss for 0.5 s;
- ``"stable"`` traces hand over every 60–180 s; ``"dynamic"`` traces have handover windows of
  20–40 s with a handover every 2–5 s, separated by 20–40 s without handovers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("stable", "dynamic")


@dataclass
class LinkTrace:
    """Per-millisecond link state; index i covers [i, i+1) ms."""

    capacity_bps: np.ndarray  # float, > 0 (the nominal rate, also during outages)
    delay_ms: np.ndarray  # one-way propagation delay
    loss: np.ndarray  # random-loss probability
    outage: np.ndarray  # bool: nothing crosses the link
    handovers_ms: np.ndarray  # handover start times
    resume_ms: np.ndarray  # for each ms, the first ms at or after it without outage

    def __post_init__(self):
        if self.duration_ms < 10_000:
            raise ValueError(f"trace length {self.duration_ms} ms: need a trace of at least 10 s")
        if np.any(self.capacity_bps <= 0):
            raise ValueError(f"capacity_bps: min {float(self.capacity_bps.min())}: capacity must be > 0")

    @property
    def duration_ms(self) -> int:
        return int(self.capacity_bps.size)

    def index(self, t_ms: float) -> int:
        return min(int(t_ms), self.duration_ms - 1)

    @classmethod
    def build(cls, capacity_bps, delay_ms, loss, outage, handovers_ms) -> "LinkTrace":
        outage = np.asarray(outage, dtype=bool)
        resume = np.arange(outage.size, dtype=np.int64)
        for i in range(outage.size - 2, -1, -1):  # backward pass: inside an outage, resume where it ends
            if outage[i]:
                resume[i] = resume[i + 1]
        if outage[-1]:
            resume[-1] = outage.size
        return cls(np.asarray(capacity_bps, float), np.asarray(delay_ms, float), np.asarray(loss, float), outage,
                   np.asarray(handovers_ms, float), resume)


def handover_times(kind: str, seconds: float, rng: np.random.Generator) -> list[float]:
    """Handover start times (ms) for a trace of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    end = seconds * 1000.0
    times: list[float] = []
    if kind == "stable":
        t = rng.uniform(0.0, 1.0) * rng.uniform(60e3, 180e3)  # a stationary renewal process starts mid-gap
        while t < end:
            times.append(t)
            t += rng.uniform(60e3, 180e3)
        return times
    t = rng.uniform(5e3, 20e3)
    while t < end:
        window_end = t + rng.uniform(20e3, 40e3)
        h = t
        while h < min(window_end, end):
            times.append(h)
            h += rng.uniform(2e3, 5e3)
        t = window_end + rng.uniform(20e3, 40e3)
    return times


def generate_trace(kind: str, seconds: float, rng: np.random.Generator, handovers: bool = True,
                   random_loss: bool = True) -> LinkTrace:
    """One seeded trace; ``handovers=False`` and ``random_loss=False`` give a clean varying-capacity link."""
    if seconds < 10:
        raise ValueError(f"seconds={seconds!r}: need a trace of at least 10 s")
    n = int(round(seconds * 1000))
    steps = int(np.ceil(seconds))
    log_cap = np.empty(steps)
    log_cap[0] = rng.normal(np.log(4e6), 0.3)
    for k in range(1, steps):
        log_cap[k] = log_cap[k - 1] + rng.normal(0.0, 0.25)
    capacity = np.repeat(np.clip(np.exp(log_cap), 2e6, 8e6), 1000)[:n]
    delay = np.full(n, rng.uniform(20.0, 40.0))
    loss = np.zeros(n)
    outage = np.zeros(n, dtype=bool)
    times = handover_times(kind, seconds, rng) if handovers else []
    for h in times:
        start = int(h)
        stop = min(n, start + int(rng.uniform(100, 400)))
        outage[start:stop] = True
        step = rng.uniform(5.0, 30.0)
        current = delay[min(stop, n - 1)]
        # step in the direction that stays inside 20-40 ms, clipped when neither fits
        new = current + step if current + step <= 40.0 or current - step < 20.0 else current - step
        delay[stop:] = float(np.clip(new, 20.0, 40.0))
        if random_loss:
            loss[stop:min(n, stop + 500)] = rng.uniform(0.05, 0.20)
    return LinkTrace.build(capacity, delay, loss, outage, times)
