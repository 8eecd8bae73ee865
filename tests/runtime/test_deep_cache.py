"""DeepCache on the tiny SD and SDXL pipelines: exactness where the maths says equal, call counts, closeness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.evaluation.fidelity import psnr
from asyncgen.runtime.deep_cache import (DeepCacheConfig, apply_deep_cache, deep_cache_hook, deep_modules,
                                         deep_unit_mask, remove_deep_cache,
                                         reset_deep_cache)

STEPS = 7


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family(request):
    return request.param


@pytest.fixture
def pipe(family_path, family):
    pipe = tiny_models.load_family(family_path(family), family)
    yield pipe
    remove_deep_cache(pipe.unet)


def _image(pipe, family, seed=0, **overrides):
    return pipe(**tiny_models.family_call_kwargs(family, seed, num_inference_steps=STEPS, **overrides)).images[0]


def _count_calls(module) -> list[int]:
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_interval_one_is_the_stock_pipeline_exactly(pipe, family):
    stock = _image(pipe, family)
    apply_deep_cache(pipe.unet, DeepCacheConfig(interval=1))
    assert np.array_equal(_image(pipe, family), stock)
    remove_deep_cache(pipe.unet)
    assert deep_cache_hook(pipe.unet) is None


def test_deep_blocks_run_only_every_kth_step(pipe, family):
    unet = pipe.unet
    # a module inside each deep part (inside: torch's hooks fire on a hooked module's call even when its hook
    # computes nothing), and one on the shallow path that must run every step
    deep = {"down downsampler": unet.down_blocks[0].downsamplers[0].conv,
            "down_blocks.1": unet.down_blocks[1].resnets[0].conv1, "mid": unet.mid_block.resnets[0].conv1,
            "up_blocks.0": unet.up_blocks[0].resnets[0].conv1, "up_blocks.0 upsampler": unet.up_blocks[0].upsamplers[0].conv}
    counts = {name: _count_calls(m) for name, m in deep.items()}
    shallow = {"conv_in": _count_calls(unet.conv_in), "down_blocks.0": _count_calls(unet.down_blocks[0].resnets[0]),
               "up_blocks.1": _count_calls(unet.up_blocks[1].resnets[-1])}
    hook = apply_deep_cache(unet, DeepCacheConfig(interval=3))
    seen = []
    # the decision as the pipeline's own callback sees it, step by step
    _image(pipe, family, callback_on_step_end=lambda p, i, t, kw: seen.append(hook.state.full) or kw)
    assert seen == [i % 3 == 0 for i in range(STEPS)]  # steps 0, 3 and 6 run the deep path
    assert {name: c[0] for name, c in counts.items()} == dict.fromkeys(deep, 3)
    assert {name: c[0] for name, c in shallow.items()} == dict.fromkeys(shallow, STEPS)


def test_differs_from_stock_but_stays_close(pipe, family):
    stock, other_seed = _image(pipe, family), _image(pipe, family, seed=1)
    apply_deep_cache(pipe.unet, DeepCacheConfig(interval=3))
    cached = _image(pipe, family)
    assert not np.array_equal(cached, stock)
    # The bound is relative to what "unrelated" means for these random weights: two seeds of the stock pipeline
    # (13.4 dB apart for sd, 13.1 dB for sdxl). DeepCache reuses a deep feature at most 2 steps stale and recomputes
    # the shallow path every step, so its squared error must stay below 1 % of a different picture's: at least 20 dB
    # above it. Measured: 44.7 dB (sd) and 45.2 dB (sdxl); a cache that fed the wrong feature would not come close.
    assert psnr(cached, stock) > psnr(other_seed, stock) + 20.0


def test_a_cached_step_recomputes_the_shallow_path_exactly(pipe, family):
    """Called twice on the same inputs, the cached second call equals the full first one bit for bit (CFG batch of 2):
    the kept deep feature is the one the full call computed and the shallow path is recomputed on the same inputs."""
    unet = pipe.unet
    torch.manual_seed(0)
    config = unet.config
    sample = torch.randn(2, config.in_channels, 8, 8)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 5, config.cross_attention_dim), return_dict=False)
    if config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(2, tiny_models.CROSS_DIM), time_ids=torch.randn(2, 6))
    t = torch.tensor(500)
    with torch.no_grad():
        stock = unet(sample, t, **kwargs)[0]
        hook = apply_deep_cache(unet, DeepCacheConfig(interval=2))
        mid = _count_calls(unet.mid_block.resnets[0].conv1)
        full, cached = unet(sample, t, **kwargs)[0], unet(sample, t, **kwargs)[0]
    assert (hook.state.full_calls, hook.state.cached_calls, mid[0]) == (1, 1, 1)
    assert torch.equal(full, stock) and torch.equal(cached, stock)


def test_each_call_starts_afresh(pipe, family):
    apply_deep_cache(pipe.unet, DeepCacheConfig(interval=3))
    first = _image(pipe, family)
    assert np.array_equal(_image(pipe, family), first)
    # reset by hand: the kept features go, the next call is a full one (the same image again)
    reset_deep_cache(pipe.unet)
    assert deep_cache_hook(pipe.unet).state.calls == 0
    assert np.array_equal(_image(pipe, family), first)

    class Stop(Exception):
        pass

    def stop(p, i, t, kw):
        if i == 4:
            raise Stop
        return kw

    # a call that raises never reaches diffusers' reset; the next call still starts with a full step
    with pytest.raises(Stop):
        _image(pipe, family, callback_on_step_end=stop)
    assert np.array_equal(_image(pipe, family), first)


def test_bad_configs_and_models_are_refused(pipe):
    with pytest.raises(ValueError, match="interval=0"):
        DeepCacheConfig(interval=0)
    with pytest.raises(ValueError, match="branch=-1"):
        DeepCacheConfig(branch=-1)
    with pytest.raises(ValueError, match=r"branch=2\).*between 0 and 1"):
        apply_deep_cache(pipe.unet, DeepCacheConfig(branch=2))
    assert deep_cache_hook(pipe.unet) is None  # nothing registered by the refused call
    with pytest.raises(TypeError, match="needs a UNet2DConditionModel.*Linear is not one"):
        apply_deep_cache(torch.nn.Linear(2, 2), DeepCacheConfig())
    apply_deep_cache(pipe.unet, DeepCacheConfig())
    with pytest.raises(ValueError, match="already has DeepCache"):
        apply_deep_cache(pipe.unet, DeepCacheConfig())


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_deep_unit_mask_matches_the_hooked_modules(branch):
    """The split's units that lie inside a hooked deep module are exactly the units the mask calls deep."""
    from asyncgen.split.registry import split_denoiser

    unet = tiny_models.odd_unet()  # three levels, a mid block without attention
    split = split_denoiser(unet, verify_split=False)
    hooked = {id(m) for _, m in deep_modules(unet, branch)}
    inside = [all(id(m) in hooked for m in unit.modules) and bool(unit.modules) for unit in split.units]
    assert len(hooked) == sum(len(unit.modules) for unit, deep in zip(split.units, inside) if deep)
    assert deep_unit_mask([u.name for u in split.units], len(unet.down_blocks), branch) == inside
    assert any(inside) and not all(inside)


