"""Stable Diffusion pipelines built from configs with random weights.

For benchmarks and tests on machines that cannot download weights: the architecture,
the loading code and the compute are real; only the weights are random (so images are
noise-like). Everything is saved in diffusers format and meant to be loaded back with
``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def clip_byte_alphabet() -> list[str]:
    """The 256 symbols CLIP's byte-level BPE maps bytes to (GPT-2's bytes_to_unicode), in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _clip_byte_vocab() -> dict[str, int]:
    chars = clip_byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


BYTE_VOCAB_SIZE = 514  # 2 * 256 symbols + start and end tokens


def byte_level_clip_tokenizer(folder: Path, max_length: int = 77):
    """A ``CLIPTokenizer`` with no merges (one token per byte), saved in ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_clip_byte_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def clip_text_encoder(hidden: int, layers: int = 2, projection: bool = False, max_length: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=hidden,
        bos_token_id=BYTE_VOCAB_SIZE - 2, eos_token_id=BYTE_VOCAB_SIZE - 1, pad_token_id=BYTE_VOCAB_SIZE - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def vae(block_out_channels=(8, 16)):
    """An ``AutoencoderKL``; its downscaling factor is ``2 ** (len(block_out_channels) - 1)``."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        block_out_channels=tuple(block_out_channels), in_channels=3, out_channels=3, latent_channels=4,
        norm_num_groups=min(block_out_channels) // 2, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
    ).eval()


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def save_sd_pipeline(folder: Path, unet, text_hidden: int, vae_channels=(8, 16), seed: int = 0) -> Path:
    """Assemble a ``StableDiffusionPipeline`` around ``unet`` and save it to ``folder``."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae(vae_channels), text_encoder=clip_text_encoder(text_hidden),
        tokenizer=byte_level_clip_tokenizer(folder / "tokenizer"), scheduler=ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def bench_unet(cross_attention_dim: int = 256):
    """The SD-architecture UNet the AsyncDiff benchmark times (about 35M parameters).

    SD 1.5's layout (three cross-attention levels, then a plain one, two resnets per
    level, 8 attention heads) at a quarter of its width, so that one CPU thread spends
    tens of milliseconds per step on 8x8 latents and compute dominates communication.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def save_bench_pipeline(folder: Path, seed: int = 0) -> Path:
    """The benchmark's SD pipeline: 64x64 images, 8x8 latents (VAE factor 8)."""
    torch.manual_seed(seed)
    return save_sd_pipeline(folder, bench_unet(256), text_hidden=256, vae_channels=(16, 16, 32, 32), seed=seed)


def t5_text_encoder(d_model: int, layers: int = 1):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=BYTE_VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
                      num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                      pad_token_id=BYTE_VOCAB_SIZE - 1, eos_token_id=BYTE_VOCAB_SIZE - 1)
    return T5EncoderModel(config).eval()


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def flow_vae(latent_channels: int, block_out_channels=(8, 16)):
    # SD3 and Flux VAEs shift and scale their latents; the pipelines read both from the config
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        block_out_channels=tuple(block_out_channels), in_channels=3, out_channels=3, latent_channels=latent_channels,
        norm_num_groups=min(block_out_channels) // 2, layers_per_block=1, shift_factor=0.06, scaling_factor=1.5,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def sd3_transformer(text_hidden: int = 32, **overrides):
    """A tiny ``SD3Transformer2DModel``; its text dims fit two CLIP encoders of width ``text_hidden``."""
    from diffusers import SD3Transformer2DModel

    config = dict(sample_size=8, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                  joint_attention_dim=2 * text_hidden, caption_projection_dim=32, pooled_projection_dim=2 * text_hidden,
                  out_channels=4)
    return SD3Transformer2DModel(**{**config, **overrides}).eval()


