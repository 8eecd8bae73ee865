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
