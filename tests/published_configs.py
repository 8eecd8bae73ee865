"""Configs of five published pipelines, as their hub folders state them, for tests that read configs alone.

Each pipeline is a ``model_index.json`` plus one ``config.json`` per model component
(tokenizer and scheduler entries are named in the index but need no files: nothing
that reads configs alone opens them). :func:`write_pipeline` writes a pipeline as the
folder a hub snapshot without weights would be, so ``asyncgen plan --model DIR``
reads it exactly as it would read the hub's. Only the fields that shape the
parameters (and those the loaders need) are given; the rest take the classes'
defaults, which these releases did not change.

``PUBLISHED_PARAMETERS`` are the parameter counts of the released checkpoints (the
number of values in their safetensors files, tied embeddings once).
"""

from __future__ import annotations

import json
from pathlib import Path

# ------------------------------------------------------------------ text encoders


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, projection: int, act: str) -> dict:
    return {"model_type": "clip_text_model", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_attention_heads": heads, "num_hidden_layers": layers, "projection_dim": projection,
            "hidden_act": act, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


CLIP_L = _clip_text(768, 12, 12, 3072, 768, "quick_gelu")  # openai/clip-vit-large-patch14 text tower
OPENCLIP_H = _clip_text(1024, 23, 16, 4096, 512, "gelu")  # SD 2.x: OpenCLIP ViT-H/14 text, last layer dropped
OPENCLIP_BIGG = _clip_text(1280, 32, 20, 5120, 1280, "gelu")  # SDXL/SD3 text_encoder_2: OpenCLIP ViT-bigG/14
T5_XXL = {  # google/t5-v1_1-xxl, the encoder half
    "model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
    "num_decoder_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
    "is_gated_act": True, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
}

# ------------------------------------------------------------------ VAEs


def _vae(latent: int, sample: int, scaling: float, shift: float | None = None, quant: bool = True) -> dict:
    config = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": latent,
              "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
              "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": sample, "scaling_factor": scaling}
    if shift is not None:
        config["shift_factor"] = shift
    if not quant:
        config.update(use_quant_conv=False, use_post_quant_conv=False)
    return config


SD_VAE = _vae(4, 768, 0.18215)
SDXL_VAE = _vae(4, 1024, 0.13025)
SD3_VAE = _vae(16, 1024, 1.5305, 0.0609, quant=False)
FLUX_VAE = _vae(16, 1024, 0.3611, 0.1159, quant=False)

# ------------------------------------------------------------------ denoisers

SD21_UNET = {  # stabilityai/stable-diffusion-2-1 unet/config.json
    "_class_name": "UNet2DConditionModel", "sample_size": 96, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "upcast_attention": True,
    "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
}
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "flip_sin_to_cos": True,
    "freq_shift": 0, "act_fn": "silu",
}
SD3_TRANSFORMER = {  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
    "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
FLUX_TRANSFORMER = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
PIXART_SIGMA_TRANSFORMER = {  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
    "_class_name": "PixArtTransformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 4,
    "out_channels": 8, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
    "cross_attention_dim": 1152, "caption_channels": 4096, "activation_fn": "gelu-approximate",
    "attention_bias": True, "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "num_embeds_ada_norm": 1000, "interpolation_scale": 2, "use_additional_conditions": False,
    "upcast_attention": False, "dropout": 0.0,
}

# ------------------------------------------------------------------ pipelines

_T = "transformers"
PIPELINES: dict[str, dict] = {
    "sd2.1": {
        "model_index": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                        "text_encoder": [_T, "CLIPTextModel"], "tokenizer": [_T, "CLIPTokenizer"],
                        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
                        "safety_checker": [None, None], "feature_extractor": [_T, "CLIPImageProcessor"],
                        "requires_safety_checker": False},
        "unet": SD21_UNET, "text_encoder": OPENCLIP_H, "vae": SD_VAE,
    },
    "sdxl": {
        "model_index": {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                        "text_encoder": [_T, "CLIPTextModel"], "text_encoder_2": [_T, "CLIPTextModelWithProjection"],
                        "tokenizer": [_T, "CLIPTokenizer"], "tokenizer_2": [_T, "CLIPTokenizer"],
                        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]},
        "unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG, "vae": SDXL_VAE,
    },
    "sd3-medium": {
        "model_index": {"_class_name": "StableDiffusion3Pipeline",
                        "transformer": ["diffusers", "SD3Transformer2DModel"],
                        "text_encoder": [_T, "CLIPTextModelWithProjection"],
                        "text_encoder_2": [_T, "CLIPTextModelWithProjection"], "text_encoder_3": [_T, "T5EncoderModel"],
                        "tokenizer": [_T, "CLIPTokenizer"], "tokenizer_2": [_T, "CLIPTokenizer"],
                        "tokenizer_3": [_T, "T5TokenizerFast"], "vae": ["diffusers", "AutoencoderKL"],
                        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
        "transformer": SD3_TRANSFORMER, "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG,
        "text_encoder_3": T5_XXL, "vae": SD3_VAE,
    },
    "flux.1-dev": {
        "model_index": {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
                        "text_encoder": [_T, "CLIPTextModel"], "text_encoder_2": [_T, "T5EncoderModel"],
                        "tokenizer": [_T, "CLIPTokenizer"], "tokenizer_2": [_T, "T5TokenizerFast"],
                        "vae": ["diffusers", "AutoencoderKL"],
                        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
        "transformer": FLUX_TRANSFORMER, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL, "vae": FLUX_VAE,
    },
    "pixart-sigma": {
        "model_index": {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
                        "text_encoder": [_T, "T5EncoderModel"], "tokenizer": [_T, "T5Tokenizer"],
                        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]},
        "transformer": PIXART_SIGMA_TRANSFORMER, "text_encoder": T5_XXL, "vae": SDXL_VAE,
    },
}

# parameter counts of the released checkpoints, per component
PUBLISHED_PARAMETERS: dict[str, dict[str, int]] = {
    "sd2.1": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
             "vae": 83_653_863},
    "sd3-medium": {"transformer": 2_028_328_000, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                   "text_encoder_3": 4_762_310_656, "vae": 83_819_683},
    "flux.1-dev": {"transformer": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
                   "vae": 83_819_683},
    "pixart-sigma": {"transformer": 610_856_096, "text_encoder": 4_762_310_656, "vae": 83_653_863},
}


def write_pipeline(name: str, folder: Path) -> Path:
    """Write pipeline ``name`` as config files only (a hub snapshot without weights); returns its folder."""
    spec = PIPELINES[name]
    root = Path(folder) / name
    root.mkdir(parents=True, exist_ok=True)
    index = dict(spec["model_index"], _diffusers_version="0.30.0")
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    for component, config in spec.items():
        if component == "model_index":
            continue
        (root / component).mkdir(exist_ok=True)
        (root / component / "config.json").write_text(json.dumps(config, indent=2))
    return root
