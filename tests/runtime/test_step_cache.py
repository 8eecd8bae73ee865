"""diffusers' step caches under AsyncDiff stages, in one process (the serial simulator)."""

import numpy as np
import pytest

import tiny_models
from asyncgen.pipelines import AsyncDiffPipeline
from step_caches import CACHES, CLASSES, STEPS, cache_config


def _call(family="flux"):
    return tiny_models.family_call_kwargs(family, num_inference_steps=STEPS)


def _stock(path, name, family="flux"):
    pipe = tiny_models.load_family(path, family)
    pipe.transformer.enable_cache(cache_config(name, pipe))
    return pipe(**_call(family)).images


def _wrapped(path, name, **kwargs):
    pipe = tiny_models.load_family(path, "flux")
    return AsyncDiffPipeline(pipe, cache=cache_config(name, pipe), **kwargs)


@pytest.mark.parametrize("name", CACHES)
def test_one_stage_with_a_cache_equals_stock_with_it(dit_paths, name, one_thread):
    path = dit_paths["flux"]
    stock = _stock(path, name)
    plain = tiny_models.load_family(path, "flux")(**_call()).images
    assert not np.array_equal(stock, plain)  # the cache skipped work (else this test would prove nothing)
    wrapped = _wrapped(path, name, stages=1)
    np.testing.assert_array_equal(wrapped(**_call()).images, stock)
    # a second call starts the cache afresh, as the stock pipeline's does
    np.testing.assert_array_equal(wrapped(**_call()).images, stock)


@pytest.mark.parametrize("name", CACHES)
def test_two_stages_all_exact_equal_stock_with_the_cache(dit_paths, name, one_thread):
    # Every step exact: stage 0's decision reaches stage 1 within the step, and a skip adds the residual at the
    # tail instead of the head with only pass-through blocks between: the stock cache's arithmetic, bit for bit
    path = dit_paths["flux"]
    wrapped = _wrapped(path, name, stages=2, warmup=STEPS)
    np.testing.assert_array_equal(wrapped(**_call()).images, _stock(path, name))


def test_a_cache_enabled_before_wrapping_is_carried_over(dit_paths, one_thread):
    path = dit_paths["flux"]
    stock = _stock(path, "FirstBlockCacheConfig")
    for stages in (1, 2):
        pipe = tiny_models.load_family(path, "flux")
        pipe.transformer.enable_cache(cache_config("FirstBlockCacheConfig"))
        wrapped = AsyncDiffPipeline(pipe, stages=stages, warmup=STEPS)
        np.testing.assert_array_equal(wrapped(**_call()).images, stock, err_msg=f"stages={stages}")
        assert pipe.transformer.is_cache_enabled  # on again, under the stages


@pytest.mark.parametrize("name", CACHES)
def test_stale_stages_with_a_cache_run_the_composed_schedule(dit_paths, name, one_thread):
    path = dit_paths["flux"]
    cached = _wrapped(path, name, stages=2, warmup=1)(**_call()).images
    uncached = AsyncDiffPipeline(tiny_models.load_family(path, "flux"), stages=2, warmup=1)(**_call()).images
    assert np.isfinite(cached).all()
    assert not np.array_equal(cached, uncached)  # the cache acted under the stale schedule too
    assert not np.array_equal(cached, _stock(path, name))  # and the stages really ran stale


@pytest.mark.parametrize("name", ["PyramidAttentionBroadcastConfig", "TaylorSeerCacheConfig"])
def test_two_passes_per_step_with_a_cache_equal_stock(family_path, name, one_thread):
    # Wan runs "cond" then "uncond" each step: TaylorSeer keeps a state per pass (as stock: per cache_context), PAB
    # one per attention module that both passes share (as stock: its state is the hook's own)
    path = family_path("wan")
    kwargs = lambda: tiny_models.family_call_kwargs("wan", num_inference_steps=6)  # noqa: E731
    pipe = tiny_models.load_family(path, "wan")
    pipe.transformer.enable_cache(cache_config(name, pipe))
    stock = pipe(**kwargs()).frames
    for stages, warmup in ((1, None), (2, 6)):
        pipe = tiny_models.load_family(path, "wan")
        wrapped = AsyncDiffPipeline(pipe, stages=stages, warmup=warmup, cache=cache_config(name, pipe))
        np.testing.assert_array_equal(wrapped(**kwargs()).frames, stock, err_msg=f"stages={stages}")


@pytest.mark.parametrize("name", ["FirstBlockCacheConfig", "MagCacheConfig"])
def test_signal_caches_at_stride_two(dit_paths, name, one_thread):
    path = dit_paths["flux"]
    # all exact: replica 0 makes every prediction as stock; replica 1's shadow runs leave them untouched
    exact = _wrapped(path, name, stages=2, stride=2, warmup=STEPS)(**_call()).images
    np.testing.assert_array_equal(exact, _stock(path, name))
    # stale: replica 1 skips from its first round on with the residual of its own exact-step runs
    cached = _wrapped(path, name, stages=2, stride=2, warmup=1)(**_call()).images
    uncached = AsyncDiffPipeline(tiny_models.load_family(path, "flux"), stages=2, stride=2, warmup=1)(**_call())
    assert np.isfinite(cached).all() and not np.array_equal(cached, uncached.images)


