"""LEO pacing, issue 25 §3: GoogCC's acknowledged-bitrate estimator, overuse state and probing after a drop;
a receiver whose frames depend on the previous frame (NACK retransmission or keyframe); a short queue limit
during an outage turning into drops; the 15 s Starlink reconfiguration traces."""

import numpy as np

from asyncgen.catalogue.netsim import rtc
from asyncgen.catalogue.netsim.gcc import (AcknowledgedBitrateEstimator, GoogleCongestionControl, OveruseDetector,
                                           ProbeController, ReceivedPacket)
from asyncgen.catalogue.netsim.rtc import FixedQueueLimit, simulate_call
from asyncgen.catalogue.netsim.traces import RECONFIGURATION_MS, LinkTrace, generate_trace


def feed(estimator, start_ms, stop_ms, rate_bps, size=1200):
    spacing = size * 8 / rate_bps * 1000.0
    t = start_ms
    while t < stop_ms:
        estimator.add(t, size)
        t += spacing


def test_a_gap_without_acknowledgements_is_not_read_as_low_throughput():
    steady = AcknowledgedBitrateEstimator()
    feed(steady, 0.0, 2000.0, 2e6)
    before = steady.estimate_bps
    assert abs(before - 2e6) / 2e6 < 0.05  # windows of whole packets: a few % of rounding per window
    feed(steady, 2300.0, 3000.0, 2e6)  # a 300 ms outage, then the same rate
    assert abs(steady.estimate_bps - 2e6) / 2e6 < 0.05
    slow = AcknowledgedBitrateEstimator()
    feed(slow, 0.0, 2000.0, 2e6)
    feed(slow, 2000.0, 4000.0, 0.5e6)  # a real drop: packets keep arriving, four times slower
    assert slow.estimate_bps < 1e6


def test_overuse_needs_a_persistent_rising_trend():
    detector = OveruseDetector()
    assert detector.detect(50.0, 0.0) == "normal"  # one group above the threshold is not overuse
    assert detector.detect(0.0, 5.0) == "normal"
    detector = OveruseDetector()
    states = [detector.detect(30.0 + k, 6.0 * k) for k in range(4)]
    assert states[0] == "normal" and states[-1] == "overuse"
    assert detector.detect(-60.0, 30.0) == "underuse"


def test_probe_after_a_large_drop():
    probes = ProbeController()
    probes.on_estimate(0.0, 2e6)
    probes.on_estimate(100.0, 1.9e6)  # a small step is no drop
    assert probes.probe_rate(100.0, True, 1.9e6) is None
    probes.on_estimate(200.0, 1.0e6)  # below 0.66 x 1.9 Mbit/s
    assert probes.probe_rate(300.0, False, 1.0e6) is None  # not while the link is unhealthy
    assert probes.probe_rate(400.0, True, 1.0e6) == 0.85 * 1.9e6
    assert probes.probe_rate(500.0, True, 1.0e6) is None  # one cluster per drop
    late = ProbeController()
    late.on_estimate(0.0, 2e6)
    late.on_estimate(100.0, 0.5e6)
    assert late.probe_rate(5200.0, True, 0.5e6) is None  # libwebrtc's 5 s timeout


def test_a_probe_cluster_that_arrives_raises_the_delay_based_estimate():
    gcc = GoogleCongestionControl(start_bps=0.5e6)
    gcc.register_probe(0, 10, 2e6)
    spacing = 1200 * 8 / 2e6 * 1000.0  # sent at 2 Mbit/s, received at the same spacing
    packets = [ReceivedPacket(k, 1200, k * spacing, 30.0 + k * spacing, probe_cluster=0) for k in range(10)]
    gcc.on_feedback(100.0, packets, 0.0, 60.0)
    assert abs(gcc.delay_rate - 2e6) / 2e6 < 1e-9  # min(send rate, receive rate), both exactly 2 Mbit/s
    assert gcc.probe_results == [(100.0, gcc.delay_rate)]


def lossy_trace(seconds=20, loss=0.05):
    n = seconds * 1000
    return LinkTrace.build(np.full(n, 4e6), np.full(n, 25.0), np.full(n, loss), np.zeros(n, bool), [])


def test_frames_decode_in_order_and_a_loss_waits_for_its_retransmission():
    metrics, call = simulate_call(lossy_trace(), FixedQueueLimit(2000.0), seed=3)
    s = call.stats
    assert s.dropped_random > 0 and s.retransmissions > 0 and s.nacks > 0
    # every delta frame renders only after its predecessor: the render order is 0, 1, 2, ... with no skip
    assert s.rendered == list(range(len(s.rendered))) and s.frames_skipped == 0 and s.keyframe_requests == 0
    assert len(s.rendered) > 0.9 * 20 * rtc.FPS


def test_without_retransmissions_a_loss_freezes_until_a_keyframe(monkeypatch):
    monkeypatch.setattr(rtc, "NACK_RETRIES", 0)  # give every lost packet up at once
    _, call = simulate_call(lossy_trace(), FixedQueueLimit(2000.0), seed=3)
    s = call.stats
    assert s.keyframe_requests > 0 and s.frames_skipped > 0
    keyframes = {f for f, key in call.frame_keyframe.items() if key}
    rendered = s.rendered
    for previous, frame in zip(rendered, rendered[1:]):  # a jump in the render order lands on a keyframe
        assert frame == previous + 1 or frame in keyframes


def outage_trace(seconds=20, start_ms=10_000, length_ms=400):
    n = seconds * 1000
    outage = np.zeros(n, bool)
    outage[start_ms:start_ms + length_ms] = True
    return LinkTrace.build(np.full(n, 3e6), np.full(n, 30.0), np.zeros(n), outage, [start_ms])


def test_a_short_queue_limit_during_an_outage_turns_into_drops():
    _, short = simulate_call(outage_trace(), FixedQueueLimit(200.0), seed=0)
    _, long = simulate_call(outage_trace(), FixedQueueLimit(2000.0), seed=0)
    assert short.stats.over_limit_ms > 0 and long.stats.over_limit_ms == 0
    assert short.stats.dropped_buffer > long.stats.dropped_buffer
    for call in (short, long):  # every drop was recovered by a retransmission: nothing skipped
        assert call.stats.frames_skipped == 0
        assert call.stats.rendered == list(range(len(call.stats.rendered)))


def test_starlink_traces_hand_over_on_the_15_s_grid():
    trace = generate_trace("starlink", 90, np.random.default_rng(5))
    gaps = np.diff(trace.handovers_ms)
    # t += 15000 on a fractional start: float64 rounding only, far below a millisecond
    assert trace.handovers_ms.size == 6 and np.allclose(gaps, RECONFIGURATION_MS, rtol=0, atol=1e-6)
    assert 0 <= trace.handovers_ms[0] < RECONFIGURATION_MS
    for h in trace.handovers_ms.astype(int):
        assert trace.outage[h] and 100 <= int(np.argmin(trace.outage[h:])) <= 400
