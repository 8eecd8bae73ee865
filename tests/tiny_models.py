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
