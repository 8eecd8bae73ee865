"""AsyncDiffPipeline in one process (serial simulator) against the stock pipelines.

Where the maths says equal (one stage, or a warm-up covering every step) the wrapper is
compared with the stock pipeline. Asynchronous steps are compared with
:func:`follow_the_design`: the stock pipeline whose own denoiser computes DESIGN.md's
formula step by step, written without the schedule, the proxy or the simulator.
"""

import inspect

import numpy as np
import pytest
import torch
from torch import nn

import tiny_models
from asyncgen.split.registry import split_denoiser
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.runtime.asyncdiff_hook import HOOK_NAME, default_warmup
from diffusers.hooks import HookRegistry
from tiny_models import call_kwargs


def _images(pipe, **overrides):
    return pipe(**call_kwargs(**overrides)).images


def denoiser_of(pipe) -> nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def even_cuts(pipe, stages: int) -> list[int]:
    """Cut points giving each stage about the same number of units (given to both sides as ``split=``)."""
    n = len(split_denoiser(denoiser_of(pipe)).units)
    return [round(k * n / stages) for k in range(stages + 1)]


def follow_the_design(pipe, cuts, warmup: int, stride: int = 1, time_shift: bool = False):
    """Make ``pipe``'s own denoiser compute DESIGN.md's asynchronous formula; returns ``pipe``.

    Steps ``< max(warmup, 1)`` are exact. Afterwards a round starts every ``stride``
    steps: stage 0 runs on the fresh latent, stage k > 0 on what stage k-1 produced in the
    previous round, and the last stage serves each step of the round from the same stale
    state with that step's conditioning (with ``time_shift``, stale stages take the
    previous step's timestep). Each step is computed when the pipeline reaches it, from
    the arguments it passes then, so nothing is looked up ahead: a wrong look-ahead in the
    proxy (img2img's later start, Flux's rescaled timesteps) shows as a difference.
    """
    denoiser = denoiser_of(pipe)
    split = split_denoiser(denoiser)
    parts = [split.units[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    signature = inspect.signature(denoiser.forward)
    exact = max(warmup, 1)
    memory = {"step": 0, "previous_timestep": None, "inside": False}
    original = denoiser.forward

    def forward(*args, **kwargs):
        if memory["inside"]:  # the generic block split runs a stage through the model's own forward
            return original(*args, **kwargs)
        memory["inside"] = True
        try:
            return design(*args, **kwargs)
        finally:
            memory["inside"] = False

    def design(*args, **kwargs):
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        return_dict = arguments.pop("return_dict", True)
        sample, timestep = arguments.pop(split.sample_argument), arguments.pop("timestep")
        cond = split.conditioning(sample, timestep, **arguments)
        stale_cond = cond
        if time_shift and memory["previous_timestep"] is not None:
            stale_cond = split.conditioning(sample, memory["previous_timestep"], **arguments)
        memory["previous_timestep"] = timestep
        step = memory["step"]
        memory["step"] += 1
        fresh = split.initial_state(sample, cond)
        if step < exact:
            states = [fresh]
            for units in parts:
                states.append(split.forward_units(states[-1], cond, units))
            memory["produced"] = states[1:-1]  # outputs of stages 0 .. N-2: the next round's stale inputs
            return split.wrap_output(split.output(states[-1]), return_dict)
        if (step - exact) % stride == 0:
            inputs = [fresh] + memory["produced"]
            memory["read"] = memory["produced"][-1]  # the last stage's input for every step of this round
            memory["produced"] = [split.forward_units(inputs[k], cond if k == 0 else stale_cond, parts[k])
                                  for k in range(len(parts) - 1)]
        return split.wrap_output(split.output(split.forward_units(memory["read"], stale_cond, parts[-1])), return_dict)

    denoiser.forward = forward
    return pipe


def test_one_stage_equals_stock_exactly(sd_path):
    reference = _images(tiny_models.load(sd_path))
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=1)
    assert np.array_equal(_images(wrapped), reference)


def test_one_stage_equals_stock_sdxl(sdxl_path):
    reference = _images(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"))
    wrapped = AsyncDiffPipeline(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"), stages=1)
    assert np.array_equal(_images(wrapped), reference)


@pytest.mark.parametrize("stages, stride", [(2, 1), (3, 1), (2, 2)])
def test_warmup_covering_all_steps_equals_stock(sd_path, stages, stride):
    reference = _images(tiny_models.load(sd_path))
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=stages, stride=stride, warmup=6)
    # exact steps run the same kernels on the same inputs; 1e-6 leaves room for nothing else
    np.testing.assert_allclose(_images(wrapped), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stages, stride, warmup, time_shift", [
    (2, 1, 2, False), (3, 1, 1, True), (2, 2, 1, False),
])
def test_asynchronous_steps_follow_the_design(sd_path, stages, stride, warmup, time_shift):
    cuts = even_cuts(tiny_models.load(sd_path), stages)
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=stages, stride=stride, warmup=warmup,
                                time_shift=time_shift, split=cuts)
    expected = _images(follow_the_design(tiny_models.load(sd_path), cuts, warmup, stride, time_shift))
    # the same units on the same inputs in the same order: bit for bit
    assert np.array_equal(_images(wrapped), expected)
    assert not np.array_equal(expected, _images(tiny_models.load(sd_path)))  # stale inputs were really used


