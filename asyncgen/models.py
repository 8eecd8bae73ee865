"""The facts about diffusers pipelines and models that asyncgen relies on, written once.

Which pipeline attributes hold a denoiser, a second expert or a placeable component;
which dtypes a user may name and how the safetensors format and our wire name them;
the batch a denoiser sees per prompt (the classifier-free-guidance rule); the size a
pipeline's height and width must be a multiple of. Every other module asks here rather
than spelling a fact again. Nothing here loads weights or talks to other ranks.
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------- pipeline attributes

# the attribute holding the denoiser asyncgen splits, in the order they are looked for
DENOISER_COMPONENTS = ("unet", "transformer")
# second denoisers a pipeline switches to during a call (Wan 2.2's low-noise expert): staged like the first
EXPERT_COMPONENTS = ("transformer_2",)
# components the memory planner can place on one rank (or layer ranges of several) and proxy on the others;
# any other model component (a ControlNet, an image encoder) stays whole on every rank
PLACEABLE_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")

# --------------------------------------------------------------------------- dtypes

# every name a user may give for a dtype (``dtype=`` arguments, ``--dtype``), lower case, "torch." prefix optional
DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

# the dtype names of the safetensors file format (its header's "dtype" field)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                                      ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}

# the dtypes a boundary state may travel in, by wire code (a code is its index: append only, never reorder)
WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"``/``"fp16"``/``"half"``, ``"bfloat16"``/``"bf16"``, ``"float32"``/``"fp32"`` or a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_ALIASES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(set(map(str, DTYPE_ALIASES.values())))}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_ALIASES:
        return DTYPE_ALIASES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_ALIASES)}")


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name of a dtype or alias: ``"bf16"`` -> ``"bfloat16"``."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")

# --------------------------------------------------------------------------- classifier-free guidance


def is_guidance_distilled(denoiser) -> bool:
    """A denoiser that takes the guidance scale as an input (Flux-dev: ``guidance_embeds``) gets no CFG batch."""
    config = getattr(denoiser, "config", None)
    return bool(config.get("guidance_embeds", False) if isinstance(config, dict) else
                getattr(config, "guidance_embeds", False))


def denoiser_batch(denoiser) -> int:
    """The denoiser's batch per prompt: 2 with classifier-free guidance ([uncond, cond]), 1 when guidance-distilled."""
    return 1 if is_guidance_distilled(denoiser) else 2


def check_cfg_parallel(denoiser, pipeline_name: str, remedy: str = "use cfg_parallel=False") -> None:
    """CFG parallelism splits the [uncond, cond] batch: a guidance-distilled denoiser has no such batch."""
    if is_guidance_distilled(denoiser):
        raise ValueError(
            f"cfg_parallel: {type(denoiser).__name__} is guidance-distilled (guidance_embeds=True): "
            f"{pipeline_name} makes no unconditional pass to split off; {remedy}"
        )

# --------------------------------------------------------------------------- sizes


def size_multiple(vae_factor: int, patch: int) -> int:
    """What a pipeline's height and width must be a multiple of: the VAE's factor times the denoiser's patch.

    diffusers' SD-family pipelines refuse sizes that are not multiples of 8 whatever the
    VAE's factor, hence the least common multiple with 8.
    """
    return math.lcm(8, vae_factor) * patch
