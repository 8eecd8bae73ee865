"""Options that ``generate`` and ``bench`` share, declared once, and value types that
refuse bad numbers with one line naming the value and what is accepted."""

from __future__ import annotations

import argparse
import math

SEED_LIMIT = 2**64  # torch generators take seeds 0 .. 2**64 - 1
DTYPES = ("float32", "float16", "bfloat16")
# The largest image side, in pixels, any command accepts. 8192 is twice the largest sizes people run diffusers
# pipelines and ASG at (4096, e.g. 4x an SDXL or Flux image per side), and about where one image stops being
# practical: 8192 x 8192 is 67 megapixels, under Pillow's decompression-bomb guard (89 megapixels), so the file
# can still be opened by `asyncgen eval` and other tools, and a SD-family VAE decoder's full-resolution feature
# maps (128 channels) are already 17 GB each in float16 there; at 65536 they would be 1.1 TB each.
MAX_IMAGE_SIDE = 8192
# The most denoising steps any command accepts: models are trained on 1000 timesteps, and samplers gain nothing
# from more steps than that; 10x it still runs, a mistyped 10**9 would allocate gigabytes of timesteps first.
MAX_STEPS = 10_000
# The most video frames: the longest clips video pipelines make are 81 (Wan), 129 (HunyuanVideo) and 257 (LTX)
# frames; four times the longest still runs, a mistyped 100000 would allocate its latents first.
MAX_FRAMES = 1024


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: need a whole number of at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: need a whole number of at least 0")
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{text}: seeds run from 0 to 2**64 - 1 = {SEED_LIMIT - 1}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: need a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: need a finite number")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: need a number from 0 to 1")
    return value


def check_image_side(option: str, value: int | None) -> None:
    """Refuse an image side above :data:`MAX_IMAGE_SIDE` in one line naming the value and the ceiling."""
    if value is not None and value > MAX_IMAGE_SIDE:
        from .errors import UsageError

        raise UsageError(f"{option} {value}: image sides go up to {MAX_IMAGE_SIDE} pixels (67 megapixels at "
                         f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}); give at most {MAX_IMAGE_SIDE}")


def check_frames(value: int | None) -> None:
    """Refuse a frame count above :data:`MAX_FRAMES` in one line."""
    if value is not None and value > MAX_FRAMES:
        from .errors import UsageError

        raise UsageError(f"--frames {value}: at most {MAX_FRAMES} (the longest clips video pipelines make are 81 to "
                         "257 frames)")


def check_steps(value: int | None) -> None:
    """Refuse a step count above :data:`MAX_STEPS` in one line."""
    if value is not None and value > MAX_STEPS:
        from .errors import UsageError

        raise UsageError(f"--steps {value}: at most {MAX_STEPS} (models are trained on 1000 timesteps; samplers "
                         "gain nothing beyond that)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: need a whole number") from None


def add_model_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--model", default=None, help="a built-in model: miniature (the shapes model, a UNet) or "
                        "miniature-dit (the shapes model as an SD3 transformer); or a diffusers pipeline: hub id (e.g. "
                        "stabilityai/stable-diffusion-2-1) or local folder; SD, SDXL, SD3, PixArt and Flux pipelines "
                        f"are recognised from the folder (default: {default_help})")
    parser.add_argument("--allow-pickle", action="store_true", help="also load pickle (.bin) weights, which can run "
                        "code when read; only for checkpoints you trust (default: safetensors only)")


def add_sampling_arguments(parser: argparse.ArgumentParser, steps_help: str, guidance_help: str,
                           size_help: str) -> None:
    parser.add_argument("--steps", type=positive_int, default=None, help=f"denoising steps (default: {steps_help})")
    parser.add_argument("--guidance", type=finite_float, default=None,
                        help=f"classifier-free guidance scale (default: {guidance_help})")
    parser.add_argument("--height", type=positive_int, default=None, help="image height in pixels, a multiple of what "
                        f"the model needs (VAE factor x patch size); one of --height/--width alone keeps the model's "
                        f"native size for the other (default: {size_help})")
    parser.add_argument("--width", type=positive_int, default=None,
                        help=f"image width in pixels (default: {size_help})")
    parser.add_argument("--seed", type=seed, default=0, help="noise seed, 0 .. 2**64-1; prompt i uses seed + i "
                        "(default: %(default)s)")


def add_asyncdiff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--time-shift", action="store_true", help="stages fed a stale input use the previous "
                        "step's timestep (default: off)")
    parser.add_argument("--split", default="flops", choices=["flops", "time"], help="how stage boundaries are "
                        "placed: estimated FLOPs and bytes, or unit times measured on rank 0 (default: %(default)s)")
    parser.add_argument("--oversubscribe", action="store_true", help="on CPU, allow more worker processes than "
                        "cores (their timings are not meaningful; default: refuse)")