def test_the_hooks_give_deep_cache_where_a_stage_runtime_runs_the_units_one_by_one():
    """A stage runtime calls the split's units, not the UNet's forward. With the decision set by hand (what a runtime
    does per task from the step it serves), running the units gives what the hooked stock forward gives, bit for bit,
    on a full step and on a cached one (CFG batch of 2, SDXL's added conditioning)."""
    from asyncgen.split.registry import split_denoiser

    unet = tiny_models.sdxl_unet()
    split = split_denoiser(unet, verify_split=False)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8)
    inputs = dict(encoder_hidden_states=torch.randn(2, 5, unet.config.cross_attention_dim),
                  added_cond_kwargs=dict(text_embeds=torch.randn(2, tiny_models.CROSS_DIM), time_ids=torch.randn(2, 6)))

    def units(t):
        cond = split.conditioning(sample, t, **inputs)
        state = split.initial_state(sample, cond)
        for unit in split.units:
            state = unit(state, cond)
        return split.output(state)

    with torch.no_grad():
        hook = apply_deep_cache(unet, DeepCacheConfig(interval=2))
        full, cached = (unet(sample, t, **inputs, return_dict=False)[0] for t in (torch.tensor(600), torch.tensor(500)))
        assert (hook.state.full_calls, hook.state.cached_calls) == (1, 1)
        for t, expected, decision in ((600, full, True), (500, cached, False)):
            hook.state.full = decision
            assert torch.equal(units(torch.tensor(t)), expected)
    assert not torch.equal(full, cached)
