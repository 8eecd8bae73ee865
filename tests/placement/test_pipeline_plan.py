"""The placement plan: sizes read from configs alone, the planner's choices, the published models' tables."""

from pathlib import Path

import pytest
import torch

import published_configs
import tiny_models
from asyncgen.placement.planner import ComponentSize, DenoiserSize, Placement, PlanDoesNotFit, check_fits, plan_memory
from asyncgen.placement.sizes import component_size
from asyncgen.placement.pipeline_plan import plan_pipeline
from asyncgen.schedules.asyncdiff import Topology
from asyncgen.pipelines.loading import empty_pipeline_modules, plan_from_configs


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """The five published pipelines as config-only folders (a hub snapshot without weights)."""
    root = tmp_path_factory.mktemp("published")
    return {name: published_configs.write_pipeline(name, root) for name in published_configs.PIPELINES}


def _denoiser(stage_bytes, shared=0, activations=None, units=None):
    n = len(stage_bytes)
    return DenoiserSize(tuple(units or ((f"u{k}",) for k in range(n))), tuple(stage_bytes), shared,
                        tuple(activations or (0,) * n), max(activations or (0,)))


# ------------------------------------------------------------------ the planner on given sizes


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


# ------------------------------------------------------------------ sizes from configs (meta device)


def test_published_parameter_counts_and_tables(published):
    counts = {}
    for name, folder in published.items():
        _, modules = empty_pipeline_modules(str(folder))
        counts[name] = {c: sum(p.numel() for p in m.parameters()) for c, m in modules.items()}
        assert all(p.is_meta for m in modules.values() for p in m.parameters())
    assert counts == published_configs.PUBLISHED_PARAMETERS
    # the one-device table: rank 0 holds everything, each component at its published size (fp32: 4 bytes)
    plan = plan_from_configs(str(published["sdxl"]), 1, estimate_activations=False)
    expected = {"denoiser": 4 * 2_567_463_684, "text_encoder": 4 * 123_060_480,
                "text_encoder_2": 4 * 694_659_840, "vae": 4 * 83_653_863}
    assert plan.on_rank(0).parameter_bytes == expected
    assert plan.full_pipeline_bytes == sum(expected.values()) and plan.largest_parameter_fraction == 1.0


def test_encoder_blocks_and_dtypes_of_the_published_text_encoders(published):
    _, flux = empty_pipeline_modules(str(published["flux.1-dev"]))
    t5 = component_size("text_encoder_2", flux["text_encoder_2"], torch.bfloat16)
    assert len(t5.layer_bytes) == 24 and t5.parameter_bytes == 2 * 4_762_310_656
    assert t5.head_bytes == 2 * 32128 * 4096  # the token embedding (tied to `shared`, counted once)
    clip = component_size("text_encoder", flux["text_encoder"], torch.bfloat16)
    assert len(clip.layer_bytes) == 12 and clip.parameter_bytes == 2 * 123_060_480
    # a float16 load keeps T5's `wo` projections in float32, as from_pretrained does: 24 x 4096 x 10240 of them
    wo = 24 * 4096 * 10240
    assert component_size("t5", flux["text_encoder_2"], torch.float16).parameter_bytes == 2 * 4_762_310_656 + 2 * wo
    assert component_size("vae", flux["vae"], torch.bfloat16) == ComponentSize("vae", 2 * 83_819_683)


