"""Loading a diffusers pipeline from a hub id or a local folder."""

from __future__ import annotations

import json
import os
from pathlib import Path


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


def load_pipeline(model: str, pipeline_class=None, dtype=None, **kwargs):
    """``DiffusionPipeline.from_pretrained`` that also loads folders saved with optional components left out.

    A pipeline saved with, say, ``text_encoder_3=None`` (SD3 without T5) records that
    component as ``[null, null]``, and ``from_pretrained`` then insists on being handed
    it; this passes ``None`` for such components unless the caller gives them.
    ``pipeline_class`` (default ``DiffusionPipeline``, which picks the saved class) loads
    the same folder as another pipeline, e.g. ``StableDiffusionImg2ImgPipeline``.
    ``dtype`` (a ``torch.dtype``) is passed under the name this diffusers release expects.
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
    return (pipeline_class or DiffusionPipeline).from_pretrained(model, **kwargs)
