"""The look-ahead's timesteps (asyncgen/runtime/asyncdiff_hook.py): how a pipeline converts its scheduler's
timesteps is learnt from the steps it takes, not from a list of pipelines.

SD passes the scheduler's ``t``, Flux ``t / 1000``, ZImage ``(1000 - t) / 1000``. At stride > 1 a
round predicts later steps from the scheduler's list before the pipeline reaches them, so a
look-ahead on the wrong map conditions those steps on the wrong timestep (issue 26: ZImage at
stride 2 was refused at step 2).
"""

import numpy as np
import pytest
import torch

import embedding_pipelines
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.runtime.asyncdiff_hook import TimestepMap, learn_timestep_map
from unseen_configs import CASES

F32 = 4 * torch.finfo(torch.float32).eps  # what _resolution gives a float32 timestep
SCHEDULED = [1000.0, 923.3425, 818.9233, 668.3267, 432.2251, 8.9286]


def _as_passed(convert, scheduled=SCHEDULED, dtype=torch.float32):
    """What a pipeline passes: its conversion done on the scheduler's float32 values in ``dtype``."""
    return [float(convert(torch.tensor(s, dtype=torch.float32).to(dtype))) for s in scheduled]


@pytest.mark.parametrize("convert, expected", [
    (lambda t: t, TimestepMap()),  # SD, SDXL
    (lambda t: t / 1000, TimestepMap(divisor=1000.0)),  # Flux, SD3
    (lambda t: (1000 - t) / 1000, TimestepMap(sign=-1, offset=1000.0, divisor=1000.0)),  # ZImage
    (lambda t: t * 1000, TimestepMap(divisor=0.001)),  # a scheduler listing sigmas, a denoiser taking t
])
def test_the_map_is_learnt_from_two_steps_and_gives_the_pipelines_values_bit_for_bit(convert, expected):
    passed = _as_passed(convert)
    learnt = learn_timestep_map(SCHEDULED[:2], passed[:2], F32)
    assert learnt == expected
    # the pipeline's own operations in its dtype: every later step exactly as the pipeline will pass it
    assert learnt(torch.tensor(SCHEDULED, dtype=torch.float32)).tolist() == passed


def test_the_order_of_a_shift_and_a_scale_is_told_by_a_step_where_they_differ():
    # Lumina2 passes 1 - t / 1000, ZImage (1000 - t) / 1000: the same map, rounded differently at about one
    # timestep in two (818.9233 here); the order that gives the steps seen bit for bit is the pipeline's
    lumina = _as_passed(lambda t: 1 - t / 1000)
    zimage = _as_passed(lambda t: (1000 - t) / 1000)
    assert lumina[2] != zimage[2]
    learnt = learn_timestep_map(SCHEDULED[:3], lumina[:3], F32, torch.float32)
    assert learnt == TimestepMap(sign=-1, offset=1000.0, divisor=1000.0, shift_first=False)
    assert learnt(torch.tensor(SCHEDULED)).tolist() == lumina
    assert learn_timestep_map(SCHEDULED[:3], zimage[:3], F32, torch.float32).shift_first
    # two steps that both orders give alike: shifted first, one unit in the last place from Lumina2's at most
    ambiguous = learn_timestep_map(SCHEDULED[:2], lumina[:2], F32, torch.float32)
    assert ambiguous.shift_first
    got = ambiguous(torch.tensor(SCHEDULED))
    assert torch.allclose(got, torch.tensor(lumina), rtol=0, atol=torch.finfo(torch.float32).eps)


def test_bf16_timesteps_are_computed_in_bf16_like_the_pipeline():
    # Flux casts t to the latents' dtype before dividing: the same operation in bf16 gives the same bf16 value
    passed = _as_passed(lambda t: t / 1000, dtype=torch.bfloat16)
    learnt = learn_timestep_map(SCHEDULED[:2], passed[:2], 4 * torch.finfo(torch.bfloat16).eps)
    assert learnt == TimestepMap(divisor=1000.0)
    assert learnt(torch.tensor(SCHEDULED).to(torch.bfloat16)).float().tolist() == passed


