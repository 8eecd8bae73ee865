"""What ``POST /v1/images`` accepts, checked by the rules ``asyncgen generate`` applies to the same options.

The JSON types are pydantic's to check (strict: ``"20"`` is not a step count, ``true`` is not 1);
the values go through the CLI's own validators (``cli/options.py`` and ``cli/generate.py``), so a
request is refused exactly where the command line would refuse the option, with the same words.
Only the server's own limits (``--max-steps``, ``--max-pixels``, ``--max-images``, prompt length)
are written here. Nothing in a request names a file.
"""

from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from .errors import UsageError


class ImageRequest(BaseModel):
    """The body of ``POST /v1/images``."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    negative_prompt: Optional[StrictStr] = None
    height: Optional[StrictInt] = None
    width: Optional[StrictInt] = None
    steps: Optional[StrictInt] = None
    guidance: Optional[Union[StrictInt, StrictFloat]] = None
    seed: Optional[StrictInt] = None  # none: a random one, returned with the images
    n: StrictInt = 1  # images; image i uses seed + i, as `asyncgen generate --prompts` does for prompt i
    response_format: Literal["png", "b64_json"] = "png"  # png: the image's bytes (n = 1); b64_json: JSON
    wait: StrictBool = True  # false: 202 with the job's id at once; poll GET /v1/jobs/{id} or its events


class FieldError(ValueError):
    """A request value refused: ``field`` names it, the message says what is accepted."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    """The server's caps on what one request may ask for (``asyncgen serve --max-...``)."""

    max_steps: int
    max_pixels: int
    max_images: int
    max_prompt_chars: int


@dataclass(frozen=True)
class ModelRules:
    """What the checks need to know of the model and the layout (from ``make_job`` and the model's configs)."""

    model: str
    builtin: bool
    facts: object  # asyncgen.pipelines.from_configs' description: size_multiple, native_height, native_width
    stages: int
    stride: int
    cfg_parallel: bool
    dtype: str
    device: str
    devices: int


def _cli(field: str, option: str, check, *args) -> None:
    """Run a CLI validator; its refusal becomes a FieldError naming the request field instead of the option."""
    try:
        check(*args)
    except (UsageError, argparse.ArgumentTypeError) as exc:
        text = str(exc).replace(option, field)
        raise FieldError(field, text if text.startswith(field) else f"{field} {text}") from None


def validate(request: ImageRequest, rules: ModelRules, limits: Limits) -> dict:
    """The job's settings from a request, every value checked; raises :class:`FieldError` for the first bad one."""
    from . import options
    from .generate import check_memory, check_size, check_scheduler_steps

    for field in ("prompt", "negative_prompt"):
        text = getattr(request, field)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise FieldError(field, f"{field}: {len(text)} characters; this server takes at most "
                             f"{limits.max_prompt_chars} (--max-prompt-chars)")
    _cli("n", "n", options.positive_int, str(request.n))
    if request.n > limits.max_images:
        raise FieldError("n", f"n {request.n}: this server makes at most {limits.max_images} images per request "
                         "(--max-images)")
    if request.response_format == "png" and request.n > 1:
        raise FieldError("response_format", f"response_format png returns one image and n is {request.n}; "
                         "ask for b64_json to get several")
    height, width = request.height, request.width
    for field, value in (("height", height), ("width", width)):
        if value is not None:
            _cli(field, field, options.positive_int, str(value))
            _cli(field, f"--{field}", options.check_image_side, f"--{field}", value)
            _cli(field, f"--{field}", check_size, field, value, rules.facts)
    facts = rules.facts
    if (height is None) != (width is None):  # one side given: the other keeps the model's native size, as the CLI
        height, width = height or facts.native_height, width or facts.native_width
    pixels = (height or facts.native_height) * (width or facts.native_width)
    if pixels > limits.max_pixels:
        field = "height" if request.height is not None else "width"
        raise FieldError(field, f"{field}: {width or facts.native_width}x{height or facts.native_height} is {pixels} "
                         f"pixels; this server takes at most {limits.max_pixels} (--max-pixels)")
    if height is not None:
        _cli("height", "--height", check_memory, rules.model, height, width, facts, rules.stages, rules.stride,
             rules.cfg_parallel, rules.dtype, rules.device, rules.devices)
    if request.steps is not None:
        _cli("steps", "steps", options.positive_int, str(request.steps))
        _cli("steps", "--steps", options.check_steps, request.steps)
        if request.steps > limits.max_steps:
            raise FieldError("steps", f"steps {request.steps}: this server takes at most {limits.max_steps} "
                             "(--max-steps)")
        _cli("steps", "--steps", check_scheduler_steps, rules.model, request.steps)
    if request.guidance is not None:
        _cli("guidance", "guidance", options.finite_float, repr(float(request.guidance)))
    seed = request.seed if request.seed is not None else secrets.randbelow(options.SEED_LIMIT - limits.max_images)
    _cli("seed", "seed", options.seed, str(seed))
    if seed + request.n - 1 >= options.SEED_LIMIT:
        raise FieldError("seed", f"seed {seed} with n {request.n}: image i uses seed + i, so the seed can be at most "
                         f"2**64 - {request.n} = {options.SEED_LIMIT - request.n}")
    return {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "height": height, "width": width,
            "steps": request.steps, "guidance": None if request.guidance is None else float(request.guidance),
            "seed": seed, "n": request.n}
