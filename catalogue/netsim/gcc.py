"""Google Congestion Control as the sender runs it on transport-wide feedback (one report per
100 ms), after libwebrtc's GoogCC (modules/congestion_controller/goog_cc; our own code, written from
its documented behaviour and the GCC papers, Carlucci et al. 2016/2017):

- **acknowledged bitrate** (:class:`AcknowledgedBitrateEstimator`): bytes of acknowledged packets per
  window of arrival time (500 ms for the first sample, then 150 ms), folded into a Bayesian estimate
  whose sample uncertainty grows with the sample's distance from the estimate (scale 10). Only time
  in which acknowledged packets arrive counts: a window that a gap without any arrival interrupts
  gives no sample, so an outage is not read as low throughput (the old model's 500 ms sliding sum
  read every 100-400 ms outage as a 60-80 % throughput drop);
- **delay-based**: a trendline over 20 packet groups of 5 ms (smoothing 0.9, gain 4) against an
  adaptive threshold (k_u = 0.01, k_d = 0.00018, start 12.5 ms, kept in [6, 600]); the detector is
  in the *overuse* state only after the trend stays above the threshold for more than 10 ms over
  at least two groups while still rising, as libwebrtc's; AIMD: overuse cuts to 0.85 x the
  acknowledged bitrate (at most once per RTT), normal grows 8 %/s (multiplicative) or by about one
  packet per response time (additive, near the link capacity estimated at earlier cuts), never
  above 1.5 x the acknowledged bitrate + 10 kbit/s, underuse holds;
- **loss-based**: loss above 10 % scales by (1 - 0.5 loss), at most once per 300 ms + RTT; loss below
  2 % grows 8 % per second; 2-10 % holds; never above the delay-based estimate; updated once the
  reports since the last update cover at least 20 packets (libwebrtc's kLimitNumPackets);
- **probing after a drop** (:class:`ProbeController`): when the estimate falls below 0.66 x its
  previous value, the controller remembers the rate before the drop; within 5 s, once a report
  comes back without overuse and with loss below 10 %, it sends one probe cluster at 0.85 x that
  rate; a cluster whose packets mostly arrive sets the delay-based estimate to the probed rate
  (min of send and receive rate, 0.95 x the receive rate where that is clearly lower).

The target is the smaller of the delay- and loss-based estimates, clamped to [0.15, 8] Mbit/s.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MIN_RATE, MAX_RATE = 0.15e6, 8e6


@dataclass
class ReceivedPacket:
    seq: int  # transport-wide sequence number
    size: int
    sent_ms: float
    arrival_ms: float
    probe_cluster: int = -1  # >= 0: a probe packet of that cluster


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
    """Compare the modified trend with an adaptive threshold gamma; overuse needs persistence.

    The state turns to ``overuse`` only when the trend has been above gamma for more than
    ``overuse_ms`` (10 ms) over at least two groups and is not falling (libwebrtc's
    kOverUsingTimeThreshold and its rising-trend check); a single late group is not overuse.
    """

    def __init__(self, k_up: float = 0.01, k_down: float = 0.00018, gamma_ms: float = 12.5,
                 overuse_ms: float = 10.0):
        self.k_up, self.k_down, self.gamma, self.overuse_ms = k_up, k_down, gamma_ms, overuse_ms
        self.state = "normal"
        self._last_ms: float | None = None
        self._over_since: float | None = None
        self._over_count = 0
        self._previous_trend = 0.0

    def detect(self, trend: float, now_ms: float) -> str:
        if trend > self.gamma:
            if self._over_since is None:
                self._over_since = now_ms
            self._over_count += 1
            if (now_ms - self._over_since > self.overuse_ms and self._over_count > 1
                    and trend >= self._previous_trend):
                self.state = "overuse"
        else:
            self._over_since, self._over_count = None, 0
            self.state = "underuse" if trend < -self.gamma else "normal"
        self._previous_trend = trend
        dt = 0.0 if self._last_ms is None else min(now_ms - self._last_ms, 100.0)
        self._last_ms = now_ms
        if abs(trend) - self.gamma <= 15.0:  # ignore spikes (libwebrtc)
            k = self.k_up if abs(trend) > self.gamma else self.k_down
            self.gamma = min(600.0, max(6.0, self.gamma + k * (abs(trend) - self.gamma) * dt))
        return self.state


class AcknowledgedBitrateEstimator:
    """Throughput of acknowledged packets, windowed on arrival time and smoothed as a Bayesian estimate."""

    def __init__(self, initial_window_ms: float = 500.0, window_ms: float = 150.0, uncertainty_scale: float = 10.0):
        self.initial_window_ms, self.window_ms, self.scale = initial_window_ms, window_ms, uncertainty_scale
        self.estimate_bps: float | None = None
        self.variance = 50.0  # (kbit/s)^2, libwebrtc's starting variance
        self._window_start: float | None = None
        self._last_arrival: float | None = None
        self._bytes = 0

    def add(self, arrival_ms: float, size: int) -> None:
        window = self.initial_window_ms if self.estimate_bps is None else self.window_ms
        if self._last_arrival is not None and arrival_ms - self._last_arrival > window:
            # a gap without acknowledgements: the link was not observed, so the window restarts
            self._window_start, self._bytes = None, 0
        self._last_arrival = arrival_ms
        if self._window_start is None:
            self._window_start = arrival_ms
        if arrival_ms - self._window_start >= window:
            self._update(self._bytes * 8 / (window / 1000.0))
            self._window_start, self._bytes = arrival_ms, 0
        self._bytes += size

    def _update(self, sample_bps: float) -> None:
        sample = sample_bps / 1000.0  # kbit/s, the unit libwebrtc's variances are stated in
        if self.estimate_bps is None:
            self.estimate_bps = sample_bps
            return
        estimate = self.estimate_bps / 1000.0
        uncertainty = self.scale * abs(estimate - sample) / max(estimate, 1e-9)
        sample_variance = uncertainty ** 2
        predicted_variance = self.variance + 5.0
        new = (sample_variance * estimate + predicted_variance * sample) / (sample_variance + predicted_variance)
        self.variance = sample_variance * predicted_variance / (sample_variance + predicted_variance)
        self.estimate_bps = new * 1000.0


class ProbeController:
    """Probe clusters after a large drop of the estimate (libwebrtc: drop below 0.66x, probe 0.85x within 5 s)."""

    def __init__(self, drop_threshold: float = 0.66, probe_fraction: float = 0.85, timeout_ms: float = 5000.0):
        self.drop_threshold, self.probe_fraction, self.timeout_ms = drop_threshold, probe_fraction, timeout_ms
        self.previous_bps: float | None = None
        self.before_drop_bps: float | None = None
        self.drop_ms = -1e9
        self.probes_sent = 0

    def on_estimate(self, now_ms: float, estimate_bps: float) -> None:
        if self.previous_bps is not None and estimate_bps < self.drop_threshold * self.previous_bps:
            if now_ms - self.drop_ms > self.timeout_ms or self.before_drop_bps is None:
                self.before_drop_bps = self.previous_bps
            self.drop_ms = now_ms
        self.previous_bps = estimate_bps

    def probe_rate(self, now_ms: float, healthy: bool, estimate_bps: float) -> float | None:
        """The rate of a probe cluster to send now, or None."""
        if self.before_drop_bps is None or not healthy:
            return None
        if now_ms - self.drop_ms > self.timeout_ms:
            self.before_drop_bps = None
            return None
        rate = self.probe_fraction * self.before_drop_bps
        self.before_drop_bps = None
        if rate <= estimate_bps:
            return None
        self.probes_sent += 1
        return rate


class GoogleCongestionControl:
    """Sender-side GCC: call ``on_feedback`` with each report; read ``target_bps``."""

    def __init__(self, start_bps: float = 1e6):
        self.trendline = TrendlineEstimator()
        self.detector = OveruseDetector()
        self.acknowledged = AcknowledgedBitrateEstimator()
        self.probes = ProbeController()
        self.delay_rate = self.loss_rate = float(start_bps)
        self.state = "normal"
        self.link_capacity: float | None = None  # EWMA of the acknowledged rate at cuts (bit/s)
        self.link_deviation = 0.0
        self._last_update_ms: float | None = None
        self._last_decrease_ms = -1e9
        self._last_loss_decrease_ms = -1e9
        self._loss_history: deque[tuple[float, float]] = deque()  # (ms, loss_rate): min over 1 s grows by 8 %
        self._loss_expected = 0.0  # packets covered by the reports since the last loss update
        self._loss_lost = 0.0
        self._clusters: dict[int, list[ReceivedPacket]] = {}
        self._cluster_sent: dict[int, tuple[int, float]] = {}  # id -> (packets sent, rate)
        self.pending_probe: float | None = None  # a probe rate the pacer should send
        self.probe_results: list[tuple[float, float]] = []  # (ms, bit/s)

    @property
    def target_bps(self) -> float:
        return min(MAX_RATE, max(MIN_RATE, min(self.delay_rate, self.loss_rate)))

    def received_rate(self) -> float:
        """The acknowledged bitrate (bit/s); before its first sample, the target."""
        return self.acknowledged.estimate_bps if self.acknowledged.estimate_bps is not None else self.target_bps

    def register_probe(self, cluster: int, packets: int, rate_bps: float) -> None:
        self._cluster_sent[cluster] = (packets, rate_bps)

    def _probe_result(self, cluster: int) -> float | None:
        packets = sorted(self._clusters.get(cluster, []), key=lambda p: p.arrival_ms)
        sent, _ = self._cluster_sent.get(cluster, (0, 0.0))
        if sent == 0 or len(packets) < max(3, 0.8 * sent):  # libwebrtc: >= 80 % of a cluster must arrive
            return None
        by_send = sorted(packets, key=lambda p: p.sent_ms)
        send_ms = by_send[-1].sent_ms - by_send[0].sent_ms
        recv_ms = packets[-1].arrival_ms - packets[0].arrival_ms
        if send_ms <= 0 or recv_ms <= 0:
            return None
        send_rate = sum(p.size for p in by_send[:-1]) * 8 / (send_ms / 1000.0)
        recv_rate = sum(p.size for p in packets[1:]) * 8 / (recv_ms / 1000.0)
        if recv_rate < 0.9 * send_rate:
            return 0.95 * recv_rate
        return min(send_rate, recv_rate)

    def on_feedback(self, now_ms: float, packets: list[ReceivedPacket], loss_fraction: float, rtt_ms: float,
                    expected: int | None = None) -> None:
        """One feedback report: the packets it acknowledges, the loss fraction it reports over ``expected``
        packets (default: as many as it acknowledges), the smoothed RTT."""
        state = self.state
        clusters = set()
        for packet in sorted(packets, key=lambda p: p.arrival_ms):
            trend = self.trendline.add(packet)
            if trend is not None:
                state = self.detector.detect(trend, packet.arrival_ms)
            if packet.probe_cluster >= 0:
                self._clusters.setdefault(packet.probe_cluster, []).append(packet)
                clusters.add(packet.probe_cluster)
            else:
                self.acknowledged.add(packet.arrival_ms, packet.size)
        self.state = state
        dt = 0.0 if self._last_update_ms is None else (now_ms - self._last_update_ms) / 1000.0
        self._last_update_ms = now_ms
        acked = self.received_rate()
        for cluster in sorted(clusters):
            result = self._probe_result(cluster)
            if result is not None and result > self.delay_rate and state != "overuse":
                self.delay_rate = result  # libwebrtc: a probe result resets the AIMD estimate upwards
                self.probe_results.append((now_ms, result))
                self._clusters.pop(cluster, None)
        if state == "overuse":
            if now_ms - self._last_decrease_ms > max(rtt_ms, 100.0):
                cut = 0.85 * acked
                if cut < self.delay_rate:
                    self.delay_rate = cut
                self._last_decrease_ms = now_ms
                self._update_link_capacity(acked)
        elif state == "normal":
            near = (self.link_capacity is not None
                    and abs(acked - self.link_capacity) <= 3 * max(self.link_deviation, 0.05 * self.link_capacity))
            if self.link_capacity is not None and acked > self.link_capacity + 3 * max(self.link_deviation,
                                                                                       0.05 * self.link_capacity):
                self.link_capacity = None  # the link got faster than what the cuts saw: search again
            if near:
                response_s = (rtt_ms + 100.0) / 1000.0
                increase = self.delay_rate + dt * 1200 * 8 / response_s  # about one packet per response time
            else:
                increase = self.delay_rate * 1.08 ** dt
            self.delay_rate = max(self.delay_rate, min(increase, 1.5 * acked + 10e3))
        self.delay_rate = min(MAX_RATE, max(MIN_RATE, self.delay_rate))
        # libwebrtc updates the loss-based estimate only once reports cover at least 20 packets
        count = float(len(packets) if expected is None else expected)
        self._loss_expected += count
        self._loss_lost += loss_fraction * count
        if self._loss_expected >= 20:
            self._loss_update(now_ms, self._loss_lost / self._loss_expected, rtt_ms)
            self._loss_expected = self._loss_lost = 0.0
        self.probes.on_estimate(now_ms, self.target_bps)
        healthy = state != "overuse" and loss_fraction < 0.10 and bool(packets)
        self.pending_probe = self.probes.probe_rate(now_ms, healthy, self.target_bps)

    def _update_link_capacity(self, acked: float) -> None:
        if self.link_capacity is None:
            self.link_capacity, self.link_deviation = acked, 0.1 * acked
            return
        error = acked - self.link_capacity
        self.link_capacity += 0.05 * error
        self.link_deviation = (0.95 * self.link_deviation ** 2 + 0.05 * error ** 2) ** 0.5

    def _loss_update(self, now_ms: float, loss: float, rtt_ms: float) -> None:
        self._loss_history.append((now_ms, self.loss_rate))
        while self._loss_history and self._loss_history[0][0] < now_ms - 1000.0:
            self._loss_history.popleft()
        if loss < 0.02:
            floor = min(rate for _, rate in self._loss_history)  # +8 % over the last second's minimum
            self.loss_rate = max(self.loss_rate, floor * 1.08 + 1000.0)
        elif loss > 0.10 and now_ms - self._last_loss_decrease_ms > 300.0 + rtt_ms:
            self.loss_rate *= 1.0 - 0.5 * loss
            self._last_loss_decrease_ms = now_ms
        # libwebrtc caps the loss-based estimate by the delay-based one, so it cannot run ahead unobserved
        self.loss_rate = min(MAX_RATE, self.delay_rate, max(MIN_RATE, self.loss_rate))
