"""Google Congestion Control as the sender runs it on transport-wide feedback (one report per
100 ms): a trendline delay-gradient estimator, an adaptive-threshold overuse detector, the
delay-based AIMD controller and the loss-based controller; the target is the smaller of the two.

Constants follow the GCC papers (Carlucci et al. 2016/2017) and libwebrtc: packet groups of
5 ms, a trendline over 20 groups with smoothing 0.9 and gain 4, threshold gains k_u = 0.01,
k_d = 0.00018 (start 12.5 ms, kept in [6, 600] ms), decrease to 0.85 x the received rate,
increase 8 % per second (capped at 1.5 x the received rate, as libwebrtc does), loss above 10 %
scales by (1 - 0.5 loss), loss below 2 % grows 5 % per report; target in [0.15, 8] Mbit/s.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MIN_RATE, MAX_RATE = 0.15e6, 8e6


@dataclass
class ReceivedPacket:
    seq: int
    size: int
    sent_ms: float
    arrival_ms: float


class TrendlineEstimator:
    """Slope of the smoothed accumulated delay over the last ``window`` packet groups."""

    def __init__(self, window: int = 20, smoothing: float = 0.9, gain: float = 4.0, burst_ms: float = 5.0):
        self.window, self.smoothing, self.gain, self.burst_ms = window, smoothing, gain, burst_ms
        self.points: deque[tuple[float, float]] = deque(maxlen=window)
        self.accumulated = self.smoothed = 0.0
        self.deltas = 0
        self._group: list[float] | None = None  # [first send, last send, last arrival]
        self._previous: list[float] | None = None
        self._first_arrival: float | None = None

    def add(self, packet: ReceivedPacket) -> float | None:
        """Feed packets in arrival order; returns the modified trend when a group completes."""
        if self._group is None:
            self._group = [packet.sent_ms, packet.sent_ms, packet.arrival_ms]
            return None
        if packet.sent_ms - self._group[0] <= self.burst_ms:  # same burst
            self._group[1] = max(self._group[1], packet.sent_ms)
            self._group[2] = max(self._group[2], packet.arrival_ms)
            return None
        finished, self._group = self._group, [packet.sent_ms, packet.sent_ms, packet.arrival_ms]
        previous, self._previous = self._previous, finished
        if previous is None:
            return None
        gradient = (finished[2] - previous[2]) - (finished[1] - previous[1])
        self.deltas += 1
        self.accumulated += gradient
        self.smoothed = self.smoothing * self.smoothed + (1 - self.smoothing) * self.accumulated
        if self._first_arrival is None:
            self._first_arrival = finished[2]
        self.points.append((finished[2] - self._first_arrival, self.smoothed))
        if len(self.points) < self.window:
            return 0.0
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        denominator = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / denominator if denominator > 0 else 0.0
        return min(self.deltas, 60) * slope * self.gain


class OveruseDetector:
    """Compare the modified trend with an adaptive threshold gamma."""

    def __init__(self, k_up: float = 0.01, k_down: float = 0.00018, gamma_ms: float = 12.5):
        self.k_up, self.k_down, self.gamma = k_up, k_down, gamma_ms
        self.state = "normal"
        self._last_ms: float | None = None

    def detect(self, trend: float, now_ms: float) -> str:
        if trend > self.gamma:
            self.state = "overuse"
        elif trend < -self.gamma:
            self.state = "underuse"
        else:
            self.state = "normal"
        dt = 0.0 if self._last_ms is None else min(now_ms - self._last_ms, 100.0)
        self._last_ms = now_ms
        if abs(trend) - self.gamma <= 15.0:  # ignore spikes (libwebrtc)
            k = self.k_up if abs(trend) > self.gamma else self.k_down
            self.gamma = min(600.0, max(6.0, self.gamma + k * (abs(trend) - self.gamma) * dt))
        return self.state


class GoogleCongestionControl:
    """Sender-side GCC: call ``on_feedback`` with each report; read ``target_bps``."""

    def __init__(self, start_bps: float = 1e6):
        self.trendline = TrendlineEstimator()
        self.detector = OveruseDetector()
        self.delay_rate = self.loss_rate = float(start_bps)
        self.arrivals: deque[tuple[float, int]] = deque()  # (arrival ms, bytes) of the last 500 ms
        self.state = "normal"
        self._last_update_ms: float | None = None
        self._last_decrease_ms = -1e9

    @property
    def target_bps(self) -> float:
        return min(MAX_RATE, max(MIN_RATE, min(self.delay_rate, self.loss_rate)))

    def received_rate(self) -> float:
        return sum(size for _, size in self.arrivals) * 8 / 0.5

    def on_feedback(self, now_ms: float, packets: list[ReceivedPacket], loss_fraction: float, rtt_ms: float) -> None:
        state = self.state
        for packet in sorted(packets, key=lambda p: p.arrival_ms):
            trend = self.trendline.add(packet)
            if trend is not None:
                state = self.detector.detect(trend, packet.arrival_ms)
            self.arrivals.append((packet.arrival_ms, packet.size))
        latest = max((p.arrival_ms for p in packets), default=now_ms)
        while self.arrivals and self.arrivals[0][0] < latest - 500.0:
            self.arrivals.popleft()
        self.state = state
        dt = 0.0 if self._last_update_ms is None else (now_ms - self._last_update_ms) / 1000.0
        self._last_update_ms = now_ms
        received = self.received_rate()
        if state == "overuse":
            if now_ms - self._last_decrease_ms > max(rtt_ms, 100.0):
                self.delay_rate = min(self.delay_rate, 0.85 * received)
                self._last_decrease_ms = now_ms
        elif state == "normal":
            self.delay_rate = min(self.delay_rate * 1.08**dt, max(self.delay_rate, 1.5 * received + 10e3))
        self.delay_rate = min(MAX_RATE, max(MIN_RATE, self.delay_rate))
        if loss_fraction > 0.10:
            self.loss_rate *= 1.0 - 0.5 * loss_fraction
        elif loss_fraction < 0.02:
            self.loss_rate *= 1.05
        self.loss_rate = min(MAX_RATE, max(MIN_RATE, self.loss_rate))
