"""Tiny CLIP models built from configs (random weights) for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import torch

from asyncgen.evaluation import shapes, train_miniature


def build_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A transformers ``CLIPModel`` with its ``CLIPProcessor``, saved in ``folder``."""
    from transformers import CLIPProcessor

    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer = train_miniature.build_tokenizer(folder, shapes.vocabulary(), max_length=16)
    cfg = train_miniature.QUICK
    clip = train_miniature.clip_model(cfg, tokenizer).eval()
    CLIPProcessor(image_processor=train_miniature.image_processor(image_size), tokenizer=tokenizer).save_pretrained(folder)
    clip.save_pretrained(folder)
    return folder


def ground_truth(n: int, seed: int = 0):
    """``n`` shapes images and their specs."""
    return shapes.ShapesDataset(seed=seed).sample(n)
