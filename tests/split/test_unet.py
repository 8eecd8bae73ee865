import itertools
import random

import pytest
import torch
from torch import nn

import tiny_models
from asyncgen.split.boundary import BoundaryState, pack, unpack
from asyncgen.cost.cuts import balanced_cuts
from asyncgen.cost.estimate import estimate_unit_costs, measure_unit_costs
from asyncgen.split.units import make_stages
from asyncgen.split.registry import split_denoiser

UNETS = {
    "sd": tiny_models.sd_unet,
    "sdxl": tiny_models.sdxl_unet,
    "odd": tiny_models.odd_unet,
    "sd-learned-sigma": lambda: tiny_models.sd_unet(out_channels=8, class_embed_type="timestep"),
}


def _inputs(split, seed=0, batch=2, **size):
    torch.manual_seed(seed)
    inputs = split.example_inputs(batch=batch, **size)
    return {k: torch.randn_like(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def _stock(unet, inputs):
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


def _staged(split, inputs, n_stages):
    inputs = dict(inputs)
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")
    stages = make_stages(split, balanced_cuts(estimate_unit_costs(split), n_stages))
    with torch.no_grad():
        cond = split.conditioning(sample, timestep, **inputs)
        state = split.initial_state(sample, cond)
        for stage in stages:
            state = stage(split, state, cond)
        return split.output(state)


@pytest.mark.parametrize("name", list(UNETS))
@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_stage_composition_equals_full_forward(name, n_stages):
    unet = UNETS[name]()
    split = split_denoiser(unet)
    inputs = _inputs(split)
    assert torch.equal(_staged(split, inputs, n_stages), _stock(unet, inputs))


def test_composition_with_odd_latent_size_forwards_upsample_size():
    unet = tiny_models.odd_unet()
    split = split_denoiser(unet)
    inputs = _inputs(split, height=10, width=14)  # not a multiple of 2**num_upsamplers
    assert torch.equal(_staged(split, inputs, 3), _stock(unet, inputs))


def test_composition_with_controlnet_residuals():
    unet = tiny_models.sd_unet()
    split = split_denoiser(unet)
    inputs = _inputs(split)
    torch.manual_seed(1)
    with torch.no_grad():
        cond = split.conditioning(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"])
        state = split.initial_state(inputs["sample"], cond)
        skips = split.forward_units(state, cond, [u for u in split.units if u.name.startswith(("conv_in", "down"))]).skips
    inputs["down_block_additional_residuals"] = tuple(torch.randn_like(s) for s in skips)
    inputs["mid_block_additional_residual"] = torch.randn(2, 32, 4, 4)
    reference = _stock(unet, inputs)
    assert torch.equal(_staged(split, inputs, 3), reference)
    without = {k: v for k, v in inputs.items() if "residual" not in k}
    assert not torch.allclose(_stock(unet, without), reference)  # the residuals did something


def test_composition_with_freeu_enabled():
    unet = tiny_models.sd_unet()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    split = split_denoiser(unet)
    inputs = _inputs(split)
    assert torch.equal(_staged(split, inputs, 2), _stock(unet, inputs))


def test_unknown_block_type_becomes_one_unit_and_stays_exact():
    unet = tiny_models.sd_unet(down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
                               up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"),
                               mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=4)
    split = split_denoiser(unet)
    names = [u.name for u in split.units]
    assert names == ["conv_in", "down0", "down1", "mid", "up0", "up1", "conv_out"]
    inputs = _inputs(split)
    assert torch.equal(_staged(split, inputs, 3), _stock(unet, inputs))


@pytest.mark.parametrize("name", list(UNETS))
def test_units_and_shared_modules_cover_every_parameter_once(name):
    unet = UNETS[name]()
    split = split_denoiser(unet)
    owned = [p for unit in split.units for p in unit.parameters()]
    owned += [p for m in split.shared_modules() for p in m.parameters()]
    assert len({id(p) for p in owned}) == len(owned)  # nothing owned twice
    assert {id(p) for p in owned} == {id(p) for p in unet.parameters()}


def test_units_are_finer_than_blocks():
    split = split_denoiser(tiny_models.sdxl_unet())
    names = [u.name for u in split.units]
    assert names[:4] == ["conv_in", "down0.resnet0", "down0.resnet1", "down0.sample"]
    assert "mid" in names and names[-1] == "conv_out"
    assert [n for n in names if n.startswith("up1.")] == ["up1.resnet0", "up1.resnet1", "up1.resnet2"]


def test_unsupported_denoiser_is_named():
    with pytest.raises(TypeError, match="Linear.*supported:.*UNet2DConditionModel"):
        split_denoiser(nn.Linear(2, 2))


def test_balanced_cuts_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.random() for _ in range(n)]
        stages = rng.randint(1, n)
        cuts = balanced_cuts(costs, stages)
        assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == stages + 1 and cuts == sorted(set(cuts))
        best = min(
            max(sum(costs[a:b]) for a, b in zip((0, *c), (*c, n)))
            for c in itertools.combinations(range(1, n), stages - 1)
        )
        got = max(sum(costs[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
        assert got == pytest.approx(best)


def test_balanced_cuts_rejects_too_many_stages():
    with pytest.raises(ValueError, match="cannot split 3 units into 4 stages"):
        balanced_cuts([1, 1, 1], 4)


def test_estimated_costs_are_deterministic_and_follow_compute():
    split = split_denoiser(tiny_models.sd_unet())
    costs = estimate_unit_costs(split)
    assert costs == estimate_unit_costs(split) and all(c > 0 for c in costs)
    by_name = dict(zip([u.name for u in split.units], costs))
    # a resnet+attention pair does far more work than the 3x3 input convolution
    assert by_name["down0.resnet0"] > 5 * by_name["conv_in"]
    # quadrupling the pixels roughly quadruples (at least triples) the work
    bigger = estimate_unit_costs(split, split.example_inputs(height=16, width=16))
    assert sum(bigger) > 3 * sum(costs)


def test_measured_costs_cover_every_unit():
    split = split_denoiser(tiny_models.sd_unet())
    costs = measure_unit_costs(split, repeats=1)
    assert len(costs) == len(split.units) and all(c > 0 for c in costs)


def test_boundary_wire_format_round_trips():
    state = BoundaryState(torch.randn(2, 3, 4, 4), (torch.randn(2, 5, 4, 4), torch.randn(2, 3, 8, 8)),
                          {"text": torch.randn(2, 7, 6)})
    layout = state.layout()
    from asyncgen.split.boundary import BoundaryLayout

    again = BoundaryLayout.decode(layout.encode(("text", "video")), ("text", "video"))
    assert again == layout
    back = unpack(pack(state), again)
    assert all(torch.equal(a, b) for a, b in zip(back.tensors(), state.tensors()))
