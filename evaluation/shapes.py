"""The "shapes" data set: one flat-coloured shape on a flat background, with its caption.

Generated on the fly from a seed (nothing is downloaded). Every image keeps the
attributes it was drawn from (shape, colour, background, size, centre, radius), so a
generated picture can be checked against the prompt it was asked for. Colours are far
apart in RGB (at least 190 apart) so that a checker reading pixels can tell them apart
even through a blurry decoder.

The geometry of a shape of radius ``r`` centred at ``(cx, cy)``:

- circle: the disc of radius ``r``;
- square: axis-aligned, half-side ``0.9 r`` (so its area is close to the circle's);
- triangle: isosceles, pointing up, apex ``(cx, cy - r)``, base from ``(cx - r, cy + r)``
  to ``(cx + r, cy + r)``.

Edges are anti-aliased by 4x4 supersampling, like a rendered picture.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# radius ranges in pixels for a 32-pixel image; scaled with the image size
SIZES: dict[str, tuple[float, float]] = {"small": (4.5, 6.5), "large": (10.0, 12.5)}
SQUARE_HALF_SIDE = 0.9
_SUPERSAMPLE = 4
CAPTION_TEMPLATE = "a {size} {colour} {shape} on a {background} background"
_CAPTION_RE = re.compile(
    r"^\s*an?\s+(?P<size>\w+)\s+(?P<colour>\w+)\s+(?P<shape>\w+)\s+on\s+an?\s+(?P<background>\w+)\s+background\s*$"
)


@dataclass(frozen=True)
class ShapeSpec:
    """What an image shows; ``cx``, ``cy`` and ``radius`` are in pixels."""

    shape: str
    colour: str
    background: str
    size: str
    cx: float
    cy: float
    radius: float

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background, self.size)

    def to_dict(self) -> dict:
        return {**asdict(self), "caption": self.caption}


def caption(shape: str, colour: str, background: str, size: str) -> str:
    """The caption of an image with these attributes ("a large red circle on a blue background")."""
    _check_attributes(shape=shape, colour=colour, background=background, size=size)
    return CAPTION_TEMPLATE.format(size=size, colour=colour, shape=shape, background=background)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption asks for; ``ValueError`` for text that is not a shapes caption."""
    match = _CAPTION_RE.match(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a shapes caption; expected the form {CAPTION_TEMPLATE!r}")
    attributes = match.groupdict()
    _check_attributes(**attributes)
    return attributes


def all_captions() -> list[str]:
    """Every caption the data set can produce, in a fixed order."""
    return [caption(s, c, b, z) for z in SIZES for s in SHAPES for c in COLOURS for b in COLOURS if b != c]


def vocabulary() -> list[str]:
    """The words of the captions, in a fixed order."""
    words: list[str] = []
    for text in ["a on background", *SIZES, *COLOURS, *SHAPES]:
        words += [w for w in text.split() if w not in words]
    return words


def _check_attributes(**attributes: str) -> None:
    allowed = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(COLOURS), "size": tuple(SIZES)}
    for key, value in attributes.items():
        if value not in allowed[key]:
            raise ValueError(f"{key}={value!r} is not one of {list(allowed[key])}")
    if attributes.get("colour") is not None and attributes.get("colour") == attributes.get("background"):
        raise ValueError(f"colour and background are both {attributes['colour']!r}; they must differ")


def random_spec(rng: np.random.Generator, image_size: int = IMAGE_SIZE, shape: str | None = None,
                colour: str | None = None, background: str | None = None, size: str | None = None) -> ShapeSpec:
    """A random spec; any attribute given is kept, the others (and the position) are drawn from ``rng``."""
    names = list(COLOURS)
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    size = size if size is not None else list(SIZES)[rng.integers(len(SIZES))]
    if colour is None:
        colour = rng.choice([c for c in names if c != background])
    if background is None:
        background = rng.choice([c for c in names if c != colour])
    _check_attributes(shape=shape, colour=str(colour), background=str(background), size=size)
    scale = image_size / IMAGE_SIZE
    low, high = SIZES[size]
    radius = float(rng.uniform(low, high)) * scale
    margin = radius + 1.0 * scale  # keep the whole shape, and one pixel of background, inside the image
    cx, cy = (float(v) for v in rng.uniform(margin, image_size - margin, size=2))
    return ShapeSpec(shape, str(colour), str(background), size, cx, cy, radius)


def coverage(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The fraction of each pixel the shape covers, ``(image_size, image_size)`` floats in [0, 1]."""
    n = image_size * _SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = centres[None, :], centres[:, None]
    dx, dy = x - spec.cx, y - spec.cy
    r = spec.radius
    if spec.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif spec.shape == "square":
        inside = (np.abs(dx) <= SQUARE_HALF_SIDE * r) & (np.abs(dy) <= SQUARE_HALF_SIDE * r)
    elif spec.shape == "triangle":
        # between the base and the apex, and within the two slanted sides (half-width grows from 0 to r)
        inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"shape={spec.shape!r} is not one of {list(SHAPES)}")
    return inside.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The image of ``spec``: ``(image_size, image_size, 3)`` uint8 RGB."""
    alpha = coverage(spec, image_size)[..., None]
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    bg = np.asarray(COLOURS[spec.background], dtype=np.float64)
    return np.rint(alpha * fg + (1 - alpha) * bg).astype(np.uint8)


class ShapesDataset:
    """An endless, seeded stream of (image, spec) pairs.

    ``sample(n)`` draws the next ``n``; two data sets with the same seed give the same stream.
    """

    def __init__(self, seed: int = 0, image_size: int = IMAGE_SIZE):
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small; shapes need at least 16 pixels")
        self.image_size = image_size
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> tuple[np.ndarray, list[ShapeSpec]]:
        """``n`` images ``(n, H, W, 3)`` uint8 and their specs."""
        specs = [random_spec(self.rng, self.image_size) for _ in range(n)]
        return np.stack([render(s, self.image_size) for s in specs]), specs

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, list[ShapeSpec]]]:
        while True:
            yield self.sample(batch_size)


def to_tensor(images: np.ndarray):
    """uint8 ``(n, H, W, 3)`` images as float ``(n, 3, H, W)`` in [-1, 1], the range diffusers' VAEs use."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def specs_for_captions(captions: Sequence[str], seed: int = 0, image_size: int = IMAGE_SIZE) -> list[ShapeSpec]:
    """One random spec per caption, with the attributes the caption asks for."""
    rng = np.random.default_rng(seed)
    return [random_spec(rng, image_size, **parse_caption(c)) for c in captions]
