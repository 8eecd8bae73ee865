"""The built-in miniature text-to-image model: the default of ``asyncgen generate``.

The package ships a complete miniature Stable Diffusion trained on a synthetic shapes
data set (``python -m asyncgen.evaluation.train_miniature``): 32x32 pictures of one
shape on a background, made from captions like "a large red circle on a blue
background". It loads offline with the stock pipeline::

    from diffusers import StableDiffusionPipeline
    from asyncgen.pipelines.miniature import MINIATURE_SD_PATH
    pipe = StableDiffusionPipeline.from_pretrained(MINIATURE_SD_PATH)

``MINIATURE_CLIP_PATH`` is the CLIP it was trained with (for CLIP scores).
"""

from __future__ import annotations

from pathlib import Path

MINIATURE_WEIGHTS = Path(__file__).resolve().parent / "miniature_weights"
MINIATURE_SD_PATH = MINIATURE_WEIGHTS / "sd"
MINIATURE_CLIP_PATH = MINIATURE_WEIGHTS / "clip"
#: the call arguments the model was trained and measured with
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


def _checked(folder: Path, marker: str) -> Path:
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"the miniature model is missing from {folder} (no {marker}); train it with "
                                f"`python -m asyncgen.evaluation.train_miniature --out {MINIATURE_WEIGHTS}`")
    return folder


def miniature_sd_path() -> Path:
    """Folder of the shipped miniature ``StableDiffusionPipeline``."""
    return _checked(MINIATURE_SD_PATH, "model_index.json")


def miniature_clip_path() -> Path:
    """Folder of the shipped miniature ``CLIPModel`` and its ``CLIPProcessor``."""
    return _checked(MINIATURE_CLIP_PATH, "config.json")


def load_miniature(device: str = "cpu", torch_dtype=None):
    """The shipped miniature model as a stock ``StableDiffusionPipeline`` (no network needed)."""
    from diffusers import StableDiffusionPipeline

    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(miniature_sd_path(), **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
