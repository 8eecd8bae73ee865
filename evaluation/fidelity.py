"""Fidelity of an image against a reference image of the same seed."""

from __future__ import annotations

import math

import numpy as np


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    image, reference = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if image.shape != reference.shape:
        raise ValueError(f"image shape {image.shape} differs from reference shape {reference.shape}")
    mse = float(np.mean((image - reference) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
