"""Tiny diffusers pipelines built from configs (random weights), saved and loaded back.

Shared by the fixtures in ``conftest.py`` and by the worker processes of distributed
tests, which load the saved folders with ``from_pretrained`` like a user would.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from asyncgen.evaluation import random_models

CROSS_DIM = 32


def _text_encoder(projection: bool = False):
    return random_models.clip_text_encoder(CROSS_DIM, projection=projection)


def _tokenizer(folder: Path):
    return random_models.byte_level_clip_tokenizer(folder / "_tok")


def sd_unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = dict(
        block_out_channels=(16, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, norm_num_groups=8, attention_head_dim=(2, 4),
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def sdxl_unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = dict(
        block_out_channels=(16, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * CROSS_DIM, norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=CROSS_DIM + 6 * 8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def odd_unet():
    """Odd channel counts, per-block head dims, three levels, no mid attention."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(12, 18, 30), layers_per_block=(1, 2, 1), sample_size=12, in_channels=3, out_channels=5,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, norm_num_groups=6, attention_head_dim=(3, 3, 5),
        mid_block_type="UNetMidBlock2D",
    ).eval()


def build_sd(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return random_models.save_sd_pipeline(folder / "sd", sd_unet(), text_hidden=CROSS_DIM, seed=seed)


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder)
    pipe = StableDiffusionXLPipeline(
        unet=sdxl_unet(), vae=random_models.vae(), text_encoder=_text_encoder(), text_encoder_2=_text_encoder(projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=random_models.ddim_scheduler(),
    )
    pipe.save_pretrained(folder / "sdxl")
    return folder / "sdxl"


def build_controlnet(folder: Path, seed: int = 0) -> Path:
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel(
        block_out_channels=(16, 32), layers_per_block=2, in_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=CROSS_DIM, norm_num_groups=8, attention_head_dim=(2, 4),
        conditioning_embedding_out_channels=(8, 8),
    )
    # random init leaves the zero convolutions at zero; give them weights so residuals matter
    for module in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(module.weight, std=0.05)
    controlnet.save_pretrained(folder / "controlnet")
    return folder / "controlnet"


def call_kwargs(seed: int = 0, **overrides) -> dict:
    """A short, seeded text-to-image call on the tiny pipelines (CFG on, like users run)."""
    kwargs = dict(prompt="a large red circle on a blue background", num_inference_steps=6, guidance_scale=7.5,
                  height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(seed))
    kwargs.update(overrides)
    return kwargs


def load(path: str | os.PathLike, cls_name: str = "StableDiffusionPipeline", **kwargs):
    import diffusers

    from asyncgen.pipelines.loading import load_pipeline

    pipe = load_pipeline(str(path), getattr(diffusers, cls_name), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Transformer families: builder, pipeline class, from_pretrained extras, call extras.
# PixArt and Flux: only the tests build these (the benchmarks use SD and SD3)

def pixart_transformer(text_hidden: int = 32, **overrides):
    """A tiny ``PixArtTransformer2DModel`` (PixArt-alpha layout: ada_norm_single, caption projection)."""
    from diffusers import PixArtTransformer2DModel

    config = dict(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                  caption_channels=text_hidden, in_channels=4, cross_attention_dim=24, out_channels=8,
                  attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtTransformer2DModel(**{**config, **overrides}).eval()



def flux_transformer(text_hidden: int = 32, **overrides):
    """A tiny guidance-distilled (Flux-dev style) ``FluxTransformer2DModel``."""
    from diffusers import FluxTransformer2DModel

    config = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=text_hidden, pooled_projection_dim=text_hidden,
                  guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return FluxTransformer2DModel(**{**config, **overrides}).eval()



def save_pixart_pipeline(folder: Path, transformer=None, text_hidden: int = 32, seed: int = 0) -> Path:
    """A ``PixArtAlphaPipeline`` with a small T5 encoder (byte-level CLIP tokenizer: no sentencepiece needed)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer if transformer is not None else pixart_transformer(text_hidden)
    pipe = PixArtAlphaPipeline(
        tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"), text_encoder=random_models.t5_text_encoder(text_hidden),
        vae=random_models.vae(), transformer=transformer, scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(folder)
    return folder



def save_flux_pipeline(folder: Path, transformer=None, text_hidden: int = 32, seed: int = 0) -> Path:
    """A guidance-distilled (Flux-dev style) ``FluxPipeline``."""
    from diffusers import FluxPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer if transformer is not None else flux_transformer(text_hidden)
    tokenizer = random_models.byte_level_clip_tokenizer(folder / "tokenizer")
    pipe = FluxPipeline(
        scheduler=random_models.flow_scheduler(), vae=random_models.flow_vae(transformer.config.in_channels // 4),
        text_encoder=random_models.clip_text_encoder(text_hidden), tokenizer=tokenizer,
        text_encoder_2=random_models.t5_text_encoder(text_hidden), tokenizer_2=tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


DIT_FAMILIES = {
    "sd3": (random_models.save_sd3_pipeline, "StableDiffusion3Pipeline", {}, dict(height=32, width=32)),
    "pixart": (save_pixart_pipeline, "PixArtAlphaPipeline", {},
               dict(height=32, width=32, use_resolution_binning=False, max_sequence_length=16)),
    "flux": (save_flux_pipeline, "FluxPipeline", {}, dict(height=32, width=32, max_sequence_length=16)),
}


def build_dit(folder: Path, family: str, seed: int = 0) -> Path:
    return DIT_FAMILIES[family][0](folder / family, seed=seed)


def load_dit(path, family: str):
    _, cls_name, extras, _ = DIT_FAMILIES[family]
    return load(path, cls_name, **extras)


def dit_call_kwargs(family: str, seed: int = 0, **overrides) -> dict:
    kwargs = call_kwargs(seed, **DIT_FAMILIES[family][3])
    if family == "flux":
        kwargs.pop("guidance_scale")  # distilled guidance: the default embedded scale
    kwargs.update(overrides)
    return kwargs


def dit_model(family: str):
    """The family's tiny transformer on its own (for splitting tests)."""
    builders = {"sd3": random_models.sd3_transformer, "pixart": pixart_transformer,
                "flux": flux_transformer}
    return builders[family]()


# ---------------------------------------------------------------------------- video
# Video pipelines: latents of 3 frames of 8x8 (16x16 pixels through a factor-2 VAE), 1-2 blocks,
# so that a whole pipeline call takes a fraction of a second.

VIDEO_FRAMES = 3


def animatediff_unet():
    """A tiny SD UNet and a motion adapter, combined as ``AnimateDiffPipeline`` does (a ``UNetMotionModel``)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, norm_num_groups=4, attention_head_dim=4)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                            motion_num_attention_heads=2, motion_max_seq_length=8)
    return UNetMotionModel.from_unet2d(unet, adapter).eval(), adapter


def save_animatediff_pipeline(folder: Path, seed: int = 0) -> Path:
    from diffusers import AnimateDiffPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    unet, adapter = animatediff_unet()
    pipe = AnimateDiffPipeline(vae=random_models.vae(), text_encoder=_text_encoder(), tokenizer=_tokenizer(folder),
                               unet=unet, motion_adapter=adapter, scheduler=random_models.ddim_scheduler())
    pipe.save_pretrained(folder)
    return folder


def svd_unet():
    """A tiny ``UNetSpatioTemporalConditionModel`` (its GroupNorms have 32 groups: widths are multiples of 32)."""
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=CROSS_DIM,
        num_attention_heads=(2, 4), addition_time_embed_dim=4, projection_class_embeddings_input_dim=12,
        num_frames=VIDEO_FRAMES).eval()


def save_svd_pipeline(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    folder = Path(folder)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=CROSS_DIM, projection_dim=CROSS_DIM, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * CROSS_DIM, image_size=224, patch_size=32)).eval()  # SVD resizes to 224
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", timestep_spacing="leading",
                                       use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0,
                                       timestep_type="continuous", steps_offset=1)
    pipe = StableVideoDiffusionPipeline(
        vae=AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                         down_block_types=("DownEncoderBlock2D",) * 2).eval(),
        image_encoder=image_encoder, unet=svd_unet(), scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.save_pretrained(folder)
    return folder


def svd_image():
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# family: (builder, pipeline class, call arguments beyond the seed)
VIDEO_FAMILIES = {
    "animatediff": (save_animatediff_pipeline, "AnimateDiffPipeline",
                    dict(prompt="a red ball bouncing", num_frames=VIDEO_FRAMES, height=16, width=16,
                         num_inference_steps=4, guidance_scale=7.5)),
    "svd": (save_svd_pipeline, "StableVideoDiffusionPipeline",
            dict(num_frames=VIDEO_FRAMES, height=16, width=16, num_inference_steps=4, decode_chunk_size=VIDEO_FRAMES,
                 min_guidance_scale=1.0, max_guidance_scale=3.0)),
}


def build_video(folder: Path, family: str, seed: int = 0) -> Path:
    return VIDEO_FAMILIES[family][0](Path(folder) / family, seed=seed)


def load_video(path, family: str):
    return load(path, VIDEO_FAMILIES[family][1])


def video_call_kwargs(family: str, seed: int = 0, **overrides) -> dict:
    kwargs = dict(VIDEO_FAMILIES[family][2], output_type="np", generator=torch.Generator().manual_seed(seed))
    if family == "svd":
        kwargs["image"] = svd_image()
    kwargs.update(overrides)
    return kwargs


# ------------------------------------------------------------------ transformer classes
# One tiny config per diffusers transformer class in the support matrix (2 blocks per
# list, widths 16-64): the generic block split must carry each exactly.

TRANSFORMER_CONFIGS = {
    # images
    "SD3Transformer2DModel": dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=32, out_channels=4),
    "PixArtTransformer2DModel": dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=2, caption_channels=32, in_channels=4, cross_attention_dim=16,
                                     out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                     num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                     norm_elementwise_affine=False, norm_eps=1e-6),
    "FluxTransformer2DModel": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
    "Flux2Transformer2DModel": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)),
    "QwenImageTransformer2DModel": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        axes_dims_rope=(4, 6, 6)),
    "SanaTransformer2DModel": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=1),
    "ChromaTransformer2DModel": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                     axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                     approximator_hidden_dim=32, approximator_layers=1),
    "Lumina2Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                                      num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                      axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=32),
    "CogView4Transformer2DModel": dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, text_embed_dim=32,
                                       time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
                                       rope_axes_dim=(4, 4)),
    "AuraFlowTransformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                       num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=32, caption_projection_dim=16, out_channels=4,
                                       pos_embed_max_size=64),
    "OvisImageTransformer2DModel": dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                                        num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=32, axes_dims_rope=(2, 2, 4)),
    "LongCatImageTransformer2DModel": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=32, axes_dims_rope=[2, 2, 4]),
    # video
    "WanTransformer3DModel": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32),
    "HunyuanVideoTransformer3DModel": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=1,
                                           patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
                                           rope_axes_dim=(2, 2, 4)),
    "LTXVideoTransformer3DModel": dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                       num_layers=2, caption_channels=32),
    "CogVideoXTransformer3DModel": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=32, num_layers=2, sample_width=8,
                                        sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=8, use_rotary_positional_embeddings=True),
    "MochiTransformer3DModel": dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=8,
                                    max_sequence_length=8),
    "AllegroTransformer3DModel": dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
                                      in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=16,
                                      sample_height=8, sample_width=8, sample_frames=3, caption_channels=32),
    "SanaVideoTransformer3DModel": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                        cross_attention_dim=16, caption_channels=32, sample_size=8,
                                        rope_max_seq_len=32),
    "SkyReelsV2Transformer3DModel": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                         in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                         num_layers=2, rope_max_seq_len=32),
}


def transformer(class_name: str, seed: int = 0):
    """The tiny ``class_name`` transformer (random weights, eval mode)."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**TRANSFORMER_CONFIGS[class_name]).eval()


# ------------------------------------------------------------------ a large model (lean loading)

LARGE_FLUX_CONFIG = dict(patch_size=1, in_channels=16, num_layers=6, num_single_layers=4, attention_head_dim=64,
                         num_attention_heads=8, joint_attention_dim=32, pooled_projection_dim=32,
                         guidance_embeds=True, axes_dims_rope=(16, 24, 24))


def build_large_flux(folder: Path, seed: int = 0, max_shard_size: str | None = "100MB") -> Path:
    """A ``FluxPipeline`` whose transformer holds ~290 MB of float32 weights (the rest tiny), saved sharded.

    Built on the meta device and filled tensor by tensor from one seeded generator
    (random init of 63 M parameters takes seconds; this takes a fraction of one).
    """
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        transformer = FluxTransformer2DModel(**LARGE_FLUX_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    for module in transformer.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.is_meta:
                    value = torch.empty(tensor.shape, dtype=tensor.dtype).normal_(std=0.02, generator=generator)
                    table[name] = torch.nn.Parameter(value, requires_grad=False) if name in module._parameters else value
    path = save_flux_pipeline(Path(folder) / "large_flux", transformer.eval(), seed=seed)
    if max_shard_size is not None:
        transformer.save_pretrained(path / "transformer", max_shard_size=max_shard_size)
        (path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    return path


def wan_transformer(text_hidden: int = 32, **overrides):
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=text_hidden, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanTransformer3DModel(**{**config, **overrides}).eval()


def save_wan_pipeline(folder: Path, seed: int = 0, transformer=None) -> Path:
    """A ``WanPipeline``: Wan VAE (time compressed by 4, space by 8: 9 frames of 64x64 are 3 latent frames of 8x8)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer if transformer is not None else wan_transformer()
    z = transformer.config.in_channels
    vae = AutoencoderKLWan(base_dim=3, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * z, latents_std=[1.0] * z).eval()
    pipe = WanPipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                       text_encoder=random_models.t5_text_encoder(transformer.config.text_dim), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


VIDEO_FAMILIES["wan"] = (save_wan_pipeline, "WanPipeline",
                         dict(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=9, height=64, width=64,
                              num_inference_steps=4, guidance_scale=5.0, max_sequence_length=16))


def save_ltx_pipeline(folder: Path, seed: int = 0) -> Path:
    """An ``LTXPipeline``: LTX VAE compressing time by 4 and space by 4 (9 frames of 32x32: 3 latent frames of 8x8)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    folder = Path(folder)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        patch_size=1, patch_size_t=1).eval()
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=3, caption_channels=CROSS_DIM).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                       text_encoder=random_models.t5_text_encoder(CROSS_DIM),
                       tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


VIDEO_FAMILIES["ltx"] = (save_ltx_pipeline, "LTXPipeline",
                         dict(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=9, height=32, width=32,
                              num_inference_steps=4, guidance_scale=3.0, max_sequence_length=16))


# ------------------------------------------------------------------ a pipeline per transformer class
# The stock pipeline of each matrix class that has no pipeline test elsewhere (SD3, PixArt and Flux
# are in DIT_FAMILIES; Wan and LTX in VIDEO_FAMILIES): tiny components, saved and loaded back, so
# `stages=1` can be checked against the stock pipeline and 2 ranks against the serial simulator.
# family: (builder, pipeline class, call arguments beyond the generator, batched CFG)
# "batched CFG": the pipeline runs the conditional and unconditional passes as one batch of 2
# (CFG parallel applies); the others make two denoiser calls per step (or none, when distilled).

TRANSFORMER_PIPELINES: dict = {}


def build_pipeline(folder: Path, family: str, seed: int = 0) -> Path:
    return TRANSFORMER_PIPELINES[family][0](Path(folder) / family, seed=seed)


# family: the set-up a user does after loading, applied to the loaded pipeline
# (AllegroPipeline's VAE decodes only with tiling enabled, as its docs show)
AFTER_LOAD: dict = {}


def load_pipeline(path, family: str):
    pipe = load(path, TRANSFORMER_PIPELINES[family][1])
    if family in AFTER_LOAD:
        AFTER_LOAD[family](pipe)
    return pipe


def pipeline_call_kwargs(family: str, seed: int = 0, **overrides) -> dict:
    kwargs = dict(TRANSFORMER_PIPELINES[family][2], output_type="np", generator=torch.Generator().manual_seed(seed))
    kwargs.update(overrides)
    return kwargs


def save_chroma_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``ChromaPipeline``: T5 text encoder (byte-level tokenizer), Flux-style VAE, true CFG as two passes."""
    from diffusers import ChromaPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("ChromaTransformer2DModel")
    pipe = ChromaPipeline(scheduler=random_models.flow_scheduler(),
                          vae=random_models.flow_vae(transformer.config.in_channels // 4),
                          text_encoder=random_models.t5_text_encoder(CROSS_DIM),
                          tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                          transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def transformer_for_pipeline(class_name: str, **overrides):
    """The matrix's tiny ``class_name`` with 3 blocks per list (so 2 stages cut inside a list)."""
    import diffusers

    config = dict(TRANSFORMER_CONFIGS[class_name])
    for key in ("num_layers", "num_single_layers", "num_mmdit_layers", "num_single_dit_layers"):
        if key in config:
            config[key] = 3
    return getattr(diffusers, class_name)(**{**config, **overrides}).eval()


TRANSFORMER_PIPELINES["chroma"] = (save_chroma_pipeline, "ChromaPipeline",
                                   dict(prompt="a red ball", negative_prompt="blurry", height=32, width=32,
                                        num_inference_steps=4, guidance_scale=4.0, max_sequence_length=16), False)


# ------------------------------------------------------------------ engineer D: wan_i2v (Wan 2.1 image-to-video), wan22 (two experts)

def tiny_wan_vae(z: int):
    """A Wan VAE compressing time by 4 and space by 4 (9 frames of 32x32: 3 latent frames of 8x8)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=z, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                            scale_factor_spatial=4, latents_mean=[0.0] * z, latents_std=[1.0] * z).eval()


def save_wan_i2v_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``WanImageToVideoPipeline`` in the Wan 2.1 form: one transformer reading CLIP image embeddings.

    The transformer takes the noisy latents and the encoded first frame with its 4 mask channels
    (``2 * z + 4`` channels); its image attention projects the image embedder's output (the
    transformer's inner width). The image encoder is a 2-layer CLIP vision tower on 32x32 images
    (the pipeline takes its second-to-last hidden state: 1 + 4 patch tokens).
    """
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    folder = Path(folder)
    z = 4
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=CROSS_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * CROSS_DIM,
        image_size=32, patch_size=16)).eval()
    transformer = transformer_for_pipeline("WanTransformer3DModel", in_channels=2 * z + 4, out_channels=z,
                                           image_dim=CROSS_DIM, added_kv_proj_dim=16)
    pipe = WanImageToVideoPipeline(
        tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
        text_encoder=random_models.t5_text_encoder(transformer.config.text_dim), vae=tiny_wan_vae(z),
        scheduler=random_models.flow_scheduler(), image_processor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=image_encoder, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


# max_sequence_length=512: Wan's attention processor takes the last 512 context tokens as text and the rest
# as image tokens (hard-coded in diffusers' WanAttnProcessor), so a shorter prompt length mixes them up.
TRANSFORMER_PIPELINES["wan_i2v"] = (save_wan_i2v_pipeline, "WanImageToVideoPipeline",
                                    dict(prompt="a red ball bouncing", negative_prompt="blurry", image=svd_image(),
                                         num_frames=9, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                                         max_sequence_length=512), False)


# ------------------------------------------------------------------ engineer B: sana, sana_video, cogview4, lumina2

def gemma2_text_encoder(hidden: int, layers: int = 1):
    """A ``Gemma2Model`` over the byte vocabulary (Sana reads its last hidden state, Lumina2 the one before)."""
    from transformers import Gemma2Config, Gemma2Model

    vocab = random_models.BYTE_VOCAB_SIZE
    config = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                          max_position_embeddings=1024, sliding_window=1024, pad_token_id=vocab - 1,
                          eos_token_id=vocab - 1, bos_token_id=vocab - 2)
    return Gemma2Model(config).eval()


def glm_text_encoder(hidden: int):
    """A 2-layer ``GlmModel`` over the byte vocabulary (CogView4 reads the second-to-last hidden state)."""
    from transformers import GlmConfig, GlmModel

    config = GlmConfig(vocab_size=random_models.BYTE_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=128, pad_token_id=random_models.BYTE_VOCAB_SIZE - 1)
    return GlmModel(config).eval()


def sana_scheduler():
    # Sana's released schedulers: DPM-Solver++ on flow sigmas (multistep: it keeps the previous model outputs)
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def save_sana_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``SanaPipeline``: Gemma2 text encoder, a 3-level ``AutoencoderDC`` (32x32 images are 8x8 latents).

    The tokenizer is the byte-level one (Sana calls it generically); its length limit is 1024 because
    Sana prepends its default complex human instruction (893 bytes) to the prompt, kept on purpose.
    """
    from diffusers import AutoencoderDC, SanaPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("SanaTransformer2DModel")
    levels = 3
    vae = AutoencoderDC(in_channels=3, latent_channels=transformer.config.in_channels, attention_head_dim=4,
                        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                        encoder_block_out_channels=(8,) * levels, decoder_block_out_channels=(8,) * levels,
                        encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
                        encoder_qkv_multiscales=((),) * levels, decoder_qkv_multiscales=((),) * levels,
                        scaling_factor=0.41).eval()
    pipe = SanaPipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer", max_length=1024),
                        text_encoder=gemma2_text_encoder(transformer.config.caption_channels), vae=vae,
                        transformer=transformer, scheduler=sana_scheduler())
    pipe.save_pretrained(folder)
    return folder


# use_resolution_binning=False: binning needs a transformer sample_size of 16, 32, 64 or 128 (the tiny one is 8)
TRANSFORMER_PIPELINES["sana"] = (save_sana_pipeline, "SanaPipeline",
                                 dict(prompt="a red ball", negative_prompt="blurry", height=32, width=32,
                                      num_inference_steps=4, guidance_scale=4.5, max_sequence_length=16,
                                      use_resolution_binning=False), True)


def save_sana_video_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``SanaVideoPipeline``: Gemma2 text encoder (as Sana's), the tiny Wan VAE (9 frames of 32x32: 3x8x8 latents)."""
    from diffusers import SanaVideoPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("SanaVideoTransformer3DModel")
    pipe = SanaVideoPipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer", max_length=1024),
                             text_encoder=gemma2_text_encoder(transformer.config.caption_channels),
                             vae=tiny_wan_vae(transformer.config.in_channels), transformer=transformer,
                             scheduler=sana_scheduler())
    pipe.save_pretrained(folder)
    return folder


