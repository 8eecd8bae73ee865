"""ASGPipeline in one process (the guidance maths and the map-recording processors are in tests/schedules/)."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.schedules.asg_attention import cross_attention_layers
from asyncgen.pipelines import ASGPipeline
from tiny_models import call_kwargs

NATIVE = 16  # the tiny pipelines: UNet sample_size 8, VAE scale factor 2
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ attention maps


def test_attention_layer_choice_is_checked(sd_pipe):
    with pytest.raises(ValueError, match="attention layers 'sideways' is not one of up, mid, down, all"):
        ASGPipeline(sd_pipe, attention_layers="sideways")
    with pytest.raises(ValueError, match=r"attention_layers \['conv_in'\] are not attention modules"):
        ASGPipeline(sd_pipe, attention_layers=["conv_in"])
    layers = list(cross_attention_layers(sd_pipe.unet, "all"))
    assert ASGPipeline(sd_pipe, attention_layers=layers[:1]).map_layers.keys() == {layers[0]}


# ------------------------------------------------------------------ the pipeline


@pytest.mark.parametrize("path_fixture, cls", [("sd_path", "StableDiffusionPipeline"),
                                                ("sdxl_path", "StableDiffusionXLPipeline")])
def test_one_patch_and_no_guidance_is_the_stock_pipeline(request, path_fixture, cls):
    # one patch per axis: the permutation is the identity, there is no other patch to
    # guide, and the detail phase has one window covering the latent, divided by a count
    # of 1; the denoiser sees the same inputs in the same batch layout as the stock
    # pipeline, so the pictures are equal to the last bit
    pipe = tiny_models.load(request.getfixturevalue(path_fixture), cls)
    kwargs = call_kwargs(height=NATIVE, width=NATIVE, num_inference_steps=4)
    stock = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    for options in (dict(structure_fraction=1.0, structure_guidance=0.0), dict(structure_fraction=0.5),
                    dict(structure_fraction=0.0, mode="sync")):
        images = ASGPipeline.from_pipe(pipe, **options)(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        np.testing.assert_array_equal(images, stock, err_msg=str(options))


def test_large_picture_output_types_and_modes(sd_pipe):
    kwargs = call_kwargs(height=2 * NATIVE, width=3 * NATIVE, num_inference_steps=4)
    seeded = lambda **extra: {**kwargs, "generator": torch.Generator().manual_seed(0), **extra}  # noqa: E731
    asynchronous = ASGPipeline(sd_pipe)
    tiles = []
    real_tiled = sd_pipe.vae.tiled_decode
    sd_pipe.vae.tiled_decode = lambda z, **kw: tiles.append(z.shape) or real_tiled(z, **kw)
    images = asynchronous(**seeded()).images
    assert tiles == [(1, 4, NATIVE, 3 * NATIVE // 2)]  # the large latent is decoded in tiles
    whole = ASGPipeline(sd_pipe, tiled_decoding=False)(**seeded()).images
    assert len(tiles) == 1 and whole.shape == images.shape  # decoded in one piece
    assert images.shape == (1, 2 * NATIVE, 3 * NATIVE, 3) and np.isfinite(images).all()
    pil, nsfw = asynchronous(**seeded(output_type="pil", return_dict=False))
    assert pil[0].size == (3 * NATIVE, 2 * NATIVE) and nsfw is None
    latent = asynchronous(**seeded(output_type="latent")).images
    assert latent.shape == (1, 4, 2 * NATIVE // 2, 3 * NATIVE // 2)
    synchronous = ASGPipeline(sd_pipe, mode="sync")(**seeded()).images
    unguided = ASGPipeline(sd_pipe, structure_guidance=0.0)(**seeded()).images
    # the guidance acts, and the two modes guide with different key predictions
    assert not np.array_equal(images, unguided) and not np.array_equal(images, synchronous)
    np.testing.assert_array_equal(ASGPipeline(sd_pipe)(**seeded()).images, images)  # deterministic given the seed


def test_from_pretrained_loads_and_wraps(sd_path, sd_pipe):
    kwargs = call_kwargs(height=2 * NATIVE, width=NATIVE, num_inference_steps=3)
    loaded = ASGPipeline.from_pretrained(str(sd_path), mode="sync")
    loaded.set_progress_bar_config(disable=True)  # reaches the wrapped pipeline
    expected = ASGPipeline.from_pipe(sd_pipe, mode="sync")(**kwargs).images
    np.testing.assert_array_equal(loaded(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images, expected)


def test_sdxl_windows_get_their_crop_offsets(sdxl_pipe):
    wrapped = ASGPipeline(sdxl_pipe)
    seen = []
    # the UNet embeds its time ids flattened (6 per row): the first row's, per native-size UNet call
    spy = sdxl_pipe.unet.add_time_proj.register_forward_pre_hook(
        lambda module, inputs: seen.append(tuple(inputs[0][:6].tolist())))
    try:
        images = wrapped(**call_kwargs(height=NATIVE, width=2 * NATIVE, num_inference_steps=2)).images
    finally:
        spy.remove()
    assert images.shape == (1, NATIVE, 2 * NATIVE, 3) and np.isfinite(images).all()
    n = float(NATIVE)
    # step 1: the two patches (uncropped), step 2: three windows, 8 pixels apart
    assert seen == [(n, n, 0.0, 0.0, n, n)] * 2 + [(n, n, 0.0, left, n, n) for left in (0.0, 8.0, 16.0)]


def test_bad_sizes_and_options_are_refused(sd_pipe):
    wrapped = ASGPipeline(sd_pipe)
    with pytest.raises(ValueError, match=r"height=24 is not a whole multiple of the native height 16; ASG accepts 16, 32, 48"):
        wrapped(**call_kwargs(height=24, width=32))
    with pytest.raises(ValueError, match="width=8 is not a whole multiple of the native width 16"):
        wrapped(**call_kwargs(height=16, width=8))
    with pytest.raises(ValueError, match=r"window stride \(columns\)=9 must be an integer between 1 and the window size 8"):
        ASGPipeline(sd_pipe, window_stride=(4, 9))(**call_kwargs(height=32, width=32))
    with pytest.raises(ValueError, match=r"window_stride=0 must be a positive integer"):
        ASGPipeline(sd_pipe, window_stride=0)
    with pytest.raises(ValueError, match=r"mode='fast' is not one of 'async', 'sync'"):
        ASGPipeline(sd_pipe, mode="fast")
    with pytest.raises(ValueError, match=r"structure_fraction=-0.1 must lie in \[0, 1\]"):
        ASGPipeline(sd_pipe, structure_fraction=-0.1)
    with pytest.raises(ValueError, match="num_inference_steps=0 must be an integer >= 1"):
        wrapped(**call_kwargs(num_inference_steps=0))
    with pytest.raises(TypeError, match="is not an SD-style pipeline"):
        ASGPipeline(object())
