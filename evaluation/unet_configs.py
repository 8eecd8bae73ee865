"""The published UNet configs the GPU check and the benchmarks build random-weight models from.

SD2.1's and SDXL's ``unet/config.json`` as published (no weights needed), and a tiny
variant of any of them for CPU runs that keeps every block type.
"""

from __future__ import annotations

import copy

# stabilityai/stable-diffusion-2-1, unet/config.json (865M parameters, 768x768 images).
# attention_head_dim is, by a historical naming slip, the number of heads per level.
SD21_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, num_class_embeds=None,
    only_cross_attention=False, out_channels=4, sample_size=96,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    upcast_attention=True, use_linear_projection=True,
)


# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.57B parameters, 1024x1024 images).
# projection_class_embeddings_input_dim = 1280 (pooled text) + 6 * 256 (size/crop ids).
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5, norm_num_groups=32, num_attention_heads=None,
    num_class_embeds=None, only_cross_attention=False, out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, resnet_time_scale_shift="default", sample_size=128,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True,
)


MODELS = {"sd21": ("SD2.1 UNet", SD21_UNET), "sdxl": ("SDXL UNet", SDXL_UNET)}


def tiny_config(config: dict) -> dict:
    """The same architecture (block types, head layout, embeddings, depth pattern) at toy width.

    Widths shrink 10x-20x, heads to at most 4, transformer depth to at most 2 and the
    latent to 8x8, so a CPU runs every part of the check in seconds while the code
    paths (linear projections, text_time embeddings, per-level depths) stay the real ones.
    """
    config = copy.deepcopy(config)
    levels = len(config["block_out_channels"])
    config["block_out_channels"] = [16 * min(2**i, 4) for i in range(levels)]
    config["attention_head_dim"] = [min(2 * 2**i, 4) for i in range(levels)]  # heads per level, 8-16 wide
    config["norm_num_groups"] = 8
    config["cross_attention_dim"] = 32
    config["sample_size"] = 8
    if isinstance(config.get("transformer_layers_per_block"), list):
        config["transformer_layers_per_block"] = [min(d, 2) for d in config["transformer_layers_per_block"]]
    if config.get("addition_embed_type") == "text_time":
        config["addition_time_embed_dim"] = 8
        config["projection_class_embeddings_input_dim"] = 32 + 6 * 8  # pooled text 32 + six size/crop ids
    return config
