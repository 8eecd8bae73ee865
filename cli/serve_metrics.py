"""The counters behind ``GET /metrics`` of ``asyncgen serve``, written in Prometheus' text format (0.0.4).

Written by hand rather than through ``prometheus_client``: five series do not need a dependency.
"""

from __future__ import annotations

import bisect
import threading

# step latency buckets, seconds: from a fast GPU step (a few ms) to a large image on CPU (tens of s)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.queue_length = 0
        self.outcomes: dict[str, int] = {}  # job outcomes: succeeded, failed, cancelled, rejected
        self.refusals: dict[str, int] = {}  # refused before queueing, by HTTP status: 401, 413, 422, 429, 503
        self._bucket_counts = [0] * (len(STEP_BUCKETS) + 1)
        self._step_sum = 0.0
        self._step_count = 0

    def count_outcome(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def count_refusal(self, status: int) -> None:
        with self._lock:
            self.refusals[str(status)] = self.refusals.get(str(status), 0) + 1

    def observe_step(self, seconds: float) -> None:
        with self._lock:
            self._bucket_counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
            self._step_sum += seconds
            self._step_count += 1

    def text(self, busy: bool) -> str:
        with self._lock:
            lines = ["# HELP asyncgen_queue_length Requests waiting for the ranks.",
                     "# TYPE asyncgen_queue_length gauge", f"asyncgen_queue_length {self.queue_length}",
                     "# HELP asyncgen_busy 1 while the ranks run a request.", "# TYPE asyncgen_busy gauge",
                     f"asyncgen_busy {int(busy)}",
                     "# HELP asyncgen_requests_total Requests by outcome: accepted ones by how they ended, refused "
                     "ones by HTTP status.", "# TYPE asyncgen_requests_total counter"]
            lines += [f'asyncgen_requests_total{{outcome="{name}"}} {count}'
                      for name, count in sorted(self.outcomes.items())]
            lines += [f'asyncgen_requests_total{{outcome="refused",code="{code}"}} {count}'
                      for code, count in sorted(self.refusals.items())]
            lines += ["# HELP asyncgen_step_seconds Denoising step latency on rank 0.",
                      "# TYPE asyncgen_step_seconds histogram"]
            cumulative = 0
            for bound, count in zip(STEP_BUCKETS, self._bucket_counts):
                cumulative += count
                lines.append(f'asyncgen_step_seconds_bucket{{le="{bound:g}"}} {cumulative}')
            lines.append(f'asyncgen_step_seconds_bucket{{le="+Inf"}} {self._step_count}')
            lines += [f"asyncgen_step_seconds_sum {self._step_sum:.6f}",
                      f"asyncgen_step_seconds_count {self._step_count}"]
            return "\n".join(lines) + "\n"
