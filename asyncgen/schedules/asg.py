"""ASG as a plan plus its serial executor: who denoises which patch and window, what guides what, when.

The plan (:func:`plan_layout`) lays a large picture out as ``K = s_h·s_w`` interleaved
native-size patches (structure phase) and overlapping native-size windows (detail
phase), and gives each rank a contiguous block of each. The executor
(:class:`ASGSimulator`) turns one denoiser call of the stock pipeline on the large latent
into the calls ASG makes, one step at a time: in a structure step every patch slot is
predicted after pixel interaction, the slots are assembled (:meth:`~ASGSimulator.combine`),
un-permuted and pulled towards the key patch with the key's prediction and map of the
previous step (``mode="async"``) or of this step (``"sync"``); in a detail step the
window predictions are assembled and averaged where they overlap. What comes back has
the shape of the stock call's output, so the pipeline's own classifier-free guidance and
scheduler step follow unchanged. In one process the simulator predicts every patch and
window itself and assembling is the identity; :class:`asyncgen.runtime.asg.ASGRuntime`
runs the very same code on its rank's share and assembles by an all-reduce (each rank
leaves zeros where it did not compute, and adding zeros is exact, so the ranks' result
equals the simulator's).

Guidance and averaging act on the denoiser's raw output (both halves of a CFG batch, the
same map for each), before the pipeline combines the halves: both are linear per
position, so this is the same maths as acting on the combined prediction.

What one native-size denoiser call is (SD or SDXL conditioning, a window's crop offset)
is the caller's; it comes in as a callable. The maths is in
:mod:`asyncgen.schedules.asg_maths`, the attention maps in
:mod:`asyncgen.schedules.asg_attention`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from asyncgen.schedules import asg_maths
from asyncgen.schedules.asg_attention import AttentionMapStore, record_attention_maps

MODES = ("async", "sync")

# denoise(sample, crop) -> the denoiser's output for a native-size part of the large sample (same rows), the
# SDXL crop offset of that part in pixels
Denoise = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


@dataclass(frozen=True)
class ASGLayout:
    """The geometry of one call: scale factors, patch and window sizes, and this rank's share of each."""

    s_h: int
    s_w: int
    h: int  # native latent size
    w: int
    windows: tuple[asg_maths.Window, ...]
    my_patches: range
    my_windows: range

    @property
    def patches(self) -> int:
        return self.s_h * self.s_w