def test_flux_dev_bf16_goal_largest_rank_at_4_and_8_ranks(published):
    """Goal: the largest rank holds <= 35 % of the full pipeline's parameters at N=4, <= 20 % at N=8."""
    from asyncgen.split.registry import split_denoiser
    from asyncgen.cost.cuts import balanced_cuts
    from asyncgen.cost.estimate import estimate_unit_costs

    _, modules = empty_pipeline_modules(str(published["flux.1-dev"]))
    transformer = modules.pop("transformer")
    torch.nn.Module.to(transformer, torch.bfloat16)
    split = split_denoiser(transformer)
    costs = estimate_unit_costs(split)  # once: the cuts for both N come from the same estimate
    fractions = {}
    for n in (4, 8):
        cuts = balanced_cuts(costs, n)
        plan = plan_pipeline(split, cuts, modules, Topology(n), dtype=torch.bfloat16, batch=1,
                             estimate_activations=False)
        # the planner places components only: the stages are the compute-balanced ones
        assert [len(r.stage_units) for r in plan.ranks] == [b - a for a, b in zip(cuts[:-1], cuts[1:])]
        assert plan.full_pipeline_bytes == 2 * (11_901_408_320 + 123_060_480 + 4_762_310_656 + 83_819_683)
        t5 = plan.placements_of("text_encoder_2")
        assert len(t5) > 1 and t5[0].layers[0] == 0 and t5[-1].layers[1] == 24  # T5 in layer ranges
        fractions[n] = plan.largest_parameter_fraction
    print(f"Flux.1-dev bf16, largest rank / full pipeline: N=4 {fractions[4]:.1%}, N=8 {fractions[8]:.1%}")
    assert fractions[4] <= 0.35 and fractions[8] <= 0.20


def test_memory_plan_of_a_wrapper_equals_the_plan_from_its_configs(sd_path):
    """The wrapper's plan (its own cuts, its loaded modules) and `asyncgen plan`'s (configs on meta) agree."""
    from asyncgen.pipelines.asyncdiff import AsyncDiffPipeline

    wrapper = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)
    from_wrapper = wrapper.memory_plan()
    from_configs = plan_from_configs(str(sd_path), 2)
    assert from_wrapper.to_dict()["ranks"] == from_configs.to_dict()["ranks"]
    assert from_wrapper.full_pipeline_bytes == from_configs.full_pipeline_bytes == sum(
        p.numel() * 4 for m in (wrapper.pipeline.text_encoder, wrapper.pipeline.vae, wrapper.denoiser.split.denoiser)
        for p in m.parameters())
    # compute-balanced cuts leave the first stage heavier: both components go to rank 1
    heavy, light = from_wrapper.ranks
    assert heavy.parameter_bytes["denoiser"] > light.parameter_bytes["denoiser"]
    assert [p.component for p in light.placements] == ["text_encoder", "vae"] and not heavy.placements
    assert all(r.activation_bytes > 0 for r in from_wrapper.ranks)


def _placement_order(p: Placement):
    return p.component, p.rank, p.layers or (0, 0)


def _plan_worker(rank, world_size, sd_path):
    from asyncgen.evaluation.bench_asyncdiff import resident_parameter_bytes
    from asyncgen.pipelines.asyncdiff import AsyncDiffPipeline

    wrapper = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, components="planned")
    plan = wrapper.memory_plan()
    in_use = sorted((p for ps in wrapper.component_placements.values() for p in ps), key=_placement_order)
    return plan.to_dict(), in_use, resident_parameter_bytes(wrapper.pipeline)


@pytest.mark.distributed
def test_in_a_process_group_the_plan_is_what_each_rank_holds(sd_path):
    """Every rank computes the same plan, runs exactly its placements, and holds exactly its planned bytes."""
    from asyncgen.cli.launcher import launch

    per_rank = launch(_plan_worker, 2, str(sd_path), timeout=300)
    plans = [plan for plan, _, _ in per_rank]
    assert plans[0] == plans[1]
    planned = sorted((Placement(p["component"], p["rank"], tuple(p["layers"]) if p["layers"] else None)
                      for r in plans[0]["ranks"] for p in r["placements"]), key=_placement_order)
    for rank, (plan, in_use, resident) in enumerate(per_rank):
        assert in_use == planned
        assert resident == sum(plan["ranks"][rank]["parameter_bytes"].values())
    # and the single-process plan (no group) is the same placement search
    assert plans[0]["ranks"] == plan_from_configs(str(sd_path), 2).to_dict()["ranks"]
