"""CLIP score of (image, prompt) pairs: ``100 * max(cos(image embedding, text embedding), 0)``.

The model is the user's choice:

- ``ClipScorer.from_transformers(path_or_hub_id)``: a transformers ``CLIPModel`` with its
  processor (a local folder, or a hub id already in the local cache when offline);
- ``ClipScorer.from_open_clip(architecture, pretrained)``: an open_clip model (the
  optional ``open-clip-torch`` package, ``pip install 'asyncgen[clip]'``); ``pretrained``
  is a local ``.safetensors`` file, a pickle checkpoint when ``allow_pickle=True``, or
  one of open_clip's pretrained tags;
- ``ClipScorer.miniature()``: the CLIP trained with the built-in miniature model.

Images are PIL images, ``(H, W, 3)`` uint8 arrays, float arrays in [0, 1], or a
``(n, H, W, 3)`` batch of those; they are embedded in batches on the chosen device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asyncgen.pipelines.loading import looks_like_local_path

from .checkpoints import PICKLE_SUFFIXES, load_state_dict


def images_to_uint8(images) -> list[np.ndarray]:
    """A list of ``(H, W, 3)`` uint8 arrays from PIL images, uint8 arrays or [0, 1] float arrays."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, torch.Tensor):
        raise TypeError("pass images as PIL images or (H, W, 3) numpy arrays, not a torch tensor")
    out = []
    for i, image in enumerate(images):
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"image {i} has shape {array.shape}; expected (H, W, 3) RGB")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
                raise ValueError(f"image {i}: non-uint8 images must be floats in [0, 1] "
                                 f"(got {array.dtype} in [{array.min()}, {array.max()}])")
            array = np.rint(array * 255).astype(np.uint8)
        out.append(array)
    return out


def _check_pair_counts(images, prompts) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; CLIP score needs one prompt per image")
    if len(images) == 0:
        raise ValueError("no images given; CLIP score needs at least one (image, prompt) pair")


