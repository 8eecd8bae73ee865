"""parallel="auto" choosing context parallelism: Ulysses alone (stages=1, context_parallel=P) and inside stages (the
hybrid), through AsyncDiffPipeline, from_pretrained and `generate --parallel auto`, on the tiny Wan."""

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen._compat import context_parallel_refusal_for_hybrid
from asyncgen.cli.launcher import launch
from asyncgen.cost.layout import Layout
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.pipelines.layout_costs import auto_layout_from_configs

pytestmark = pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None,
                                reason=f"{context_parallel_refusal_for_hybrid()}")

FAMILY = "wan"  # diffusers' plan for Wan splits its first block's inputs; 2 heads and 48 tokens: Ulysses 2 divides both
STEPS = 4
RATE = dict(flops_per_s=2e10, bytes_per_s=5e9, device="cpu", dtype="float32", threads=1)


def _probe(world: int) -> dict:
    # a fast link (10 us, 10 GB/s; all-to-alls as fast), ranks that do not slow each other: compute decides
    return dict(link=dict(latency_s=1e-5, bandwidth_bytes_per_s=1e10, world_size=world, parallel_slowdown=1.0,
                          all_to_all_latency_s=1e-5, all_to_all_bytes_per_s=1e10, backend="gloo", device="cpu",
                          sizes=[4, 65536], repeats=5), rate=RATE)


def cheap_sharded_units() -> None:
    """Unit costs where context parallelism is cheapest: each unit's counted cost at the sharded shape, a tenth of it
    (on the tiny model the real sharded shape costs about half, and stages would win). The choice, the settings it
    maps to and the run are what is tested; the costs only make the choice land on context parallelism."""
    import asyncgen.pipelines.layout_costs as layout_costs

    measured = layout_costs.with_sharded_units
    if getattr(measured, "cheapened", False):
        return

    def cheaper(*args, **kwargs):
        costs = measured(*args, **kwargs)
        return dataclasses.replace(costs, sharded_unit_seconds={
            p: tuple(t / 10 for t in times) for p, times in costs.sharded_unit_seconds.items()})

    cheaper.cheapened = True
    layout_costs.with_sharded_units = cheaper


@pytest.fixture
def cheap(monkeypatch):
    import asyncgen.pipelines.layout_costs as layout_costs

    monkeypatch.setattr(layout_costs, "with_sharded_units", layout_costs.with_sharded_units)  # restored after
    cheap_sharded_units()


def _call():
    return tiny_models.family_call_kwargs(FAMILY, num_inference_steps=STEPS, output_type="latent")


def _auto_on_ranks(rank, world, path, constructor):
    torch.set_num_threads(1)
    cheap_sharded_units()
    if constructor == "wrap":
        pipe = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), parallel="auto", steps=STEPS,
                                 size=(64, 64), probe=_probe(world))
    else:
        pipe = AsyncDiffPipeline.from_pretrained(path, parallel="auto", steps=STEPS, size=(64, 64), probe=_probe(world))
    layout = pipe.layout_choice.chosen.layout
    return dict(layout=layout, degree=pipe.hybrid.degree if pipe.hybrid is not None else 1,
                stages=pipe.topology.stages, group=pipe.ctx.world_size, frames=pipe(**_call()).frames)


@pytest.mark.distributed
@pytest.mark.parametrize("constructor", ["wrap", "from_pretrained"])
def test_auto_on_two_ranks_chooses_ulysses_and_runs_it(family_path, constructor, cheap, one_thread):
    path = str(family_path(FAMILY))
    expected = auto_layout_from_configs(path, _probe(2), 2, STEPS, 64, 64).chosen.layout
    assert expected == Layout(ulysses=2)  # the CLI's path, on the same numbers
    per_rank = launch(_auto_on_ranks, 2, path, constructor, timeout=600)
    stock = tiny_models.load_family(path, FAMILY)(**_call()).frames
    for rank, result in enumerate(per_rank):
        assert result["layout"] == expected
        assert (result["degree"], result["stages"], result["group"]) == (2, 1, 1)  # one stage, its 2 ranks share it
        # one stage of Ulysses 2 is the stock forward (tested equal to diffusers' own CP run bit for bit elsewhere);
        # against one process only the order of float32 sums in the sharded matmuls may differ
        np.testing.assert_allclose(result["frames"], stock, rtol=0, atol=1e-5, err_msg=f"rank {rank}")


