"""The pure placement planner on given sizes (asyncgen/placement/planner.py): components to the lighter rank,
replicated stages, determinism, given placements checked, and a plan that does not fit."""

import pytest

from asyncgen.placement.planner import ComponentSize, DenoiserSize, Placement, PlanDoesNotFit, check_fits, plan_memory
from asyncgen.schedules.asyncdiff import Topology


def _denoiser(stage_bytes, shared=0, activations=None, units=None):
    n = len(stage_bytes)
    return DenoiserSize(tuple(units or ((f"u{k}",) for k in range(n))), tuple(stage_bytes), shared,
                        tuple(activations or (0,) * n), max(activations or (0,)))


def test_components_go_to_the_lighter_rank_and_stages_stay():
    # a UNet's compute-balanced halves: the first holds 84 % of the weights
    denoiser = _denoiser([84, 16], shared=2, activations=[5, 7], units=(("a", "b"), ("c",)))
    plan = plan_memory(denoiser, [ComponentSize("text_encoder", 20), ComponentSize("vae", 10)], Topology(2))
    assert [r.stage_units for r in plan.ranks] == [["a", "b"], ["c"]]
    assert plan.placements_of("text_encoder") == [Placement("text_encoder", 1)]
    assert plan.placements_of("vae") == [Placement("vae", 1)]
    assert plan.on_rank(0).parameter_bytes == {"denoiser": 86}
    assert plan.on_rank(1).parameter_bytes == {"denoiser": 18, "text_encoder": 20, "vae": 10}
    assert [r.total_bytes for r in plan.ranks] == [91, 55]
    assert plan.full_pipeline_bytes == 2 + 84 + 16 + 20 + 10
    assert plan.largest.rank == 0 and plan.largest_parameter_fraction == 86 / 132


def test_an_encoder_too_big_for_any_rank_runs_as_layer_ranges_covering_every_block_once():
    layers = (10,) * 8
    encoder = ComponentSize("text_encoder_2", 3 + 80 + 2, layers, head_bytes=3, tail_bytes=2)
    plan = plan_memory(_denoiser([50, 50, 50, 50]), [encoder, ComponentSize("vae", 4)], Topology(4))
    ranges = plan.placements_of("text_encoder_2")
    assert [p.layers for p in ranges][0][0] == 0 and ranges[-1].layers[1] == 8
    assert all(a.layers[1] == b.layers[0] for a, b in zip(ranges, ranges[1:]))
    assert len({p.rank for p in ranges}) == len(ranges)  # one range per rank
    assert sum(r.parameter_bytes.get("text_encoder_2", 0) for r in plan.ranks) == 85
    # (4 * 50 + 85 + 4) / 4 = 72.25 is the bound; ranges of 10-byte blocks reach 74 at best
    assert max(r.total_bytes for r in plan.ranks) <= 74
    whole = plan_memory(_denoiser([50, 50, 50, 50]), [encoder, ComponentSize("vae", 4)], Topology(4),
                        split_encoders=False)
    assert whole.placements_of("text_encoder_2") == [Placement("text_encoder_2", 0)]
    assert whole.largest.total_bytes == 135


def test_stride_and_cfg_parallel_replicate_stages_and_use_every_rank():
    # stages=2, stride=2, cfg halves: 2 * (2 + 2 - 1) = 6 ranks; the last stage runs on ranks 1, 2 (and 4, 5)
    plan = plan_memory(_denoiser([30, 30], activations=[4, 6]), [ComponentSize(f"c{i}", 9) for i in range(6)],
                       Topology(2, 2), cfg_parts=2)
    assert [r.stage for r in plan.ranks] == [0, 1, 1, 0, 1, 1]
    assert [r.activation_bytes for r in plan.ranks] == [4, 6, 6, 4, 6, 6]
    assert sorted(p.rank for name in plan.components for p in plan.placements_of(name)) == list(range(6))


def test_the_plan_is_deterministic_and_ties_go_to_the_lowest_rank():
    args = (_denoiser([10, 10, 10]), [ComponentSize("vae", 5), ComponentSize("text_encoder", 5)], Topology(3))
    first, second = plan_memory(*args), plan_memory(*args)
    assert first.to_dict() == second.to_dict()
    # equal sizes: the order given decides; equal loads: the lowest rank
    assert first.placements_of("vae") == [Placement("vae", 0)]
    assert first.placements_of("text_encoder") == [Placement("text_encoder", 1)]


def test_given_placements_are_reported_not_searched_and_checked():
    sizes = [ComponentSize("text_encoder", 8, (2, 2, 2), 1, 1)]
    given = [Placement("text_encoder", 1, (0, 2)), Placement("text_encoder", 0, (2, 3))]
    plan = plan_memory(_denoiser([1, 1]), sizes, Topology(2), placements=given)
    assert plan.on_rank(1).parameter_bytes["text_encoder"] == 1 + 4 and plan.on_rank(0).parameter_bytes[
        "text_encoder"] == 2 + 1
    with pytest.raises(ValueError, match=r"do not cover its 3 blocks"):
        plan_memory(_denoiser([1, 1]), sizes, Topology(2), placements=[Placement("text_encoder", 0, (0, 2))])


def test_a_plan_that_does_not_fit_says_by_how_much():
    plan = plan_memory(_denoiser([3_000_000_000]), [ComponentSize("vae", 1_000_000_000)], Topology(1))
    check_fits(plan, 4_000_000_000)
    with pytest.raises(PlanDoesNotFit, match=r"rank 0 needs 4.00 GB .* 500.00 MB \(500000000 bytes\) more"):
        check_fits(plan, 3_500_000_000)
