"""Synthetic learning curves for the ID-Hyperband miniature: loss(x, r) = g(x) + a(x) r^-b(x) + noise.

g is a Hartmann-4-like final loss on [0, 1]^4 scaled to [0, 1] (0 at the best configuration),
a(x) in [0, 1] the distance still to go at budget 1, b(x) in [0.3, 1.5] how fast it goes.
The noise N(0, 0.002^2) is a deterministic function of (seed, params, budget), so the same
pair always returns the same loss, whichever scheduler asks.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Hartmann's coefficients (the 6-d problem), first four coordinates
_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_A = np.array([[10, 3, 17, 3.5], [0.05, 10, 17, 0.1], [3, 3.5, 1.7, 10], [17, 8, 0.05, 10]])
_P = 1e-4 * np.array([[1312, 1696, 5569, 124], [2329, 4135, 8307, 3736], [2348, 1451, 3522, 2883],
                      [4047, 8828, 8732, 5743]])
# the largest value of sum alpha exp(-...) over [0,1]^4, found by dense search + L-BFGS-B (seeds >= 100)
_PEAK = 3.7298


def final_loss(x) -> float:
    """g(x) = 1 - S(x) / S_max, S the Hartmann-4 sum of bumps: in [0, 1], 0 at the optimum."""
    x = np.asarray(x, dtype=float)
    bumps = float(np.dot(_ALPHA, np.exp(-np.sum(_A * (x - _P) ** 2, axis=1))))
    return max(0.0, 1.0 - bumps / _PEAK)


def curve_scale(x) -> float:
    """a(x) in [0, 1]."""
    x = np.asarray(x, dtype=float)
    return float(0.5 + 0.5 * np.sin(2 * np.pi * (x[0] + 0.5 * x[2])))


def curve_rate(x) -> float:
    """b(x) in [0.3, 1.5]."""
    x = np.asarray(x, dtype=float)
    return float(0.3 + 1.2 * (0.5 + 0.5 * np.cos(np.pi * (x[1] - x[3]) * 1.5)))


class LearningCurves:
    """The objective ``loss(params, budget)`` of one seed; params are ``{"x0": .., "x3": ..}``."""

    def __init__(self, seed: int, noise: float = 0.002):
        self.seed, self.noise = int(seed), float(noise)

    @staticmethod
    def point(params: dict) -> np.ndarray:
        return np.array([params[f"x{i}"] for i in range(4)], dtype=float)

    def __call__(self, params: dict, budget: float) -> float:
        x = self.point(params)
        digest = hashlib.blake2b(np.concatenate([x, [budget, self.seed]]).tobytes(), digest_size=8).digest()
        noise = np.random.default_rng(int.from_bytes(digest, "little")).normal(0.0, self.noise)
        return final_loss(x) + curve_scale(x) * budget ** -curve_rate(x) + noise


def sample_unit_cube(rng: np.random.Generator) -> dict:
    """A configuration drawn uniformly from [0, 1]^4."""
    return {f"x{i}": float(v) for i, v in enumerate(rng.random(4))}
