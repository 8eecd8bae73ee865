"""Which denoiser classes asyncgen can split, and the split for a given denoiser.

The model families (``unet``, ``dit``) build on ``split``; this module sits above all
of them, so the dependency runs one way.
"""

from __future__ import annotations

from torch import nn

from .dit import FluxSplit, PixArtSplit, SD3Split
from .split import DenoiserSplit
from .unet import UNetSplit

SPLITS: tuple[type[DenoiserSplit], ...] = (UNetSplit, SD3Split, PixArtSplit, FluxSplit)


def supported_denoisers() -> list[str]:
    return [c.__name__ for cls in SPLITS for c in cls.handles]


def split_denoiser(denoiser: nn.Module) -> DenoiserSplit:
    """Describe ``denoiser`` as a chain of units, or explain which classes are supported."""
    for cls in SPLITS:
        if isinstance(denoiser, cls.handles):
            return cls(denoiser)
    raise TypeError(
        f"asyncgen cannot split a denoiser of class {type(denoiser).__name__}; "
        f"supported: {', '.join(supported_denoisers())}"
    )
