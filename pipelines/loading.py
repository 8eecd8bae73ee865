"""Loading a diffusers pipeline from a hub id or a local folder."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

DENOISER_COMPONENTS = ("unet", "transformer")


def looks_like_local_path(name: str) -> bool:
    """A name that can only be a local path (a hub id is ``name`` or ``org/name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or Path(name).exists())


def check_pipeline_location(model: str) -> None:
    """Refuse, with a message naming it, a ``model`` that is neither a pipeline folder nor possibly a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model}: the folder has no model_index.json, so it is not a diffusers pipeline "
                             "folder (save one with pipe.save_pretrained(folder), or give a hub id)")
    elif looks_like_local_path(model):
        raise FileNotFoundError(f"{model}: no such folder (expected a local pipeline folder or a hub id like "
                                "'owner/name')")


def _dtype_argument() -> str:
    """The name ``from_pretrained`` takes a dtype by: ``dtype`` in recent diffusers, ``torch_dtype`` before."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present once `dtype` is accepted)

        return "dtype"
    except ImportError:
        return "torch_dtype"


def load_pipeline(model: str, pipeline_class=None, dtype=None, allow_pickle: bool = False, **kwargs):
    """``DiffusionPipeline.from_pretrained`` that also loads folders saved with optional components left out.

    A pipeline saved with, say, ``text_encoder_3=None`` (SD3 without T5) records that
    component as ``[null, null]``, and ``from_pretrained`` then insists on being handed
    it; this passes ``None`` for such components unless the caller gives them.
    ``pipeline_class`` (default ``DiffusionPipeline``, which picks the saved class) loads
    the same folder as another pipeline, e.g. ``StableDiffusionImg2ImgPipeline``.
    ``dtype`` (a ``torch.dtype``) is passed under the name this diffusers release expects.
    Weights load from safetensors only: a pickle checkpoint (``.bin``) can run code
    when it is read, so it loads only with ``allow_pickle=True``.
    """
    from diffusers import DiffusionPipeline

    check_pipeline_location(str(model))
    index = Path(model) / "model_index.json"
    if index.is_file():
        for name, value in json.loads(index.read_text()).items():
            if not name.startswith("_") and isinstance(value, list) and value == [None, None]:
                kwargs.setdefault(name, None)
    if dtype is not None:
        kwargs[_dtype_argument()] = dtype
    if not allow_pickle:
        kwargs.setdefault("use_safetensors", True)
    try:
        return (pipeline_class or DiffusionPipeline).from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        if not allow_pickle and "safetensors" in str(exc).lower():
            raise PickleRefused(
                f"{model}: no safetensors weights found; it may hold only pickle (.bin) checkpoints, which can run "
                "code when loaded. Pass allow_pickle=True (--allow-pickle) if you trust its source") from exc
        raise


class PickleRefused(OSError):
    """The weights exist only as pickle checkpoints and the caller did not allow pickle."""


@dataclass(frozen=True)
class PipelineFacts:
    """What a pipeline folder's configs say, read without loading any weights."""

    pipeline_class: str
    denoiser_class: str
    splittable_units: int | None  # None: asyncgen cannot split this denoiser class
    native_height: int
    native_width: int
    size_multiple: int  # heights and widths must be multiples of this

    def nearest_sizes(self, value: int) -> str:
        low = max(self.size_multiple, value - value % self.size_multiple)
        high = low + self.size_multiple if low < value else low
        return f"{low}" if low == high else f"{low} or {high}"


def describe_pipeline(model: str) -> PipelineFacts:
    """Read ``model``'s configs (local folder or cached hub id) and split its denoiser on the meta device.

    The launching process checks the request against these facts before it starts any
    worker, so a bad ``--stages`` or size fails in a second instead of after N loads.
    """
    import diffusers
    import torch
    from diffusers import DiffusionPipeline

    check_pipeline_location(str(model))
    index = DiffusionPipeline.load_config(model)
    component = next((c for c in DENOISER_COMPONENTS if isinstance(index.get(c), list) and index[c][1]), None)
    if component is None:
        raise ValueError(f"{model}: the pipeline has no unet or transformer component; asyncgen splits the denoiser "
                         f"of text-to-image pipelines (components: {', '.join(k for k in index if not k.startswith('_'))})")
    class_name = index[component][1]
    model_class = getattr(diffusers, class_name, None)
    if model_class is None:
        raise ValueError(f"{model}: unknown denoiser class {class_name}; this diffusers ({diffusers.__version__}) "
                         "has no such model class")
    config = model_class.load_config(model, subfolder=component)
    with torch.device("meta"):  # structure only: no memory, no weights read
        denoiser = model_class.from_config(config)
    from asyncgen.denoisers import split_denoiser

    try:
        units = len(split_denoiser(denoiser).units)
    except TypeError:
        units = None
    vae_factor, latent_channels = 8, None
    if isinstance(index.get("vae"), list) and index["vae"][1]:
        vae_config = getattr(diffusers, index["vae"][1]).load_config(model, subfolder="vae")
        vae_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        latent_channels = vae_config.get("latent_channels")
    patch = int(config.get("patch_size") or 1)
    in_channels = int(config.get("in_channels") or 0)
    if component == "transformer" and latent_channels and in_channels > latent_channels \
            and in_channels % latent_channels == 0:
        patch *= math.isqrt(in_channels // latent_channels)  # latents packed into patches by the pipeline (Flux)
    # diffusers' SD-family pipelines refuse sizes that are not multiples of 8 whatever the VAE's factor
    multiple = math.lcm(8, vae_factor) * patch
    sample = config.get("sample_size") or 128
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return PipelineFacts(pipeline_class=index.get("_class_name", "DiffusionPipeline"), denoiser_class=class_name,
                         splittable_units=units, native_height=sample_h * vae_factor,
                         native_width=sample_w * vae_factor, size_multiple=multiple)