class ClipScorer:
    """Embeds images and prompts with one CLIP model and scores their pairs."""

    def __init__(self, embed_images, embed_texts, name: str, device: str | torch.device, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self._embed_images, self._embed_texts = embed_images, embed_texts
        self.name, self.device, self.batch_size = name, torch.device(device), batch_size

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_transformers(cls, model: str | os.PathLike, device: str = "cpu", batch_size: int = 64,
                          dtype: torch.dtype | None = None) -> "ClipScorer":
        """A transformers ``CLIPModel`` and its processor from a local folder or a hub id."""
        from transformers import AutoProcessor, CLIPModel

        name = os.fspath(model)
        if looks_like_local_path(name):
            folder = Path(name).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"CLIP model folder {folder} does not exist; pass a folder holding a "
                                        "transformers CLIPModel (config.json, weights, processor files) or a hub id")
            name = str(folder)
        try:
            clip = CLIPModel.from_pretrained(name, torch_dtype=dtype) if dtype else CLIPModel.from_pretrained(name)
            processor = AutoProcessor.from_pretrained(name)
        except OSError as error:
            raise OSError(f"could not load a transformers CLIP from {name!r}: not a local folder with a CLIPModel, and "
                          f"not loadable as a hub id here (offline runs need it in the local cache). {error}") from error
        clip = clip.eval().to(device)
        text_length = min(processor.tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)

        def features(output) -> torch.Tensor:
            # transformers 5 returns a model output whose pooler_output is the projected embedding
            return output if isinstance(output, torch.Tensor) else output.pooler_output

        def embed_images(arrays: list[np.ndarray]) -> torch.Tensor:
            pixels = processor(images=arrays, return_tensors="pt")["pixel_values"]
            return features(clip.get_image_features(pixel_values=pixels.to(device, clip.dtype)))

        def embed_texts(prompts: list[str]) -> torch.Tensor:
            tokens = processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=text_length,
                                         return_tensors="pt").to(device)
            return features(clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))

        return cls(embed_images, embed_texts, f"transformers:{name}", device, batch_size)

    @classmethod
    def from_open_clip(cls, architecture: str, pretrained: str | os.PathLike, device: str = "cpu",
                       batch_size: int = 64, allow_pickle: bool = False) -> "ClipScorer":
        """An open_clip model: ``architecture`` (e.g. ``"ViT-B-32"``) with ``pretrained`` weights.

        ``pretrained``: a local ``.safetensors`` state dict; a pickle checkpoint (.pt, .pth,
        .bin, .ckpt) only with ``allow_pickle=True`` (read with ``torch.load(weights_only=True)``);
        or an open_clip pretrained tag (loaded through open_clip's own cache).
        """
        try:
            import open_clip
        except ImportError as error:
            raise ImportError("open_clip models need the optional open-clip-torch package: "
                              "pip install 'asyncgen[clip]'") from error
        if architecture not in open_clip.list_models():
            raise ValueError(f"architecture={architecture!r} is not an open_clip model; known: {open_clip.list_models()}")
        name = os.fspath(pretrained)
        if looks_like_local_path(name) or name.endswith((".safetensors",) + PICKLE_SUFFIXES):
            state = load_state_dict(name, allow_pickle, what="open_clip checkpoint")
            model, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=None)
            model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        else:
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=name)
            except Exception as error:  # open_clip raises RuntimeError/OSError/HF errors for unknown or absent tags
                raise RuntimeError(f"could not load open_clip {architecture} with pretrained={name!r} "
                                   f"(an unknown tag, or weights not in the local cache when offline): {error}") from error
        model = model.eval().to(device)
        tokenizer = open_clip.get_tokenizer(architecture)

        def embed_images(arrays: list[np.ndarray]) -> torch.Tensor:
            from PIL import Image

            pixels = torch.stack([preprocess(Image.fromarray(a)) for a in arrays]).to(device)
            return model.encode_image(pixels)

        def embed_texts(prompts: list[str]) -> torch.Tensor:
            return model.encode_text(tokenizer(prompts).to(device))

        return cls(embed_images, embed_texts, f"open_clip:{architecture}:{Path(name).name}", device, batch_size)

    @classmethod
    def miniature(cls, device: str = "cpu", batch_size: int = 64) -> "ClipScorer":
        """The CLIP trained with the built-in miniature text-to-image model."""
        from asyncgen.pipelines.miniature import miniature_clip_path

        return cls.from_transformers(miniature_clip_path(), device=device, batch_size=batch_size)

    # ------------------------------------------------------------ embedding and scoring

    def _batched(self, embed, items: list) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([embed(items[i:i + self.batch_size]).float().cpu() for i in range(0, len(items), self.batch_size)])

    def embed_images(self, images, normalize: bool = True) -> torch.Tensor:
        embeddings = self._batched(self._embed_images, images_to_uint8(images))
        return torch.nn.functional.normalize(embeddings, dim=-1) if normalize else embeddings

    def embed_texts(self, prompts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        prompts = list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings; got {bad[:3]}")
        embeddings = self._batched(self._embed_texts, prompts)
        return torch.nn.functional.normalize(embeddings, dim=-1) if normalize else embeddings

    def similarity(self, images, prompts: Sequence[str]) -> np.ndarray:
        """CLIP scores of every image (rows) against every prompt (columns)."""
        cos = self.embed_images(images) @ self.embed_texts(prompts).T
        return (100 * cos.clamp(min=0)).double().numpy()

    def scores(self, images, prompts: Sequence[str]) -> np.ndarray:
        """The CLIP score of each (image, prompt) pair, in order."""
        arrays = images_to_uint8(images)
        _check_pair_counts(arrays, prompts)
        cos = (self.embed_images(arrays) * self.embed_texts(prompts)).sum(dim=-1)
        return (100 * cos.clamp(min=0)).double().numpy()

    def score(self, images, prompts: Sequence[str]) -> float:
        """The mean CLIP score over (image, prompt) pairs."""
        return float(self.scores(images, prompts).mean())