# use_resolution_binning=False: binning needs a transformer sample_size of 30 or 22 (the tiny one is 8)
TRANSFORMER_PIPELINES["sana_video"] = (save_sana_video_pipeline, "SanaVideoPipeline",
                                       dict(prompt="a red ball bouncing", negative_prompt="blurry", frames=9,
                                            height=32, width=32, num_inference_steps=4, guidance_scale=6.0,
                                            max_sequence_length=16, use_resolution_binning=False), True)


def save_cogview4_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``CogView4Pipeline``: GLM text encoder, a 3-level ``AutoencoderKL`` (32x32 images are 8x8 latents)."""
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("CogView4Transformer2DModel")
    # CogView4 passes mu (resolution-dependent shift) to set_timesteps: dynamic shifting, linear as released
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    pipe = CogView4Pipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                            text_encoder=glm_text_encoder(transformer.config.text_embed_dim),
                            vae=random_models.vae((8, 8, 16)), transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["cogview4"] = (save_cogview4_pipeline, "CogView4Pipeline",
                                     dict(prompt="a red ball", negative_prompt="blurry", height=32, width=32,
                                          num_inference_steps=4, guidance_scale=5.0, max_sequence_length=16), False)


def save_lumina2_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``Lumina2Pipeline``: 2-layer Gemma2, a 4-level Flux-style VAE (the pipeline hard-codes a factor of 8:
    32x32 images are 4x4 latents), cond and uncond as two unnamed passes per step."""
    from diffusers import Lumina2Pipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("Lumina2Transformer2DModel")
    pipe = Lumina2Pipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                           text_encoder=gemma2_text_encoder(transformer.config.cap_feat_dim, layers=2),
                           vae=random_models.flow_vae(transformer.config.in_channels, (8, 8, 8, 8)),
                           transformer=transformer, scheduler=random_models.flow_scheduler())
    pipe.save_pretrained(folder)
    return folder


