"""AsyncDiffPipeline in one process (serial simulator) against the stock pipelines."""

import numpy as np
import pytest
import torch
from torch import nn

import tiny_models
from asyncgen.pipelines import AsyncDiffPipeline
from tiny_models import call_kwargs


def _images(pipe, **overrides):
    return pipe(**call_kwargs(**overrides)).images


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


def test_asynchronous_steps_approximate_the_stock_output(sd_path):
    reference = _images(tiny_models.load(sd_path), num_inference_steps=12)
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=2)
    images = _images(wrapped, num_inference_steps=12)
    difference = np.abs(images - reference)
    assert difference.max() > 0  # stale inputs really were used
    assert difference.mean() < 0.1  # ...and the result is still the same picture, roughly


def test_time_shift_changes_the_result(sd_path):
    plain = _images(AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1))
    shifted = _images(AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1, time_shift=True))
    assert not np.array_equal(plain, shifted)


def test_default_warmup_is_five_percent(sd_path):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)
    wrapped(**call_kwargs(num_inference_steps=40))
    assert wrapped.denoiser.schedule is None  # reset after the call
    from asyncgen.proxy import default_warmup

    assert default_warmup(40) == 2 and default_warmup(6) == 1 and default_warmup(50) == 3


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
    asynchronous = AsyncDiffPipeline(tiny_models.load(sd_path, "StableDiffusionImg2ImgPipeline"), stages=2, stride=2, warmup=1)
    images = _images(asynchronous, **kwargs)
    assert images.shape == reference.shape and np.isfinite(images).all()


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
    images = _images(AsyncDiffPipeline(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"), stages=2, stride=2, warmup=1))
    assert np.isfinite(images).all()


def test_proxy_keeps_the_denoiser_interface(sd_path):
    pipe = tiny_models.load(sd_path)
    unet = pipe.unet
    wrapped = AsyncDiffPipeline(pipe, stages=2)
    assert pipe.unet is wrapped.denoiser
    assert pipe.unet.config is unet.config and pipe.unet.dtype == torch.float32
    assert pipe.config["unet"][1] == "UNet2DConditionModel"  # the pipeline's config still names the model
    # serial mode keeps every stage: the proxy's parameters are the UNet's
    assert {id(p) for p in pipe.unet.parameters()} == {id(p) for p in unet.parameters()}
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
