"""Fidelity of an image against a reference image of the same seed."""

from __future__ import annotations

import math

import numpy as np


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    image, reference = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if image.shape != reference.shape:
        raise ValueError(f"image shape {image.shape} differs from reference shape {reference.shape}")
    mse = float(np.mean((image - reference) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _as_float_image(image, name: str) -> np.ndarray:
    """uint8 images become floats in [0, 1]; float images are taken as they are."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 or floating point, got dtype {array.dtype}")
    return array.astype(np.float64)


def _gaussian_filter_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable filtering of the first two axes, keeping only positions where the window fits."""
    k = len(kernel)
    rows = np.lib.stride_tricks.sliding_window_view(x, k, axis=0) @ kernel
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1) @ kernel


def ssim(image, reference, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004): 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03.

    ``image`` and ``reference``: ``(H, W)`` or ``(H, W, C)`` arrays (or PIL images) of the same
    shape; uint8 images are scaled to [0, 1] (then ``data_range`` is 1). The SSIM map is
    averaged over the positions where the whole window fits and over channels.
    Identical images give exactly 1.0.
    """
    x, y = _as_float_image(image, "image"), _as_float_image(reference, "reference")
    if x.shape != y.shape:
        raise ValueError(f"image shape {x.shape} differs from reference shape {y.shape}")
    if x.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (H, W, C) images, got shape {x.shape}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window={window} must be a positive odd number")
    if min(x.shape[:2]) < window:
        raise ValueError(f"images of shape {x.shape} are smaller than the {window}-pixel window; pass a smaller window")
    offsets = np.arange(window) - window // 2
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _gaussian_filter_valid(x, kernel), _gaussian_filter_valid(y, kernel)
    # products written the same way for x and y so that identical inputs give exactly 1
    var_x = _gaussian_filter_valid(x * x, kernel) - mu_x * mu_x
    var_y = _gaussian_filter_valid(y * y, kernel) - mu_y * mu_y
    cov = _gaussian_filter_valid(x * y, kernel) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot run here: the ``lpips`` package or its backbone weights are not present locally."""


_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
_lpips_models: dict = {}


def lpips_weights_file(net: str = "alex"):
    """Where torchvision keeps the ImageNet backbone that LPIPS ``net`` needs (it must already be there)."""
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"net={net!r} is not one of {sorted(_LPIPS_BACKBONES)}")
    try:
        import lpips  # noqa: F401
        import torch
        import torchvision.models
    except ImportError as error:
        raise LPIPSUnavailable(f"LPIPS needs the `lpips` and `torchvision` packages ({error}); "
                               "install them with `pip install lpips torchvision`") from error
    from pathlib import Path

    url = getattr(torchvision.models, _LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def lpips(image, reference, net: str = "alex", device: str = "cpu") -> float:
    """LPIPS distance (Zhang et al. 2018; lower is closer) between two RGB images.

    Runs only with weights already on this machine: the ``lpips`` package ships its
    linear heads, and the ImageNet backbone must be in torch's hub cache
    (``lpips_weights_file(net)``); otherwise ``LPIPSUnavailable`` says what is missing,
    and nothing is downloaded.
    """
    weights = lpips_weights_file(net)
    if not weights.is_file():
        raise LPIPSUnavailable(f"LPIPS skipped: the {net} backbone weights are not present locally at {weights} "
                               "(nothing is downloaded; copy the torchvision checkpoint there to enable it)")
    import lpips as lpips_package
    import torch

    x, y = _as_float_image(image, "image"), _as_float_image(reference, "reference")
    if x.shape != y.shape or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected two RGB images of the same (H, W, 3) shape, got {x.shape} and {y.shape}")
    key = (net, device)
    if key not in _lpips_models:
        _lpips_models[key] = lpips_package.LPIPS(net=net, verbose=False).eval().to(device)
    to_tensor = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float().to(device) * 2 - 1  # noqa: E731
    with torch.no_grad():
        return float(_lpips_models[key](to_tensor(x), to_tensor(y)))


def fidelity(image, reference, with_lpips: bool = True) -> dict:
    """PSNR, SSIM and (when available locally) LPIPS of ``image`` against ``reference``.

    Where LPIPS cannot run, ``"lpips"`` is ``None`` and ``"lpips_skipped"`` says why.
    """
    x, y = _as_float_image(image, "image"), _as_float_image(reference, "reference")
    result = {"psnr": psnr(x, y), "ssim": ssim(x, y), "lpips": None}
    if with_lpips:
        try:
            result["lpips"] = lpips(x, y)
        except LPIPSUnavailable as reason:
            result["lpips_skipped"] = str(reason)
    return result
