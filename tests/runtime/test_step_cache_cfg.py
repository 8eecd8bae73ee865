"""diffusers' step caches with CFG parallelism (each half of the batch on its own lane), in one process.

TaylorSeer decides from the step, MagCache from the step and its calibrated ratios: each half
makes the decision stock makes for the whole batch, so one stage with CFG parallel is the stock
pipeline with the cache, up to the rounding of batch 1 against batch 2. First Block Cache decides
from the whole batch's residual, which a half does not see, and Pyramid Attention Broadcast's
state is each attention hook's own, which both halves would share in one process: both refused
with CFG parallel.
"""

import numpy as np
import pytest

import tiny_models
from asyncgen.evaluation.bench_cache import apply_cache
from asyncgen.pipelines import AsyncDiffPipeline
from step_caches import STEPS, cache_config


def _call():
    return tiny_models.family_call_kwargs("sd3", num_inference_steps=STEPS)  # guidance 7.5: a CFG batch of 2


def _stock(path, name=None):
    pipe = tiny_models.load_family(path, "sd3")
    if name is not None:
        # SD3's transformer has no CacheMixin: the cache as a user enables it there (diffusers' apply function and a
        # cache context per call, as bench --cache's cache-alone arm does)
        apply_cache(pipe, cache_config(name))
    return pipe(**_call()).images


@pytest.mark.parametrize("name", ["MagCacheConfig", "TaylorSeerCacheConfig"])
def test_one_stage_cfg_parallel_with_a_schedule_decided_cache_equals_stock_with_it(dit_paths, name, one_thread):
    path = dit_paths["sd3"]
    stock = _stock(path, name)
    assert not np.array_equal(stock, _stock(path))  # the cache skipped work (else this would prove nothing)
    pipe = tiny_models.load_family(path, "sd3")
    wrapped = AsyncDiffPipeline(pipe, stages=1, cfg_parallel=True, cache=cache_config(name))
    # each half is computed at batch 1 rather than 2: same maths and decisions, possibly different rounding (the bound
    # of test_dit_cfg's CFG-parallel-equals-stock check)
    np.testing.assert_allclose(wrapped(**_call()).images, stock, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,why", [
    ("FirstBlockCacheConfig", "each half of the batch would decide alone"),
    ("PyramidAttentionBroadcastConfig", "which both halves would share in one process")])
def test_caches_deciding_on_the_whole_batch_are_refused_with_cfg_parallel(name, why):
    from asyncgen.pipelines.attach import AsyncDiffConfig

    config = cache_config(name)  # (PAB's timestep callback is never called here)
    with pytest.raises(ValueError, match=rf"cache={name} with cfg_parallel=True: .*{why}.*; with cfg_parallel=True use "
                                         r"MagCacheConfig, TaylorSeerCacheConfig, DeepCacheConfig .*, or "
                                         r"cfg_parallel=False"):
        AsyncDiffConfig(stages=2, cfg_parallel=True, cache=config)
    AsyncDiffConfig(stages=2, cache=config)  # without CFG parallel: accepted