def test_one_step_tells_only_a_rescaling_and_says_so():
    assert learn_timestep_map([923.3425], [0.9233425], F32) == TimestepMap(divisor=1000.0, assumed=True)
    assert learn_timestep_map([999.0], [999.0], 0.0) == TimestepMap(assumed=True)
    # ZImage's first step, 1000 -> 0, is no rescaling: nothing can be told from it alone
    assert learn_timestep_map([1000.0], [0.0], F32) is None


def test_a_conversion_that_is_not_affine_is_not_guessed():
    passed = _as_passed(lambda t: (t / 1000) ** 2)
    assert learn_timestep_map(SCHEDULED[:3], passed[:3], F32) is None


# ------------------------------------------------------------------ ZImage through its stock pipeline

def _zimage(steps: int = 6):
    case = CASES["ZImageTransformer2DModel"]
    return embedding_pipelines.pipeline("ZImageTransformer2DModel", case["config"], height=case["size"],
                                        width=case["size"], steps=steps)


def _conditioned_on(wrapped, call):
    """Run ``call``: its images, the timesteps the pipeline passed, those the stages were conditioned on, and the
    maps the look-ahead used (read during the call: the lane forgets its map when the call ends)."""
    hook = wrapped.hook
    passed, conditioned, maps = [], [], set()
    conditioning = None

    def record_passed(module, args, kwargs):
        if hook._running:
            return  # a block split's stage runs the model's own forward inside the hook's: not a pipeline call
        arguments = hook._signature.bind(*args, **kwargs).arguments
        passed.append(arguments[hook.split.timestep_argument if hook.split else "t"].clone())

    handle = wrapped.denoiser.register_forward_pre_hook(record_passed, with_kwargs=True)
    try:
        images = embedding_pipelines.run(wrapped, call)  # the first call adopts the pipeline's call as the example
        conditioning = hook.split.conditioning

        def record(sample, timestep, **kwargs):
            conditioned.append(timestep.clone())
            maps.add(hook.main._map)
            return conditioning(sample, timestep, **kwargs)

        hook.split.conditioning = record
        passed.clear()
        images = embedding_pipelines.run(wrapped, call)
    finally:
        handle.remove()
        if conditioning is not None:
            hook.split.conditioning = conditioning
    return images, passed, conditioned, maps


@pytest.mark.skipif(not hasattr(__import__("diffusers"), "ZImageTransformer2DModel"), reason="no ZImage in this diffusers")
@pytest.mark.parametrize("stages, stride", [(1, 2), (2, 2)])
def test_zimage_look_ahead_conditions_each_step_on_the_timestep_its_pipeline_passes(stages, stride, one_thread):
    pipe, call = _zimage()
    stock = embedding_pipelines.run(pipe, call)
    wrapped = AsyncDiffPipeline(pipe, stages=stages, stride=stride, warmup=1)
    images, passed, conditioned, maps = _conditioned_on(wrapped, call)
    assert TimestepMap(sign=-1, offset=1000.0, divisor=1000.0) in maps  # (None before the first look-ahead)
    assert maps <= {None, TimestepMap(sign=-1, offset=1000.0, divisor=1000.0)}
    # every conditioning (the exact step's, each round's fresh stage and each replica's step ahead) is on a
    # timestep the pipeline passes at some step, bit for bit; the steps looked up ahead are among them
    passed_values = {float(t[0]) for t in passed}
    assert len(passed) == 6 and all(float(t[0]) in passed_values and t.dtype == torch.float32 for t in conditioned)
    # and every step's timestep is used: rounds at steps 1, 3 and 5 condition steps 2 and 4 ahead
    assert {float(t[0]) for t in conditioned} == passed_values and len(passed_values) == 6
    assert torch.isfinite(images).all() and not torch.equal(images, stock)  # the rounds ran from stale states


