"""The wrappers' diffusers manners: methods return the wrapper, from_pipe leaves the original usable,
wrapping twice is refused, arguments are checked, and they log through diffusers' logger."""

import logging

import numpy as np
import pytest
import torch
import tiny_models
from diffusers.utils import logging as diffusers_logging

from asyncgen.pipelines import ASGPipeline, AsyncDiffPipeline
from asyncgen.runtime.asyncdiff_hook import asyncdiff_hooks


@pytest.fixture
def records():
    """What the wrappers log through diffusers' logger (which does not propagate to the root logger)."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    root = diffusers_logging.get_logger("diffusers")
    old_level = diffusers_logging.get_verbosity()
    root.addHandler(handler)
    diffusers_logging.set_verbosity_info()
    yield seen
    root.removeHandler(handler)
    diffusers_logging.set_verbosity(old_level)


def test_the_engine_exports_itself_and_points_to_the_wrappers():
    import asyncgen
    import asyncgen.pipelines
    from asyncgen.split.registry import split_denoiser

    assert asyncgen.pipelines.AsyncDiffPipeline is AsyncDiffPipeline and asyncgen.pipelines.ASGPipeline is ASGPipeline
    assert asyncgen.split_denoiser is split_denoiser and "choose_cuts" in dir(asyncgen)
    # the engine does not import the layer above it: asking it for a wrapper says where the wrapper lives
    with pytest.raises(AttributeError, match=r"from asyncgen\.pipelines import AsyncDiffPipeline"):
        asyncgen.AsyncDiffPipeline
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        asyncgen.Nope


def test_methods_that_return_the_pipeline_return_the_wrapper(sd_path):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)
    assert wrapped.to("cpu") is wrapped
    assert wrapped.to(torch.float32) is wrapped
    assert wrapped.set_progress_bar_config(disable=True) is None  # as diffusers returns
    assert wrapped.scheduler is wrapped.pipeline.scheduler  # plain attributes pass through
    asg = ASGPipeline(tiny_models.load(sd_path))
    assert asg.to("cpu") is asg


def test_from_pipe_leaves_the_original_usable(sd_path):
    pipe = tiny_models.load(sd_path)
    before = pipe(**tiny_models.call_kwargs(num_inference_steps=3)).images
    wrapped = AsyncDiffPipeline.from_pipe(pipe, stages=2, warmup=1)
    # one denoiser module shared by both: its hook is scoped to the wrapper's calls
    assert wrapped.pipeline is not pipe and wrapped.pipeline.unet is pipe.unet and wrapped.hook.scoped
    wrapped(**tiny_models.call_kwargs(num_inference_steps=3))
    after = pipe(**tiny_models.call_kwargs(num_inference_steps=3)).images
    assert np.array_equal(before, after)  # the original still runs the stock denoiser, with its weights
    asg = ASGPipeline.from_pipe(pipe)
    assert asg.pipeline is not pipe and pipe.unet is asg.pipeline.unet  # components shared, object separate


def test_the_constructor_wraps_in_place(sd_path):
    pipe = tiny_models.load(sd_path)
    wrapped = AsyncDiffPipeline(pipe, stages=2)
    assert wrapped.pipeline is pipe and asyncdiff_hooks(pipe.unet) == [wrapped.hook] and not wrapped.hook.scoped


def test_wrapping_twice_says_so(sd_path):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)
    with pytest.raises(TypeError, match="already a wrapper; wrap the diffusers pipeline itself"):
        AsyncDiffPipeline(wrapped)
    with pytest.raises(TypeError, match="already wrapped by AsyncDiffPipeline"):
        AsyncDiffPipeline(wrapped.pipeline)
    with pytest.raises(TypeError, match="already wrapped by AsyncDiffPipeline"):
        ASGPipeline.from_pipe(wrapped.pipeline)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_step_counts_are_refused_by_name(sd_path, steps):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)
    with pytest.raises(ValueError, match=f"num_inference_steps={steps!r}: need a whole number of at least 1"):
        wrapped(**tiny_models.call_kwargs(num_inference_steps=steps))


def test_logging_goes_through_diffusers_logger(sd_path, records):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=2)
    wrapped(**tiny_models.call_kwargs(num_inference_steps=4))
    messages = [(r.levelno, r.getMessage()) for r in records if r.name.startswith("diffusers.asyncgen")]
    assert (logging.WARNING, "stages=2 stride=1 in one process: running the serial simulator (the images of 2 "
            "processes, without their speedup); launch 2 processes (torchrun, asyncgen generate --devices) for the "
            "speedup") in messages
    split = [m for level, m in messages if level == logging.INFO and m.startswith("split UNet2DConditionModel")]
    assert len(split) == 1 and "2 stage(s)" in split[0]
    assert (logging.INFO, "2 exact warm-up step(s) before the asynchronous ones") in messages
    diffusers_logging.set_verbosity_error()  # diffusers' own switch silences us too
    records.clear()
    AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)
    assert not [r for r in records if r.name.startswith("diffusers.asyncgen")]


def test_no_print_in_library_code():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    calls = []
    for folder in ("asyncgen", "pipelines"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    calls.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not calls, f"print in library code: {calls}"
