"""ASG's plan: every patch and window is computed by exactly one rank; the serial executor assembles nothing."""

import pytest
import torch

from asyncgen.schedules.asg import ASGSimulator, plan_layout


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_ranks_shares_cover_every_patch_and_window_once(world):
    layouts = [plan_layout(1024, 1536, (512, 512), 8, rank, world) for rank in range(world)]
    first = layouts[0]
    assert (first.s_h, first.s_w, first.h, first.w, first.patches) == (2, 3, 64, 64, 6)
    assert all(layout.windows == first.windows for layout in layouts)  # the geometry is the same on every rank
    patches = [p for layout in layouts for p in layout.my_patches]
    windows = [w for layout in layouts for w in layout.my_windows]
    assert patches == list(range(6)) and windows == list(range(len(first.windows)))
    assert max(map(len, (l.my_patches for l in layouts))) - min(map(len, (l.my_patches for l in layouts))) <= 1


def test_more_ranks_than_patches_is_refused():
    with pytest.raises(ValueError, match=r"^5 ranks are more than the K = 2x2 = 4 patches of a 64x64 picture"):
        plan_layout(64, 64, (32, 32), 8, 0, 5)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode='later' is not one of 'async', 'sync'"):
        ASGSimulator(1.0, "cosine", "later", {}, 8)


def test_the_detail_phase_averages_overlapping_windows():
    """A prediction equal to the window's own latent averages back to the latent, every window seen once a step."""
    layout = plan_layout(64, 64, (32, 32), 8)  # 2x2 patches of 4x4 latents: an 8x8 latent, 9 windows at stride 2
    assert len(layout.windows) == 9 and layout.my_windows == range(9)
    # small integers: the sums over 1, 2 or 4 overlapping windows and their division are exact
    latents = torch.randint(-8, 8, (1, 4, 8, 8)).float()
    seen = []

    def predict(latent, t, crop, store):
        seen.append(crop)
        return latent.clone()

    out = ASGSimulator(0.0, "constant", "sync", {}, 8).detail_phase(
        latents, [999], layout, predict, step=lambda prediction, t, latent: prediction)
    assert torch.equal(out, latents)
    assert seen == [(w.top * 8, w.left * 8) for w in layout.windows]
