"""The UNet split (asyncgen/split/unet.py, through the registry): stages compose to the full forward
bit for bit, and the units cover every parameter once."""

import pytest
import torch
from torch import nn

import tiny_models
from asyncgen.cost.cuts import balanced_cuts
from asyncgen.cost.estimate import estimate_unit_costs
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
