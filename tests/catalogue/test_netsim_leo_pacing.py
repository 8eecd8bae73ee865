"""LEO real-time video: traces, packet conservation, clean links, determinism, policies, bad inputs."""

import numpy as np
import pytest

from asyncgen.catalogue.netsim.gcc import MIN_RATE, MAX_RATE
from asyncgen.catalogue.netsim.pacing import OracleQueueLimit, PredictedQueueLimit, near_handover, noisy_schedule
from asyncgen.catalogue.netsim.rtc import FixedQueueLimit, simulate_call
from asyncgen.catalogue.netsim.traces import LinkTrace, generate_trace


def test_traces_follow_the_spec():
    for seed in range(3):
        dynamic = generate_trace("dynamic", 120, np.random.default_rng(seed))
        assert dynamic.duration_ms == 120_000
        assert 2e6 <= dynamic.capacity_bps.min() and dynamic.capacity_bps.max() <= 8e6
        assert 20.0 <= dynamic.delay_ms.min() and dynamic.delay_ms.max() <= 40.0
        gaps = np.diff(dynamic.handovers_ms)
        # inside a window every 2-5 s; between windows at least the 20-40 s quiet gap
        assert np.min(gaps) >= 2e3 and np.all((gaps <= 5e3) | (gaps >= 20e3)) and np.any(gaps <= 5e3)
        for h in dynamic.handovers_ms.astype(int):
            length = int(np.argmin(dynamic.outage[h:])) if not dynamic.outage[-1] else None
            assert length is None or 100 <= length <= 400
        lossy = dynamic.loss[dynamic.loss > 0]
        assert lossy.size and lossy.min() >= 0.05 and lossy.max() <= 0.20
        assert not np.any((dynamic.loss > 0) & dynamic.outage)  # loss follows the outage, it does not overlap it
        stable = generate_trace("stable", 120, np.random.default_rng(seed))
        assert len(stable.handovers_ms) <= 2 and np.all(np.diff(stable.handovers_ms) >= 60e3)
    # resume_ms points past each outage
    trace = generate_trace("dynamic", 60, np.random.default_rng(1))
    inside = np.flatnonzero(trace.outage)
    assert np.all(~trace.outage[np.minimum(trace.resume_ms[inside], trace.duration_ms - 1)])


def test_packets_are_conserved_at_every_checkpoint():
    trace = generate_trace("dynamic", 40, np.random.default_rng(4))
    _, call = simulate_call(trace, FixedQueueLimit(200.0), seed=4)
    assert len(call.stats.checkpoints) == 39
    for _, sent, delivered, dropped, queued, in_flight in call.stats.checkpoints:
        assert sent == delivered + dropped + queued + in_flight
    assert call.stats.dropped > 0  # handovers lose packets, so the identity is not trivially sent == delivered


def test_clean_link_has_no_freezes():
    rng = np.random.default_rng(0)
    trace = generate_trace("stable", 60, rng, handovers=False, random_loss=False)
    metrics, call = simulate_call(trace, FixedQueueLimit(2000.0), seed=0)
    assert metrics.freezes_per_min == 0.0 and call.stats.dropped_random == 0
    assert metrics.bitrate > 1.0  # GCC ramps up from 1 Mbit/s on a 2-8 Mbit/s link
    assert all(MIN_RATE <= row[2] <= MAX_RATE for row in call.stats.limits)


def test_same_seed_same_metrics():
    trace = generate_trace("dynamic", 30, np.random.default_rng(2))
    first, _ = simulate_call(trace, FixedQueueLimit(2000.0), seed=2)
    again, _ = simulate_call(generate_trace("dynamic", 30, np.random.default_rng(2)), FixedQueueLimit(2000.0), seed=2)
    assert first == again


def test_oracle_policy_and_schedule():
    times = np.array([10_000.0, 14_000.0])
    oracle = OracleQueueLimit(times, 200.0, 3000.0, lead_s=2.0)
    assert [oracle.limit_ms(t, None) for t in (7_999.0, 8_000.0, 12_000.0, 16_000.0, 16_001.0)] == \
        [200.0, 3000.0, 3000.0, 3000.0, 200.0]
    assert not near_handover(np.array([]), 5.0, 2.0)
    many = np.arange(1000) * 10_000.0
    schedule = noisy_schedule(many, np.random.default_rng(0))
    assert 850 <= schedule.size <= 950  # 10% missing, binomial sd ~9.5
    matched = np.abs(schedule[:, None] - many[None, :]).min(axis=1)
    assert matched.max() <= 1000.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="limit_ms"):
        FixedQueueLimit(0)
    with pytest.raises(ValueError, match="lead_s"):
        OracleQueueLimit([1.0], lead_s=-1.0)
    with pytest.raises(ValueError, match="queue limits"):
        PredictedQueueLimit(None, [], stable_ms=-5.0)
    with pytest.raises(ValueError, match="at least 10 s"):
        generate_trace("dynamic", 5, np.random.default_rng(0))
    n = 20_000
    with pytest.raises(ValueError, match="capacity"):
        LinkTrace.build(np.zeros(n), np.full(n, 30.0), np.zeros(n), np.zeros(n, bool), [])
    with pytest.raises(ValueError, match="kind"):
        generate_trace("sparse", 20, np.random.default_rng(0))
