"""Secret-key rates per channel use: the repeaterless PLOB bound, single-photon BB84, and
memory-assisted asynchronous Bell-state measurement (Bhaskar et al., Nature 2020).

The memory sits in the middle of the link. In each time bin a photon from Alice (and,
independently, one from Bob) reaches it with probability ``p = sqrt(eta) * eta_m``. A
memory cycle lasts ``N`` bins; the first photon to arrive is stored until the first photon
from the other side arrives, then the two are measured. Only the storage time costs
fidelity, through pure dephasing ``e_dec(t) = (1 - exp(-t / T2)) / 2``.

Everything here is closed-form (numpy only). For the Monte Carlo check see
``monte_carlo.py``. Key generation is embarrassingly parallel: a run beyond one machine
splits the Monte Carlo cycles across processes with independent
``numpy.random.SeedSequence(seed).spawn(k)`` streams and adds the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..frame import require_extra

require_extra("quantum", "numpy")

import numpy as np  # noqa: E402


def _check_loss(loss_db) -> np.ndarray:
    loss = np.asarray(loss_db, dtype=float)
    if not np.all(np.isfinite(loss)) or np.any(loss < 0):
        raise ValueError(f"loss_db={loss_db!r}: total loss must be a finite number of dB >= 0")
    return loss


def transmittance(loss_db) -> np.ndarray:
    """eta = 10^(-L/10): the probability that a photon survives L dB of loss (detection included)."""
    return 10.0 ** (-_check_loss(loss_db) / 10.0)


def binary_entropy(p) -> np.ndarray:
    """h(p) = -p log2 p - (1-p) log2(1-p), with h(0) = h(1) = 0."""
    p = np.asarray(p, dtype=float)
    q = np.clip(p, 1e-300, 1 - 1e-16)
    h = -q * np.log2(q) - (1 - q) * np.log2(1 - q)
    return np.where((p <= 0) | (p >= 1), 0.0, h)


def secret_fraction(error) -> np.ndarray:
    """1 - 2 h(e), floored at 0: the key kept per sifted bit after error correction and privacy amplification."""
    return np.maximum(0.0, 1.0 - 2.0 * binary_entropy(error))


def plob_rate(loss_db) -> np.ndarray:
    """The repeaterless bound of Pirandola, Laurenza, Ottaviani, Banchi: -log2(1 - eta) bits per channel use."""
    return -np.log2(1.0 - transmittance(loss_db))


def bb84_rate(loss_db, error: float = 0.01) -> np.ndarray:
    """Ideal single-photon BB84 over the whole link: eta * (1 - 2 h(e_d))."""
    if not 0.0 <= error <= 0.5:
        raise ValueError(f"error={error!r}: the BB84 error rate must lie in [0, 0.5]")
    return transmittance(loss_db) * secret_fraction(error)


def dephasing_error(storage_seconds, t2_seconds: float) -> np.ndarray:
    """Error of a stored qubit after pure dephasing for ``storage_seconds``: (1 - exp(-t/T2)) / 2."""
    return 0.5 * (1.0 - np.exp(-np.asarray(storage_seconds, dtype=float) / t2_seconds))


@dataclass(frozen=True)
class MemoryLink:
    """A memory-assisted MDI-QKD link.

    Args:
        cycle_bins: N, time bins per memory cycle (default 124).
        t2_seconds: memory coherence time T2 (default 1 ms).
        bin_seconds: tau, the time-bin length (default 1 µs, a MHz clock).
        base_error: e0, the error without storage (default 0.08; the paper's QBER is about 0.1).
        memory_efficiency: eta_m in (0, 1], multiplies the arrival probability (default 1, "loss-equivalent").
    """

    cycle_bins: int = 124
    t2_seconds: float = 1e-3
    bin_seconds: float = 1e-6
    base_error: float = 0.08
    memory_efficiency: float = 1.0

    def __post_init__(self):
        if int(self.cycle_bins) != self.cycle_bins or self.cycle_bins < 1:
            raise ValueError(f"cycle_bins={self.cycle_bins!r}: need an integer N >= 1")
        if not self.t2_seconds > 0:
            raise ValueError(f"t2_seconds={self.t2_seconds!r}: the coherence time T2 must be > 0")
        if not self.bin_seconds > 0:
            raise ValueError(f"bin_seconds={self.bin_seconds!r}: the time bin tau must be > 0")
        if not 0.0 <= self.base_error <= 0.5:
            raise ValueError(f"base_error={self.base_error!r}: e0 must lie in [0, 0.5]")
        if not 0.0 < self.memory_efficiency <= 1.0:
            raise ValueError(f"memory_efficiency={self.memory_efficiency!r}: eta_m must lie in (0, 1]")

    def arrival_probability(self, loss_db) -> np.ndarray:
        """p = sqrt(eta) * eta_m: one side's photon reaches the memory in a given bin."""
        return np.sqrt(transmittance(loss_db)) * self.memory_efficiency

    def success_probability(self, loss_db) -> np.ndarray:
        """P_s = (1 - (1-p)^N)^2: at least one photon from each side within the cycle."""
        p = self.arrival_probability(loss_db)
        # -expm1(N log1p(-p)) keeps full precision when N p is tiny (high loss)
        return (-np.expm1(self.cycle_bins * np.log1p(-p))) ** 2

    def gap_distribution(self, p: float) -> np.ndarray:
        """P(|k_A - k_B| = g | success) for g = 0..N-1, with k_A, k_B the first-arrival bins.

        Each first-arrival bin is a geometric variable truncated to the cycle, P(k) ∝ (1-p)^k;
        at p -> 0 it becomes uniform on 0..N-1.
        """
        n = self.cycle_bins
        k = np.arange(n)
        weights = (1.0 - p) ** k  # 0**0 = 1 keeps p = 1 (no loss) exact
        weights = weights / weights.sum()
        gaps = np.zeros(n)
        # P(gap = g) = sum_k w_k w_{k+g} (twice for g > 0: either side first)
        gaps[0] = np.sum(weights**2)
        for g in range(1, n):
            gaps[g] = 2.0 * np.sum(weights[:-g] * weights[g:])
        return gaps

    def mean_error(self, loss_db) -> np.ndarray:
        """e = e0 + E[e_dec(gap * tau) | success], per loss value."""
        p = np.atleast_1d(self.arrival_probability(loss_db))
        storage = np.arange(self.cycle_bins) * self.bin_seconds
        dephasing = dephasing_error(storage, self.t2_seconds)
        errors = np.array([self.base_error + np.dot(self.gap_distribution(float(q)), dephasing) for q in p])
        return errors.reshape(np.shape(loss_db))

    def key_rate(self, loss_db) -> np.ndarray:
        """R_mem = P_s / N * max(0, 1 - 2 h(e)) secret bits per channel use (time bin)."""
        return self.success_probability(loss_db) / self.cycle_bins * secret_fraction(self.mean_error(loss_db))

    def high_loss_ratio(self) -> float:
        """lim_{L->inf} R_mem / R_PLOB = N ln2 (1 - 2h(e)) with e at uniform arrival bins (and eta_m^2 factor)."""
        p = 0.0
        storage = np.arange(self.cycle_bins) * self.bin_seconds
        error = self.base_error + np.dot(self.gap_distribution(p), dephasing_error(storage, self.t2_seconds))
        return float(self.cycle_bins * np.log(2.0) * self.memory_efficiency**2 * secret_fraction(error))
