"""The placement plan of a pipeline (asyncgen/placement/pipeline_plan.py, sizes.py): sizes read from configs alone,
the published models' tables, and on ranks what each holds (the pure planner is in test_planner.py)."""

from pathlib import Path

import pytest
import torch

import published_configs
import tiny_models
from asyncgen.placement.planner import ComponentSize, Placement
from asyncgen.placement.sizes import component_size
from asyncgen.placement.pipeline_plan import plan_pipeline
from asyncgen.schedules.asyncdiff import Topology
from asyncgen.pipelines.from_configs import empty_pipeline_modules, plan_from_configs


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """The five published pipelines as config-only folders (a hub snapshot without weights)."""
    root = tmp_path_factory.mktemp("published")
    return {name: published_configs.write_pipeline(name, root) for name in published_configs.PIPELINES}


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
        p.numel() * 4 for m in (wrapper.pipeline.text_encoder, wrapper.pipeline.vae, wrapper.denoiser)
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
