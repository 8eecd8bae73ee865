"""ASG as a plan plus its serial executor: who denoises which patch and window, what guides what, when.

The plan (:func:`plan_layout`) lays a large picture out as ``K = s_h·s_w`` interleaved
native-size patches (structure phase) and overlapping native-size windows (detail
phase), and gives each rank a contiguous block of each. The executor
(:class:`ASGSimulator`) runs both phases: per structure step every patch slot is
predicted after pixel interaction, the slots are assembled (:meth:`~ASGSimulator.combine`),
un-permuted and pulled towards the key patch with the key's prediction and map of the
previous step (``mode="async"``) or of this step (``"sync"``); per detail step the
window predictions are assembled and averaged where they overlap. In one process the
simulator predicts every patch and window itself and assembling is the identity;
:class:`asyncgen.runtime.asg.ASGRuntime` runs the very same code on its rank's share and
assembles by an all-reduce (each rank leaves zeros where it did not compute, and adding
zeros is exact, so the ranks' result equals the simulator's).

What a prediction is (the denoiser call with CFG, SD or SDXL conditioning) and how the
scheduler steps are the pipeline's; they come in as callables. The maths is in
:mod:`asyncgen.schedules.asg_maths`, the attention maps in
:mod:`asyncgen.schedules.asg_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from asyncgen.schedules import asg_maths
from asyncgen.schedules.asg_attention import AttentionMapStore, record_attention_maps

MODES = ("async", "sync")

# predict(latent, t, crop, store) -> noise: one native-size denoiser call (with CFG), maps recorded into store
Predict = Callable[[torch.Tensor, object, tuple[int, int], "AttentionMapStore | None"], torch.Tensor]
# step(prediction, t, latent) -> the scheduler's next latent
Step = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


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
    """Both phases of ASG in one process: every patch and window computed here, nothing exchanged.

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

    def combine(self, tensor: torch.Tensor) -> torch.Tensor:
        """Assemble what the ranks computed (zeros where a rank did not compute): here, everything is local."""
        return tensor

    def structure_phase(self, patches: torch.Tensor, timesteps: Sequence, layout: ASGLayout, predict: Predict,
                        step: Step, token_weights: torch.Tensor, shuffle: torch.Generator | None,
                        progress=None) -> torch.Tensor:
        """Denoise the K patches with pixel interaction and structure guidance; returns them ``(K, B, C, h, w)``."""
        k = layout.patches
        weights = asg_maths.guidance_weights(self.structure_guidance, len(timesteps), self.guidance_schedule)
        guided = k > 1 and any(w > 0 for w in weights)
        store = AttentionMapStore()
        previous_key = None  # (prediction, map) of the key patch at the previous step
        # every step's permutation drawn up front (the same draws in the same order) and moved to
        # the device in one copy, instead of two host-to-device copies per step
        permutations = torch.stack([asg_maths.interaction_permutation(k, layout.h, layout.w, shuffle)
                                    for _ in timesteps]).to(patches.device) if k > 1 and len(timesteps) else None
        with record_attention_maps(self.map_layers if guided else {}, store):
            for index, t in enumerate(timesteps):
                permutation = permutations[index] if k > 1 else None
                slots = asg_maths.permute_patches(patches, permutation) if k > 1 else patches
                channels = patches.shape[2]
                # this rank's slots (zeros elsewhere): prediction channels, then the map channel
                out = slots.new_zeros(k, slots.shape[1], channels + int(guided), layout.h, layout.w)
                for s in layout.my_patches:
                    out[s, :, :channels] = predict(slots[s], t, (0, 0), store if guided else None)
                    if guided:
                        out[s, :, channels:] = asg_maths.structure_map(store.take(), token_weights,
                                                                       (layout.h, layout.w))
                out = self.combine(out)
                if k > 1:
                    out = asg_maths.unpermute_patches(out, permutation)
                predictions = out[:, :, :channels]
                current_key = (predictions[0], out[0, :, channels:]) if guided else None
                # the first step has no previous key prediction: it guides with its own
                key = previous_key if self.mode == "async" and previous_key is not None else current_key
                if guided:
                    predictions = asg_maths.structure_guidance(predictions, key[0], key[1], weights[index])
                previous_key = current_key
                # the scheduler steps the relocated latent, so its state (step index, multistep
                # history, noise) has the large latent's shape in both phases
                latent = step(asg_maths.relocate(predictions, layout.s_h, layout.s_w), t,
                              asg_maths.relocate(patches, layout.s_h, layout.s_w))
                patches = asg_maths.derelocate(latent, layout.s_h, layout.s_w)
                if progress is not None:
                    progress.update()
        return patches

    def detail_phase(self, latents: torch.Tensor, timesteps: Sequence, layout: ASGLayout, predict: Predict,
                     step: Step, progress=None) -> torch.Tensor:
        """Denoise overlapping native-size windows of the large latent, averaging where they overlap."""
        counts = asg_maths.overlap_counts(layout.windows, *latents.shape[-2:], device=latents.device,
                                          dtype=latents.dtype)
        for t in timesteps:
            total = torch.zeros_like(latents)
            for index in layout.my_windows:
                window = layout.windows[index]
                rows, cols = window.slices
                crop = (window.top * self.vae_scale_factor, window.left * self.vae_scale_factor)
                total[..., rows, cols] += predict(latents[..., rows, cols], t, crop, None)
            prediction = self.combine(total) / counts
            latents = step(prediction, t, latents)
            if progress is not None:
                progress.update()
        return latents
