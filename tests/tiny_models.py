"""Tiny diffusers pipelines built from configs (random weights), saved and loaded back.

Shared by the fixtures in ``conftest.py`` and by the worker processes of distributed
tests, which load the saved folders with ``from_pretrained`` like a user would.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from asyncgen.evaluation import synthetic

CROSS_DIM = 32


def _text_encoder(projection: bool = False):
    return synthetic.clip_text_encoder(CROSS_DIM, projection=projection)


def _tokenizer(folder: Path):
    return synthetic.byte_level_clip_tokenizer(folder / "_tok")


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
    return synthetic.save_sd_pipeline(folder / "sd", sd_unet(), text_hidden=CROSS_DIM, seed=seed)


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder)
    pipe = StableDiffusionXLPipeline(
        unet=sdxl_unet(), vae=synthetic.vae(), text_encoder=_text_encoder(), text_encoder_2=_text_encoder(projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=synthetic.ddim_scheduler(),
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
DIT_FAMILIES = {
    "sd3": (synthetic.save_sd3_pipeline, "StableDiffusion3Pipeline", {}, dict(height=32, width=32)),
    "pixart": (synthetic.save_pixart_pipeline, "PixArtAlphaPipeline", {},
               dict(height=32, width=32, use_resolution_binning=False, max_sequence_length=16)),
    "flux": (synthetic.save_flux_pipeline, "FluxPipeline", {}, dict(height=32, width=32, max_sequence_length=16)),
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
    builders = {"sd3": synthetic.sd3_transformer, "pixart": synthetic.pixart_transformer,
                "flux": synthetic.flux_transformer}
    return builders[family]()