def test_default_warmup_is_five_percent(sd_path):
    steps = 21  # 5% is 1.05: rounded up to 2, which neither "one step" nor "5% rounded down" gives
    small = dict(num_inference_steps=steps, height=32, width=32)
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)
    used = []

    def record(pipe, step, timestep, callback_kwargs):
        used.append(wrapped.hook.schedule.exact_steps)
        return callback_kwargs

    images = _images(wrapped, callback_on_step_end=record, **small)
    assert used == [2] * steps
    assert wrapped.hook.schedule is None  # reset after the call
    explicit = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=2)
    assert np.array_equal(images, _images(explicit, **small))
    assert default_warmup(None) == 1 and default_warmup(6) == 1 and default_warmup(40) == 2 and default_warmup(50) == 3


def test_repeated_calls_are_independent(sd_path):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1)
    first, second = _images(wrapped), _images(wrapped)
    assert np.array_equal(first, second)


def test_stock_call_through_the_swapped_pipeline_also_works(sd_path):
    pipe = tiny_models.load(sd_path)
    wrapped = AsyncDiffPipeline(pipe, stages=2, warmup=1)
    expected = _images(wrapped)
    assert np.array_equal(_images(pipe), expected)  # the proxy notices a new call by itself
    assert np.array_equal(_images(pipe), expected)


def test_img2img_one_stage_equals_stock(sd_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    init = torch.rand(1, 3, 64, 64)
    kwargs = dict(image=init, strength=0.6)
    reference = _images(tiny_models.load(sd_path, "StableDiffusionImg2ImgPipeline"), **kwargs)
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path, "StableDiffusionImg2ImgPipeline"), stages=1)
    assert np.array_equal(_images(wrapped, **kwargs), reference)
    full_warmup = AsyncDiffPipeline(StableDiffusionImg2ImgPipeline.from_pretrained(sd_path), stages=3, warmup=6)
    np.testing.assert_allclose(_images(full_warmup, **kwargs), reference, atol=1e-6, rtol=0)
    # strength 0.6 starts at the 4th of 6 timesteps: stride 2 must look ahead from there
    cuts = even_cuts(tiny_models.load(sd_path), 2)
    asynchronous = AsyncDiffPipeline(tiny_models.load(sd_path, "StableDiffusionImg2ImgPipeline"), stages=2, stride=2,
                                     warmup=1, split=cuts)
    design = follow_the_design(tiny_models.load(sd_path, "StableDiffusionImg2ImgPipeline"), cuts, warmup=1, stride=2)
    expected = _images(design, **kwargs)
    assert np.array_equal(_images(asynchronous, **kwargs), expected)
    assert not np.array_equal(expected, reference)


