"""Monte Carlo of memory cycles: the check that ``MemoryLink.key_rate`` is the rate the
protocol actually delivers.

Each cycle draws the first-arrival bin of Alice's and of Bob's photon (a geometric number
of bins, one Bernoulli(p) trial per bin), declares success when both fall inside the N
bins, stores the earlier photon for ``|k_A - k_B| * tau`` and draws the measured bit's error
with probability ``e0 + e_dec(storage)``. Counts, not formulas, make the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..frame import require_extra

require_extra("quantum", "numpy")

import numpy as np  # noqa: E402

from .key_rates import MemoryLink, dephasing_error, secret_fraction  # noqa: E402


@dataclass
class MonteCarloEstimate:
    """What ``simulate_cycles`` counted."""

    cycles: int
    successes: int
    errors: int  # sampled bit errors among successes
    mean_error_probability: float  # average of e0 + e_dec over the successful events (no Bernoulli noise)

    @property
    def success_probability(self) -> float:
        return self.successes / self.cycles

    @property
    def sampled_qber(self) -> float:
        return self.errors / self.successes if self.successes else float("nan")

    def key_rate(self, cycle_bins: int, sampled: bool = False) -> float:
        """P_s / N * (1 - 2h(e)); ``sampled=True`` uses the counted QBER, else the per-event error average."""
        error = self.sampled_qber if sampled else self.mean_error_probability
        return self.success_probability / cycle_bins * float(secret_fraction(error))


def simulate_cycles(link: MemoryLink, loss_db: float, cycles: int, rng: np.random.Generator,
                    chunk: int = 250_000) -> MonteCarloEstimate:
    """Simulate ``cycles`` memory cycles at ``loss_db`` with generator ``rng``."""
    if int(cycles) != cycles or cycles < 1:
        raise ValueError(f"cycles={cycles!r}: need an integer >= 1")
    p = float(link.arrival_probability(loss_db))
    successes = errors = 0
    error_sum = 0.0
    done = 0
    while done < cycles:
        size = min(chunk, cycles - done)
        done += size
        # first-arrival bin, 0-based: numpy's geometric counts trials up to the first success
        first_a = rng.geometric(p, size) - 1
        first_b = rng.geometric(p, size) - 1
        ok = (first_a < link.cycle_bins) & (first_b < link.cycle_bins)
        storage = np.abs(first_a[ok] - first_b[ok]) * link.bin_seconds
        probability = link.base_error + dephasing_error(storage, link.t2_seconds)
        successes += int(ok.sum())
        errors += int((rng.random(storage.size) < probability).sum())
        error_sum += float(probability.sum())
    return MonteCarloEstimate(cycles=int(cycles), successes=successes, errors=errors,
                              mean_error_probability=error_sum / successes if successes else float("nan"))