def test_refusals_name_the_bad_value(dit_paths, sd_path):
    with pytest.raises(ValueError, match=r"cache='fbc' is not a step cache asyncgen can run under stages; "
                                         r"accepted: FirstBlockCacheConfig"):
        AsyncDiffPipeline(tiny_models.load_family(dit_paths["flux"], "flux"), stages=1, cache="fbc")
    pipe = tiny_models.load_family(dit_paths["flux"], "flux")
    pipe.transformer.enable_cache(cache_config("FirstBlockCacheConfig"))
    with pytest.raises(ValueError, match="already has FirstBlockCacheConfig enabled and cache=TaylorSeerCacheConfig"):
        AsyncDiffPipeline(pipe, stages=1, cache=cache_config("TaylorSeerCacheConfig"))
    with pytest.raises(ValueError, match="runs on transformer denoisers split by block; pipe.unet"):
        AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, cache=cache_config("TaylorSeerCacheConfig"))


def test_caches_not_composed_are_refused_with_the_accepted_list(dit_paths):
    from diffusers.hooks import FasterCacheConfig

    faster = FasterCacheConfig(current_timestep_callback=lambda: 500)
    with pytest.raises(ValueError, match="accepted: FirstBlockCacheConfig, MagCacheConfig, "
                                         "PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig"):
        AsyncDiffPipeline(tiny_models.load_family(dit_paths["flux"], "flux"), stages=2, cache=faster)
    with pytest.raises(ValueError, match="PyramidAttentionBroadcastConfig needs stride=1"):
        pipe = tiny_models.load_family(dit_paths["flux"], "flux")
        AsyncDiffPipeline(pipe, stages=1, stride=2, cache=cache_config("PyramidAttentionBroadcastConfig", pipe))


def test_compat_cache_helpers_read_what_diffusers_keeps(dit_paths):
    from asyncgen._compat import (block_output_indices, cache_context_value, enabled_cache_config, hook_registry_of,
                                  state_manager_context)
    from diffusers.hooks.hooks import StateManager

    pipe = tiny_models.load_family(dit_paths["flux"], "flux")
    model = pipe.transformer
    assert enabled_cache_config(model) is None and hook_registry_of(model.transformer_blocks[0]) is None
    config = cache_config("FirstBlockCacheConfig")
    model.enable_cache(config)
    assert enabled_cache_config(model) is config
    assert "fbc_leader_block_hook" in hook_registry_of(model.transformer_blocks[0]).hooks
    hidden, text = block_output_indices(model.transformer_blocks[0])
    assert {hidden, text} == {0, 1}  # Flux's joint block returns (text, image) states
    manager = StateManager(dict)
    assert state_manager_context(manager) is None
    manager.set_context(cache_context_value("cond"))
    assert state_manager_context(manager) == cache_context_value("cond")
    assert getattr(state_manager_context(manager), "name", state_manager_context(manager)) == "cond"


def test_a_from_pipe_sibling_refuses_a_cache(dit_paths):
    pipe = tiny_models.load_family(dit_paths["flux"], "flux")
    with pytest.raises(ValueError, match="cannot be used with scoped=True"):
        AsyncDiffPipeline.from_pipe(pipe, stages=1, cache=cache_config("TaylorSeerCacheConfig"))


def test_a_model_without_enable_cache_takes_the_cache_through_its_apply_function(dit_paths, one_thread):
    # SD3's transformer has no CacheMixin (diffusers 0.40-0.42) and its pipeline names no cache_context: the cache
    # goes on through diffusers.hooks.apply_taylorseer_cache, and the stage tasks give it its contexts
    path = dit_paths["sd3"]
    kwargs = lambda: tiny_models.family_call_kwargs("sd3", num_inference_steps=STEPS)  # noqa: E731
    plain = tiny_models.load_family(path, "sd3")(**kwargs()).images
    one = AsyncDiffPipeline(tiny_models.load_family(path, "sd3"), stages=1,
                            cache=cache_config("TaylorSeerCacheConfig"))(**kwargs()).images
    exact = AsyncDiffPipeline(tiny_models.load_family(path, "sd3"), stages=2, warmup=STEPS,
                              cache=cache_config("TaylorSeerCacheConfig"))(**kwargs()).images
    assert not np.array_equal(one, plain)  # the cache acted
    np.testing.assert_array_equal(exact, one)  # TaylorSeer's decisions are per module and step: the cut changes none


def test_first_block_cache_on_a_model_whose_last_block_drops_the_text_stream_is_refused(dit_paths):
    pipe = tiny_models.load_family(dit_paths["sd3"], "sd3")
    wrapped = AsyncDiffPipeline(pipe, stages=2, cache=cache_config("FirstBlockCacheConfig"))
    with pytest.raises(ValueError, match="cannot run on SD3Transformer2DModel: its last block returns no text"):
        wrapped(**tiny_models.family_call_kwargs("sd3", num_inference_steps=2))


def test_each_call_leaves_no_cache_state_behind(dit_paths, one_thread):
    # SD3's pipeline never resets a cache (its transformer has no CacheMixin): a lane's next call drops its states
    pipe = tiny_models.load_family(dit_paths["sd3"], "sd3")
    wrapped = AsyncDiffPipeline(pipe, stages=2, warmup=1, cache=cache_config("TaylorSeerCacheConfig"))
    kwargs = lambda: tiny_models.family_call_kwargs("sd3", num_inference_steps=4)  # noqa: E731
    first = wrapped(**kwargs()).images
    managers = wrapped.hook.executor.cache.managers
    kept = {id(m): len(m._state_cache) for m in managers}  # noqa: SLF001 - counting what the test is about
    second = wrapped(**kwargs()).images
    np.testing.assert_array_equal(second, first)  # a fresh start each call
    assert {id(m): len(m._state_cache) for m in managers} == kept  # noqa: SLF001
