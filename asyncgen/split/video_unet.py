"""Video UNets as chains of units: AnimateDiff's ``UNetMotionModel`` and SVD's ``UNetSpatioTemporalConditionModel``.

Both run a 2-D UNet over the frames folded into the batch (``batch * frames`` images)
and mix information across frames inside their blocks: AnimateDiff with a *motion
module* (a temporal transformer) after every resnet/attention pair, SVD with
spatio-temporal resnets and transformers. The units follow :mod:`asyncgen.split.unet`: per
down/up block one unit per resnet, per spatial attention and per motion module, one for
the sampler; the mid block; ``conv_in`` and ``conv_out``. The boundary state is (hidden
state, skips pushed and not yet popped), in the folded ``(batch * frames, C, H, W)``
layout, so a cut between any two units carries what the stock forward would hold there.

The units re-trace the stock block forwards, so a block class whose ``forward`` is not
the stock one is refused rather than split on a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.unets.unet_3d_blocks import (
    CrossAttnDownBlockSpatioTemporal,
    CrossAttnUpBlockSpatioTemporal,
    DownBlockSpatioTemporal,
    UpBlockSpatioTemporal,
)
from diffusers.models.unets.unet_motion_model import (
    CrossAttnDownBlockMotion,
    CrossAttnUpBlockMotion,
    DownBlockMotion,
    UNetMotionModel,
    UNetMotionOutput,
    UpBlockMotion,
)
from diffusers.models.unets.unet_spatio_temporal_condition import (
    UNetSpatioTemporalConditionModel,
    UNetSpatioTemporalConditionOutput,
)
from diffusers.utils.torch_utils import apply_freeu, maybe_adjust_dtype_for_device
from torch import nn

from asyncgen._compat import unet_mask_bias
from asyncgen.split.boundary import BoundaryState
from asyncgen.schedules.cfg_parallel import batch_part
from asyncgen.split.units import DenoiserSplit, Unit


@dataclass
class VideoUNetConditioning:
    """Everything a unit needs for one step besides the boundary state."""

    emb: torch.Tensor  # time embedding, repeated per frame
    encoder_hidden_states: Any
    num_frames: int
    batch: int
    forward_upsample_size: bool
    attention_mask: torch.Tensor | None = None
    cross_attention_kwargs: dict | None = None
    down_residuals: tuple[torch.Tensor, ...] | None = None
    mid_residual: torch.Tensor | None = None
    image_only_indicator: torch.Tensor | None = None


def _timesteps(timestep: Any, sample: torch.Tensor, batch: int) -> torch.Tensor:
    # the stock forwards' timestep normalisation, step for step
    if not torch.is_tensor(timestep):
        dtype = maybe_adjust_dtype_for_device(torch.float64 if isinstance(timestep, float) else torch.int64,
                                              sample.device)
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    elif len(timestep.shape) == 0:
        timestep = timestep[None].to(sample.device)
    return timestep.expand(batch)


class _VideoUNetSplit(DenoiserSplit):
    """Units shared by the two video UNets; subclasses say how a resnet, an attention and the ends are called."""

    #: stock block classes whose forwards the per-layer units re-trace
    down_types: tuple[type, ...] = ()
    up_types: tuple[type, ...] = ()
    output_class: type = None

    # ------------------------------------------------------------------ structure

    def build_units(self) -> list[Unit]:
        unet = self.denoiser
        units = [Unit("conv_in", (unet.conv_in,), self._conv_in)]
        for b, block in enumerate(unet.down_blocks):
            self._check_stock(f"down_blocks[{b}]", block, self.down_types)
            units += self._layer_units(f"down{b}", block, push=True)
            if block.downsamplers is not None:
                units.append(Unit(f"down{b}.sample", tuple(block.downsamplers),
                                  lambda s, c, block=block: self._downsample(block, s)))
        units.append(Unit("mid", (unet.mid_block,) if unet.mid_block is not None else (), self._mid))
        for b, block in enumerate(unet.up_blocks):
            self._check_stock(f"up_blocks[{b}]", block, self.up_types)
            units += self._layer_units(f"up{b}", block, push=False)
            if block.upsamplers is not None:
                final = b == len(unet.up_blocks) - 1
                units.append(Unit(f"up{b}.sample", tuple(block.upsamplers),
                                  lambda s, c, block=block, final=final: self._upsample(block, s, c, final)))
        tail = tuple(m for m in (unet.conv_norm_out, unet.conv_act, unet.conv_out) if m is not None)
        units.append(Unit("conv_out", tail, self._conv_out))
        return units

    def _check_stock(self, where: str, block: nn.Module, stock: tuple[type, ...]) -> None:
        if not any(type(block).forward is cls.forward for cls in stock):
            raise TypeError(
                f"asyncgen cannot split {type(self.denoiser).__name__}.{where} of class {type(block).__name__}: "
                f"its units re-trace the stock forwards of {', '.join(c.__name__ for c in stock)}"
            )

    def _layer_units(self, prefix: str, block: nn.Module, push: bool) -> list[Unit]:
        """Per layer: [pop and concatenate the skip, on the way up] resnet, attention, motion module [push]."""
        attentions = getattr(block, "attentions", None)
        motions = getattr(block, "motion_modules", None)
        units = []
        for i, resnet in enumerate(block.resnets):
            parts = [("resnet", resnet, self._resnet)]
            if attentions is not None:
                parts.append(("attn", attentions[i], self._attention))
            if motions is not None:
                parts.append(("motion", motions[i], self._motion))
            for k, (kind, module, call) in enumerate(parts):
                first, last = k == 0, k == len(parts) - 1

                def fn(state, cond, module=module, call=call, first=first, last=last, block=block):
                    hidden, skips = state.hidden, state.skips
                    if first and not push:
                        hidden, skips = self._pop_skip(block, hidden, skips)
                    hidden = call(module, hidden, cond)
                    if last and push:
                        skips = skips + (hidden,)
                    return BoundaryState(hidden, skips)

                units.append(Unit(f"{prefix}.{kind}{i}", (module,), fn))
        return units

    # --------------------------------------------------------------- unit bodies

    def _pop_skip(self, block, hidden, skips):
        res = skips[-1]
        if all(getattr(block, k, None) for k in ("s1", "s2", "b1", "b2")):  # FreeU enabled
            hidden, res = apply_freeu(block.resolution_idx, hidden, res, s1=block.s1, s2=block.s2, b1=block.b1,
                                      b2=block.b2)
        return torch.cat([hidden, res], dim=1), skips[:-1]

    def _conv_in(self, state: BoundaryState, cond: VideoUNetConditioning) -> BoundaryState:
        hidden = self.denoiser.conv_in(state.hidden)
        return BoundaryState(hidden, (hidden,))

    def _downsample(self, block, state: BoundaryState) -> BoundaryState:
        hidden = state.hidden
        for downsampler in block.downsamplers:
            hidden = downsampler(hidden)
        return BoundaryState(hidden, state.skips + (hidden,))

    def _upsample(self, block, state: BoundaryState, cond: VideoUNetConditioning, final: bool) -> BoundaryState:
        size = state.skips[-1].shape[2:] if cond.forward_upsample_size and not final else None
        hidden = state.hidden
        for upsampler in block.upsamplers:
            hidden = upsampler(hidden, size)
        return BoundaryState(hidden, state.skips)

    def _folded_output(self, hidden: torch.Tensor, cond: VideoUNetConditioning) -> torch.Tensor:
        raise NotImplementedError

    def _conv_out(self, state: BoundaryState, cond: VideoUNetConditioning) -> BoundaryState:
        unet, hidden = self.denoiser, state.hidden
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return BoundaryState(self._folded_output(unet.conv_out(hidden), cond), state.skips)

    def output(self, state: BoundaryState) -> torch.Tensor:
        if state.skips:
            raise RuntimeError(f"{len(state.skips)} skip tensors left unconsumed at the end of the UNet")
        return state.hidden

    def wrap_output(self, prediction: torch.Tensor, return_dict: bool):
        return self.output_class(sample=prediction) if return_dict else (prediction,)

    def _example_device(self) -> tuple[torch.device, torch.dtype]:
        param = next(self.denoiser.parameters())
        return (param.device if param.device.type != "meta" else torch.device("cpu")), param.dtype


class MotionUNetSplit(_VideoUNetSplit):
    """AnimateDiff: ``UNetMotionModel``, latents ``(batch, channels, frames, height, width)``."""

    handles = (UNetMotionModel,)
    down_types = (CrossAttnDownBlockMotion, DownBlockMotion)
    up_types = (CrossAttnUpBlockMotion, UpBlockMotion)
    output_class = UNetMotionOutput

    def shared_modules(self) -> list[nn.Module]:
        unet = self.denoiser
        names = ["time_proj", "time_embedding", "add_time_proj", "add_embedding", "encoder_hid_proj"]
        return [m for m in (getattr(unet, n, None) for n in names) if isinstance(m, nn.Module)]

    def conditioning(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, attention_mask=None,
                     cross_attention_kwargs=None, added_cond_kwargs=None, down_block_additional_residuals=None,
                     mid_block_additional_residual=None) -> VideoUNetConditioning:
        # UNetMotionModel.forward up to conv_in, through the model's own modules
        unet = self.denoiser
        if attention_mask is not None:
            attention_mask = unet_mask_bias(attention_mask, sample.dtype)
        num_frames = sample.shape[2]
        t_emb = unet.time_proj(_timesteps(timestep, sample, sample.shape[0])).to(dtype=unet.dtype)
        emb = unet.time_embedding(t_emb, timestep_cond)
        if unet.config.addition_embed_type == "text_time":
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = unet.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
            emb = emb + unet.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)
        if unet.encoder_hid_proj is not None and unet.config.encoder_hid_dim_type == "ip_image_proj":
            image_embeds = [e.repeat_interleave(num_frames, dim=0, output_size=e.shape[0] * num_frames)
                            for e in unet.encoder_hid_proj(added_cond_kwargs["image_embeds"])]
            encoder_hidden_states = (encoder_hidden_states, image_embeds)
        controlnet = down_block_additional_residuals is not None
        return VideoUNetConditioning(
            emb=emb, encoder_hidden_states=encoder_hidden_states, num_frames=num_frames, batch=sample.shape[0],
            forward_upsample_size=any(s % 2**unet.num_upsamplers != 0 for s in sample.shape[-2:]),
            attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
            down_residuals=tuple(down_block_additional_residuals) if controlnet else None,
            mid_residual=mid_block_additional_residual,
        )

    def batch_part(self, value, part: int, parts: int, batch: int):
        """CFG parallel's slice of ``(sample, timestep, arguments)``: as :func:`asyncgen.schedules.cfg_parallel.batch_part`, except that
        tensors with ``batch * frames`` rows (the prompt and ControlNet residuals, repeated per frame) are cut into
        ``parts`` contiguous row blocks, each sample's frames being contiguous."""
        sample, timestep, arguments = value
        frames = sample.shape[2]

        def cut(v):
            if frames > 1 and isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch * frames:
                size = batch * frames // parts
                return v[part * size:(part + 1) * size]
            if isinstance(v, dict):
                return {k: cut(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return type(v)(cut(x) for x in v)
            return batch_part(v, part, parts, batch)

        return batch_part(sample, part, parts, batch), batch_part(timestep, part, parts, batch), cut(arguments)

    def initial_state(self, sample: torch.Tensor, cond: VideoUNetConditioning) -> BoundaryState:
        frames = sample.shape[2]
        return BoundaryState(sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * frames, -1) + sample.shape[3:]))

    def _resnet(self, resnet, hidden, cond: VideoUNetConditioning):
        return resnet(input_tensor=hidden, temb=cond.emb)

    def _attention(self, attn, hidden, cond: VideoUNetConditioning):
        return attn(hidden_states=hidden, encoder_hidden_states=cond.encoder_hidden_states,
                    cross_attention_kwargs=cond.cross_attention_kwargs, attention_mask=cond.attention_mask,
                    encoder_attention_mask=None, return_dict=False)[0]

    def _motion(self, motion, hidden, cond: VideoUNetConditioning):
        return motion(hidden, num_frames=cond.num_frames)

    def _mid(self, state: BoundaryState, cond: VideoUNetConditioning) -> BoundaryState:
        skips, hidden, mid = state.skips, state.hidden, self.denoiser.mid_block
        if cond.down_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, cond.down_residuals))
        if mid is not None:
            extra = {"num_frames": cond.num_frames} if hasattr(mid, "motion_modules") else {}
            hidden = mid(hidden, cond.emb, encoder_hidden_states=cond.encoder_hidden_states,
                         attention_mask=cond.attention_mask, cross_attention_kwargs=cond.cross_attention_kwargs, **extra)
        if cond.mid_residual is not None:
            hidden = hidden + cond.mid_residual
        return BoundaryState(hidden, skips)

    def _folded_output(self, hidden, cond: VideoUNetConditioning):
        return hidden[None, :].reshape((-1, cond.num_frames) + hidden.shape[1:]).permute(0, 2, 1, 3, 4)

    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        conv_out = self.denoiser.conv_out
        return torch.empty((sample.shape[0], conv_out.out_channels, *sample.shape[2:]), dtype=conv_out.weight.dtype,
                           device=sample.device)

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None,
                       frames: int = 8) -> dict:
        config = self.denoiser.config
        device, dtype = self._example_device()
        size = config.sample_size or 64
        h, w = height or size, width or size
        cross = config.cross_attention_dim
        inputs = dict(sample=torch.zeros(batch, config.in_channels, frames, h, w, device=device, dtype=dtype),
                      timestep=torch.tensor(500, device=device),
                      # AnimateDiff pipelines repeat the prompt per frame
                      encoder_hidden_states=torch.zeros(batch * frames, 77, cross, device=device, dtype=dtype))
        if config.addition_embed_type is not None or config.encoder_hid_dim_type is not None:
            raise NotImplementedError(
                f"no example inputs for addition_embed_type={config.addition_embed_type!r} / encoder_hid_dim_type="
                f"{config.encoder_hid_dim_type!r}; pass explicit cut points (split=[...])")
        return inputs


