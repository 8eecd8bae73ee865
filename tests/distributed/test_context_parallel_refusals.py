"""context_parallel= where the hybrid cannot run: one clear error each, in one process, before any rank waits."""

import pytest

import tiny_models
from asyncgen._compat import context_parallel_refusal_for_hybrid
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.runtime import context_parallel
from asyncgen.runtime.context_parallel import HybridGroups, apply_stage_context_parallel, check_context_parallel
from asyncgen.split.registry import split_denoiser

needs_cp = pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None,
                              reason=f"{context_parallel_refusal_for_hybrid()}")


@pytest.mark.parametrize("degree", [0, -1, "2", 2.0, True])
def test_a_degree_that_is_not_a_whole_number_of_ranks_is_refused(degree):
    with pytest.raises(ValueError, match=r"context_parallel=.*: need a whole number of at least 1"):
        check_context_parallel(degree)


def test_a_diffusers_without_context_parallelism_is_named(monkeypatch):
    """Where the installed diffusers lacks the pieces, the refusal names it (the feature check's own words)."""
    monkeypatch.setattr(context_parallel, "context_parallel_refusal_for_hybrid",
                        lambda: "diffusers 0.35.0 has no context parallelism the hybrid can use")
    with pytest.raises(ValueError, match="context_parallel=2: diffusers 0.35.0 has no context parallelism"):
        check_context_parallel(2)
    assert check_context_parallel(1) == 1  # no context parallelism asked: nothing to check


@needs_cp
@pytest.mark.parametrize("kwargs, message", [
    (dict(), "context_parallel=2: diffusers gives UNet2DConditionModel no context-parallel plan"),
    (dict(parallel="auto"), "context_parallel=2 with parallel='auto'"),
    (dict(cache="FirstBlockCacheConfig"), "context_parallel=2 with cache=FirstBlockCacheConfig"),
])
def test_the_wrapper_refuses_what_the_hybrid_does_not_run(sd_pipe, kwargs, message):
    if "cache" in kwargs:
        import diffusers.hooks

        kwargs["cache"] = getattr(diffusers.hooks, kwargs["cache"])()
    with pytest.raises(ValueError, match=message):
        AsyncDiffPipeline(sd_pipe, stages=None if kwargs.get("parallel") else 1, context_parallel=2, **kwargs)


@needs_cp
def test_one_process_is_refused(family_path):
    pipe = tiny_models.load_family(family_path("wan"), "wan")
    with pytest.raises(ValueError, match="context_parallel=2: needs a process group of several ranks"):
        AsyncDiffPipeline(pipe, stages=1, context_parallel=2)


def _groups():
    from diffusers import ContextParallelConfig, ParallelConfig

    # never set up: the refusals come before anything touches the mesh
    return HybridGroups(degree=2, stage_group=None, mesh=None,
                        parallel_config=ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2)))


@needs_cp
@pytest.mark.parametrize("class_name, first, stop, message", [
    # Flux's plan splits the model's inputs: a later stage receives its state at a block, where it has no entry
    ("FluxTransformer2DModel", 1, 2, "diffusers' plan for FluxTransformer2DModel splits the sequence at the model's "
                                     "inputs"),
    ("SD3Transformer2DModel", 0, 1, "diffusers gives SD3Transformer2DModel no context-parallel plan"),
])
def test_a_class_whose_plan_cannot_move_to_a_stage_is_refused(class_name, first, stop, message):
    split = split_denoiser(tiny_models.transformer(class_name))
    with pytest.raises(ValueError, match=message):
        apply_stage_context_parallel(split, first, stop, False, _groups())
