"""Diffusion transformers (SD3, PixArt, Flux) as chains of units.

A DiT is an input embedding, a stack of blocks and an output head, so its units are:
``embed`` (patch/linear embedding of the latent, plus the text-stream embedding where
the blocks transform the text), one unit per transformer block, ``out`` (final norm,
projection, unpatchify). Block counts and kinds are read from the model. Where the
blocks carry two streams (SD3's joint blocks, Flux's dual- and single-stream blocks)
the boundary state carries both: ``hidden`` is the image stream and ``streams["text"]``
the text stream. Everything derived from the timestep and the prompt only (time/text
embeddings, rotary embeddings, PixArt's caption projection) is conditioning, which
every rank computes with the shared modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import torch
from torch import nn

from .boundary import BoundaryState
from .split import DenoiserSplit, Unit

from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

try:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
except ImportError:  # pragma: no cover - moved between releases
    from diffusers.models.transformers.transformer_2d import Transformer2DModelOutput


class _ParameterHolder(nn.Module):
    """Gives loose parameters of the model (PixArt's ``scale_shift_table``) a module to live in.

    The parameter objects are shared, not copied: releasing or moving the holder acts on
    the model's own parameters.
    """

    def __init__(self, **parameters: nn.Parameter):
        super().__init__()
        for name, p in parameters.items():
            self.register_parameter(name, p)


@dataclass
class DiTConditioning:
    temb: torch.Tensor
    height: int
    width: int
    attention_kwargs: dict | None = None
    extras: dict = field(default_factory=dict)  # family-specific (rotary embeddings, masks, residuals)


def _unpatchify(hidden: torch.Tensor, height: int, width: int, patch: int, channels: int) -> torch.Tensor:
    hidden = hidden.reshape(shape=(hidden.shape[0], height, width, patch, patch, channels))
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(shape=(hidden.shape[0], channels, height * patch, width * patch))


class _DiTSplit(DenoiserSplit):
    """What the three families share: units from the block lists, the output class."""

    sample_argument = "hidden_states"
    stream_names = ("text",)

    def wrap_output(self, prediction: torch.Tensor, return_dict: bool):
        return Transformer2DModelOutput(sample=prediction) if return_dict else (prediction,)

    def output(self, state: BoundaryState) -> torch.Tensor:
        return state.hidden

    def initial_state(self, sample: torch.Tensor, cond: DiTConditioning) -> BoundaryState:
        return BoundaryState(sample)

    def _block_units(self, name: str, blocks: nn.ModuleList, fn) -> list[Unit]:
        return [Unit(f"{name}{i}", (block,), lambda s, c, i=i, b=block: fn(i, b, s, c)) for i, block in enumerate(blocks)]

    def _example_common(self, batch: int, height: int | None, width: int | None) -> tuple[dict, torch.device, torch.dtype]:
        model, config = self.denoiser, self.denoiser.config
        param = next(model.parameters())
        device = param.device if param.device.type != "meta" else torch.device("cpu")
        size = config.sample_size
        h, w = height or size, width or size
        sample = torch.zeros(batch, config.in_channels, h, w, device=device, dtype=param.dtype)
        return dict(hidden_states=sample, timestep=torch.full((batch,), 500.0, device=device)), device, param.dtype

    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        return torch.empty((sample.shape[0], self.denoiser.out_channels, *sample.shape[2:]),
                           dtype=self.output_dtype(), device=sample.device)

    def output_dtype(self) -> torch.dtype:
        return next(p for p in self.denoiser.proj_out.parameters()).dtype


class SD3Split(_DiTSplit):
    handles = (SD3Transformer2DModel,)
    lora_kwargs_name = "joint_attention_kwargs"

    def build_units(self) -> list[Unit]:
        model = self.denoiser
        units = [Unit("embed", (model.pos_embed, model.context_embedder), self._embed)]
        units += self._block_units("block", model.transformer_blocks, self._block)
        units.append(Unit("out", (model.norm_out, model.proj_out), self._out))
        return units

    def shared_modules(self) -> list[nn.Module]:
        model = self.denoiser
        return [m for m in (model.time_text_embed, getattr(model, "image_proj", None)) if m is not None]

    def conditioning(self, sample, timestep=None, encoder_hidden_states=None, pooled_projections=None,
                     block_controlnet_hidden_states=None, joint_attention_kwargs=None, skip_layers=None):
        model = self.denoiser
        temb = model.time_text_embed(timestep, pooled_projections)
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            joint_attention_kwargs = dict(joint_attention_kwargs)
            ip_hidden_states, ip_temb = model.image_proj(joint_attention_kwargs.pop("ip_adapter_image_embeds"), timestep)
            joint_attention_kwargs.update(ip_hidden_states=ip_hidden_states, temb=ip_temb)
        patch = model.config.patch_size
        return DiTConditioning(
            temb, sample.shape[-2] // patch, sample.shape[-1] // patch, joint_attention_kwargs,
            dict(text_input=encoder_hidden_states, controlnet=block_controlnet_hidden_states,
                 skip_layers=set(skip_layers or ())),
        )

    def _embed(self, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        model = self.denoiser
        hidden = model.pos_embed(state.hidden).contiguous()
        return BoundaryState(hidden, (), {"text": model.context_embedder(cond.extras["text_input"])})

    def _block(self, index: int, block: nn.Module, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        hidden, streams = state.hidden, dict(state.streams)
        if index not in cond.extras["skip_layers"]:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=streams.get("text"), temb=cond.temb,
                                 joint_attention_kwargs=cond.attention_kwargs)
            if text is None:  # the last joint block returns only the image stream
                streams.pop("text", None)
            else:
                streams["text"] = text
        controlnet = cond.extras["controlnet"]
        if controlnet is not None and block.context_pre_only is False:
            interval = len(self.denoiser.transformer_blocks) / len(controlnet)
            hidden = hidden + controlnet[int(index / interval)]
        return BoundaryState(hidden, (), streams)

    def _out(self, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        model = self.denoiser
        hidden = model.proj_out(model.norm_out(state.hidden, cond.temb))
        return BoundaryState(_unpatchify(hidden, cond.height, cond.width, model.config.patch_size, model.out_channels))

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None) -> dict:
        inputs, device, dtype = self._example_common(batch, height, width)
        config = self.denoiser.config
        inputs["encoder_hidden_states"] = torch.zeros(batch, 77, config.joint_attention_dim, device=device, dtype=dtype)
        inputs["pooled_projections"] = torch.zeros(batch, config.pooled_projection_dim, device=device, dtype=dtype)
        return inputs


class PixArtSplit(_DiTSplit):
    handles = (PixArtTransformer2DModel,)
    lora_kwargs_name = "cross_attention_kwargs"
    stream_names = ()

    def build_units(self) -> list[Unit]:
        model = self.denoiser
        units = [Unit("embed", (model.pos_embed,), lambda s, c: BoundaryState(model.pos_embed(s.hidden)))]
        units += self._block_units("block", model.transformer_blocks, self._block)
        head = (model.norm_out, model.proj_out, _ParameterHolder(scale_shift_table=model.scale_shift_table))
        units.append(Unit("out", head, self._out))
        return units

    def shared_modules(self) -> list[nn.Module]:
        model = self.denoiser
        return [m for m in (model.adaln_single, model.caption_projection) if m is not None]

    def conditioning(self, sample, timestep=None, encoder_hidden_states=None, added_cond_kwargs=None,
                     cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None):
        model = self.denoiser
        if model.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        batch, patch = sample.shape[0], model.config.patch_size
        temb, embedded_timestep = model.adaln_single(timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=sample.dtype)
        if model.caption_projection is not None:
            encoder_hidden_states = model.caption_projection(encoder_hidden_states).view(batch, -1, model.inner_dim)
        return DiTConditioning(
            temb, sample.shape[-2] // patch, sample.shape[-1] // patch, cross_attention_kwargs,
            dict(text=encoder_hidden_states, attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
                 embedded_timestep=embedded_timestep),
        )

    def _block(self, index: int, block: nn.Module, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        x = cond.extras
        hidden = block(state.hidden, attention_mask=x["attention_mask"], encoder_hidden_states=x["text"],
                       encoder_attention_mask=x["encoder_attention_mask"], timestep=cond.temb,
                       cross_attention_kwargs=cond.attention_kwargs, class_labels=None)
        return BoundaryState(hidden)

    def _out(self, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        model = self.denoiser
        table = model.scale_shift_table
        shift, scale = (table[None] + cond.extras["embedded_timestep"][:, None].to(table.device)).chunk(2, dim=1)
        hidden = model.norm_out(state.hidden)
        hidden = hidden * (1 + scale.to(hidden.device)) + shift.to(hidden.device)
        hidden = model.proj_out(hidden).squeeze(1)
        return BoundaryState(_unpatchify(hidden, cond.height, cond.width, model.config.patch_size, model.out_channels))

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None) -> dict:
        inputs, device, dtype = self._example_common(batch, height, width)
        config = self.denoiser.config
        text_dim = config.caption_channels or self.denoiser.inner_dim
        inputs["encoder_hidden_states"] = torch.zeros(batch, 120, text_dim, device=device, dtype=dtype)
        if self.denoiser.use_additional_conditions:
            inputs["added_cond_kwargs"] = {"resolution": torch.ones(batch, 2, device=device, dtype=dtype),
                                           "aspect_ratio": torch.ones(batch, 1, device=device, dtype=dtype)}
        else:
            inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return inputs


class FluxSplit(_DiTSplit):
    handles = (FluxTransformer2DModel,)
    lora_kwargs_name = "joint_attention_kwargs"

    def build_units(self) -> list[Unit]:
        model = self.denoiser
        units = [Unit("embed", (model.x_embedder, model.context_embedder), self._embed)]
        units += self._block_units("double", model.transformer_blocks, self._double)
        units += self._block_units("single", model.single_transformer_blocks, self._single)
        units.append(Unit("out", (model.norm_out, model.proj_out), self._out))
        return units

    def shared_modules(self) -> list[nn.Module]:
        model = self.denoiser
        return [m for m in (model.time_text_embed, model.pos_embed, getattr(model, "encoder_hid_proj", None)) if m is not None]

    def conditioning(self, sample, timestep=None, encoder_hidden_states=None, pooled_projections=None, img_ids=None,
                     txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                     controlnet_single_block_samples=None, controlnet_blocks_repeat=False):
        model = self.denoiser
        dtype = model.x_embedder.weight.dtype  # what the stock forward casts to (the embedded latent's dtype)
        timestep = timestep.to(dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(dtype) * 1000
            temb = model.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, pooled_projections)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            joint_attention_kwargs = dict(joint_attention_kwargs)
            ip_hidden_states = model.encoder_hid_proj(joint_attention_kwargs.pop("ip_adapter_image_embeds"))
            joint_attention_kwargs.update({"ip_hidden_states": ip_hidden_states})
        return DiTConditioning(
            temb, 0, 0, joint_attention_kwargs,
            dict(text_input=encoder_hidden_states, rotary=rotary, controlnet=controlnet_block_samples,
                 controlnet_single=controlnet_single_block_samples, repeat=controlnet_blocks_repeat),
        )

    def _embed(self, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        model = self.denoiser
        return BoundaryState(model.x_embedder(state.hidden), (), {"text": model.context_embedder(cond.extras["text_input"])})

    def _run_block(self, block, state: BoundaryState, cond: DiTConditioning) -> tuple[torch.Tensor, torch.Tensor]:
        text, hidden = block(hidden_states=state.hidden, encoder_hidden_states=state.streams["text"], temb=cond.temb,
                             image_rotary_emb=cond.extras["rotary"], joint_attention_kwargs=cond.attention_kwargs)
        return text, hidden

    def _double(self, index: int, block: nn.Module, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        text, hidden = self._run_block(block, state, cond)
        samples = cond.extras["controlnet"]
        if samples is not None:
            interval = int(np.ceil(len(self.denoiser.transformer_blocks) / len(samples)))
            residual = samples[index % len(samples)] if cond.extras["repeat"] else samples[index // interval]
            hidden = hidden + residual
        return BoundaryState(hidden, (), {"text": text})

    def _single(self, index: int, block: nn.Module, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        text, hidden = self._run_block(block, state, cond)
        samples = cond.extras["controlnet_single"]
        if samples is not None:
            interval = int(np.ceil(len(self.denoiser.single_transformer_blocks) / len(samples)))
            hidden = hidden + samples[index // interval]
        return BoundaryState(hidden, (), {"text": text})

    def _out(self, state: BoundaryState, cond: DiTConditioning) -> BoundaryState:
        model = self.denoiser
        return BoundaryState(model.proj_out(model.norm_out(state.hidden, cond.temb)))

    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        # Flux works on packed latents (batch, tokens, channels)
        return torch.empty((*sample.shape[:-1], self.denoiser.out_channels), dtype=self.output_dtype(), device=sample.device)

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None) -> dict:
        model, config = self.denoiser, self.denoiser.config
        param = next(model.parameters())
        device, dtype = (param.device if param.device.type != "meta" else torch.device("cpu")), param.dtype
        h, w = (height or 16) // 2, (width or 16) // 2  # packed 2x2 latent patches
        inputs = dict(
            hidden_states=torch.zeros(batch, h * w, config.in_channels, device=device, dtype=dtype),
            encoder_hidden_states=torch.zeros(batch, 64, config.joint_attention_dim, device=device, dtype=dtype),
            pooled_projections=torch.zeros(batch, config.pooled_projection_dim, device=device, dtype=dtype),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_ids=torch.zeros(h * w, 3, device=device, dtype=dtype),
            txt_ids=torch.zeros(64, 3, device=device, dtype=dtype),
        )
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return inputs
