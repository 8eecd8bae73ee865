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

    def denoise(part, crop):
        seen.append(crop)
        return part.clone()

    simulator = ASGSimulator(0.0, "constant", "sync", {}, 8)
    simulator.begin_call(layout, 0, torch.ones(1, 3), cfg=False, shuffle=None, out_channels=4)  # no structure step
    assert torch.equal(simulator.step(latents, 0, denoise), latents)
    assert seen == [(w.top * 8, w.left * 8) for w in layout.windows]


def _structure_call(mode, guidance, steps=3, rows=2):
    """Every structure step of a 2x2 layout with a denoiser whose output is its input plus one; what it returns."""
    layout = plan_layout(64, 64, (32, 32), 8)
    simulator = ASGSimulator(guidance, "constant", mode, {}, 8)
    simulator.begin_call(layout, steps, torch.ones(rows, 3), cfg=False, shuffle=torch.Generator().manual_seed(0),
                         out_channels=4)
    sample = torch.randint(-8, 8, (rows, 4, 8, 8)).float()
    crops = []

    def denoise(part, crop):
        crops.append(crop)
        return part + 1

    return sample, [simulator.step(sample, index, denoise) for index in range(steps)], crops


def test_pixel_interaction_alone_gives_each_position_back_its_own_prediction():
    # without guidance, permuting the patches before an elementwise denoiser and un-permuting after is the
    # identity: every latent position gets exactly its own prediction (pure indexing, so equal to the bit)
    sample, outputs, crops = _structure_call("sync", guidance=0.0)
    assert all(torch.equal(out, sample + 1) for out in outputs)
    assert crops == [(0, 0)] * 12  # 4 patches a step, each the whole picture (uncropped)


def test_an_unknown_step_before_begin_call_is_refused():
    with pytest.raises(RuntimeError, match="step before begin_call"):
        ASGSimulator(1.0, "cosine", "sync", {}, 8).step(torch.zeros(1, 4, 8, 8), 0, lambda part, crop: part)
