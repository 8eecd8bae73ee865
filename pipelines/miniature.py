"""The built-in miniature text-to-image models: the default of ``asyncgen generate``.

The package ships a complete miniature Stable Diffusion trained on a synthetic shapes
data set (``python -m asyncgen.evaluation.train_miniature``): 32x32 pictures of one
shape on a background, made from captions like "a large red circle on a blue
background". It loads offline with the stock pipeline::

    from diffusers import StableDiffusionPipeline
    from asyncgen.pipelines.miniature import MINIATURE_SD_PATH
    pipe = StableDiffusionPipeline.from_pretrained(MINIATURE_SD_PATH)

``MINIATURE_CLIP_PATH`` is the CLIP it was trained with (for CLIP scores).

Beside it ships a miniature diffusion transformer, a ``StableDiffusion3Pipeline``
(``train_miniature --arch dit``) whose transformer was trained on the same data with
the UNet model's frozen text tower, tokenizer and VAE: ``MINIATURE_DIT_PATH``, loaded by
:func:`load_miniature_dit`. The CLI names the two ``miniature`` and ``miniature-dit``
(:data:`BUILTIN_MODELS`).
"""

from __future__ import annotations

from pathlib import Path

MINIATURE_WEIGHTS = Path(__file__).resolve().parent / "miniature_weights"
MINIATURE_SD_PATH = MINIATURE_WEIGHTS / "sd"
MINIATURE_CLIP_PATH = MINIATURE_WEIGHTS / "clip"
MINIATURE_DIT_PATH = MINIATURE_WEIGHTS / "dit"
#: the call arguments the model was trained and measured with
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


def _checked(folder: Path, marker: str, arch: str = "") -> Path:
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"the miniature model is missing from {folder} (no {marker}); train it with "
                                f"`python -m asyncgen.evaluation.train_miniature {arch}--out {MINIATURE_WEIGHTS}`")
    return folder


def miniature_sd_path() -> Path:
    """Folder of the shipped miniature ``StableDiffusionPipeline``."""
    return _checked(MINIATURE_SD_PATH, "model_index.json")


def miniature_dit_path() -> Path:
    """Folder of the shipped miniature transformer, a ``StableDiffusion3Pipeline`` without T5."""
    return _checked(MINIATURE_DIT_PATH, "model_index.json", "--arch dit ")


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


def load_miniature_dit(device: str = "cpu", torch_dtype=None):
    """The shipped miniature transformer as a stock ``StableDiffusion3Pipeline`` (no network needed)."""
    from diffusers import StableDiffusion3Pipeline

    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    # saved without T5: from_pretrained wants the absent components named
    pipe = StableDiffusion3Pipeline.from_pretrained(miniature_dit_path(), text_encoder_3=None, tokenizer_3=None,
                                                    **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: the built-in models' names on the command line (``--model NAME``), each with the function giving its folder
BUILTIN_MODELS = {"miniature": miniature_sd_path, "miniature-dit": miniature_dit_path}
DEFAULT_BUILTIN = "miniature"


def builtin_model_names() -> str:
    """The built-in names as help and error texts list them: "miniature, miniature-dit"."""
    return ", ".join(BUILTIN_MODELS)


def resolve_model(name: str | None) -> tuple[str, bool]:
    """``(folder or hub id, whether it is a built-in model)`` for a ``--model`` value.

    ``None`` is the default built-in model; a built-in name is its shipped folder; anything
    else (a hub id or a folder) is returned as given, for the loader to judge. A built-in name
    wins over a folder of the same name in the working directory; ``./miniature`` names the folder.
    """
    if name is None:
        name = DEFAULT_BUILTIN
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name]()), True
    return name, False
