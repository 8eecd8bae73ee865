"""diffusers' step caches under stages on gloo ranks against the serial simulator."""

import numpy as np
import pytest

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.pipelines import AsyncDiffPipeline
from step_caches import CLASSES, STEPS, cache_config

pytestmark = pytest.mark.distributed

# (cache, stages, stride, enabled on the denoiser before wrapping, time_shift); 2 ranks each
CONFIGS = [
    ("FirstBlockCacheConfig", 2, 1, False, False),
    ("FirstBlockCacheConfig", 2, 1, True, True),
    ("FirstBlockCacheConfig", 1, 2, False, False),  # two whole-model replicas, each with its own decisions
    ("MagCacheConfig", 2, 1, False, False),
    ("PyramidAttentionBroadcastConfig", 2, 1, False, False),
    ("TaylorSeerCacheConfig", 2, 1, False, True),
    ("TaylorSeerCacheConfig", 1, 2, False, False),  # two replicas of one stage, each serving every other step
]


def _wrapped(path, name, stages, stride, before, time_shift):
    pipe = tiny_models.load_family(path, "flux")
    kwargs = dict(stages=stages, stride=stride, warmup=1, time_shift=time_shift)
    if before:
        pipe.transformer.enable_cache(cache_config(name, pipe))
        return AsyncDiffPipeline(pipe, **kwargs)
    return AsyncDiffPipeline(pipe, cache=cache_config(name, pipe), **kwargs)


def _run(rank, world_size, path, configs):
    return [_wrapped(path, *config)(**tiny_models.family_call_kwargs("flux", num_inference_steps=STEPS)).images
            for config in configs]


def test_caches_on_two_ranks_equal_the_simulator(dit_paths, one_thread):
    path = str(dit_paths["flux"])
    configs, per_rank = _launched(path, CONFIGS, 2, "none of the step caches")
    for i, config, expected in _simulated(path, configs):
        uncached = AsyncDiffPipeline(tiny_models.load_family(path, "flux"), stages=config[1], stride=config[2],
                                     warmup=1, time_shift=config[4])(**tiny_models.family_call_kwargs(
                                         "flux", num_inference_steps=STEPS))
        assert not np.array_equal(expected, uncached.images), config  # the cache acted
        _assert_ranks_equal(per_rank, i, config, expected)


def _launched(path, candidates, ranks, lacking):
    """The configurations the installed diffusers has caches for, and each rank's images of them."""
    configs = [c for c in candidates if c[0] in CLASSES]
    if not configs:
        pytest.skip(f"the installed diffusers has {lacking}")
    return configs, launch(_run, ranks, path, configs, timeout=400)


def _simulated(path, configs):
    """(index, config, the serial simulator's images) of each configuration, run in this process."""
    for i, config in enumerate(configs):
        yield i, config, _wrapped(path, *config)(**tiny_models.family_call_kwargs(
            "flux", num_inference_steps=STEPS)).images


def _assert_ranks_equal(per_rank, i, config, expected):
    for rank, images in enumerate(per_rank):
        # received states sit at aligned offsets of one flat buffer (comm/wire.py): see assert_equals_simulator
        tiny_models.assert_equals_simulator(images[i], expected, err_msg=f"{config} rank {rank}")


# signal caches at stride 2: stage 0 on rank 0, the last stage's replicas on ranks 1 and 2
STRIDE_CONFIGS = [("FirstBlockCacheConfig", 2, 2, False, False), ("MagCacheConfig", 2, 2, False, False)]


def test_signal_caches_at_stride_two_on_three_ranks_equal_the_simulator(dit_paths, one_thread):
    path = str(dit_paths["flux"])
    configs, per_rank = _launched(path, STRIDE_CONFIGS, 3, "neither First Block Cache nor MagCache")
    for i, config, expected in _simulated(path, configs):
        _assert_ranks_equal(per_rank, i, config, expected)


# DeepCache (asyncgen's, for UNets) through cache=, on the tiny SD pipeline: (stages, stride, applied before wrapping)
DEEP_CONFIGS = {2: [(2, 1, False), (2, 1, True)], 3: [(2, 2, False)]}


def _deep_wrapped(path, stages, stride, before):
    from asyncgen.runtime.deep_cache import DeepCacheConfig, apply_deep_cache

    pipe = tiny_models.load(path)
    if before:
        apply_deep_cache(pipe.unet, DeepCacheConfig(interval=3))
        return AsyncDiffPipeline(pipe, stages=stages, stride=stride, warmup=1)
    return AsyncDiffPipeline(pipe, stages=stages, stride=stride, warmup=1, cache=DeepCacheConfig(interval=3))


def _deep_run(rank, world_size, path):
    return [_deep_wrapped(path, *config)(**tiny_models.family_call_kwargs("sd", num_inference_steps=7)).images
            for config in DEEP_CONFIGS[world_size]]


@pytest.mark.parametrize("world_size", [2, 3])
def test_deep_cache_on_ranks_equals_the_simulator(sd_path, world_size, one_thread):
    # at stride 2 (3 ranks) the last stage's replicas keep deep features of their own
    per_rank = launch(_deep_run, world_size, str(sd_path), timeout=400)
    for i, config in enumerate(DEEP_CONFIGS[world_size]):
        expected = _deep_wrapped(sd_path, *config)(**tiny_models.family_call_kwargs("sd", num_inference_steps=7)).images
        _assert_ranks_equal(per_rank, i, config, expected)


# CFG parallel (each half of SD3's CFG batch on its own rank) with the caches that decide from the step alone
CFG_CACHES = ["MagCacheConfig", "TaylorSeerCacheConfig"]


def _cfg_wrapped(path, name):
    return AsyncDiffPipeline(tiny_models.load_family(path, "sd3"), stages=1, cfg_parallel=True,
                             cache=cache_config(name))


def _cfg_run(rank, world_size, path, names):
    return [_cfg_wrapped(path, name)(**tiny_models.family_call_kwargs("sd3", num_inference_steps=STEPS)).images
            for name in names]


def test_cfg_parallel_with_a_cache_on_two_ranks_equals_the_simulator(dit_paths, one_thread):
    names = [name for name in CFG_CACHES if name in CLASSES]
    if not names:
        pytest.skip("the installed diffusers has neither MagCache nor TaylorSeer")
    path = str(dit_paths["sd3"])
    per_rank = launch(_cfg_run, 2, path, names, timeout=400)
    for i, name in enumerate(names):
        expected = _cfg_wrapped(path, name)(**tiny_models.family_call_kwargs("sd3", num_inference_steps=STEPS)).images
        _assert_ranks_equal(per_rank, i, name, expected)
