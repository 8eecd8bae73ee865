"""Reads a shapes picture's pixels and says what it shows; no neural network involved.

Independent of whatever generated the picture, so it can grade a text-to-image model
against the prompt it was given:

1. **Background**: the median colour of the one-pixel border (the data set keeps every
   shape at least one pixel inside), snapped to the nearest palette colour.
2. **Shape colour**: the pixels far from the background colour are the foreground; the
   median colour of its most distinct half, snapped to the nearest palette colour.
3. **Coverage**: each pixel's position along the line from the measured background
   colour to the measured shape colour (0 = background, 1 = shape), which tells how much
   of an anti-aliased or blurred edge pixel is shape; only the largest connected blob
   (of pixels more than half covered) is kept.
4. **Shape**: two integrals over the coverage ``a`` of that blob, both robust to blur
   and noise because they sum many pixels. The *chord ratio* ``C_max R_max / A`` (the
   longest column sum times the longest row sum over the area) is 1 for a square
   (exactly, even blurred, since its coverage stays separable), 4/π for a circle and 2
   for the triangle. The *vertical skewness* of the row sums is 0 for the symmetric
   circle and square and -2√2/5 ≈ -0.57 for the upward triangle, whose mass sits at its
   base. A shape whose skewness is past half the triangle's is a triangle; otherwise
   the chord ratio, split halfway between 1 and 4/π, tells square from circle.
5. **Size**: the radius implied by the area and the shape, against the midpoint
   between the small and large radius ranges.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from . import shapes

# decision thresholds, halfway between the ideal values of neighbouring classes
_TRIANGLE_SKEWNESS = -math.sqrt(2) / 5  # half the upward triangle's -2*sqrt(2)/5; circle and square have 0
_SQUARE_CHORD_RATIO = (1 + 4 / math.pi) / 2  # square 1, circle 4/pi
# area of a shape of radius 1 (see shapes.py for the geometry)
_UNIT_AREA = {"circle": math.pi, "square": (2 * shapes.SQUARE_HALF_SIDE) ** 2, "triangle": 2.0}
# a pixel this far (RGB distance) from the background is a foreground candidate:
# half the smallest distance between two palette colours
_FOREGROUND_DISTANCE = 0.5 * min(
    math.dist(a, b) for i, a in enumerate(shapes.COLOURS.values()) for b in list(shapes.COLOURS.values())[i + 1:]
)


@dataclass(frozen=True)
class Detection:
    """What the checker read from one image; ``None`` where it found no shape."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None
    chord_ratio: float
    skewness: float
    radius: float

    def to_dict(self) -> dict:
        return asdict(self)


def _as_rgb_uint8(image) -> np.ndarray:
    if hasattr(image, "convert"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got an array of shape {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image of shape {image.shape} is too small to check; need at least 8x8 pixels")
    if image.dtype != np.uint8:
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"float images must lie in [0, 1]; got values in [{image.min()}, {image.max()}]")
        image = np.rint(image * 255)
    return image.astype(np.float64)


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(shapes.COLOURS)
    palette = np.asarray([shapes.COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of ``mask``, each grown by repeated dilation inside the mask."""
    remaining, found = mask.copy(), []
    while remaining.any():
        blob = np.zeros_like(mask)
        blob[np.unravel_index(np.argmax(remaining), mask.shape)] = True
        while True:
            grown = blob.copy()
            grown[1:] |= blob[:-1]
            grown[:-1] |= blob[1:]
            grown[:, 1:] |= blob[:, :-1]
            grown[:, :-1] |= blob[:, 1:]
            grown &= remaining
            if (grown == blob).all():
                break
            blob = grown
        found.append(blob)
        remaining &= ~blob
    return found


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (the first found among equals)."""
    return max(blobs(mask), key=lambda blob: blob.sum(), default=np.zeros_like(mask))


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def detect(image) -> Detection:
    """Read one image: ``(H, W, 3)`` uint8, or floats in [0, 1], or a PIL image."""
    pixels = _as_rgb_uint8(image)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_colour(bg_rgb)

    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    candidates = distance > _FOREGROUND_DISTANCE
    if not candidates.any():
        return Detection(background, None, None, None, math.nan, math.nan, 0.0)
    core = candidates & (distance >= np.median(distance[candidates]))
    fg_rgb = np.median(pixels[core], axis=0)
    colour = _nearest_colour(fg_rgb)

    direction = fg_rgb - bg_rgb
    alpha = np.clip(((pixels - bg_rgb) @ direction) / float(direction @ direction), 0.0, 1.0)
    blob = _largest_blob(alpha > 0.5)
    # the blob's partly covered rim lies just outside the half-covered mask
    a = np.where(_dilate(_dilate(blob)), alpha, 0.0)
    area = float(a.sum())
    # the mean of the two longest chords, so that one noisy row or column does not decide
    longest_column = float(np.sort(a.sum(axis=0))[-2:].mean())
    longest_row = float(np.sort(a.sum(axis=1))[-2:].mean())
    chord_ratio = longest_column * longest_row / area
    rows = np.arange(h, dtype=np.float64)
    mass = a.sum(axis=1) / area
    mean = float((rows * mass).sum())
    variance = float(((rows - mean) ** 2 * mass).sum())
    skewness = float(((rows - mean) ** 3 * mass).sum()) / max(variance, 1e-12) ** 1.5

    if skewness < _TRIANGLE_SKEWNESS:
        shape = "triangle"
    elif chord_ratio < _SQUARE_CHORD_RATIO:
        shape = "square"
    else:
        shape = "circle"
    radius = math.sqrt(area / _UNIT_AREA[shape])
    small_high, large_low = shapes.SIZES["small"][1], shapes.SIZES["large"][0]
    size = "large" if radius * shapes.IMAGE_SIZE / min(h, w) > (small_high + large_low) / 2 else "small"
    return Detection(background, colour, shape, size, chord_ratio, skewness, radius)


def grade(image, prompt: str | dict) -> dict:
    """Whether ``image`` shows what ``prompt`` (a shapes caption, or its attributes) asks for."""
    wanted = shapes.parse_caption(prompt) if isinstance(prompt, str) else dict(prompt)
    found = detect(image)
    return {
        "colour": found.colour == wanted["colour"],
        "background": found.background == wanted["background"],
        "shape": found.shape == wanted["shape"],
        "size": found.size == wanted["size"],
        "detected": found.to_dict(),
    }


def accuracy(images: Sequence, prompts: Sequence[str | dict]) -> dict[str, float]:
    """Fraction of images whose colour, background, shape, size (and all of them) match their prompts."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one prompt per image")
    if len(images) == 0:
        raise ValueError("no images to check")
    grades = [grade(i, p) for i, p in zip(images, prompts)]
    keys = ("colour", "background", "shape", "size")
    result = {k: sum(g[k] for g in grades) / len(grades) for k in keys}
    result["all"] = sum(all(g[k] for k in keys) for g in grades) / len(grades)
    return result
