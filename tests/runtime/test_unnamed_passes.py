"""A pipeline that runs a second denoiser pass per step without naming it (Lumina2: cond, then
uncond, on the same latents, no ``cache_context``): the proxy must count steps, not calls, and
give the second pass a lane of its own, so the two passes' stale states never mix."""

import numpy as np

import tiny_models
from asyncgen.pipelines import AsyncDiffPipeline


def test_a_second_pass_on_the_same_latents_is_a_lane_of_its_own(pipeline_path, one_thread):
    path = pipeline_path("lumina2")
    wrapped = AsyncDiffPipeline(tiny_models.load_pipeline(path, "lumina2"), stages=2, warmup=1)
    seen = []

    def count(pipe, i, t, kwargs):
        proxy = pipe.transformer
        seen.append((proxy._step, {name: lane._step for name, lane in proxy._lanes.items()}))
        return {}

    kwargs = tiny_models.pipeline_call_kwargs("lumina2", callback_on_step_end=count)
    images = wrapped(**kwargs).images
    steps = kwargs["num_inference_steps"]
    # after step i both the proxy and the uncond lane have run i + 1 steps (not 2 (i + 1) calls on one schedule)
    assert seen == [(i + 1, {"pass 1": i + 1}) for i in range(steps)]
    assert np.isfinite(images).all()
