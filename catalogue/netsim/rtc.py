"""A real-time video call over a LEO link, as simpy processes on one Environment (clock in ms).

    encoder -> pacer queue -> pacer -> drop-tail bottleneck (LinkTrace) -> receiver (decoder)
                   ^   ^                                                      |   |
                   |   +---- NACK / keyframe request (reverse path) ----------+   |
                   +------------------- GCC <- feedback every 100 ms -------------+

- encoder: 30 fps, a delta frame of target/30 bytes (±10 %), a keyframe 3x that (the first frame and
  the frame after a keyframe request), split in 1200-byte packets numbered by a media sequence;
- pacer: sends at 2.5 x target in 5 ms bursts, retransmissions first; pauses while the bytes in
  flight exceed a congestion window of target x (RTT + 100 ms) (libwebrtc's congestion-window
  pushback; while congested it still sends one packet every 500 ms, as libwebrtc's pacer does, so
  that feedback resumes), unless the queue holds more than the queue limit L in time (queue bits / target), in
  which case it ignores the window and speeds up to empty the queue within L (libwebrtc's queue
  time limit); probe clusters that GCC asks for go out at their own rate;
- bottleneck: FIFO at the trace's capacity, drop-tail buffer of 100 ms at capacity, nothing
  crosses during an outage, then random loss and one-way delay. What the pacer pushes into the
  full buffer (as it does when L is short and an outage stalls the link) is dropped, and the
  receiver sees those drops as gaps like any other loss;
- receiver: frame f decodes only after frame f-1 (every delta frame depends on the previous one)
  or as a keyframe. A gap in the media sequence is NACKed at once and again every RTT; the sender
  retransmits what is NACKed. After 10 NACKs (about 10 RTTs, libwebrtc's retry limit) the packet is
  given up and the receiver asks for a keyframe (at most once per RTT + 100 ms); the video freezes
  until the retransmission or the keyframe arrives, or until a later complete keyframe. A freeze is
  a render gap > max(3 x avg interval, avg + 150 ms) (WebRTC's freeze metric); transport feedback
  goes back every 100 ms over the reverse path (held back during outages), as do NACKs and
  keyframe requests.

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
KEYFRAME_FACTOR = 3.0  # a keyframe is this many delta frames
NACK_RETRIES = 10  # libwebrtc's NackRequester gives a packet up after 10 requests, one per RTT
NACK_TICK_MS = 20.0  # how often the receiver looks at its missing packets
CONGESTED_PACKET_MS = 500.0  # libwebrtc's pacer sends one packet this often while congested, to keep feedback alive
PROBE_CLUSTER_MS = 30.0  # a probe cluster lasts this long at the probed rate (at least 5 packets)


@dataclass
class Packet:
    seq: int  # transport-wide sequence number (assigned when sent)
    frame: int
    size: int
    enqueued_ms: float
    sent_ms: float = math.nan
    media_seq: int = -1  # the media (RTP) sequence number; -1 for probe padding
    kind: str = "media"  # "media", "rtx" (a retransmission) or "probe"
    cluster: int = -1


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
    delivered_bytes: int = 0  # video bytes (media and retransmissions; probe padding is not video)
    render_ms: list = field(default_factory=list)
    rendered: list = field(default_factory=list)  # frame ids in render order
    frame_delay_ms: list = field(default_factory=list)
    freezes: int = 0
    freeze_ms: list = field(default_factory=list)  # when each freeze began (the last render before the gap)
    retransmissions: int = 0
    nacks: int = 0
    keyframe_requests: int = 0
    probe_clusters: int = 0
    frames_skipped: int = 0  # frames never decoded (a later keyframe replaced them)
    max_queue_ms: float = 0.0  # the longest pacer queue seen, in ms at the target rate
    over_limit_ms: float = 0.0  # time the pacer spent over its queue limit (speeding up)
    checkpoints: list = field(default_factory=list)  # (t, sent, delivered, dropped, queued, in_flight)
    limits: list = field(default_factory=list)  # (t, L, target bit/s) every 100 ms

    @property
    def dropped(self) -> int:
        return self.dropped_buffer + self.dropped_random


@dataclass
class _Missing:
    detected_ms: float
    nacked_ms: float = -math.inf
    nacks: int = 0


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
        # sender
        self.queue: deque[Packet] = deque()  # media, in order
        self.rtx_queue: deque[Packet] = deque()  # retransmissions, sent first
        self.probe_queue: deque[Packet] = deque()
        self.probe_rate = 0.0
        self.queue_bytes = 0
        self.packets: list[Packet] = []
        self.media_history: dict[int, Packet] = {}  # media seq -> original packet (what a NACK retransmits)
        self.retransmitted_ms: dict[int, float] = {}
        self.next_media_seq = 0
        self.keyframe_pending = True  # the first frame is a keyframe
        self.cum_bytes = [0]  # bytes sent up to and including seq i-1
        self.acked_seq = -1  # every seq <= this was reported (received or lost)
        self.srtt = 2 * float(trace.delay_ms[0])
        self.last_feedback_ms = 0.0
        self.last_loss = 0.0
        self.rtt_history: deque[tuple[float, float]] = deque(maxlen=20)
        self._clusters = 0
        self._last_send_ms = 0.0
        # bottleneck
        self.buffer: deque[Packet] = deque()
        self.buffer_bytes = 0
        self.in_flight = 0
        # receiver
        self.frame_packets: dict[int, int] = {}
        self.frame_first_seq: dict[int, int] = {}
        self.frame_keyframe: dict[int, bool] = {}
        self.frame_capture: dict[int, float] = {}
        self.frame_received: dict[int, int] = {}
        self.received_media: set[int] = set()
        self.highest_media_seq = -1
        self.missing: dict[int, _Missing] = {}
        self.next_frame = 0  # the next frame the decoder needs
        self.last_rendered = -1
        self.last_keyframe_request_ms = -math.inf
        self.unreported: list[ReceivedPacket] = []
        self.reported_highest = -1
        self._pacer_wake = env.event()
        self._link_wake = env.event()
        self.limit = float(policy.limit_ms(0.0, self))
        for process in (self.encoder(), self.pacer(), self.bottleneck(), self.feedback(), self.controller(),
                        self.nack_requester(), self.checkpoints()):
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

    def queue_ms(self) -> float:
        """The pacer queue (media and retransmissions) in ms at the target rate."""
        return self.queue_bytes * 8 / self.target_bps * 1000.0

    def _reverse(self, callback) -> bool:
        """Send a receiver-to-sender message now; False (not sent) during an outage."""
        i = self.trace.index(self.env.now)
        if self.trace.outage[i]:
            return False
        self.env.timeout(self.trace.delay_ms[i]).callbacks.append(lambda _: callback())
        return True

    # -- sender -------------------------------------------------------------------------
    def encoder(self):
        frame = 0
        while True:
            keyframe, self.keyframe_pending = self.keyframe_pending, False
            size = int(self.target_bps / 8 / FPS * self.rng.uniform(0.9, 1.1) * (KEYFRAME_FACTOR if keyframe else 1))
            count = max(1, math.ceil(size / PACKET_BYTES))
            self.frame_packets[frame] = count
            self.frame_first_seq[frame] = self.next_media_seq
            self.frame_keyframe[frame] = keyframe
            self.frame_capture[frame] = self.env.now
            for k in range(count):
                chunk = max(1, min(PACKET_BYTES, size - k * PACKET_BYTES))
                packet = Packet(-1, frame, chunk, self.env.now, media_seq=self.next_media_seq)
                self.media_history[self.next_media_seq] = packet
                self.next_media_seq += 1
                self.queue.append(packet)
                self.queue_bytes += chunk
            self.stats.max_queue_ms = max(self.stats.max_queue_ms, self.queue_ms())
            self._wake(self._pacer_wake)
            frame += 1
            yield self.env.timeout(1000.0 / FPS)

    def pacer(self):
        while True:
            if self.probe_queue:  # a probe cluster goes out at its own rate, packet by packet
                packet = self.probe_queue.popleft()
                self._send(packet)
                yield self.env.timeout(packet.size * 8 / self.probe_rate * 1000.0)
                continue
            if not self.queue and not self.rtx_queue:
                self._pacer_wake = self.env.event()
                yield self._pacer_wake
                continue
            target = self.target_bps
            over_limit = self.queue_ms() > self.limit
            window = target / 8 * (self.srtt + self.window_extra_ms) / 1000.0
            if not over_limit and self.outstanding_bytes() >= window:
                quiet = self.env.now - self._last_send_ms
                if quiet >= CONGESTED_PACKET_MS:  # congested for 500 ms: one packet keeps feedback alive
                    source = self.rtx_queue if self.rtx_queue else self.queue
                    packet = source.popleft()
                    self.queue_bytes -= packet.size
                    self._send(packet)
                    continue
                self._pacer_wake = self.env.event()  # a report, a frame, a new limit or the keepalive wakes us
                wake = self._pacer_wake
                self.env.timeout(CONGESTED_PACKET_MS - quiet).callbacks.append(lambda _, e=wake: self._wake(e))
                yield wake
                continue
            rate = 2.5 * target
            if over_limit:
                rate = max(rate, self.queue_bytes * 8 / (self.limit / 1000.0))
            # one burst per 5 ms pacing interval (libwebrtc's pacer period), then wait for it to drain
            budget = rate / 8 * PACER_INTERVAL_MS / 1000.0
            sent = 0
            while self.rtx_queue or self.queue:
                source = self.rtx_queue if self.rtx_queue else self.queue
                if sent and sent + source[0].size > budget:
                    break
                if sent and not over_limit and self.outstanding_bytes() >= window:
                    break
                packet = source.popleft()
                self.queue_bytes -= packet.size
                sent += packet.size
                self._send(packet)
            wait = sent * 8 / rate * 1000.0
            if over_limit:
                self.stats.over_limit_ms += wait
            yield self.env.timeout(wait)

    def _send(self, packet: Packet) -> None:
        packet.seq, packet.sent_ms = len(self.packets), self.env.now
        self._last_send_ms = self.env.now
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

    def _on_nack(self, media_seqs: list[int]) -> None:
        now = self.env.now
        for media_seq in media_seqs:
            original = self.media_history.get(media_seq)
            # one retransmission per RTT at most (libwebrtc's RTPSender keeps the same rule)
            if original is None or now - self.retransmitted_ms.get(media_seq, -math.inf) < self.srtt:
                continue
            self.retransmitted_ms[media_seq] = now
            copy = Packet(-1, original.frame, original.size, now, media_seq=media_seq, kind="rtx")
            self.rtx_queue.append(copy)
            self.queue_bytes += copy.size
            self.stats.retransmissions += 1
        self._wake(self._pacer_wake)

    def _on_keyframe_request(self) -> None:
        self.keyframe_pending = True

    def _start_probe(self, rate_bps: float) -> None:
        count = max(5, math.ceil(rate_bps / 8 * PROBE_CLUSTER_MS / 1000.0 / PACKET_BYTES))
        cluster = self._clusters
        self._clusters += 1
        self.probe_rate = rate_bps
        for _ in range(count):
            self.probe_queue.append(Packet(-1, -1, PACKET_BYTES, self.env.now, kind="probe", cluster=cluster))
        self.gcc.register_probe(cluster, count, rate_bps)
        self.stats.probe_clusters += 1
        self._wake(self._pacer_wake)

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
        self.unreported.append(ReceivedPacket(packet.seq, packet.size, packet.sent_ms, now, packet.cluster))
        if packet.kind == "probe":
            return
        self.stats.delivered_bytes += packet.size
        media_seq = packet.media_seq
        if media_seq in self.received_media:
            return  # a retransmission of a packet that got through after all
        self.received_media.add(media_seq)
        self.missing.pop(media_seq, None)
        if media_seq > self.highest_media_seq + 1:  # a gap: NACK the packets in it at once
            for lost in range(self.highest_media_seq + 1, media_seq):
                if lost not in self.received_media:
                    self.missing[lost] = _Missing(now)
            self._request_missing(now)
        self.highest_media_seq = max(self.highest_media_seq, media_seq)
        frame = packet.frame
        self.frame_received[frame] = self.frame_received.get(frame, 0) + 1
        self._decode(now)

    def _complete(self, frame: int) -> bool:
        return frame in self.frame_packets and self.frame_received.get(frame, 0) == self.frame_packets[frame]

    def _decode(self, now: float) -> None:
        """Render every frame that can be decoded now: the next one in order, or a later complete keyframe."""
        while True:
            if self._complete(self.next_frame):
                self._render(self.next_frame, now)
                self.next_frame += 1
                continue
            later = [f for f, received in self.frame_received.items()
                     if f > self.next_frame and self.frame_keyframe.get(f) and self._complete(f)]
            if not later:
                return
            keyframe = max(later)  # the decoder restarts at the newest complete keyframe
            self.stats.frames_skipped += keyframe - self.next_frame
            first = self.frame_first_seq[keyframe]
            for media_seq in [s for s in self.missing if s < first]:  # nothing before a keyframe is needed
                del self.missing[media_seq]
            self.next_frame = keyframe

    def _render(self, frame: int, now: float) -> None:
        renders = self.stats.render_ms
        if renders:
            recent = np.diff(renders[-31:]) if len(renders) > 1 else np.array([1000.0 / FPS])
            average = float(np.mean(recent))
            if now - renders[-1] > max(3 * average, average + 150.0):
                self.stats.freezes += 1
                self.stats.freeze_ms.append(renders[-1])
        renders.append(now)
        self.stats.rendered.append(frame)
        self.stats.frame_delay_ms.append(now - self.frame_capture[frame])
        self.last_rendered = frame
        for done in [f for f in self.frame_received if f <= frame]:
            del self.frame_received[done]

    def _request_missing(self, now: float) -> None:
        """NACK what is missing and due (once per RTT), give up after NACK_RETRIES and ask for a keyframe."""
        due, given_up = [], False
        first_needed = self.frame_first_seq.get(self.next_frame, 0)
        for media_seq, record in list(self.missing.items()):
            if media_seq < first_needed:  # its frame was skipped by a keyframe
                del self.missing[media_seq]
                continue
            if record.nacks >= NACK_RETRIES:
                given_up = True
                continue
            if now - record.nacked_ms >= self.srtt:
                due.append((media_seq, record))
        if due and self._reverse(lambda seqs=[s for s, _ in due]: self._on_nack(seqs)):
            for _, record in due:
                record.nacked_ms = now
                record.nacks += 1
            self.stats.nacks += len(due)
        if given_up and now - self.last_keyframe_request_ms > self.srtt + 100.0:
            if self._reverse(self._on_keyframe_request):
                self.last_keyframe_request_ms = now
                self.stats.keyframe_requests += 1
                for media_seq in [s for s, r in self.missing.items() if r.nacks >= NACK_RETRIES]:
                    del self.missing[media_seq]  # the keyframe replaces them

    def nack_requester(self):
        while True:
            yield self.env.timeout(NACK_TICK_MS)
            if self.missing:
                self._request_missing(self.env.now)

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
        expected = 0
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
        self.gcc.on_feedback(now, report, loss, self.srtt, expected)
        if self.gcc.pending_probe is not None and not self.probe_queue:
            self._start_probe(self.gcc.pending_probe)
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
