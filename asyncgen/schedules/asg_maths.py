"""The maths of ASG (asynchronous structure guidance) for high-resolution generation.

Notation (see ``DESIGN.md``, section ASG): the target latent is ``(s_h·h, s_w·w)`` for a
native latent ``h×w``; it is seen as ``K = s_h·s_w`` interleaved *patches*, patch
``k = i·s_w + j`` being ``HR[..., i::s_h, j::s_w]``. Every patch shows the whole
picture at the native resolution, which is what the model was trained on. Patch 0 is
the *key* patch. Patches are stacked as ``(K, B, C, h, w)``.

This module is pure tensor maths (no model, no communication):

- :func:`relocate` / :func:`derelocate`: patches <-> the full latent (exact inverses);
- :func:`interaction_permutation`, :func:`permute_patches`, :func:`unpermute_patches`:
  pixel interaction, a random permutation of the K patches at every latent position;
- :func:`structure_guidance`: ``ε̃_i = ε_i + w_t · M ⊙ (ε_0 − ε_i)`` for ``i ≥ 1``;
- :func:`guidance_weights`: the schedule ``w_t`` over the structure steps;
- :func:`structure_map`: ``M`` from recorded cross-attention probabilities;
- :func:`window_layout` / :func:`overlap_counts`: the detail phase's overlapping windows;
- :func:`scale_factors`, :func:`structure_steps`, :func:`split_evenly`: bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")


# ------------------------------------------------------------------ sizes and steps


def scale_factors(height: int, width: int, native_height: int, native_width: int) -> tuple[int, int]:
    """``(s_h, s_w)`` with ``height = s_h · native_height`` and ``width = s_w · native_width``.

    ASG's patches are the native size, so the target must be a whole number (>= 1) of
    native sizes per side; anything else is refused with the sizes that would work.
    """
    for name, value, native in (("height", height, native_height), ("width", width, native_width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < native or value % native:
            raise ValueError(
                f"{name}={value!r} is not a whole multiple of the native {name} {native}; ASG accepts "
                f"{native}, {2 * native}, {3 * native}, ... (s x {native} for an integer s >= 1)"
            )
    return height // native_height, width // native_width


def structure_steps(num_steps: int, fraction: float) -> int:
    """How many of ``num_steps`` steps belong to the structure phase: ``fraction · num_steps``
    rounded half up (so 0.5 of 25 steps is 13: an odd count leans towards structure)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"structure_fraction={fraction!r} must lie in [0, 1]")
    return min(num_steps, int(math.floor(fraction * num_steps + 0.5)))


