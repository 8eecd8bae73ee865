"""ASG in one process: the guidance maths, the map-recording processors, the pipeline."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.schedules import asg_maths
from asyncgen.schedules.asg_attention import AttentionMapStore, cross_attention_layers, record_attention_maps
from asyncgen.pipelines import ASGPipeline
from tiny_models import call_kwargs

NATIVE = 16  # the tiny pipelines: UNet sample_size 8, VAE scale factor 2
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ maths


@pytest.mark.parametrize("s_h, s_w", [(1, 1), (2, 2), (2, 3), (3, 1)])
def test_relocation_and_derelocation_are_inverses(s_h, s_w):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 5 * s_h, 7 * s_w, generator=g)
    patches = asg_maths.derelocate(latent, s_h, s_w)
    assert patches.shape == (s_h * s_w, 2, 4, 5, 7)
    for i in range(s_h):
        for j in range(s_w):  # HR[..., i::s_h, j::s_w] = patch(i, j)
            assert torch.equal(patches[i * s_w + j], latent[..., i::s_h, j::s_w])
    assert torch.equal(asg_maths.relocate(patches, s_h, s_w), latent)
    assert torch.equal(asg_maths.derelocate(asg_maths.relocate(patches, s_h, s_w), s_h, s_w), patches)


def test_pixel_interaction_permutation_round_trips_exactly():
    g = torch.Generator().manual_seed(1)
    patches = torch.randn(6, 2, 4, 5, 7, generator=g)
    permutation = asg_maths.interaction_permutation(6, 5, 7, g)
    # a permutation of the patches at every position, and not the identity everywhere
    assert torch.equal(permutation.sort(dim=0).values, torch.arange(6).view(6, 1, 1).expand(6, 5, 7))
    assert not torch.equal(permutation, torch.arange(6).view(6, 1, 1).expand(6, 5, 7))
    slots = asg_maths.permute_patches(patches, permutation)
    assert torch.equal(slots[:, :, :, 2, 3], patches[permutation[:, 2, 3], :, :, 2, 3])
    assert torch.equal(asg_maths.unpermute_patches(slots, permutation), patches)
    # the same generator state gives the same permutation (ranks agree without talking)
    assert torch.equal(asg_maths.interaction_permutation(3, 4, 4, torch.Generator().manual_seed(5)),
                       asg_maths.interaction_permutation(3, 4, 4, torch.Generator().manual_seed(5)))


def test_structure_guidance_pulls_towards_the_key_where_the_map_is_high():
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(4, 1, 4, 3, 3, generator=g)
    key = torch.randn(1, 4, 3, 3, generator=g)
    full, none = torch.ones(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)
    assert torch.equal(asg_maths.structure_guidance(eps, key, none, 1.0), eps)
    assert torch.equal(asg_maths.structure_guidance(eps, key, full, 0.0), eps)
    out = asg_maths.structure_guidance(eps, key, full, 1.0)
    assert torch.equal(out[0], eps[0])  # the key patch itself is not guided
    torch.testing.assert_close(out[1:], key.expand(3, 1, 4, 3, 3))
    half = asg_maths.structure_guidance(eps, key, full, 0.5)
    torch.testing.assert_close(half[1:], eps[1:] + 0.5 * (key - eps[1:]))


def test_guidance_weight_schedules():
    assert asg_maths.guidance_weights(2.0, 3, "constant") == [2.0, 2.0, 2.0]
    cosine = asg_maths.guidance_weights(2.0, 4, "cosine")
    assert cosine[0] == 2.0 and all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] > 0
    assert asg_maths.guidance_weights(1.0, 4, "linear") == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="guidance_schedule='exp' is not one of constant, linear, cosine"):
        asg_maths.guidance_weights(1.0, 3, "exp")
    with pytest.raises(ValueError, match="structure_guidance=-1.0 must be a finite number >= 0"):
        asg_maths.guidance_weights(-1.0, 3)


def test_windows_overlap_by_half_and_cover_everything():
    windows = asg_maths.window_layout(16, 24, 8, 8)
    assert [(w.top, w.left) for w in windows[:5]] == [(0, 0), (0, 4), (0, 8), (0, 12), (0, 16)]
    assert len(windows) == 3 * 5
    counts = asg_maths.overlap_counts(windows, 16, 24)
    assert counts.min() == 1 and counts.max() == 4 and counts[0, 0, 5, 5] == 4
    # a stride that does not land on the edge: the last window is moved flush with it
    assert [w.left for w in asg_maths.window_layout(8, 13, 8, 8, 4, 4)] == [0, 4, 5]
    assert len(asg_maths.window_layout(8, 8, 8, 8)) == 1
    with pytest.raises(ValueError, match=r"window stride \(rows\)=0 must be an integer between 1 and the window size 8"):
        asg_maths.window_layout(16, 16, 8, 8, 0, 4)
    with pytest.raises(ValueError, match="a 4x16 latent holds no 8x8 window"):
        asg_maths.window_layout(4, 16, 8, 8)


def test_sizes_must_be_whole_multiples_of_the_native_size():
    assert asg_maths.scale_factors(64, 96, 32, 32) == (2, 3)
    with pytest.raises(ValueError, match=r"height=40 is not a whole multiple of the native height 32; ASG accepts 32, 64, 96"):
        asg_maths.scale_factors(40, 64, 32, 32)
    with pytest.raises(ValueError, match=r"width=16 is not a whole multiple of the native width 32"):
        asg_maths.scale_factors(32, 16, 32, 32)  # smaller than native: no window would fit
    assert asg_maths.structure_steps(25, 0.5) == 13 and asg_maths.structure_steps(10, 0.0) == 0 and asg_maths.structure_steps(4, 1.0) == 4
    with pytest.raises(ValueError, match=r"structure_fraction=1.5 must lie in \[0, 1\]"):
        asg_maths.structure_steps(10, 1.5)
    assert [len(r) for r in asg_maths.split_evenly(4, 3)] == [2, 1, 1]
    assert [list(r) for r in asg_maths.split_evenly(9, 2)] == [list(range(5)), list(range(5, 9))]


def test_structure_map_is_normalised_per_image():
    g = torch.Generator().manual_seed(3)
    # two layers of a UNet on an 8x6 latent: full resolution and one level down
    probs = [torch.rand(2, 48, 5, generator=g).softmax(-1), torch.rand(2, 12, 5, generator=g).softmax(-1)]
    tokens = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    m = asg_maths.structure_map(probs, tokens, (8, 6))
    assert m.shape == (2, 1, 8, 6)
    for image in m:
        assert image.min() == 0 and image.max() == 1
    flat = asg_maths.structure_map([torch.full((1, 48, 5), 0.2)], tokens[:1], (8, 6))
    assert torch.equal(flat, torch.zeros(1, 1, 8, 6))  # nothing to follow: no guidance
    with pytest.raises(ValueError, match="an attention map with 10 positions does not fit a 8x6 latent"):
        asg_maths.structure_map([torch.rand(1, 10, 5)], tokens[:1], (8, 6))


# ------------------------------------------------------------------ attention maps


@pytest.mark.parametrize("path_fixture, cls", [("sd_path", "StableDiffusionPipeline"),
                                                ("sdxl_path", "StableDiffusionXLPipeline")])
def test_recording_processors_leave_outputs_unchanged(request, path_fixture, cls):
    pipe = tiny_models.load(request.getfixturevalue(path_fixture), cls)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    expected = unet(sample, 10, text, **kwargs).sample
    layers = cross_attention_layers(unet, "up")
    assert layers and all(name.startswith("up_blocks.") and name.endswith("attn2") for name in layers)
    originals = {name: m.processor for name, m in layers.items()}
    store = AttentionMapStore()
    with record_attention_maps(layers, store):
        with store.recording(rows=slice(1, 2)):
            recorded = unet(sample, 10, text, **kwargs).sample
        maps = store.take()
        not_recording = unet(sample, 10, text, **kwargs).sample
    assert torch.equal(recorded, expected) and torch.equal(not_recording, expected)
    assert {name: m.processor for name, m in layers.items()} == originals  # put back
    assert len(maps) == len(layers) and store.take() == []
    for m in maps:
        assert m.shape[0] == 1 and m.shape[-1] == 77
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))  # probabilities over the tokens


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
    real = sdxl_pipe.unet.forward

    def spy(*args, added_cond_kwargs=None, **kwargs):
        seen.append(tuple(added_cond_kwargs["time_ids"][0].tolist()))
        return real(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    sdxl_pipe.unet.forward = spy
    images = wrapped(**call_kwargs(height=NATIVE, width=2 * NATIVE, num_inference_steps=2)).images
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
