"""Seeded LEO link traces at 1 ms resolution: capacity, one-way delay, random loss and
handover outages (Gottipati and Qiu 2025, sparse constellations).

- capacity 2–8 Mbit/s, a lognormal step every second;
- one-way delay 20–40 ms; each handover steps it by ±5–30 ms (kept inside 20–40 ms);
- a handover is a 100–400 ms outage followed by 5–20% random loss for 0.5 s;
- ``"stable"`` traces hand over every 60–180 s; ``"dynamic"`` traces have handover windows of
  20–40 s with a handover every 2–5 s, separated by 20–40 s without handovers; ``"starlink"``
  traces hand over on Starlink's 15 s reconfiguration grid (the scheduler reassigns satellites at
  seconds 12, 27, 42 and 57 of every minute; the trace starts at a random phase of that grid),
  each reconfiguration an outage, a delay jump and a loss burst as above.

``load_trace_csv`` reads a measured trace (time, capacity, delay; optionally loss, outage and
handover marks) from a CSV file instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("stable", "dynamic", "starlink")  # the index of a kind seeds its traces: append, never reorder
RECONFIGURATION_MS = 15_000.0  # Starlink's global scheduler interval


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
    if kind == "starlink":
        t = rng.uniform(0.0, RECONFIGURATION_MS)  # where in the 15 s grid the call starts
        while t < end:
            times.append(t)
            t += RECONFIGURATION_MS
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


#: the columns ``load_trace_csv`` reads (one of each pair; the others are optional)
TIME_COLUMNS = {"time_s": 1000.0, "time_ms": 1.0}
CAPACITY_COLUMNS = {"capacity_mbps": 1e6, "capacity_kbps": 1e3, "capacity_bps": 1.0}


def load_trace_csv(path, end_s: float | None = None) -> LinkTrace:
    """A measured link trace from a CSV file, as a 1 ms :class:`LinkTrace`.

    Columns (a header row names them, any order, extra columns ignored): the time (``time_s`` or ``time_ms``,
    increasing, from 0 or later), the capacity (``capacity_mbps``, ``capacity_kbps`` or ``capacity_bps``; 0
    means an outage) and the one-way delay ``delay_ms``; optional ``loss`` (random-loss probability, 0..1),
    ``outage`` (0/1) and ``handover`` (1 where a handover starts; without the column, every outage start is
    one). Each row holds until the next; the last until ``end_s`` (default: one more step of the last spacing).
    A bad file is a one-line ValueError naming the file, the line and the column.
    """
    import csv

    def bad(line, message):
        return ValueError(f"{path}: line {line}: {message}")

    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [({k.strip(): (v or "").strip() for k, v in row.items() if k is not None}, reader.line_num)
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc})") from None
    time_col = next((c for c in TIME_COLUMNS if c in header), None)
    cap_col = next((c for c in CAPACITY_COLUMNS if c in header), None)
    if time_col is None or cap_col is None or "delay_ms" not in header:
        raise ValueError(f"{path}: needs the columns time_s (or time_ms), capacity_mbps (or capacity_kbps, "
                         f"capacity_bps) and delay_ms; found {', '.join(header) or 'no header'}")
    if not rows:
        raise ValueError(f"{path}: no rows under the header")

    def number(row, line, column, low=None, high=None, default=None):
        text = row.get(column, "")
        if text == "" and default is not None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise bad(line, f"{column}={text!r} is not a number") from None
        if not np.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise bad(line, f"{column}={text}: expected a finite number in {low}..{'any' if high is None else high}")
        return value

    times, caps, delays, losses, outages, marks = [], [], [], [], [], []
    for row, line in rows:
        t = number(row, line, time_col, low=0.0) * TIME_COLUMNS[time_col]
        if times and t <= times[-1]:
            raise bad(line, f"{time_col}: times must increase (after {times[-1] / TIME_COLUMNS[time_col]:g})")
        times.append(t)
        caps.append(number(row, line, cap_col, low=0.0) * CAPACITY_COLUMNS[cap_col])
        delays.append(number(row, line, "delay_ms", low=0.0, high=10_000.0))
        losses.append(number(row, line, "loss", low=0.0, high=1.0, default=0.0))
        outages.append(bool(number(row, line, "outage", low=0.0, high=1.0, default=0.0)) or caps[-1] == 0.0)
        marks.append(bool(number(row, line, "handover", low=0.0, high=1.0, default=0.0)))
    step = times[-1] - times[-2] if len(times) > 1 else 1000.0
    end = end_s * 1000.0 if end_s is not None else times[-1] + step
    if end <= times[-1]:
        raise ValueError(f"{path}: end_s={end_s} is not after the last row ({times[-1] / 1000:g} s)")
    if not any(c > 0 for c in caps):
        raise ValueError(f"{path}: every row has capacity 0; a link needs some capacity")
    start, n = int(times[0]), int(round(end))
    edges = [int(round(t)) for t in times] + [n]
    capacity, delay = np.empty(n - start), np.empty(n - start)
    loss, outage = np.zeros(n - start), np.zeros(n - start, dtype=bool)
    last_capacity = next(c for c in caps if c > 0)
    for i in range(len(times)):
        a, b = edges[i] - start, edges[i + 1] - start
        last_capacity = caps[i] if caps[i] > 0 else last_capacity  # an outage keeps the nominal rate
        capacity[a:b], delay[a:b], loss[a:b], outage[a:b] = last_capacity, delays[i], losses[i], outages[i]
    if "handover" in header:
        handovers = [edges[i] - start for i, m in enumerate(marks) if m]
    else:
        handovers = [edges[i] - start for i, o in enumerate(outages) if o and (i == 0 or not outages[i - 1])]
    try:
        return LinkTrace.build(capacity, delay, loss, outage, handovers)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