def split_evenly(count: int, parts: int) -> list[range]:
    """``count`` items in ``parts`` contiguous ranges whose lengths differ by at most one
    (the first ``count % parts`` ranges take the extra item)."""
    if parts < 1:
        raise ValueError(f"parts={parts} must be at least 1")
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for p in range(parts):
        stop = start + base + (1 if p < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


# ------------------------------------------------------------------ relocation


def derelocate(latent: torch.Tensor, s_h: int, s_w: int) -> torch.Tensor:
    """``(B, C, s_h·h, s_w·w)`` -> patches ``(K, B, C, h, w)``; patch ``i·s_w + j`` is ``latent[..., i::s_h, j::s_w]``."""
    b, c, big_h, big_w = latent.shape
    if big_h % s_h or big_w % s_w:
        raise ValueError(f"latent of size {big_h}x{big_w} does not split into {s_h}x{s_w} interleaved patches")
    h, w = big_h // s_h, big_w // s_w
    # index (b, c, y, i, x, j) is latent row y·s_h + i, column x·s_w + j
    return latent.reshape(b, c, h, s_h, w, s_w).permute(3, 5, 0, 1, 2, 4).reshape(s_h * s_w, b, c, h, w)


def relocate(patches: torch.Tensor, s_h: int, s_w: int) -> torch.Tensor:
    """Patches ``(K, B, C, h, w)`` -> the full latent ``(B, C, s_h·h, s_w·w)``:
    ``HR[..., i::s_h, j::s_w] = patch(i·s_w + j)``; the exact inverse of :func:`derelocate`."""
    k, b, c, h, w = patches.shape
    if k != s_h * s_w:
        raise ValueError(f"got {k} patches; a {s_h}x{s_w} layout has {s_h * s_w}")
    return patches.reshape(s_h, s_w, b, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(b, c, h * s_h, w * s_w)


# ------------------------------------------------------------------ pixel interaction


def interaction_permutation(k: int, h: int, w: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of the ``k`` patches at each of the ``h×w`` positions: ``(k, h, w)`` int64.

    Entry ``[s, y, x]`` is the patch whose value slot ``s`` holds at ``(y, x)``.
    """
    scores = torch.rand(k, h * w, generator=generator, device=generator.device if generator is not None else "cpu")
    return torch.argsort(scores, dim=0).reshape(k, h, w)


def _expand(permutation: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    k, h, w = permutation.shape
    if like.shape[0] != k or like.shape[-2:] != (h, w):
        raise ValueError(f"permutation of shape {tuple(permutation.shape)} does not fit patches of shape {tuple(like.shape)}")
    view = permutation.to(like.device).reshape(k, *([1] * (like.dim() - 3)), h, w)
    return view.expand_as(like)


def permute_patches(patches: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Slots ``(K, ...)``: ``slot[s, ..., y, x] = patches[permutation[s, y, x], ..., y, x]``."""
    return torch.gather(patches, 0, _expand(permutation, patches))


def unpermute_patches(slots: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`permute_patches` (pure indexing, so the round trip is exact)."""
    return torch.empty_like(slots).scatter_(0, _expand(permutation, slots), slots)


# ------------------------------------------------------------------ structure guidance


def guidance_weights(weight: float, num_steps: int, schedule: str = "cosine") -> list[float]:
    """``w_t`` for each of the ``num_steps`` structure steps.

    ``constant``: ``weight`` throughout; ``linear``: from ``weight`` down to ``weight/n``;
    ``cosine``: ``weight · (1 + cos(π k / n)) / 2``, full strength while the layout forms
    and fading as the patches settle, so that the detail phase starts from patches
    that are no longer pulled together (our default; the paper leaves the schedule open).
    """
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule={schedule!r} is not one of {', '.join(GUIDANCE_SCHEDULES)}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"structure_guidance={weight!r} must be a finite number >= 0")
    n = num_steps
    if schedule == "constant":
        return [float(weight)] * n
    if schedule == "linear":
        return [weight * (n - k) / n for k in range(n)]
    return [weight * 0.5 * (1.0 + math.cos(math.pi * k / n)) for k in range(n)]


def structure_guidance(predictions: torch.Tensor, key_prediction: torch.Tensor, attention: torch.Tensor,
                       weight: float) -> torch.Tensor:
    """``ε̃_i = ε_i + w · M ⊙ (ε_0 − ε_i)`` for patches ``i ≥ 1``; the key patch (0) is left as it is.

    ``predictions``: ``(K, B, C, h, w)``; ``key_prediction``: ``(B, C, h, w)``, the key
    patch's prediction (this step's, or the previous step's in asynchronous mode);
    ``attention``: ``M``, ``(B, 1, h, w)`` in [0, 1].
    """
    if weight == 0 or predictions.shape[0] == 1:
        return predictions
    others = predictions[1:]
    guided = others + weight * attention * (key_prediction - others)
    return torch.cat([predictions[:1], guided])


def _attention_grid(queries: int, h: int, w: int) -> tuple[int, int]:
    """The spatial shape of an attention layer with ``queries`` positions in a UNet on an ``h×w``
    latent: the UNet halves each side per level, rounding up (stride-2 convolutions with padding 1)."""
    gh, gw = h, w
    while gh * gw > queries:
        gh, gw = -(-gh // 2), -(-gw // 2)
    if gh * gw != queries:
        raise ValueError(f"an attention map with {queries} positions does not fit a {h}x{w} latent")
    return gh, gw


def structure_map(probabilities: Sequence[torch.Tensor], token_weights: torch.Tensor, size: tuple[int, int],
                  eps: float = 1e-12) -> torch.Tensor:
    """``M``: cross-attention probabilities turned into one map in [0, 1] per sample, ``(B, 1, h, w)``.

    ``probabilities``: per recorded layer, ``(B, Q, T)`` (averaged over heads) for queries
    at that layer's resolution and the ``T`` text tokens. ``token_weights``: ``(B, T)``,
    which tokens count (the prompt's words: the start token soaks up most of the
    probability everywhere and says nothing about where the object is). Each layer's
    attention to those tokens is upsampled (bilinear) to the latent size ``h×w``, the
    layers are averaged, and each sample is min-max normalised; a constant map (no
    structure to follow) becomes 0, i.e. no guidance.
    """
    if not probabilities:
        raise ValueError("no attention maps were recorded; check that the chosen layers are cross-attention layers")
    h, w = size
    weights = token_weights / token_weights.sum(dim=-1, keepdim=True).clamp_min(eps)
    layers = []
    for probs in probabilities:
        b, q, _ = probs.shape
        gh, gw = _attention_grid(q, h, w)
        focus = torch.einsum("bqt,bt->bq", probs.float(), weights.to(probs.device, torch.float32))
        layers.append(F.interpolate(focus.reshape(b, 1, gh, gw), size=(h, w), mode="bilinear", align_corners=False))
    combined = torch.stack(layers).mean(dim=0)
    low = combined.amin(dim=(-2, -1), keepdim=True)
    span = combined.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > eps, (combined - low) / span.clamp_min(eps), torch.zeros_like(combined))


# ------------------------------------------------------------------ detail-phase windows


def _starts(size: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:  # the last window sits flush with the edge, so every row is covered
        starts.append(size - window)
    return starts


@dataclass(frozen=True)
class Window:
    """A native-size window of the full latent: rows ``top:top+h``, columns ``left:left+w``."""

    top: int
    left: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.h), slice(self.left, self.left + self.w)


def window_layout(height: int, width: int, h: int, w: int, stride_h: int | None = None,
                  stride_w: int | None = None) -> list[Window]:
    """Overlapping ``h×w`` windows covering a ``height×width`` latent, row by row.

    The stride defaults to half a window (rounded down, at least 1); the last window of
    each row and column is moved flush with the edge when the stride does not land there.
    """
    stride_h = max(h // 2, 1) if stride_h is None else stride_h
    stride_w = max(w // 2, 1) if stride_w is None else stride_w
    for name, value, limit in (("window stride (rows)", stride_h, h), ("window stride (columns)", stride_w, w)):
        if not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{name}={value!r} must be an integer between 1 and the window size {limit}")
    if height < h or width < w:
        raise ValueError(f"a {height}x{width} latent holds no {h}x{w} window; it must be at least the native size")
    return [Window(t, l, h, w) for t in _starts(height, h, stride_h) for l in _starts(width, w, stride_w)]


def overlap_counts(windows: Sequence[Window], height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """How many windows cover each latent position, ``(1, 1, height, width)``: the divisor of the
    overlap average. Every position is covered at least once by :func:`window_layout`."""
    counts = torch.zeros(1, 1, height, width, device=device, dtype=dtype)
    for window in windows:
        rows, cols = window.slices
        counts[..., rows, cols] += 1
    if not bool((counts > 0).all()):
        raise ValueError("the windows leave part of the latent uncovered")
    return counts
