"""DeepCache through ``AsyncDiffPipeline(..., cache=DeepCacheConfig(...))``: the stage runtime's own composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.evaluation.fidelity import psnr
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.runtime.deep_cache import DeepCacheConfig, StagedDeepCache, apply_deep_cache, enabled_deep_cache

STEPS = 7


def _call(family="sd", **overrides):
    return tiny_models.family_call_kwargs(family, num_inference_steps=STEPS, **overrides)


def _deep_cache_alone(path, family="sd", interval=3):
    pipe = tiny_models.load_family(path, family)
    apply_deep_cache(pipe.unet, DeepCacheConfig(interval=interval))
    return pipe(**_call(family)).images


def _assert_errors_add_at_most(composed, asyncdiff_alone, deep_cache_alone, stock):
    """The composed picture is off stock by no more than the two methods alone are, added (as RMS amplitudes).

    Each method perturbs the denoising trajectory a little; composed, the perturbations add, and on these short
    schedules they add no more than their sizes (the triangle inequality on the two errors taken as independent
    perturbations). A deep feature kept in the wrong context (another replica's, another half's) or never refreshed
    is a perturbation of its own, far outside this bound (two seeds of stock are 13.4 dB apart).
    """
    rms = lambda image: float(np.sqrt(np.mean((np.asarray(image, np.float64) - stock) ** 2)))  # noqa: E731
    assert rms(composed) <= rms(asyncdiff_alone) + rms(deep_cache_alone), (psnr(composed, stock),
                                                                          psnr(asyncdiff_alone, stock))


def _calls_of(module) -> list[int]:
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_one_stage_with_deep_cache_equals_deep_cache_alone(family_path, family, one_thread):
    path = family_path(family)
    alone = _deep_cache_alone(path, family)
    stock = tiny_models.load_family(path, family)(**_call(family)).images
    assert not np.array_equal(alone, stock)  # the cache skipped work (else this test would prove nothing)
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=1, cache=DeepCacheConfig(interval=3))
    np.testing.assert_array_equal(wrapped(**_call(family)).images, alone)
    # a second call starts afresh (its first step runs the deep path), as DeepCache alone's does
    np.testing.assert_array_equal(wrapped(**_call(family)).images, alone)


def test_two_stages_all_exact_equal_deep_cache_alone(sd_path, one_thread):
    # every step exact: both stages serve the step, so each decides as DeepCache alone does at that step
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=STEPS, cache=DeepCacheConfig(interval=3))
    np.testing.assert_array_equal(wrapped(**_call()).images, _deep_cache_alone(sd_path))


def test_deep_cache_applied_before_wrapping_is_carried_over(sd_path, one_thread):
    alone = _deep_cache_alone(sd_path)
    pipe = tiny_models.load(sd_path)
    apply_deep_cache(pipe.unet, DeepCacheConfig(interval=3))
    wrapped = AsyncDiffPipeline(pipe, stages=2, warmup=STEPS)
    assert enabled_deep_cache(pipe.unet) is None  # taken off the UNet: the stages run it now
    np.testing.assert_array_equal(wrapped(**_call()).images, alone)
    assert isinstance(wrapped.hook.executor.cache, StagedDeepCache)


def test_stale_stages_run_the_deep_path_on_the_stock_steps_only(sd_path, one_thread):
    """Stride 1, warm-up 1: every stage serves every step, so the deep units run on steps 0, 3 and 6 only, and the
    shallow ones every step; the picture is the composed schedule's (not stock's, not AsyncDiff alone's)."""
    pipe = tiny_models.load(sd_path)
    unet = pipe.unet
    wrapped = AsyncDiffPipeline(pipe, stages=2, warmup=1, cache=DeepCacheConfig(interval=3))
    wrapped(**_call())  # counted from the second call: the first also checks the split on the real arguments
    deep = {"mid": _calls_of(unet.mid_block.resnets[0].conv1), "up0": _calls_of(unet.up_blocks[0].resnets[0].conv1)}
    shallow = {"conv_in": _calls_of(unet.conv_in), "up1": _calls_of(unet.up_blocks[1].resnets[-1])}
    composed = wrapped(**_call()).images
    assert {k: c[0] for k, c in deep.items()} == dict.fromkeys(deep, 3)
    assert {k: c[0] for k, c in shallow.items()} == dict.fromkeys(shallow, STEPS)
    cache = wrapped.hook.executor.cache
    assert (cache.state.full_calls, cache.state.cached_calls) == (2 * 3, 2 * 4)  # two stages' tasks, serially
    plain = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1)(**_call()).images
    stock = tiny_models.load(sd_path)(**_call()).images
    assert not np.array_equal(composed, plain) and not np.array_equal(composed, stock)
    # measured: composed 34.6 dB to stock, AsyncDiff alone 35.2 dB, DeepCache alone 44.7 dB (bound: 32.7 dB)
    _assert_errors_add_at_most(composed, plain, _deep_cache_alone(sd_path), stock)