@pytest.mark.distributed
def test_auto_on_four_ranks_chooses_the_hybrid_and_equals_the_serial_simulator(family_path, cheap, one_thread):
    """Two stages x Ulysses 2, chosen: 4 ranks oversubscribed on 2 cores (correctness only)."""
    path = str(family_path(FAMILY))
    choice = auto_layout_from_configs(path, _probe(4), 4, STEPS, 64, 64)
    layout = choice.chosen.layout
    assert (layout.stages, layout.stride, layout.cfg_parallel, layout.ulysses) == (2, 1, False, 2), choice.reason
    per_rank = launch(_auto_on_ranks, 4, path, "wrap", timeout=600)
    expected = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), stages=2, warmup=layout.warmup)(**_call())
    for rank, result in enumerate(per_rank):
        assert result["layout"] == layout
        assert (result["degree"], result["stages"], result["group"]) == (2, 2, 2)
        # Ulysses computes every head's attention over the whole sequence, as one process does; only the order of
        # float32 sums in the sharded matmuls may differ (1e-5: the hybrid's own bound against the simulator)
        np.testing.assert_allclose(result["frames"], expected.frames, rtol=0, atol=1e-5, err_msg=f"rank {rank}")


def test_auto_never_offers_context_parallelism_where_it_cannot_run(family_path, cheap, one_thread):
    path = str(family_path(FAMILY))
    # a step cache: the hybrid takes none
    without = auto_layout_from_configs(path, _probe(2), 2, STEPS, 64, 64, context_parallel=False)
    assert all(p.layout.ulysses == 1 for p in without.candidates)
    # a class diffusers gives no plan (a UNet): never a candidate, however cheap its sharded shape would be
    sd = auto_layout_from_configs(str(family_path("sd")), _probe(2), 2, STEPS)
    assert all(p.layout.ulysses == 1 for p in sd.candidates)


def _generate_args(path, *extra) -> argparse.Namespace:
    from asyncgen.cli import generate

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(["a red fox", "--model", str(path), "--devices", "2", "--oversubscribe", "--frames", "9",
                              "--height", "64", "--width", "64", "--steps", str(STEPS), "--parallel", "auto", *extra])


def test_generate_parallel_auto_maps_the_choice_to_sp(family_path, tmp_path, monkeypatch, cheap, capsys):
    """`generate --parallel auto` takes --sp from the choice (the probe from the cache it reads)."""
    from asyncgen.cli.generate import make_job
    from asyncgen.cli.plan import PROBE_CACHE_VERSION, probe_key

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "asyncgen" / "probe.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"version": PROBE_CACHE_VERSION, "entries": {
        probe_key("cpu", 2, "float32"): dict(_probe(2), measured_at="2026-01-01T00:00:00+00:00")}}))
    path = family_path(FAMILY)
    job = make_job(_generate_args(path, "-o", str(tmp_path / "a.gif")), 2)
    assert (job.stages, job.stride, job.cfg_parallel, job.sp) == (1, 1, False, 2)
    assert "--parallel auto: Ulysses 2 on 2 device(s)" in capsys.readouterr().err
    # with a step cache the hybrid is no candidate: stages, not --sp
    job = make_job(_generate_args(path, "-o", str(tmp_path / "b.gif"), "--cache", "taylorseer"), 2)
    assert job.sp == 1 and job.stages == 2
