"""Distances between two sets of images: Fréchet distance and KID, over encoder features.

The features come from an image encoder chosen by the user: torchvision's Inception-v3
(pool features, 2048-d) when its weights are on this machine, otherwise the image
tower of a CLIP model (its projected embedding). The Fréchet distance is FID only over
Inception features, so ``set_metrics`` reports it under the encoder's ``frechet_key``:
``"fid"`` for Inception, ``"fd_clip"`` for CLIP. Values over different encoders are not
comparable, and torchvision's Inception is not the TensorFlow graph published FIDs use,
so report the encoder next to the numbers (``set_metrics`` does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .checkpoints import load_state_dict


def _features(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (n, d) array of features, got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"{name} has {len(x)} rows; need at least 2 samples")
    return x


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``; the trace of the matrix square
    root is taken as that of ``(S_a^(1/2) S_b S_a^(1/2))^(1/2)``, which has the same
    eigenvalues and is symmetric, so it needs only symmetric eigendecompositions.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
    return max(value, 0.0)  # rounding can leave a tiny negative for identical sets


def kernel_inception_distance(features_a, features_b, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD² with the kernel ``(x·y / d + 1)^3``.

    Averaged over ``subsets`` random subsets of ``min(subset_size, n_a, n_b)`` samples
    from each set; returns (mean, standard deviation over subsets). Unbiased, so it can
    be slightly negative for sets from the same distribution.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got subsets={subsets}, subset_size={subset_size}")
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


class ClipImageEncoder:
    """Features from a transformers CLIP image tower (its projected image embedding)."""

    frechet_key = "fd_clip"  # a Fréchet distance, but not FID: that name means Inception features

    def __init__(self, model: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64):
        from .clip_score import ClipScorer

        self.scorer = ClipScorer.from_transformers(model, device=device, batch_size=batch_size) if model is not None \
            else ClipScorer.miniature(device=device, batch_size=batch_size)
        self.name = f"clip:{self.scorer.name}"

    def __call__(self, images: Sequence) -> np.ndarray:
        return self.scorer.embed_images(images, normalize=False).cpu().double().numpy()


class InceptionEncoder:
    """2048-d pool features of torchvision's Inception-v3, from a local weights file.

    ``weights``: a ``.safetensors`` state dict, or a pickle checkpoint (``.pth``/``.pt``)
    only with ``allow_pickle=True`` (read with ``torch.load(weights_only=True)``).
    Images are resized to 299x299 and normalised with ImageNet statistics.
    """

    frechet_key = "fid"

    def __init__(self, weights: str | os.PathLike, device: str = "cpu", batch_size: int = 32, allow_pickle: bool = False):
        import torch

        try:
            from torchvision.models import inception_v3
        except ImportError as error:
            raise ImportError("the Inception encoder needs torchvision (`pip install torchvision`)") from error
        state = load_state_dict(weights, allow_pickle, what="Inception weights")
        model = inception_v3(weights=None, aux_logits=True, init_weights=False)
        model.load_state_dict(state)
        model.fc = torch.nn.Identity()
        self.model, self.device, self.batch_size = model.eval().to(device), device, batch_size
        self.name = f"inception:{Path(weights).name}"

    def __call__(self, images: Sequence) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from .clip_score import images_to_uint8

        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        arrays, out = images_to_uint8(images), []
        with torch.no_grad():
            for i in range(0, len(arrays), self.batch_size):
                x = torch.from_numpy(np.stack(arrays[i:i + self.batch_size])).permute(0, 3, 1, 2).float() / 255
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                out.append(self.model(((x - mean) / std).to(self.device)).cpu().double())
        return torch.cat(out).numpy()


def image_encoder(inception_weights: str | os.PathLike | None = None, clip_model: str | os.PathLike | None = None,
                  device: str = "cpu", allow_pickle: bool = False):
    """Inception when ``inception_weights`` names a local file and torchvision is installed, else a CLIP image tower.

    ``clip_model``: a transformers CLIP folder or hub id (default: the miniature CLIP).
    The returned encoder's ``.name`` says which one was used; ``.fallback_reason`` why
    Inception was not.
    """
    reason = "no Inception weights given"
    if inception_weights is not None:
        try:
            return InceptionEncoder(inception_weights, device=device, allow_pickle=allow_pickle)
        except ImportError as error:
            reason = str(error)
    encoder = ClipImageEncoder(clip_model, device=device)
    encoder.fallback_reason = reason
    return encoder


def set_metrics(images_a: Sequence, images_b: Sequence, encoder=None, kid_subsets: int = 100,
                kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """Fréchet distance and KID between two image sets over ``encoder``'s features (default: ``image_encoder()``).

    The Fréchet distance is reported under ``encoder.frechet_key``: ``"fid"`` over
    Inception features, ``"fd_clip"`` over CLIP image features, ``"fd"`` for an encoder
    that does not say.
    """
    encoder = encoder if encoder is not None else image_encoder()
    a, b = encoder(images_a), encoder(images_b)
    kid_mean, kid_std = kernel_inception_distance(a, b, kid_subsets, kid_subset_size, seed)
    return {getattr(encoder, "frechet_key", "fd"): frechet_distance(a, b), "kid": kid_mean, "kid_std": kid_std,
            "encoder": encoder.name, "n_a": len(a), "n_b": len(b)}