def save_sd3_pipeline(folder: Path, transformer=None, text_hidden: int = 32, seed: int = 0) -> Path:
    """A ``StableDiffusion3Pipeline`` with two CLIP text encoders and no T5 (the pipeline allows that)."""
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    transformer = transformer if transformer is not None else sd3_transformer(text_hidden)
    tokenizer = byte_level_clip_tokenizer(folder / "tokenizer")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(), vae=flow_vae(transformer.config.in_channels),
        text_encoder=clip_text_encoder(text_hidden, projection=True), tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(text_hidden, projection=True), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(folder)
    return folder


def save_bench_sd3_pipeline(folder: Path, seed: int = 0) -> Path:
    """The transformer benchmark's SD3 pipeline: 8 joint blocks of width 384 (41M parameters).

    128x128 images, VAE factor 8, 2x2 patches: 64 image tokens plus 77 text tokens per
    sample, so that one CPU thread spends tens of milliseconds per block pair and compute
    dominates communication.
    """
    torch.manual_seed(seed)
    transformer = sd3_transformer(32, num_layers=8, num_attention_heads=6, attention_head_dim=64,
                                  caption_projection_dim=384, patch_size=2, sample_size=16)
    folder = Path(folder)
    pipe_folder = save_sd3_pipeline(folder, transformer=transformer, seed=seed)
    # swap in a VAE of factor 8 so that 128x128 images have 16x16 latents
    from diffusers import AutoencoderKL

    flow_vae(4, (16, 16, 32, 32)).save_pretrained(pipe_folder / "vae")
    AutoencoderKL.from_pretrained(pipe_folder / "vae")  # fail here, not in the benchmark, if it does not load
    return pipe_folder


def save_bench_wan_pipeline(folder: Path, seed: int = 0) -> Path:
    """The video benchmark's ``WanPipeline``: a Wan-architecture transformer, 8 blocks of width 384 (about 24M
    parameters), and a small Wan VAE (time compressed by 4, space by 8).

    The benchmark's 9 frames of 192x192 are 3 latent frames of 24x24; with 1x2x2 patches that is 432 video tokens
    per sample, so one CPU thread spends about 50 ms per block and compute dominates communication and the per-pass bookkeeping.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    folder = Path(folder)
    text_dim, channels = 64, 16
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=64, in_channels=channels,
        out_channels=channels, text_dim=text_dim, freq_dim=256, ffn_dim=1536, num_layers=8, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024).eval()
    vae = AutoencoderKLWan(base_dim=4, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=byte_level_clip_tokenizer(folder / "tokenizer"),
                       text_encoder=t5_text_encoder(text_dim), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def save_bench_flux_pipeline(folder: Path, seed: int = 0) -> Path:
    """The Flux benchmark's ``FluxPipeline`` (guidance-distilled, Flux-dev style): a ``FluxTransformer2DModel`` of
    4 double-stream and 8 single-stream blocks of width 384 (about 40M parameters), a CLIP and a T5 text encoder of
    width 64, and a VAE of factor 8 with 16 latent channels.

    256x256 images are 32x32 latents, packed 2x2 into 256 image tokens, beside 32 text tokens
    (``max_sequence_length=32``): one pass per step (the guidance is an embedded input, not a second pass). Both
    token counts divide by 2 and 4, so diffusers' context parallelism can shard them at those degrees; one CPU
    thread spends tens of milliseconds per block, so compute dominates communication as in the other bench models.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    folder = Path(folder)
    text_hidden = 64
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=6,
        joint_attention_dim=text_hidden, pooled_projection_dim=text_hidden, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24)).eval()
    tokenizer = byte_level_clip_tokenizer(folder / "tokenizer")
    pipe = FluxPipeline(
        scheduler=flow_scheduler(), vae=flow_vae(16, (16, 16, 32, 32)),
        text_encoder=clip_text_encoder(text_hidden), tokenizer=tokenizer,
        text_encoder_2=t5_text_encoder(text_hidden), tokenizer_2=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
