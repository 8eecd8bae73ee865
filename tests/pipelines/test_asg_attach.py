"""apply_asg: ASG through a diffusers hook on the pipeline's own UNet, without the front door."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.pipelines import ASGConfig, ASGPipeline, AsyncDiffPipeline, apply_asg
from asyncgen.runtime.asg_hook import ASGHook
from asyncgen.runtime.scoped_hook import hooks_of
from tiny_models import call_kwargs

NATIVE = 16  # the tiny pipelines: UNet sample_size 8, VAE scale factor 2
pytestmark = pytest.mark.usefixtures("one_thread")


def _large(**extra):
    # given latents and no generator: the front door draws no interaction seed, so it uses the config's, as
    # apply_asg does; the same noise for both
    latents = torch.randn(1, 4, NATIVE, 3 * NATIVE // 2, generator=torch.Generator().manual_seed(1))
    kwargs = call_kwargs(height=2 * NATIVE, width=3 * NATIVE, num_inference_steps=4, latents=latents, **extra)
    kwargs.pop("generator")
    return kwargs


def test_the_stock_call_after_apply_asg_is_the_front_doors_call(sd_path):
    # the same hook and executor: the wrapper adds only what the UNet cannot see (the prompt's word tokens for
    # M, the pixel-interaction seed) and shared randomness, so with the same inputs the pictures are equal
    expected = ASGPipeline(tiny_models.load(sd_path))(**_large()).images
    pipe = tiny_models.load(sd_path)
    attachment = apply_asg(pipe)
    assert pipe.vae.use_tiling  # the large latent is decoded in native-size tiles
    with attachment.call_inputs(prompt=_large()["prompt"]):
        np.testing.assert_array_equal(pipe(**_large()).images, expected)
    # without the prompt's words the map follows every token but the start token: another picture
    assert not np.array_equal(pipe(**_large()).images, expected)
    assert attachment.hook.step == 4  # one UNet call per step of the last call


def test_scoped_attachment_leaves_every_other_call_stock_and_remove_restores(sd_path):
    stock_pipe = tiny_models.load(sd_path)
    stock = stock_pipe(**_large()).images
    pipe = tiny_models.load(sd_path)
    attachment = apply_asg(pipe, ASGConfig(scoped=True, tiled_decoding=True))
    np.testing.assert_array_equal(pipe(**_large()).images, stock)  # outside active(): the stock large picture
    assert not pipe.vae.use_tiling
    with attachment.active():
        assert pipe.vae.use_tiling
        asg = pipe(**_large()).images
    assert not pipe.vae.use_tiling and not np.array_equal(asg, stock)
    unscoped = tiny_models.load(sd_path)
    other = apply_asg(unscoped)
    other.remove()
    assert not hooks_of(unscoped.unet, ASGHook) and not unscoped.vae.use_tiling
    np.testing.assert_array_equal(unscoped(**_large()).images, stock)


def test_wrapping_twice_and_residual_inputs_are_refused(sd_path):
    pipe = tiny_models.load(sd_path)
    apply_asg(pipe)
    with pytest.raises(TypeError, match=r"already wrapped by ASGPipeline \(or apply_asg"):
        apply_asg(pipe)
    with pytest.raises(TypeError, match="already wrapped by ASGPipeline"):
        AsyncDiffPipeline(pipe, stages=1)
    unet = pipe.unet
    sample = torch.zeros(1, 4, NATIVE // 2, NATIVE // 2)
    pipe.scheduler.set_timesteps(2)
    residuals = tuple(torch.zeros(1, 1, 1, 1) for _ in range(3))
    with pytest.raises(ValueError, match="ASG does not cut down_block_additional_residuals"):
        unet(sample, 1, torch.zeros(1, 3, unet.config.cross_attention_dim), down_block_additional_residuals=residuals)


def test_config_values_are_checked():
    with pytest.raises(ValueError, match=r"structure_fraction=2 must lie in \[0, 1\]"):
        ASGConfig(structure_fraction=2)
    with pytest.raises(ValueError, match="interaction_seed=-1: must be an integer from 0"):
        ASGConfig(interaction_seed=-1)
    with pytest.raises(ValueError, match=r"native_size=\(16, 0\) must be a positive integer or a pair"):
        ASGConfig(native_size=(16, 0))
    with pytest.raises(ValueError, match="scoped='yes': must be True or False"):
        ASGConfig(scoped="yes")
    with pytest.raises(TypeError, match="config must be an ASGConfig, got dict"):
        apply_asg(object(), {"mode": "sync"})


def test_a_size_that_is_not_a_multiple_of_the_native_one_is_refused_at_the_first_step(sd_path):
    pipe = tiny_models.load(sd_path)
    apply_asg(pipe)
    with pytest.raises(ValueError, match="height=24 is not a whole multiple of the native height 16"):
        pipe(**call_kwargs(height=24, width=32, num_inference_steps=2))
