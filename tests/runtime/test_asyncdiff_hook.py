"""The AsyncDiff hook (asyncgen/runtime/asyncdiff_hook.py): its own duties (LoRA scale, timesteps looked up ahead,
the guards around them) and a second, unnamed pass per step as a lane of its own."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.pipelines import AsyncDiffPipeline
from tests.pipelines.test_asyncdiff import denoiser_of, even_cuts, follow_the_design
from tiny_models import call_kwargs

# family -> (load the pipeline, call arguments, the denoiser kwargs dict that carries a LoRA scale)
FAMILIES = {
    "sd": (lambda paths: tiny_models.load(paths["sd"]), lambda **kw: call_kwargs(**kw), "cross_attention_kwargs"),
    "flux": (lambda paths: tiny_models.load_family(paths["flux"], "flux"), lambda **kw: tiny_models.family_call_kwargs("flux", **kw),
             "joint_attention_kwargs"),
}


@pytest.fixture
def model_paths(sd_path, dit_paths):
    return {"sd": sd_path, "flux": dit_paths["flux"]}


@pytest.fixture
def lora_backend(monkeypatch):
    """PEFT's scale/unscale calls, recorded instead of made; returns ``(events, scales in force)``.

    peft is not a dependency; what is tested is when, on what and with which scale the
    proxy calls them, against what the stock denoiser's forward (diffusers'
    ``apply_lora_scale``) does with the same arguments. The pipelines' own calls for their
    text encoders are recorded too (without PEFT, diffusers 0.42 takes a path that fails on
    transformers 5's CLIPTextModel, which has no ``text_model``), the same with and without
    the wrapper.

    Like diffusers' own functions (and PEFT's ``scale_layer``), a weight of 1.0 (or an
    unscale without one) returns at once, and scales multiply: the block split runs the
    model's own forward for each stage, whose ``apply_lora_scale`` calls them with 1.0
    inside the proxy's scale, which changes no weight; a scale applied twice would show.
    """
    import diffusers.utils
    from diffusers.pipelines.flux import pipeline_flux
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion
    from diffusers.utils import peft_utils

    import asyncgen.runtime.asyncdiff_hook as proxy

    events, in_force = [], {}

    def scale(model, weight):
        if weight == 1.0:
            return
        events.append(("scale", type(model).__name__, weight))
        in_force[type(model).__name__] = in_force.get(type(model).__name__, 1.0) * weight

    def unscale(model, weight=None):
        if weight is None or weight == 1.0:
            return
        events.append(("unscale", type(model).__name__, weight))
        name = type(model).__name__
        in_force[name] = in_force.get(name, 1.0) / weight if weight else 1.0  # 0 resets, as diffusers does
        if in_force[name] == 1.0:
            in_force.pop(name)

    for module in (diffusers.utils, proxy, pipeline_flux, pipeline_stable_diffusion):
        monkeypatch.setattr(module, "USE_PEFT_BACKEND", True)
    for module in (peft_utils, proxy, pipeline_flux, pipeline_stable_diffusion):
        monkeypatch.setattr(module, "scale_lora_layers", scale)
        monkeypatch.setattr(module, "unscale_lora_layers", unscale)
    return events, in_force


def record_attention(denoiser, events, in_force, fail_at: int | None = None):
    """Log every attention call of ``denoiser`` with the denoiser's LoRA scale in force and its keyword names."""
    owner, calls = type(denoiser).__name__, [0]

    def hook(module, args, kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("injected failure inside a stage")
        events.append(("attention", in_force.get(owner), tuple(sorted(kwargs))))

    for module in denoiser.modules():
        if hasattr(module, "processor"):
            module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_lora_scale_is_applied_around_the_stages_like_the_stock_denoiser(model_paths, lora_backend, family):
    load, kwargs_of, lora_kwargs = FAMILIES[family]
    events, in_force = lora_backend
    given = {"scale": 0.5}

    stock = load(model_paths)
    # before the hooks: splitting a transformer runs its forward (trace, verification), which
    # would log attention calls on the stock denoiser and scale(1.0) no-ops into this call's events
    cuts = even_cuts(stock, 2)
    record_attention(denoiser_of(stock), events, in_force)
    stock(**kwargs_of(**{lora_kwargs: given}))
    expected = list(events)

    wrapped = AsyncDiffPipeline(load(model_paths), stages=2, warmup=1, split=cuts)
    # a first call: the split traces its boundary again on the pipeline's own arguments there, which runs the
    # transformer's forward once more (split-time work, not the call's)
    wrapped(**kwargs_of(**{lora_kwargs: given}))
    events[:] = []  # the wrapper's own split-time forwards are not the call's
    record_attention(wrapped.denoiser, events, in_force)
    wrapped(**kwargs_of(**{lora_kwargs: given}))

    # per step: scale(0.5) on the denoiser, every attention call with 0.5 in force and no
    # "scale" among its keywords, unscale(0.5): the same sequence as the stock forward's
    assert events == expected
    attention = [e for e in expected if e[0] == "attention"]
    assert attention and all(scale == 0.5 and "scale" not in names for _, scale, names in attention)
    assert given == {"scale": 0.5}  # the caller's dict is not modified


def test_lora_scale_is_undone_when_a_stage_fails(sd_path, lora_backend):
    events, in_force = lora_backend
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1, split=[0, 10, 20])
    record_attention(wrapped.denoiser, events, in_force, fail_at=3)
    with pytest.raises(RuntimeError, match="injected failure inside a stage"):
        wrapped(**call_kwargs(cross_attention_kwargs={"scale": 0.5}))
    unet = [e for e in events if e[1] == "UNet2DConditionModel"]
    assert unet == [("scale", "UNet2DConditionModel", 0.5), ("unscale", "UNet2DConditionModel", 0.5)]
    assert events[-1] == unet[-1] and "UNet2DConditionModel" not in in_force