@pytest.mark.parametrize("interval,stride", [(3, 1), (3, 2), (4, 2), (2, 2), (5, 3)])
def test_a_replica_keeps_its_deep_feature_no_older_than_the_stock_cache_does(interval, stride):
    """The decision rule, task by task: at stride 1 it is the stock decision of the served step; at any stride a
    replica's deep feature (from its last full task) is never more than ``interval - 1`` steps older than the step it
    serves, as stock's never is, and a replica recomputes only when the stock cache recomputed since its last task."""
    cache = StagedDeepCache(DeepCacheConfig(interval=interval), stages=[None, None], stride=stride)
    for replica in range(stride):
        context, last_full = f"call/stage1.{replica}", None
        served = range(replica, 40, stride)  # the steps one replica of the last stage serves
        for step in served:
            full = cache.full(context, step)
            cache.served[context] = step
            if stride == 1:
                assert full == (step % interval == 0), step
            stock_recomputed = last_full is None or any(s % interval == 0 for s in range(last_full + 1, step + 1))
            assert full == stock_recomputed, (replica, step)
            last_full = step if full else last_full
            assert step - last_full <= interval - 1
    if interval <= stride:  # every stride's window holds a stock full step: nothing is ever reused
        assert cache.full("call/stage1.0", 40 + stride)


def test_stride_two_keeps_a_deep_feature_per_replica(sd_path, one_thread):
    # stage 0 and the last stage's two replicas each keep their own deep outputs (a shared one would mix a replica's
    # feature into the other's steps); the picture stays close to stock
    pipe = tiny_models.load(sd_path)
    wrapped = AsyncDiffPipeline(pipe, stages=2, stride=2, warmup=1, cache=DeepCacheConfig(interval=3))
    composed = wrapped(**_call()).images
    hooks = wrapped.hook.executor.cache.hooks
    contexts = {c.rsplit("/", 1)[1] for h in hooks for c in h.kept}
    assert contexts == {"stage0.0", "stage1.0", "stage1.1"}
    plain = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, stride=2, warmup=1)(**_call()).images
    stock = tiny_models.load(sd_path)(**_call()).images
    assert not np.array_equal(composed, plain)
    # measured: composed 31.1 dB to stock, AsyncDiff alone 31.4 dB, DeepCache alone 44.7 dB (bound: 29.7 dB)
    _assert_errors_add_at_most(composed, plain, _deep_cache_alone(sd_path), stock)


def test_cfg_parallel_halves_keep_their_own_deep_features(sd_path, one_thread):
    # one stage, CFG parallel in one process: each half runs its own lane with its own kept outputs and the stock
    # decisions, so the images are DeepCache alone's up to the rounding of batch 1 against batch 2 (the bound of
    # test_dit_cfg's CFG-parallel-equals-stock check)
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, cfg_parallel=True,
                                cache=DeepCacheConfig(interval=3))
    np.testing.assert_allclose(wrapped(**_call()).images, _deep_cache_alone(sd_path), atol=1e-5, rtol=0)


def test_deep_cache_refusals_name_the_bad_value(sd_path, dit_paths):
    with pytest.raises(ValueError, match=r"cache=DeepCacheConfig runs on SD/SDXL UNets .*FluxTransformer2DModel"):
        AsyncDiffPipeline(tiny_models.load_family(dit_paths["flux"], "flux"), stages=2, cache=DeepCacheConfig())
    from asyncgen.runtime.step_cache import step_cache_config_classes

    if "TaylorSeerCacheConfig" in step_cache_config_classes():
        from diffusers.hooks import TaylorSeerCacheConfig

        with pytest.raises(ValueError, match="runs on transformer denoisers split by block; pipe.unet .*"
                                             "DeepCacheConfig"):
            AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, cache=TaylorSeerCacheConfig())
    pipe = tiny_models.load(sd_path)
    apply_deep_cache(pipe.unet, DeepCacheConfig(interval=3))
    with pytest.raises(ValueError, match=r"already has DeepCacheConfig enabled .*remove_deep_cache\(unet\)"):
        AsyncDiffPipeline(pipe, stages=2, cache=DeepCacheConfig(interval=2))
    with pytest.raises(ValueError, match=r"branch=3\).*between 0 and 1"):
        AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, cache=DeepCacheConfig(branch=3))


def test_no_kept_feature_outlives_its_call(sd_path, one_thread):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1, cache=DeepCacheConfig(interval=3))
    first = wrapped(**_call()).images
    hooks = wrapped.hook.executor.cache.hooks
    kept = sum(len(h.kept) for h in hooks)
    with torch.no_grad():
        second = wrapped(**_call()).images
    np.testing.assert_array_equal(second, first)
    assert sum(len(h.kept) for h in hooks) == kept  # the first call's outputs went when the second began
