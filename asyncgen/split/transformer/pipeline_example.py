"""The denoiser's first call as the stock pipeline prepares it, recorded on shapes alone (no weight read).

The config path (``asyncgen plan``, stage-only loading) must split a denoiser before any
weight is read, so it needs a valid call of the forward without the model's values. The
pipeline knows what that call is: its ``encode_prompt`` gives the text states (their width,
their length, a mask or not, per-sample lists or a batch), ``prepare_latents`` the latent
layout, its scheduler the timestep, its loop the rest. :func:`record_denoiser_call` runs the
stock pipeline's ``__call__`` with every model component's ``meta`` weights standing in as
fake tensors (``FakeTensorMode``: shapes only, no arithmetic) and stops it at the first call
of the denoiser, before that forward runs: what the pipeline passed, by name, with each
tensor as a ``meta`` tensor of its shape and dtype. A loaded pipeline (the whole-model
wrapper) is recorded the same way, its real weights standing in as fakes too: no text
encoder or VAE computes, and the random draws of its preparation (the initial noise) are
undone, so the user's next call draws what it would have drawn. A pipeline whose preparation reads
tensor values (a mask's lengths through ``.item()``) cannot run on fake tensors; then
:class:`PipelineExampleUnavailable` says why and the caller falls back to the call built
from the config (:mod:`asyncgen.split.transformer.example_inputs`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from asyncgen.split.transformer.trace import ExampleUnavailable

# the one prompt the preparation encodes (its tokens decide the text length the call carries)
PROMPT = "a photograph of a red ball on a table"


class PipelineExampleUnavailable(ExampleUnavailable):
    """The stock pipeline's preparation could not be run on fake tensors (the pipeline path of the config path)."""


class _Reached(Exception):
    """Raised by the pre-hook at the denoiser's first call, carrying its arguments (ends the pipeline's call)."""

    def __init__(self, arguments: dict):
        super().__init__("the denoiser was reached")
        self.arguments = arguments


def _as_meta(value):
    """``value`` with every (fake) tensor replaced by a ``meta`` tensor of its shape and dtype."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, dict):
        return {k: _as_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_meta(v) for v in value)
    return value


def pipeline_call_arguments(pipeline, height: int | None, width: int | None, steps: int = 2) -> dict:
    """Arguments of one ordinary call of ``pipeline``: a prompt and its negative, a size, few steps, latents out.

    Only arguments the pipeline's ``__call__`` takes. A required image (image-to-video) is a black one of the size.
    Resolution binning is off: it only moves the size asked to a listed one, and the listed sizes are real
    checkpoints' (a small or fine-tuned model's own size may be in no list: the pipeline then refuses the call).
    """
    parameters = inspect.signature(type(pipeline).__call__).parameters
    call: dict[str, Any] = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=steps,
                                output_type="latent", height=height, width=width, use_resolution_binning=False)
    image = parameters.get("image")
    if image is not None and image.default is inspect.Parameter.empty:
        from PIL import Image

        call["image"] = Image.new("RGB", (width or 64, height or 64))
    return {k: v for k, v in call.items() if k in parameters and v is not None}


@contextlib.contextmanager
def _quiet_progress(pipeline):
    """No progress bar for the recorded call, and the pipeline's own setting (the user's) left as it was."""
    from tqdm.auto import tqdm

    def progress_bar(iterable=None, total=None):
        return tqdm(iterable=iterable, total=total, disable=True)

    pipeline.progress_bar = progress_bar  # an instance attribute over the method, removed on exit
    try:
        yield
    finally:
        del pipeline.progress_bar


def _real_weights_as_fake(model: nn.Module, mode):
    """``model``'s real parameters and buffers stand in as fake tensors of ``mode`` (same shape, dtype and device),
    restored on exit: a loaded pipeline's preparation then runs on shapes, like one on meta weights."""
    from asyncgen.cost.fake import weights_swapped

    return weights_swapped(model, lambda tensor: None if tensor.is_meta else mode.from_tensor(tensor))


def record_denoiser_call(pipeline, attribute: str, call: dict) -> dict:
    """The arguments (by name, tensors on ``meta``) of the first call ``pipeline(**call)`` makes of its ``attribute``.

    Every model component's meta weights stand in as fake tensors for the call, which is
    stopped before the denoiser's forward runs; raises :class:`PipelineExampleUnavailable`
    (one line: the pipeline, the exception) when the preparation cannot run on shapes alone.
    """
    from asyncgen._compat import fake_tensor_mode
    from asyncgen.cost.fake import clear_method_caches, meta_weights_as_fake

    denoiser = getattr(pipeline, attribute)
    modules = [m for m in pipeline.components.values() if isinstance(m, nn.Module)]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    signature = inspect.signature(denoiser.forward)

    def reached(module, args, kwargs):
        raise _Reached({k: _as_meta(v) for k, v in signature.bind(*args, **kwargs).arguments.items()
                        if k != "return_dict"})

    handle = denoiser.register_forward_pre_hook(reached, with_kwargs=True)
    name = type(pipeline).__name__
    try:
        # the mode is not entered: only the weights are fake, so what derives from them is computed on shapes and
        # everything else (token ids, masks and their lengths, timesteps, positions, the noise) for real, as the
        # pipeline's Python reads those values
        mode = fake_tensor_mode(allow_non_fake_inputs=True)
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), contextlib.ExitStack() as stack:
            for module in modules:
                # the real ones first: the meta ones' fakes are not meta, and must not be faked again
                stack.enter_context(_real_weights_as_fake(module, mode))
                stack.enter_context(meta_weights_as_fake(module, mode, torch.device("cpu")))
            stack.enter_context(_quiet_progress(pipeline))
            pipeline(**call)
    except _Reached as done:
        return done.arguments
    except Exception as exc:  # noqa: BLE001 - whatever stops the preparation on shapes alone: the fallback's cue
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise PipelineExampleUnavailable(
            f"{name}'s own preparation did not run on shapes alone (pipeline path: {type(exc).__name__}: "
            f"{first})") from exc
    finally:
        handle.remove()
        for module in modules:
            clear_method_caches(module)  # what the fake run cached (rotary tables) is fake
    raise PipelineExampleUnavailable(f"{name}'s call with {sorted(call)} never called its {attribute} (pipeline path)")