class SpatioTemporalUNetSplit(_VideoUNetSplit):
    """Stable Video Diffusion: ``UNetSpatioTemporalConditionModel``, latents ``(batch, frames, channels, h, w)``."""

    handles = (UNetSpatioTemporalConditionModel,)
    down_types = (CrossAttnDownBlockSpatioTemporal, DownBlockSpatioTemporal)
    up_types = (CrossAttnUpBlockSpatioTemporal, UpBlockSpatioTemporal)
    output_class = UNetSpatioTemporalConditionOutput
    lora_kwargs_name = None

    def shared_modules(self) -> list[nn.Module]:
        unet = self.denoiser
        return [unet.time_proj, unet.time_embedding, unet.add_time_proj, unet.add_embedding]

    def conditioning(self, sample, timestep, encoder_hidden_states=None, added_time_ids=None) -> VideoUNetConditioning:
        # UNetSpatioTemporalConditionModel.forward up to conv_in
        unet = self.denoiser
        batch, num_frames = sample.shape[:2]
        emb = unet.time_embedding(unet.time_proj(_timesteps(timestep, sample, batch)).to(dtype=sample.dtype))
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch, -1)).to(emb.dtype)
        emb = emb + unet.add_embedding(time_embeds)
        emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(
            num_frames, dim=0, output_size=encoder_hidden_states.shape[0] * num_frames)
        return VideoUNetConditioning(
            emb=emb, encoder_hidden_states=encoder_hidden_states, num_frames=num_frames, batch=batch,
            forward_upsample_size=any(s % 2**unet.num_upsamplers != 0 for s in sample.shape[-2:]),
            image_only_indicator=torch.zeros(batch, num_frames, dtype=sample.dtype, device=sample.device),
        )

    def initial_state(self, sample: torch.Tensor, cond: VideoUNetConditioning) -> BoundaryState:
        return BoundaryState(sample.flatten(0, 1))

    def _resnet(self, resnet, hidden, cond: VideoUNetConditioning):
        return resnet(hidden, cond.emb, image_only_indicator=cond.image_only_indicator)

    def _attention(self, attn, hidden, cond: VideoUNetConditioning):
        return attn(hidden, encoder_hidden_states=cond.encoder_hidden_states,
                    image_only_indicator=cond.image_only_indicator, return_dict=False)[0]

    _motion = None  # SVD's blocks have no separate motion modules

    def _mid(self, state: BoundaryState, cond: VideoUNetConditioning) -> BoundaryState:
        hidden = self.denoiser.mid_block(hidden_states=state.hidden, temb=cond.emb,
                                         encoder_hidden_states=cond.encoder_hidden_states,
                                         image_only_indicator=cond.image_only_indicator)
        return BoundaryState(hidden, state.skips)

    def _folded_output(self, hidden, cond: VideoUNetConditioning):
        return hidden.reshape(cond.batch, cond.num_frames, *hidden.shape[1:])

    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        conv_out = self.denoiser.conv_out
        return torch.empty((*sample.shape[:2], conv_out.out_channels, *sample.shape[3:]), dtype=conv_out.weight.dtype,
                           device=sample.device)

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None,
                       frames: int | None = None) -> dict:
        config = self.denoiser.config
        device, dtype = self._example_device()
        size = config.sample_size or 96
        h, w = height or size, width or size
        frames = frames or config.num_frames
        n_ids = config.projection_class_embeddings_input_dim // config.addition_time_embed_dim
        return dict(sample=torch.zeros(batch, frames, config.in_channels, h, w, device=device, dtype=dtype),
                    timestep=torch.tensor(1.0, device=device),
                    encoder_hidden_states=torch.zeros(batch, 1, config.cross_attention_dim, device=device, dtype=dtype),
                    added_time_ids=torch.zeros(batch, n_ids, device=device, dtype=dtype))
