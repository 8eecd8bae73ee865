"""ASG's guidance maths (asyncgen/schedules/asg_maths.py): relocation, permutation, guidance, windows, structure maps."""

import pytest
import torch

from asyncgen.schedules import asg_maths

pytestmark = pytest.mark.usefixtures("one_thread")


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
