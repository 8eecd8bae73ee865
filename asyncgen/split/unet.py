"""``UNet2DConditionModel`` as a chain of units.

Units, in forward order: ``conv_in``; per down block one unit per resnet, one per
attention (transformer) module and one for its downsampler; the junction (ControlNet
residuals, the mid block); the same for each up block and its upsampler; ``conv_out``. Every unit
pushes or pops the skip stack exactly as the stock forward does, so the boundary state
at any cut is simply (hidden state, skips pushed and not yet popped).

Blocks whose ``forward`` is the stock ``CrossAttnDownBlock2D``/``DownBlock2D``/
``CrossAttnUpBlock2D``/``UpBlock2D`` forward are split per resnet and attention (the
structure these units re-trace); any other block type becomes a single unit that calls the block itself,
so unusual configs still split exactly, only more coarsely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UpBlock2D,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from diffusers.utils.torch_utils import apply_freeu
from torch import nn

from asyncgen._compat import unet_mask_bias
from asyncgen.split.boundary import BoundaryState
from asyncgen.split.units import DenoiserSplit, Unit


@dataclass
class UNetConditioning:
    """Everything a UNet unit needs for one step besides the boundary state."""

    emb: torch.Tensor
    encoder_hidden_states: Any
    attention_mask: torch.Tensor | None
    encoder_attention_mask: torch.Tensor | None
    cross_attention_kwargs: dict | None
    forward_upsample_size: bool
    down_residuals: tuple[torch.Tensor, ...] | None
    mid_residual: torch.Tensor | None
    hint: torch.Tensor | None = None

    def attention_kwargs(self) -> dict:
        return dict(
            encoder_hidden_states=self.encoder_hidden_states,
            attention_mask=self.attention_mask,
            cross_attention_kwargs=self.cross_attention_kwargs,
            encoder_attention_mask=self.encoder_attention_mask,
        )


def _has_cross_attention(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def _is_pairwise(block: nn.Module, *stock: type) -> bool:
    """True when the block runs the stock forward that the per-pair units re-trace."""
    forward = type(block).forward
    if not any(forward is cls.forward for cls in stock):
        return False
    attentions = getattr(block, "attentions", None)
    return attentions is None or len(attentions) == len(block.resnets)


class UNetSplit(DenoiserSplit):
    handles = (UNet2DConditionModel,)

    # ------------------------------------------------------------------ structure

    def build_units(self) -> list[Unit]:
        unet: UNet2DConditionModel = self.denoiser
        units = [Unit("conv_in", (unet.conv_in,), self._conv_in)]
        for b, block in enumerate(unet.down_blocks):
            units += self._down_block_units(b, block)
        junction = (unet.mid_block,) if unet.mid_block is not None else ()
        units.append(Unit("mid", junction, self._mid))
        for b, block in enumerate(unet.up_blocks):
            units += self._up_block_units(b, block, is_final=b == len(unet.up_blocks) - 1)
        tail = tuple(m for m in (unet.conv_norm_out, unet.conv_act, unet.conv_out) if m is not None)
        units.append(Unit("conv_out", tail, self._conv_out))
        return units

    def shared_modules(self) -> list[nn.Module]:
        unet = self.denoiser
        names = [
            "time_proj",
            "time_embedding",
            "class_embedding",
            "add_time_proj",
            "add_embedding",
            "time_embed_act",
            "encoder_hid_proj",
            "text_encoder_hid_proj",
            "position_net",
        ]
        return [m for m in (getattr(unet, n, None) for n in names) if isinstance(m, nn.Module)]

    def _down_block_units(self, b: int, block: nn.Module) -> list[Unit]:
        if not _is_pairwise(block, CrossAttnDownBlock2D, DownBlock2D):
            return [Unit(f"down{b}", (block,), lambda s, c, block=block: self._down_whole(block, s, c))]
        attentions = getattr(block, "attentions", None)
        units = []
        for i, resnet in enumerate(block.resnets):
            attn = attentions[i] if attentions is not None else None
            fn = lambda s, c, r=resnet, push=attn is None: self._down_resnet(r, s, c, push)  # noqa: E731
            units.append(Unit(f"down{b}.resnet{i}", (resnet,), fn))
            if attn is not None:
                units.append(Unit(f"down{b}.attn{i}", (attn,), lambda s, c, a=attn: self._down_attention(a, s, c)))
        if block.downsamplers is not None:
            units.append(
                Unit(f"down{b}.sample", tuple(block.downsamplers), lambda s, c, block=block: self._downsample(block, s))
            )
        return units

    def _up_block_units(self, b: int, block: nn.Module, is_final: bool) -> list[Unit]:
        if not _is_pairwise(block, CrossAttnUpBlock2D, UpBlock2D):
            fn = lambda s, c, block=block: self._up_whole(block, s, c, is_final)  # noqa: E731
            return [Unit(f"up{b}", (block,), fn)]
        attentions = getattr(block, "attentions", None)
        units = []
        for i, resnet in enumerate(block.resnets):
            fn = lambda s, c, block=block, r=resnet: self._up_resnet(block, r, s, c)  # noqa: E731
            units.append(Unit(f"up{b}.resnet{i}", (resnet,), fn))
            if attentions is not None:
                attn = attentions[i]
                units.append(Unit(f"up{b}.attn{i}", (attn,), lambda s, c, a=attn: self._attention(a, s, c)))
        if block.upsamplers is not None:
            fn = lambda s, c, block=block: self._upsample(block, s, c, is_final)  # noqa: E731
            units.append(Unit(f"up{b}.sample", tuple(block.upsamplers), fn))
        return units

    # --------------------------------------------------------------- conditioning

    def conditioning(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        down_block_additional_residuals: tuple | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> UNetConditioning:
        # Mirrors UNet2DConditionModel.forward up to conv_in, through the model's own helpers.
        unet = self.denoiser
        if down_intrablock_additional_residuals is not None or (
            down_block_additional_residuals is not None and mid_block_additional_residual is None
        ):
            raise NotImplementedError(
                "T2I-Adapter residuals (down_intrablock_additional_residuals) are not supported by asyncgen stages; "
                "ControlNet residuals (down_block_additional_residuals with mid_block_additional_residual) are"
            )
        up_factor = 2**unet.num_upsamplers
        forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
        if attention_mask is not None:
            attention_mask = unet_mask_bias(attention_mask, sample.dtype)
        if encoder_attention_mask is not None:
            encoder_attention_mask = unet_mask_bias(encoder_attention_mask, sample.dtype)
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        hint = None
        if unet.config.addition_embed_type == "image_hint":
            aug_emb, hint = aug_emb
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen", None) is not None:
            cross_attention_kwargs = cross_attention_kwargs.copy()
            gligen_args = cross_attention_kwargs.pop("gligen")
            cross_attention_kwargs["gligen"] = {"objs": unet.position_net(**gligen_args)}
        is_controlnet = mid_block_additional_residual is not None and down_block_additional_residuals is not None
        return UNetConditioning(
            emb=emb,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            forward_upsample_size=forward_upsample_size,
            down_residuals=tuple(down_block_additional_residuals) if is_controlnet else None,
            mid_residual=mid_block_additional_residual if is_controlnet else None,
            hint=hint,
        )

    def initial_state(self, sample: torch.Tensor, cond: UNetConditioning) -> BoundaryState:
        if self.denoiser.config.center_input_sample:
            sample = 2 * sample - 1.0
        if cond.hint is not None:
            sample = torch.cat([sample, cond.hint], dim=1)
        return BoundaryState(sample)

    def output(self, state: BoundaryState) -> torch.Tensor:
        if state.skips:
            raise RuntimeError(f"{len(state.skips)} skip tensors left unconsumed at the end of the UNet")
        return state.hidden

    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        conv_out = self.denoiser.conv_out
        return torch.empty(
            (sample.shape[0], conv_out.out_channels, *sample.shape[2:]), dtype=conv_out.weight.dtype, device=sample.device
        )

    def wrap_output(self, prediction: torch.Tensor, return_dict: bool):
        return UNet2DConditionOutput(sample=prediction) if return_dict else (prediction,)

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None) -> dict:
        unet, config = self.denoiser, self.denoiser.config
        param = next(unet.parameters())
        device = param.device if param.device.type != "meta" else torch.device("cpu")
        dtype = param.dtype
        size = config.sample_size if config.sample_size is not None else 64
        default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
        h, w = height or default_h, width or default_w
        cross_dim = config.cross_attention_dim
        cross_dim = max(cross_dim) if isinstance(cross_dim, (list, tuple)) else cross_dim
        inputs = dict(
            sample=torch.zeros(batch, config.in_channels, h, w, device=device, dtype=dtype),
            timestep=torch.tensor(500, device=device),
            encoder_hidden_states=torch.zeros(batch, 77, cross_dim, device=device, dtype=dtype),
        )
        if config.addition_embed_type == "text_time":
            time_dim = config.addition_time_embed_dim
            text_dim = config.projection_class_embeddings_input_dim - 6 * time_dim
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(batch, text_dim, device=device, dtype=dtype),
                "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype),
            }
        elif config.addition_embed_type is not None:
            raise NotImplementedError(
                f"no example inputs for addition_embed_type={config.addition_embed_type!r}; "
                "pass explicit cut points (split=[...]) or example inputs for cost estimation"
            )
        if getattr(unet, "class_embedding", None) is not None:
            if config.class_embed_type == "projection":
                labels = torch.zeros(batch, config.projection_class_embeddings_input_dim, device=device, dtype=dtype)
            else:
                labels = torch.zeros(batch, dtype=torch.long, device=device)
            inputs["class_labels"] = labels
        if config.time_cond_proj_dim is not None:
            inputs["timestep_cond"] = torch.zeros(batch, config.time_cond_proj_dim, device=device, dtype=dtype)
        return inputs

    # ---------------------------------------------------------------------- units

    def _conv_in(self, state: BoundaryState, cond: UNetConditioning) -> BoundaryState:
        hidden = self.denoiser.conv_in(state.hidden)
        return BoundaryState(hidden, (hidden,))

    def _down_resnet(self, resnet, state: BoundaryState, cond: UNetConditioning, push: bool) -> BoundaryState:
        hidden = resnet(state.hidden, cond.emb)
        return BoundaryState(hidden, state.skips + (hidden,) if push else state.skips)

    def _attention(self, attn, state: BoundaryState, cond: UNetConditioning) -> BoundaryState:
        return BoundaryState(attn(state.hidden, return_dict=False, **cond.attention_kwargs())[0], state.skips)

    def _down_attention(self, attn, state: BoundaryState, cond: UNetConditioning) -> BoundaryState:
        hidden = self._attention(attn, state, cond).hidden
        return BoundaryState(hidden, state.skips + (hidden,))

    def _downsample(self, block, state: BoundaryState) -> BoundaryState:
        hidden = state.hidden
        for downsampler in block.downsamplers:
            hidden = downsampler(hidden)
        return BoundaryState(hidden, state.skips + (hidden,))

    def _down_whole(self, block, state: BoundaryState, cond: UNetConditioning) -> BoundaryState:
        if _has_cross_attention(block):
            hidden, res = block(hidden_states=state.hidden, temb=cond.emb, **cond.attention_kwargs())
        else:
            hidden, res = block(hidden_states=state.hidden, temb=cond.emb)
        return BoundaryState(hidden, state.skips + tuple(res))

    def _mid(self, state: BoundaryState, cond: UNetConditioning) -> BoundaryState:
        skips, hidden = state.skips, state.hidden
        if cond.down_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, cond.down_residuals))
        mid = self.denoiser.mid_block
        if mid is not None:
            if _has_cross_attention(mid):
                hidden = mid(hidden, cond.emb, **cond.attention_kwargs())
            else:
                hidden = mid(hidden, cond.emb)
        if cond.mid_residual is not None:
            hidden = hidden + cond.mid_residual
        return BoundaryState(hidden, skips)

    def _up_resnet(self, block, resnet, state: BoundaryState, cond: UNetConditioning) -> BoundaryState:
        hidden, res = state.hidden, state.skips[-1]
        if all(getattr(block, k, None) for k in ("s1", "s2", "b1", "b2")):  # FreeU enabled
            hidden, res = apply_freeu(block.resolution_idx, hidden, res, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2)
        return BoundaryState(resnet(torch.cat([hidden, res], dim=1), cond.emb), state.skips[:-1])

    def _upsample_size(self, state: BoundaryState, cond: UNetConditioning, is_final: bool):
        if cond.forward_upsample_size and not is_final:
            return state.skips[-1].shape[2:]
        return None

    def _upsample(self, block, state: BoundaryState, cond: UNetConditioning, is_final: bool) -> BoundaryState:
        size = self._upsample_size(state, cond, is_final)
        hidden = state.hidden
        for upsampler in block.upsamplers:
            hidden = upsampler(hidden, size)
        return BoundaryState(hidden, state.skips)

    def _up_whole(self, block, state: BoundaryState, cond: UNetConditioning, is_final: bool) -> BoundaryState:
        n = len(block.resnets)
        res, skips = state.skips[-n:], state.skips[:-n]
        size = self._upsample_size(BoundaryState(state.hidden, skips), cond, is_final)
        kwargs = cond.attention_kwargs() if _has_cross_attention(block) else {}
        hidden = block(hidden_states=state.hidden, temb=cond.emb, res_hidden_states_tuple=res, upsample_size=size, **kwargs)
        return BoundaryState(hidden, skips)

    def _conv_out(self, state: BoundaryState, cond: UNetConditioning) -> BoundaryState:
        unet, hidden = self.denoiser, state.hidden
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return BoundaryState(unet.conv_out(hidden), state.skips)
