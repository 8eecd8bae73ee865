"""Which denoiser classes asyncgen can split, and the split for a given denoiser.

The model families (``unet``, ``dit``) build on ``split``; this module sits above all
of them, so the dependency runs one way.
"""

from __future__ import annotations

from diffusers import ModelMixin
from torch import nn

from asyncgen.split.transformer.example_inputs import transformer_split
from asyncgen.split.units import DenoiserSplit
from asyncgen.split.unet import UNetSplit
from asyncgen.split.video_unet import MotionUNetSplit, SpatioTemporalUNetSplit

# UNets by class; every other denoiser through the generic block split (asyncgen.split.transformer.block_split)
SPLITS: tuple[type[DenoiserSplit], ...] = (UNetSplit, MotionUNetSplit, SpatioTemporalUNetSplit)


def supported_denoisers() -> list[str]:
    return [c.__name__ for cls in SPLITS for c in cls.handles] + ["any transformer whose forward runs its blocks in sequence"]


def needs_example_call(denoiser: nn.Module) -> bool:
    """Whether ``denoiser`` splits through the generic block split, which traces an example call (UNets do not)."""
    return not any(isinstance(denoiser, cls.handles) for cls in SPLITS)


def split_denoiser(denoiser: nn.Module, verify_split: bool = True, call: dict | None = None) -> DenoiserSplit:
    """Describe ``denoiser`` as a chain of units, or explain which classes are supported.

    A transformer goes through the generic block split, which is checked once here
    against the full forward on a small random input (``verify_split=False`` skips the
    check) and refused with a one-line ``TypeError`` where it does not match. ``call``
    (a real call's arguments by name, the pipeline's first) is the example the split
    traces and checks; without it one is built from the denoiser's config.
    """
    for cls in SPLITS:
        if isinstance(denoiser, cls.handles):
            return cls(denoiser)
    if isinstance(denoiser, ModelMixin) and any(isinstance(m, nn.ModuleList) for m in denoiser.modules()):
        return transformer_split(denoiser, verify=verify_split, call=call)
    raise TypeError(
        f"asyncgen cannot split a denoiser of class {type(denoiser).__name__}; "
        f"supported: {', '.join(supported_denoisers())}"
    )
