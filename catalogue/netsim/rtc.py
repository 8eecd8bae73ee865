"""A real-time video call over a LEO link, as simpy processes on one Environment (clock in ms).

    encoder -> pacer queue -> pacer -> drop-tail bottleneck (LinkTrace) -> receiver
                   ^                                                          |
                   +------------------- GCC <- feedback every 100 ms ---------+

- encoder: 30 fps, a frame of target/30 bytes (±10 %), split in 1200-byte packets;
- pacer: sends at 2.5 x target in 5 ms bursts; pauses while the bytes in flight exceed a congestion window of
  target x (RTT + 100 ms) (libwebrtc's congestion-window pushback), unless the queue holds more
  than the queue limit L in time (queue bits / target), in which case it ignores the window and
  speeds up to empty the queue within L (libwebrtc's queue time limit);
- bottleneck: FIFO at the trace's capacity, drop-tail buffer of 100 ms at capacity, nothing
  crosses during an outage, then random loss and one-way delay;
- receiver: renders a frame when all its packets arrived (no retransmission: a frame with a
  lost packet is skipped), counts freezes (render gap > max(3 x avg interval, avg + 150 ms)),
  and sends transport feedback every 100 ms over the reverse path (held back during outages).

``QueueLimitPolicy.limit_ms(now_ms, call)`` sets L every 100 ms. Beyond one machine: the model
is one process per call; sweeps over traces and policies run as independent processes (e.g.
``concurrent.futures.ProcessPoolExecutor`` or Ray tasks), each with its own seeded trace.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ..frame import require_extra

require_extra("netsim", "simpy", "numpy")

import numpy as np  # noqa: E402
import simpy  # noqa: E402

from .gcc import GoogleCongestionControl, ReceivedPacket  # noqa: E402
from .traces import LinkTrace  # noqa: E402

PACKET_BYTES = 1200
FPS = 30.0
PACER_INTERVAL_MS = 5.0


@dataclass
class Packet:
    seq: int
    frame: int
    size: int
    enqueued_ms: float
    sent_ms: float = math.nan


class QueueLimitPolicy:
    """The pacer queue limit L (ms) as a function of time and what the sender observes."""

    name = "policy"

    def limit_ms(self, now_ms: float, call: "RtcCall") -> float:
        raise NotImplementedError


class FixedQueueLimit(QueueLimitPolicy):
    def __init__(self, limit_ms: float):
        if not limit_ms > 0:
            raise ValueError(f"limit_ms={limit_ms!r}: the pacer queue limit must be > 0 ms")
        self.limit = float(limit_ms)
        self.name = f"fixed-{limit_ms:g}"

    def limit_ms(self, now_ms, call):
        return self.limit


@dataclass
class CallStats:
    """Counters and per-frame records of one call."""

    sent: int = 0
    delivered: int = 0
    dropped_buffer: int = 0
    dropped_random: int = 0
    delivered_bytes: int = 0
    render_ms: list = field(default_factory=list)
    frame_delay_ms: list = field(default_factory=list)
    freezes: int = 0
    checkpoints: list = field(default_factory=list)  # (t, sent, delivered, dropped, queued, in_flight)
    limits: list = field(default_factory=list)  # (t, L, target bit/s) every 100 ms

    @property
    def dropped(self) -> int:
        return self.dropped_buffer + self.dropped_random


class RtcCall:
    """One call on ``env`` over ``trace`` with pacer queue limit ``policy``; run with ``env.run(until)``."""

    def __init__(self, env: simpy.Environment, trace: LinkTrace, policy: QueueLimitPolicy, rng: np.random.Generator,
                 start_bps: float = 1e6, buffer_ms: float = 100.0, window_extra_ms: float = 100.0):
        if not buffer_ms > 0:
            raise ValueError(f"buffer_ms={buffer_ms!r}: the bottleneck buffer must be > 0 ms")
        self.env, self.trace, self.policy, self.rng = env, trace, policy, rng
        self.gcc = GoogleCongestionControl(start_bps)
        self.buffer_ms, self.window_extra_ms = buffer_ms, window_extra_ms
        self.stats = CallStats()
        self.queue: deque[Packet] = deque()
        self.queue_bytes = 0
        self.packets: list[Packet] = []
        self.cum_bytes = [0]  # bytes sent up to and including seq i-1
        self.acked_seq = -1  # every seq <= this was reported (received or lost)
        self.srtt = 2 * float(trace.delay_ms[0])
        self.last_feedback_ms = 0.0
        self.last_loss = 0.0
        self.rtt_history: deque[tuple[float, float]] = deque(maxlen=20)
        # bottleneck
        self.buffer: deque[Packet] = deque()
        self.buffer_bytes = 0
        self.in_flight = 0
        # receiver
        self.frame_packets: dict[int, int] = {}
        self.frame_capture: dict[int, float] = {}
        self.frame_received: dict[int, int] = {}
        self.last_rendered = -1
        self.unreported: list[ReceivedPacket] = []
        self.reported_highest = -1
        self._pacer_wake = env.event()
        self._link_wake = env.event()
        self.limit = float(policy.limit_ms(0.0, self))
        for process in (self.encoder(), self.pacer(), self.bottleneck(), self.feedback(), self.controller(),
                        self.checkpoints()):
            env.process(process)

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _wake(event: simpy.Event) -> None:
        if not event.triggered:
            event.succeed()

    @property
    def target_bps(self) -> float:
        return self.gcc.target_bps

    def outstanding_bytes(self) -> int:
        return self.cum_bytes[-1] - self.cum_bytes[self.acked_seq + 1]

    # -- sender -------------------------------------------------------------------------
    def encoder(self):
        frame = 0
        while True:
            size = int(self.target_bps / 8 / FPS * self.rng.uniform(0.9, 1.1))
            count = max(1, math.ceil(size / PACKET_BYTES))
            self.frame_packets[frame] = count
            self.frame_capture[frame] = self.env.now
            for k in range(count):
                chunk = min(PACKET_BYTES, size - k * PACKET_BYTES) if size > 0 else 1
                self.queue.append(Packet(-1, frame, max(chunk, 1), self.env.now))
                self.queue_bytes += max(chunk, 1)
            self._wake(self._pacer_wake)
            frame += 1
            yield self.env.timeout(1000.0 / FPS)

    def pacer(self):
        while True:
            if not self.queue:
                self._pacer_wake = self.env.event()
                yield self._pacer_wake
                continue
            target = self.target_bps
            queue_ms = self.queue_bytes * 8 / target * 1000.0
            over_limit = queue_ms > self.limit
            window = target / 8 * (self.srtt + self.window_extra_ms) / 1000.0
            if not over_limit and self.outstanding_bytes() >= window:
                self._pacer_wake = self.env.event()  # a report, a frame or a new limit wakes us
                yield self._pacer_wake
                continue
            rate = 2.5 * target
            if over_limit:
                rate = max(rate, self.queue_bytes * 8 / (self.limit / 1000.0))
            # one burst per 5 ms pacing interval (libwebrtc's pacer period), then wait for it to drain
            budget = rate / 8 * PACER_INTERVAL_MS / 1000.0
            sent = 0
            while self.queue and (sent == 0 or sent + self.queue[0].size <= budget):
                if sent and not over_limit and self.outstanding_bytes() >= window:
                    break
                packet = self.queue.popleft()
                self.queue_bytes -= packet.size
                sent += packet.size
                self._send(packet)
            yield self.env.timeout(sent * 8 / rate * 1000.0)

    def _send(self, packet: Packet) -> None:
        packet.seq, packet.sent_ms = len(self.packets), self.env.now
        self.packets.append(packet)
        self.cum_bytes.append(self.cum_bytes[-1] + packet.size)
        self.stats.sent += 1
        i = self.trace.index(self.env.now)
        if self.buffer_bytes + packet.size > self.trace.capacity_bps[i] / 8 * self.buffer_ms / 1000.0:
            self.stats.dropped_buffer += 1  # drop-tail
            return
        self.buffer.append(packet)
        self.buffer_bytes += packet.size
        self._wake(self._link_wake)

    def controller(self):
        """Every 100 ms: ask the policy for the queue limit."""
        while True:
            yield self.env.timeout(100.0)
            self.limit = float(self.policy.limit_ms(self.env.now, self))
            self.stats.limits.append((self.env.now, self.limit, self.target_bps))
            self._wake(self._pacer_wake)

    # -- network ------------------------------------------------------------------------
    def bottleneck(self):
        while True:
            if not self.buffer:
                self._link_wake = self.env.event()
                yield self._link_wake
                continue
            i = self.trace.index(self.env.now)
            if self.trace.outage[i]:
                yield self.env.timeout(max(1.0, self.trace.resume_ms[i] - self.env.now))
                continue
            packet = self.buffer[0]
            yield self.env.timeout(packet.size * 8 / self.trace.capacity_bps[i] * 1000.0)
            self.buffer.popleft()
            self.buffer_bytes -= packet.size
            i = self.trace.index(self.env.now)
            if self.rng.random() < self.trace.loss[i]:
                self.stats.dropped_random += 1
                continue
            self.in_flight += 1
            self.env.timeout(self.trace.delay_ms[i]).callbacks.append(lambda _, p=packet: self._arrive(p))

    # -- receiver -----------------------------------------------------------------------
    def _arrive(self, packet: Packet) -> None:
        now = self.env.now
        self.in_flight -= 1
        self.stats.delivered += 1
        self.stats.delivered_bytes += packet.size
        self.unreported.append(ReceivedPacket(packet.seq, packet.size, packet.sent_ms, now))
        frame = packet.frame
        self.frame_received[frame] = self.frame_received.get(frame, 0) + 1
        if self.frame_received[frame] == self.frame_packets[frame] and frame > self.last_rendered:
            self._render(frame, now)

    def _render(self, frame: int, now: float) -> None:
        renders = self.stats.render_ms
        if renders:
            recent = np.diff(renders[-31:]) if len(renders) > 1 else np.array([1000.0 / FPS])
            average = float(np.mean(recent))
            if now - renders[-1] > max(3 * average, average + 150.0):
                self.stats.freezes += 1
        renders.append(now)
        self.stats.frame_delay_ms.append(now - self.frame_capture[frame])
        self.last_rendered = frame

    def feedback(self):
        """Transport feedback every 100 ms; during an outage it waits for the next report slot."""
        while True:
            yield self.env.timeout(100.0)
            i = self.trace.index(self.env.now)
            if self.trace.outage[i] or not self.unreported:
                continue
            report, self.unreported = self.unreported, []
            sent_at = self.env.now
            delay = self.trace.delay_ms[i]
            self.env.timeout(delay).callbacks.append(lambda _, r=report, t=sent_at: self._on_report(r, t))

    def _on_report(self, report: list[ReceivedPacket], report_ms: float) -> None:
        now = self.env.now
        highest = max(p.seq for p in report)
        if highest > self.reported_highest:
            expected = highest - self.reported_highest
            received = sum(1 for p in report if p.seq > self.reported_highest)
            loss = max(0.0, 1.0 - received / expected)
            self.reported_highest = highest
            self.acked_seq = max(self.acked_seq, highest)
        else:
            loss = 0.0
        last = max(report, key=lambda p: p.arrival_ms)
        rtt = (last.arrival_ms - last.sent_ms) + (now - report_ms)
        self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rtt_history.append((now, rtt))
        self.last_feedback_ms, self.last_loss = now, loss
        self.gcc.on_feedback(now, report, loss, self.srtt)
        self._wake(self._pacer_wake)

    def checkpoints(self):
        while True:
            yield self.env.timeout(1000.0)
            s = self.stats
            s.checkpoints.append((self.env.now, s.sent, s.delivered, s.dropped, len(self.buffer), self.in_flight))


@dataclass
class CallMetrics:
    bitrate: float  # received video bitrate, Mbit/s
    freezes_per_min: float
    p95_delay_ms: float


def simulate_call(trace: LinkTrace, policy: QueueLimitPolicy, seed: int, **kwargs) -> tuple[CallMetrics, RtcCall]:
    """Run one call over the whole trace."""
    env = simpy.Environment()
    call = RtcCall(env, trace, policy, np.random.default_rng(seed), **kwargs)
    env.run(until=float(trace.duration_ms))
    seconds = trace.duration_ms / 1000.0
    delays = call.stats.frame_delay_ms
    metrics = CallMetrics(bitrate=call.stats.delivered_bytes * 8 / seconds / 1e6,
                          freezes_per_min=call.stats.freezes / (seconds / 60.0),
                          p95_delay_ms=float(np.percentile(delays, 95)) if delays else math.inf)
    return metrics, call
