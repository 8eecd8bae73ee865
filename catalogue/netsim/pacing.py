"""Queue-limit policies for the pacer around LEO handovers (Gottipati and Qiu 2025): fixed limits,
an oracle that knows the handover schedule, and a scikit-learn predictor that sees only what a
sender sees (RTT, loss, received rate, feedback gaps) plus the published orbital schedule with
±1 s jitter and 10 % of handovers missing.

Adaptive rule: L = 200 ms when the link is stable, 3000 ms from ``lead_s`` before to ``lead_s``
after (predicted) handover activity.
"""

from __future__ import annotations

import numpy as np

from .rtc import QueueLimitPolicy, RtcCall

FEATURES = ("to_next_scheduled_s", "since_last_scheduled_s", "since_feedback_ms", "srtt_ms", "loss",
            "received_over_target")


def _check_limits(stable_ms: float, handover_ms: float, lead_s: float) -> None:
    if not stable_ms > 0 or not handover_ms > 0:
        raise ValueError(f"queue limits {stable_ms!r}/{handover_ms!r} ms: the pacer queue limit must be > 0")
    if not lead_s >= 0:
        raise ValueError(f"lead_s={lead_s!r}: the lead time must be >= 0 s")


def near_handover(times_ms: np.ndarray, now_ms: float, lead_s: float) -> bool:
    """Whether ``now_ms`` lies within ``lead_s`` of any time in ``times_ms``."""
    return bool(times_ms.size) and float(np.min(np.abs(times_ms - now_ms))) <= lead_s * 1000.0


def noisy_schedule(handovers_ms: np.ndarray, rng: np.random.Generator, jitter_s: float = 1.0,
                   miss: float = 0.10) -> np.ndarray:
    """The orbital schedule as a sender would know it: each handover shifted by U(-jitter, jitter), some missing."""
    keep = rng.random(handovers_ms.size) >= miss
    shifted = handovers_ms + rng.uniform(-jitter_s, jitter_s, handovers_ms.size) * 1000.0
    return np.sort(shifted[keep])


def observe(now_ms: float, call: RtcCall, schedule_ms: np.ndarray) -> np.ndarray:
    """The predictor's features at ``now_ms`` (see FEATURES)."""
    ahead = schedule_ms[schedule_ms >= now_ms]
    behind = schedule_ms[schedule_ms < now_ms]
    to_next = min(10.0, (ahead[0] - now_ms) / 1000.0) if ahead.size else 10.0
    since_last = min(10.0, (now_ms - behind[-1]) / 1000.0) if behind.size else 10.0
    received = call.gcc.received_rate() / call.target_bps
    return np.array([to_next, since_last, min(2000.0, now_ms - call.last_feedback_ms), call.srtt, call.last_loss,
                     min(received, 3.0)])


class OracleQueueLimit(QueueLimitPolicy):
    """Knows the true handover times."""

    name = "adaptive-oracle"

    def __init__(self, handovers_ms, stable_ms: float = 200.0, handover_ms: float = 3000.0, lead_s: float = 2.0):
        _check_limits(stable_ms, handover_ms, lead_s)
        self.times = np.asarray(handovers_ms, dtype=float)
        self.stable, self.handover, self.lead = stable_ms, handover_ms, lead_s

    def limit_ms(self, now_ms, call):
        return self.handover if near_handover(self.times, now_ms, self.lead) else self.stable


class PredictedQueueLimit(QueueLimitPolicy):
    """A fitted scikit-learn classifier decides, every 100 ms, whether handover activity is near."""

    name = "adaptive-predicted"

    def __init__(self, classifier, schedule_ms, stable_ms: float = 200.0, handover_ms: float = 3000.0,
                 threshold: float = 0.5):
        _check_limits(stable_ms, handover_ms, 0.0)
        self.classifier, self.schedule = classifier, np.asarray(schedule_ms, dtype=float)
        self.stable, self.handover, self.threshold = stable_ms, handover_ms, threshold

    def limit_ms(self, now_ms, call):
        features = observe(now_ms, call, self.schedule)[None, :]
        near = self.classifier.predict_proba(features)[0, 1] >= self.threshold
        return self.handover if near else self.stable


class RecordingQueueLimit(QueueLimitPolicy):
    """Wraps a policy and records (features, label) every 100 ms: the predictor's training data."""

    def __init__(self, inner: QueueLimitPolicy, handovers_ms, schedule_ms, lead_s: float = 2.0):
        self.inner, self.name = inner, inner.name
        self.times, self.schedule, self.lead = np.asarray(handovers_ms, float), np.asarray(schedule_ms, float), lead_s
        self.features: list[np.ndarray] = []
        self.labels: list[int] = []

    def limit_ms(self, now_ms, call):
        if now_ms > 0:
            self.features.append(observe(now_ms, call, self.schedule))
            self.labels.append(int(near_handover(self.times, now_ms, self.lead)))
        return self.inner.limit_ms(now_ms, call)