@pytest.mark.skipif(not hasattr(__import__("diffusers"), "ZImageTransformer2DModel"), reason="no ZImage in this diffusers")
def test_zimage_at_warmup_0_is_refused_with_the_fix(one_thread):
    # stride 2 with no exact step looks step 1 up at step 0: ZImage's 1000 -> 0 is no rescaling
    pipe, call = _zimage()
    wrapped = AsyncDiffPipeline(pipe, stages=1, stride=2, warmup=0)
    with pytest.raises(RuntimeError, match=r"^stages 1 at stride 2 need the timestep of step 1 before the pipeline "
                                           r"reaches it: the pipeline passes its denoiser timesteps that are no affine "
                                           r"map of its scheduler's \(scheduler -> passed: 1000 -> 0\); a map other "
                                           r"than a rescaling is learnt from two steps: use warmup >= 1$"):
        embedding_pipelines.run(wrapped, call)


@pytest.mark.skipif(not hasattr(__import__("diffusers"), "ZImageTransformer2DModel"), reason="no ZImage in this diffusers")
def test_a_rescaling_assumed_from_one_step_and_proved_wrong_says_so(one_thread):
    # sigmas below 1: ZImage's first step passes 1000 - t != 0, which one step cannot tell from a rescaling
    pipe, call = _zimage()
    call = dict(call, num_inference_steps=None, sigmas=[0.8, 0.6, 0.4, 0.2])
    wrapped = AsyncDiffPipeline(pipe, stages=1, stride=2, warmup=0)
    with pytest.raises(RuntimeError, match=r"^step 1 was predicted ahead for timestep \S+, taking the pipeline's "
                                           r"timesteps for its scheduler's rescaled \(s / \S+, from step 0 alone\), "
                                           r"but the pipeline passed \S+: with warmup=0 the map is learnt from one "
                                           r"step; use warmup >= 1$"):
        embedding_pipelines.run(wrapped, call)
    # with one exact step the map is learnt from two, and the same call runs
    wrapped = AsyncDiffPipeline(_zimage()[0], stages=1, stride=2, warmup=1)
    assert torch.isfinite(embedding_pipelines.run(wrapped, call)).all()


def test_lumina2_at_stride_2_conditions_each_step_within_a_unit_in_the_last_place(family_path, one_thread):
    # Lumina2 passes 1 - t / 1000 (its first step 1000 -> 0 gave the old ratio map 1, refused at step 2), and runs a
    # second, unnamed pass per step: each pass's lane learns the map from its own steps
    import tiny_models

    path = family_path("lumina2")
    call = tiny_models.family_call_kwargs("lumina2", num_inference_steps=6)
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, "lumina2"), stages=1, stride=2, warmup=1)
    wrapped(**call)  # the first call adopts the pipeline's call as the example
    hook, conditioned, passed = wrapped.hook, [], []
    conditioning = hook.split.conditioning

    def record(sample, timestep, **kwargs):
        conditioned.append(float(timestep.reshape(-1)[0]))
        return conditioning(sample, timestep, **kwargs)

    def record_passed(module, args, kwargs):
        if not hook._running:
            passed.append(float(hook._signature.bind(*args, **kwargs).arguments["timestep"].reshape(-1)[0]))

    hook.split.conditioning = record
    handle = wrapped.denoiser.register_forward_pre_hook(record_passed, with_kwargs=True)
    try:
        images = wrapped(**call).images
    finally:
        handle.remove()
        hook.split.conditioning = conditioning
    assert np.isfinite(images).all() and len(set(passed)) == 6
    # one ulp of float32 at these values (below 1): the look-ahead's order of operations may differ from Lumina2's
    ulp = torch.finfo(torch.float32).eps
    assert all(min(abs(c - p) for p in passed) <= ulp for c in conditioned)
    assert {min(passed, key=lambda p: abs(p - c)) for c in conditioned} == set(passed)  # every step's used