def test_flux_look_ahead_uses_the_timestep_scale_the_pipeline_passes(dit_paths):
    # FluxPipeline passes t / 1000 to the transformer while its scheduler lists t; at stride 2
    # the proxy predicts step i + 1 at step i from the scheduler's list, rescaled
    path = dit_paths["flux"]
    cuts = even_cuts(tiny_models.load_family(path, "flux"), 2)
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, "flux"), stages=2, stride=2, warmup=1, split=cuts)
    passed = []
    conditioning = wrapped.hook.split.conditioning

    def record(sample, timestep, **kwargs):
        passed.append(float(timestep.reshape(-1)[0]))
        return conditioning(sample, timestep, **kwargs)

    wrapped(**tiny_models.family_call_kwargs("flux"))  # the first call also retraces the split (its own forward)
    wrapped.hook.split.conditioning = record
    images = wrapped(**tiny_models.family_call_kwargs("flux")).images
    expected = follow_the_design(tiny_models.load_family(path, "flux"), cuts, warmup=1, stride=2)(
        **tiny_models.family_call_kwargs("flux")).images
    # the design computes each step from the timestep the pipeline passes when it gets
    # there; a look-ahead on the scheduler's scale (x1000) or off by a bit would differ
    assert np.array_equal(images, expected)
    assert max(passed) <= 1.0 and len(passed) == 6  # one conditioning per step, all on the pipeline's scale
    assert not np.array_equal(expected, tiny_models.load_family(path, "flux")(**tiny_models.family_call_kwargs("flux")).images)


def _nudge_the_next_timestep(pipe, step, timestep, callback_kwargs):
    if step == 1:
        pipe.scheduler.timesteps[2] += 1  # the tensor the pipeline is iterating over
    return callback_kwargs


def test_a_timestep_changed_after_the_look_ahead_is_refused(sd_path):
    # stride 2, warm-up 1: the round at step 1 predicted step 2 from timesteps[2]
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, stride=2, warmup=1, split=[0, 10, 20])
    with pytest.raises(RuntimeError, match=r"step 2 was predicted ahead for a timestep the pipeline does not use now "
                                           r"\(\d+\.0\); the scheduler's timesteps changed during the call"):
        wrapped(**call_kwargs(callback_on_step_end=_nudge_the_next_timestep))
    # at stride 1 nothing is predicted ahead, so the same change is the pipeline's business
    stride_1 = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, stride=1, warmup=1, split=[0, 10, 20])
    assert np.isfinite(stride_1(**call_kwargs(callback_on_step_end=_nudge_the_next_timestep)).images).all()


def test_timesteps_the_scheduler_does_not_list(sd_path):
    # a hand-written loop calling the denoiser with its own timesteps (990.5 is in no DDIM list)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 8, tiny_models.CROSS_DIM, generator=generator)
    timesteps = [torch.tensor(990.5), torch.tensor(970.5)]
    cuts = even_cuts(tiny_models.load(sd_path), 2)

    stride_2 = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, stride=2, warmup=1, split=cuts).denoiser
    stride_2(latents, timesteps[0], encoder_hidden_states=text)  # the exact step needs nothing ahead
    with pytest.raises(RuntimeError, match=r"stride 2 needs the timestep of step 2 before the pipeline reaches it, "
                                           r"but the pipeline's scheduler does not list it \(custom timesteps\?\); "
                                           r"use stride=1"):
        stride_2(latents, timesteps[1], encoder_hidden_states=text)

    # stride 1 needs no timestep ahead: the same loop runs, and follows the design
    stride_1 = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, stride=1, warmup=1, split=cuts).denoiser
    design = denoiser_of(follow_the_design(tiny_models.load(sd_path), cuts, warmup=1))
    for t in timesteps:
        x = latents + t / 1000  # a different sample each step, as a real loop has
        assert torch.equal(stride_1(x, t, encoder_hidden_states=text).sample,
                           design(x, t, encoder_hidden_states=text).sample)


# A pipeline that runs a second denoiser pass per step without naming it (Lumina2: cond, then
# uncond, on the same latents, no ``cache_context``): the proxy must count steps, not calls, and
# give the second pass a lane of its own, so the two passes' stale states never mix.
def test_a_second_pass_on_the_same_latents_is_a_lane_of_its_own(family_path, one_thread):
    path = family_path("lumina2")
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, "lumina2"), stages=2, warmup=1)
    seen = []

    def count(pipe, i, t, kwargs):
        hook = wrapped.hook
        seen.append((hook.main._step, {name: lane._step for name, lane in hook.lanes.items()}))
        return {}

    kwargs = tiny_models.family_call_kwargs("lumina2", callback_on_step_end=count)
    images = wrapped(**kwargs).images
    steps = kwargs["num_inference_steps"]
    # after step i both the main lane and the uncond lane have run i + 1 steps (not 2 (i + 1) calls on one schedule)
    assert seen == [(i + 1, {"pass 1": i + 1}) for i in range(steps)]
    assert np.isfinite(images).all()