# system_prompt="": the default one is 170 bytes, 170 tokens of the byte-level tokenizer (a cost, nothing tested)
TRANSFORMER_PIPELINES["lumina2"] = (save_lumina2_pipeline, "Lumina2Pipeline",
                                    dict(prompt="a red ball", negative_prompt="blurry", height=32, width=32,
                                         num_inference_steps=4, guidance_scale=4.0, max_sequence_length=32,
                                         system_prompt=""), False)


# ------------------------------------------------------------------ ovis_image, flux2, hunyuan_video, qwenimage
# Chat-template pipelines get the byte-level CLIP tokenizer with a minimal `chat_template` set (built
# locally: the real Qwen tokenizers would need a download); the pipelines only call
# `apply_chat_template(..., tokenize=False)` and then the tokenizer itself.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_tokenizer(folder: Path, max_length: int = 512):
    tokenizer = random_models.byte_level_clip_tokenizer(folder, max_length=max_length)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def _qwen3_config(hidden: int, layers: int = 1):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=random_models.BYTE_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                       max_position_embeddings=512, pad_token_id=random_models.BYTE_VOCAB_SIZE - 1)


def save_ovis_image_pipeline(folder: Path, seed: int = 0) -> Path:
    """An ``OvisImagePipeline``: one-layer Qwen3Model, chat-template tokenizer, Flux-style VAE, true CFG as two passes."""
    from diffusers import OvisImagePipeline
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("OvisImageTransformer2DModel")
    pipe = OvisImagePipeline(scheduler=random_models.flow_scheduler(),
                             vae=random_models.flow_vae(transformer.config.in_channels // 4),
                             text_encoder=Qwen3Model(_qwen3_config(transformer.config.joint_attention_dim)).eval(),
                             tokenizer=_chat_tokenizer(folder / "tokenizer"), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["ovis_image"] = (save_ovis_image_pipeline, "OvisImagePipeline",
                                       dict(prompt="a red ball", negative_prompt="blurry", height=32, width=32,
                                            num_inference_steps=4, guidance_scale=4.0, max_sequence_length=16), False)


def save_flux2_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``Flux2KleinPipeline`` (Flux2Pipeline itself needs a Mistral3 encoder and its processor; Klein runs the
    same Flux2Transformer2DModel): two-layer Qwen3ForCausalLM whose hidden states 0, 1, 2 are stacked into the
    text input, chat-template tokenizer, AutoencoderKLFlux2 tiny, true CFG as two passes."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    folder = Path(folder)
    text_hidden = 16
    transformer = transformer_for_pipeline("Flux2Transformer2DModel", joint_attention_dim=3 * text_hidden)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                             latent_channels=transformer.config.in_channels // 4, sample_size=32).eval()
    pipe = Flux2KleinPipeline(scheduler=random_models.flow_scheduler(), vae=vae,
                              text_encoder=Qwen3ForCausalLM(_qwen3_config(text_hidden, layers=2)).eval(),
                              tokenizer=_chat_tokenizer(folder / "tokenizer"), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["flux2"] = (save_flux2_pipeline, "Flux2KleinPipeline",
                                  dict(prompt="a red ball", height=32, width=32, num_inference_steps=4,
                                       guidance_scale=4.0, max_sequence_length=16, text_encoder_out_layers=(0, 1, 2)),
                                  False)


def save_hunyuan_video_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``HunyuanVideoPipeline``: two-layer LlamaModel (the pipeline reads hidden state -3) and a CLIPTextModel
    for the pooled projection, byte-level tokenizers for both, HunyuanVideo VAE with 3 levels (time compressed
    by 4, space by 4: 9 frames of 32x32 are 3 latent frames of 8x8), true CFG as two passes."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("HunyuanVideoTransformer3DModel")
    text_hidden = transformer.config.text_embed_dim
    llama = LlamaModel(LlamaConfig(vocab_size=random_models.BYTE_VOCAB_SIZE, hidden_size=text_hidden,
                                   intermediate_size=2 * text_hidden, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=512,
                                   pad_token_id=random_models.BYTE_VOCAB_SIZE - 1)).eval()
    vae = AutoencoderKLHunyuanVideo(latent_channels=transformer.config.in_channels, block_out_channels=(8, 8, 8),
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                    norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4).eval()
    pipe = HunyuanVideoPipeline(text_encoder=llama,
                                tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer", max_length=512),
                                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=random_models.clip_text_encoder(transformer.config.pooled_projection_dim),
                                tokenizer_2=random_models.byte_level_clip_tokenizer(folder / "tokenizer_2"))
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["hunyuan_video"] = (save_hunyuan_video_pipeline, "HunyuanVideoPipeline",
                                          dict(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=9,
                                               height=32, width=32, num_inference_steps=4, true_cfg_scale=2.0,
                                               guidance_scale=6.0, max_sequence_length=16), False)


def _qwen2_5_vl_encoder(hidden: int):
    """A one-layer ``Qwen2_5_VLForConditionalGeneration`` (vision tower one block wide 16; the pipeline never gives
    it an image). Image/video token ids stay out of the byte vocabulary so no text token is taken for an image."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = random_models.BYTE_VOCAB_SIZE
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[2, 3, 3]),  # sums to head_dim / 2 = 8
                         pad_token_id=vocab - 1, bos_token_id=vocab - 2, eos_token_id=vocab - 1),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab + 1, video_token_id=vocab + 2, vision_start_token_id=vocab + 3,
        vision_end_token_id=vocab + 4)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def save_qwenimage_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``QwenImagePipeline``: tiny Qwen2.5-VL text encoder, byte-level tokenizer (the pipeline formats its own
    template, then calls the tokenizer), one-level AutoencoderKLQwenImage (space compressed by 2), true CFG as two
    passes."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("QwenImageTransformer2DModel")
    z = transformer.config.in_channels // 4
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=z, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * z, latents_std=[1.0] * z).eval()
    pipe = QwenImagePipeline(scheduler=random_models.flow_scheduler(), vae=vae,
                             text_encoder=_qwen2_5_vl_encoder(transformer.config.joint_attention_dim),
                             tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer", max_length=2048),
                             transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["qwenimage"] = (save_qwenimage_pipeline, "QwenImagePipeline",
                                      dict(prompt="a red ball", negative_prompt="blurry", height=32, width=32,
                                           num_inference_steps=4, true_cfg_scale=4.0, max_sequence_length=16), False)


# AuraFlow, CogVideoX, Allegro, SkyReels-V2 (UMT5/T5 text encoders, the byte-level tokenizer)


def umt5_text_encoder(d_model: int, layers: int = 1):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=random_models.BYTE_VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=2 * d_model,
                        num_layers=layers, num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                        pad_token_id=random_models.BYTE_VOCAB_SIZE - 1, eos_token_id=random_models.BYTE_VOCAB_SIZE - 1)
    return UMT5EncoderModel(config).eval()


def save_auraflow_pipeline(folder: Path, seed: int = 0) -> Path:
    """An ``AuraFlowPipeline``: UMT5 text encoder (byte-level tokenizer), 4-channel VAE of factor 2, batched CFG."""
    from diffusers import AuraFlowPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("AuraFlowTransformer2DModel")
    pipe = AuraFlowPipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                            text_encoder=umt5_text_encoder(transformer.config.joint_attention_dim),
                            vae=random_models.vae(), transformer=transformer, scheduler=random_models.flow_scheduler())
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["auraflow"] = (save_auraflow_pipeline, "AuraFlowPipeline",
                                     dict(prompt="a red ball", negative_prompt="blurry", height=16, width=16,
                                          num_inference_steps=4, guidance_scale=4.0, max_sequence_length=8), True)


def save_cogvideox_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``CogVideoXPipeline``: CogVideoX VAE compressing time by 4 and space by 4 (9 frames of 32x32: 3 latent
    frames of 8x8), rotary positions, DDIM; CFG is one batch of 2."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    # the pipeline's 3D rotary table splits a head into t/h/w parts of dim/4, 3*dim/8, 3*dim/8, each even
    transformer = transformer_for_pipeline("CogVideoXTransformer3DModel", attention_head_dim=16)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                 latent_channels=transformer.config.in_channels, layers_per_block=1, norm_num_groups=4,
                                 temporal_compression_ratio=4, sample_height=32, sample_width=32).eval()
    pipe = CogVideoXPipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                             text_encoder=random_models.t5_text_encoder(transformer.config.text_embed_dim), vae=vae,
                             transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                                              prediction_type="v_prediction"))
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["cogvideox"] = (save_cogvideox_pipeline, "CogVideoXPipeline",
                                      dict(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=9,
                                           height=32, width=32, num_inference_steps=4, guidance_scale=6.0,
                                           max_sequence_length=8), True)


def save_allegro_pipeline(folder: Path, seed: int = 0) -> Path:
    """An ``AllegroPipeline``. Its VAE decodes only tile by tile (``enable_tiling``, as its docs say), with a tile of
    24 frames and ``sample_size`` pixels: 24 frames of 16x16 (6 latent frames of 8x8) are exactly one tile. Fewer
    than 6 latent frames fit no tile and decode to a constant video (9 frames: every pixel 0.5), which no
    comparison could fail on."""
    from diffusers import AllegroPipeline, AutoencoderKLAllegro, EulerAncestralDiscreteScheduler

    torch.manual_seed(seed)
    folder = Path(folder)
    # the rotary table splits a head into three even parts; cross-attention reads the projected caption (inner dim)
    transformer = transformer_for_pipeline("AllegroTransformer3DModel", sample_frames=6, attention_head_dim=12,
                                           cross_attention_dim=24)
    vae = AutoencoderKLAllegro(down_block_types=("AllegroDownBlock3D",) * 2, up_block_types=("AllegroUpBlock3D",) * 2,
                               block_out_channels=(8, 8), temporal_downsample_blocks=(True, True),
                               temporal_upsample_blocks=(True, True), latent_channels=transformer.config.in_channels,
                               layers_per_block=1, norm_num_groups=4, sample_size=16).eval()
    pipe = AllegroPipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                           text_encoder=random_models.t5_text_encoder(transformer.config.caption_channels), vae=vae,
                           transformer=transformer, scheduler=EulerAncestralDiscreteScheduler())
    pipe.save_pretrained(folder)
    return folder


def _enable_vae_tiling(pipe):
    pipe.vae.enable_tiling()


AFTER_LOAD["allegro"] = _enable_vae_tiling
TRANSFORMER_PIPELINES["allegro"] = (save_allegro_pipeline, "AllegroPipeline",
                                    dict(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=24,
                                         height=16, width=16, num_inference_steps=4, guidance_scale=7.5,
                                         max_sequence_length=8, clean_caption=False), True)


def save_skyreels_v2_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``SkyReelsV2Pipeline``: UMT5 text encoder, a Wan VAE one level shallower than save_wan_pipeline's (time and
    space compressed by 4: 9 frames of 32x32 are 3 latent frames of 8x8, decoded in a third of the time), UniPC; CFG
    as two passes (cache_context "cond"/"uncond")."""
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("SkyReelsV2Transformer3DModel")
    pipe = SkyReelsV2Pipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                              text_encoder=umt5_text_encoder(transformer.config.text_dim),
                              vae=tiny_wan_vae(transformer.config.in_channels),
                              transformer=transformer,
                              scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                                flow_shift=8.0))
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["skyreels_v2"] = (save_skyreels_v2_pipeline, "SkyReelsV2Pipeline",
                                        dict(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=9,
                                             height=32, width=32, num_inference_steps=4, guidance_scale=6.0,
                                             max_sequence_length=8), False)


def save_wan22_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``WanPipeline`` in the Wan 2.2 form: two experts (``transformer`` for t >= 800, ``transformer_2`` below).

    With 4 steps of ``FlowMatchEulerDiscreteScheduler(shift=5)`` (t = 1000, 910, 717, 24) and
    ``boundary_ratio=0.8`` each expert runs two steps, so a 2-stage run with one warm-up step
    has an exact and an asynchronous step on both sides of the switch.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("WanTransformer3DModel")
    transformer_2 = transformer_for_pipeline("WanTransformer3DModel")
    pipe = WanPipeline(tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"),
                       text_encoder=random_models.t5_text_encoder(transformer.config.text_dim),
                       vae=tiny_wan_vae(transformer.config.in_channels),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer,
                       transformer_2=transformer_2, boundary_ratio=0.8)
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["wan22"] = (save_wan22_pipeline, "WanPipeline",
                                  dict(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=9, height=32,
                                       width=32, num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=3.0,
                                       max_sequence_length=16), False)


def save_mochi_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``MochiPipeline``: T5 text encoder, a Mochi VAE of width 32 (its group norms take 32 groups) compressing
    time by 6 and space by 8 (7 frames of 64x64: 2 latent frames of 8x8), batched CFG."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer_for_pipeline("MochiTransformer3DModel", in_channels=12)  # the VAE's 12 latent channels
    vae = AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             layers_per_block=(1,) * 5, add_attention_block=(False,) * 5).eval()
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                         text_encoder=random_models.t5_text_encoder(transformer.config.text_embed_dim),
                         tokenizer=random_models.byte_level_clip_tokenizer(folder / "tokenizer"), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


TRANSFORMER_PIPELINES["mochi"] = (save_mochi_pipeline, "MochiPipeline",
                                  dict(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=7, height=64,
                                       width=64, num_inference_steps=4, guidance_scale=4.5, max_sequence_length=8), True)