def plan_layout(height: int, width: int, native_size: tuple[int, int], vae_scale_factor: int, rank: int = 0,
                world: int = 1, window_stride: tuple[int, int] | None = None) -> ASGLayout:
    """Scale factors, windows, and rank ``rank`` of ``world``'s contiguous, near-equal share of patches and windows."""
    s_h, s_w = asg_maths.scale_factors(height, width, *native_size)
    h, w = (n // vae_scale_factor for n in native_size)
    k = s_h * s_w
    if world > k:
        raise ValueError(f"{world} ranks are more than the K = {s_h}x{s_w} = {k} patches of a "
                         f"{height}x{width} picture; use at most {k} ranks (a rank needs a patch to work on)")
    stride = window_stride or (None, None)
    windows = tuple(asg_maths.window_layout(s_h * h, s_w * w, h, w, *stride))
    return ASGLayout(s_h, s_w, h, w, windows, asg_maths.split_evenly(k, world)[rank],
                     asg_maths.split_evenly(len(windows), world)[rank])




class ASGSimulator:
    """One pipeline call of ASG in one process: every patch and window computed here, nothing exchanged.

    Call :meth:`begin_call` once per pipeline call, then :meth:`step` for each denoiser call
    the pipeline makes, in order.

    Args:
        structure_guidance: peak weight ``w`` of the pull towards the key patch (0: off).
        guidance_schedule: how ``w_t`` moves over the structure steps (:data:`asg_maths.GUIDANCE_SCHEDULES`).
        mode: ``"async"`` guides step ``t`` with the key patch's prediction and map of step ``t - 1``
            (its first step with its own), ``"sync"`` with step ``t``'s.
        map_layers: the cross-attention layers whose maps form ``M`` (recorded only while guiding).
        vae_scale_factor: pixels per latent pixel (a window's crop offset is given in pixels).
    """

    def __init__(self, structure_guidance: float, guidance_schedule: str, mode: str, map_layers: dict,
                 vae_scale_factor: int):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(repr(m) for m in MODES)}")
        self.structure_guidance, self.guidance_schedule, self.mode = structure_guidance, guidance_schedule, mode
        self.map_layers, self.vae_scale_factor = map_layers, vae_scale_factor
        self.layout: ASGLayout | None = None

    def combine(self, tensor: torch.Tensor) -> torch.Tensor:
        """Assemble what the ranks computed (zeros where a rank did not compute): here, everything is local."""
        return tensor

    def begin_call(self, layout: ASGLayout, structure_steps: int, token_weights: torch.Tensor, cfg: bool,
                   shuffle: torch.Generator | None, out_channels: int) -> None:
        """A new pipeline call: its layout, how many of its steps are structure steps, and what ``M`` needs.

        ``token_weights``: ``(B, T)``, the prompt's word tokens (``B`` rows: the conditional half
        when ``cfg``, whose maps are recorded). ``shuffle`` draws the pixel-interaction
        permutations, every structure step's up front (the same draws in the same order on every
        rank), so the host moves them to the device once per call, not twice per step.
        ``out_channels``: the denoiser's output channels (a rank with no part to predict still
        adds its zeros to the all-reduce).
        """
        self.out_channels = out_channels
        self.layout, self.structure_steps, self.token_weights, self.cfg = layout, structure_steps, token_weights, cfg
        self.weights = asg_maths.guidance_weights(self.structure_guidance, structure_steps, self.guidance_schedule)
        self.guided = layout.patches > 1 and any(w > 0 for w in self.weights)
        self.permutations = None
        if layout.patches > 1 and structure_steps:
            self.permutations = torch.stack([asg_maths.interaction_permutation(layout.patches, layout.h, layout.w,
                                                                               shuffle)
                                             for _ in range(structure_steps)])
        self.previous_key = None  # (prediction, map) of the key patch at the previous structure step
        self.counts = None  # the detail phase's overlap counts, made on the sample's device at its first step

    def step(self, sample: torch.Tensor, index: int, denoise: Denoise) -> torch.Tensor:
        """Step ``index`` of the call: the denoiser's output for the whole large ``sample``, as ASG makes it."""
        if self.layout is None:
            raise RuntimeError("ASGSimulator.step before begin_call")
        if index < self.structure_steps:
            return self._structure_step(sample, index, denoise)
        return self._detail_step(sample, denoise)

    def _structure_step(self, sample: torch.Tensor, index: int, denoise: Denoise) -> torch.Tensor:
        layout, k = self.layout, self.layout.patches
        patches = asg_maths.derelocate(sample, layout.s_h, layout.s_w)  # (K, R, C, h, w)
        permutation = None
        if self.permutations is not None:
            if self.permutations.device != sample.device:
                self.permutations = self.permutations.to(sample.device)
            permutation = self.permutations[index]
        slots = asg_maths.permute_patches(patches, permutation) if permutation is not None else patches
        rows, channels = patches.shape[1], self.out_channels
        # the conditional half of a CFG batch (the negative prompt's rows come first) is whose maps count
        cond_rows = slice(rows // 2, rows) if self.cfg else slice(None)
        store = AttentionMapStore()
        # this rank's slots (zeros elsewhere): prediction channels, then the map channel
        out = sample.new_zeros(k, rows, channels + int(self.guided), layout.h, layout.w)
        with record_attention_maps(self.map_layers if self.guided else {}, store):
            for s in layout.my_patches:
                with store.recording(cond_rows) if self.guided else contextlib.nullcontext():
                    prediction = denoise(slots[s], (0, 0))
                out[s, :, :channels] = prediction
                if self.guided:
                    attention = asg_maths.structure_map(store.take(), self.token_weights, (layout.h, layout.w))
                    out[s, :, channels:] = attention.repeat(rows // attention.shape[0], 1, 1, 1).to(out.dtype)
        out = self.combine(out)
        if permutation is not None:
            out = asg_maths.unpermute_patches(out, permutation)
        predictions = out[:, :, :channels]
        current_key = (predictions[0], out[0, :, channels:]) if self.guided else None
        # the first step has no previous key prediction: it guides with its own
        key = self.previous_key if self.mode == "async" and self.previous_key is not None else current_key
        if self.guided:
            predictions = asg_maths.structure_guidance(predictions, key[0], key[1], self.weights[index])
        self.previous_key = current_key
        return asg_maths.relocate(predictions, layout.s_h, layout.s_w)

    def _detail_step(self, sample: torch.Tensor, denoise: Denoise) -> torch.Tensor:
        layout = self.layout
        if self.counts is None:
            self.counts = asg_maths.overlap_counts(layout.windows, *sample.shape[-2:], device=sample.device,
                                                   dtype=sample.dtype)
        total = sample.new_zeros(sample.shape[0], self.out_channels, *sample.shape[-2:])
        for index in layout.my_windows:
            window = layout.windows[index]
            rows, cols = window.slices
            crop = (window.top * self.vae_scale_factor, window.left * self.vae_scale_factor)
            prediction = denoise(sample[..., rows, cols], crop)
            total[..., rows, cols] += prediction
        return self.combine(total) / self.counts
