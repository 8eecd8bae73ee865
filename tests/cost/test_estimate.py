"""Unit costs (asyncgen/cost/estimate.py): estimated from FLOPs and traffic, and measured."""

import tiny_models
from asyncgen.cost.estimate import estimate_unit_costs, measure_unit_costs
from asyncgen.split.registry import split_denoiser


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
