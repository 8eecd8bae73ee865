"""Test functions for the AEGiS miniature, on the unit cube: Branin (d = 2) and Hartmann6 (d = 6)."""

from __future__ import annotations

import numpy as np

BRANIN_MIN = 0.397887357729738
HARTMANN6_MIN = -3.322368011391339

_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H6_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8],
                  [17, 8, 0.05, 10, 0.1, 14]])
_H6_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                         [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])


def branin(u) -> float:
    """Branin on [-5, 10] x [0, 15], given u in [0, 1]^2."""
    x1, x2 = 15.0 * u[0] - 5.0, 15.0 * u[1]
    b, c, t = 5.1 / (4 * np.pi**2), 5.0 / np.pi, 1.0 / (8 * np.pi)
    return float((x2 - b * x1**2 + c * x1 - 6.0) ** 2 + 10.0 * (1 - t) * np.cos(x1) + 10.0)


def hartmann6(u) -> float:
    u = np.asarray(u, dtype=float)
    return float(-np.dot(_H6_ALPHA, np.exp(-np.sum(_H6_A * (u - _H6_P) ** 2, axis=1))))


PROBLEMS = {"branin": (branin, 2, BRANIN_MIN), "hartmann6": (hartmann6, 6, HARTMANN6_MIN)}