def test_controlnet_pipeline(sd_path, controlnet_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    def load():
        controlnet = ControlNetModel.from_pretrained(controlnet_path)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(sd_path, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    kwargs = dict(image=torch.rand(1, 3, 64, 64))
    reference = _images(load(), **kwargs)
    assert np.array_equal(_images(AsyncDiffPipeline(load(), stages=1), **kwargs), reference)
    np.testing.assert_allclose(_images(AsyncDiffPipeline(load(), stages=3, warmup=6), **kwargs), reference, atol=1e-6, rtol=0)


def test_sdxl_stride_2(sdxl_path):
    reference = _images(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"))
    wrapped = AsyncDiffPipeline(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"), stages=2, stride=2, warmup=6)
    np.testing.assert_allclose(_images(wrapped), reference, atol=1e-6, rtol=0)
    cuts = even_cuts(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"), 2)
    asynchronous = AsyncDiffPipeline(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"), stages=2, stride=2,
                                     warmup=1, split=cuts)
    expected = _images(follow_the_design(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"), cuts, 1, stride=2))
    assert np.array_equal(_images(asynchronous), expected)  # text_time embeddings reach every stage's conditioning
    assert not np.array_equal(expected, reference)


def test_the_denoiser_stays_the_pipelines_own_module(sd_path):
    pipe = tiny_models.load(sd_path)
    unet = pipe.unet
    parameters = {id(p) for p in unet.parameters()}
    wrapped = AsyncDiffPipeline(pipe, stages=2)
    assert pipe.unet is unet and wrapped.denoiser is unet and type(unet).__name__ == "UNet2DConditionModel"
    assert wrapped.hook is HookRegistry.check_if_exists_or_initialize(unet).get_hook(HOOK_NAME)
    assert pipe.config["unet"][1] == "UNet2DConditionModel"
    # serial mode keeps every stage: nothing is released
    assert {id(p) for p in pipe.unet.parameters()} == parameters
    assert wrapped.scheduler is pipe.scheduler  # other attributes reach the pipeline


def test_output_type_matches_stock(sd_path):
    out = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)(**call_kwargs(output_type="pil"))
    assert type(out).__name__ == "StableDiffusionPipelineOutput" and out.images[0].size == (64, 64)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(stages=99), ValueError, "stages=99 is more than the 20 units"),
    (dict(stages=2, warmup=-1), ValueError, "warmup must be None or an integer >= 0, got -1"),
    (dict(stages=0), ValueError, "stages must be a positive integer, got 0"),
    (dict(stages=2, stride=0), ValueError, "stride must be a positive integer"),
    (dict(stages=2, split="magic"), ValueError, "split='magic' is not one of"),
    (dict(stages=2, split=[0, 3, 9, 20]), ValueError, "gives 3 stages, expected 2"),
])
def test_bad_arguments(sd_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        AsyncDiffPipeline(tiny_models.load(sd_path), **kwargs)


def test_unsupported_denoiser_class(sd_path):
    pipe = tiny_models.load(sd_path)
    object.__setattr__(pipe, "unet", nn.Conv2d(4, 4, 1))
    with pytest.raises(TypeError, match="cannot split a denoiser of class Conv2d"):
        AsyncDiffPipeline(pipe, stages=2)


def test_pipeline_without_denoiser():
    with pytest.raises(TypeError, match="has no denoiser to split"):
        AsyncDiffPipeline(object(), stages=2)


def test_explicit_cut_points(sd_path):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, split=[0, 4, 20])
    assert [len(s.units) for s in wrapped.stages] == [4, 16]


def test_attention_processor_changes_reach_the_stages(sd_path):
    from diffusers.models.attention_processor import AttnProcessor

    class Counting(AttnProcessor):
        calls = 0

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return super().__call__(*args, **kwargs)

    reference = _images(tiny_models.load(sd_path))
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=6)
    wrapped.unet.set_attn_processor(Counting())  # through the proxy, onto the real modules
    images = _images(wrapped)
    assert Counting.calls > 0
    # AttnProcessor and the default SDPA processor differ only in float rounding
    np.testing.assert_allclose(images, reference, atol=1e-5, rtol=0)
