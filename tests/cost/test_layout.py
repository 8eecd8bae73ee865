"""The layout chooser (asyncgen/cost/layout.py): candidates, the exact filter, the prediction formula, the
choice; the shapes it counts on a tiny transformer; the link probe on two gloo processes (asyncgen/comm/link_probe.py)."""

import math

import pytest
import torch

import tiny_models
from asyncgen.cli.launcher import run_workers
from asyncgen.cost.layout import (DenoiserCosts, Layout, Link, check_layout, choose, context_parallel_refusal,
                                  count_shapes, denoiser_costs, enumerate_layouts, predict)

# made-up costs: 4 units, 1 pass per step of the [uncond, cond] batch, context parallelism available (4 heads), the
# units measured at Ulysses 2's and 4's sharded shapes (more than 1/2 and 1/4 of the whole: small shapes)
COSTS = DenoiserCosts(unit_names=("a", "b", "c", "d"), unit_seconds=(0.010, 0.020, 0.030, 0.040),
                      shared_seconds=0.002, cut_costs=(1.0, 2.0, 3.0, 4.0), boundary_bytes=(1000.0, 2000.0, 3000.0),
                      output_bytes=500.0, attention_calls=(1, 1, 1, 1), attention_bytes=4000.0, attention_heads=4,
                      passes_per_step=1, pass_batch=2, context_parallel=None,
                      sharded_unit_seconds={2: (0.006, 0.011, 0.016, 0.021), 4: (0.004, 0.006, 0.009, 0.011)},
                      ulysses_refusals={3: "the degree does not divide the attention heads (4)"})
LINK = Link(latency_s=0.001, bandwidth_bytes_per_s=1e6, parallel_slowdown=1.5)
# the formula's sums are added in another order than written here: equal up to float rounding
CLOSE = dict(rel=1e-12)


def names(layouts):
    return [(l.stages, l.stride, l.warmup, l.cfg_parallel, l.ulysses) for l in layouts]


def test_candidates_on_two_devices():
    assert names(enumerate_layouts(COSTS, 2, steps=10, warmup=1)) == [
        (1, 1, 0, False, 1),  # one device
        (2, 1, 1, False, 1),  # AsyncDiff N=2
        (1, 1, 0, False, 2),  # Ulysses 2
        (1, 1, 0, True, 1),  # CFG parallel
    ]


def test_candidates_on_four_devices_include_the_hybrids():
    layouts = enumerate_layouts(COSTS, 4, steps=10, warmup=1)
    assert all(l.devices <= 4 for l in layouts)
    assert {(l.stages, l.stride, l.cfg_parallel, l.ulysses) for l in layouts} == {
        (1, 1, False, 1), (2, 1, False, 1), (2, 2, False, 1), (2, 3, False, 1), (3, 1, False, 1), (3, 2, False, 1),
        (4, 1, False, 1),
        (1, 1, False, 2), (2, 1, False, 2),  # Ulysses 2 alone, and inside 2 stages (the hybrid)
        (1, 1, False, 4),
        (1, 1, True, 1), (2, 1, True, 1),
        (1, 1, True, 2),  # CFG parallel x Ulysses
    }
    assert Layout(2, 1, 1, False, 2).settings == dict(stages=2, stride=1, warmup=1, cfg_parallel=False,
                                                      context_parallel=2)


def test_ulysses_only_at_the_measured_degrees_and_inside_stages_only_where_the_plan_moves():
    only_two = DenoiserCosts(**{**COSTS.to_dict(), "sharded_unit_seconds": {2: COSTS.sharded_unit_seconds[2]}})
    assert {l.ulysses for l in enumerate_layouts(only_two, 4, steps=10)} == {1, 2}
    with pytest.raises(ValueError, match=r"ulysses=4: the units were not measured at its sharded shape \(measured at: \[2\]\)"):
        check_layout(only_two, Layout(ulysses=4))
    with pytest.raises(ValueError, match=r"ulysses=3: the degree must divide the attention heads \(4\)"):
        check_layout(COSTS, Layout(ulysses=3))
    flux_like = DenoiserCosts(**{**COSTS.to_dict(), "stages_context_parallel": "the plan splits the model's inputs"})
    layouts = enumerate_layouts(flux_like, 4, steps=10)
    assert {(l.stages, l.ulysses) for l in layouts if l.ulysses > 1} == {(1, 2), (1, 4)}
    with pytest.raises(ValueError, match="ulysses=2 with stages=2: the plan splits the model's inputs"):
        check_layout(flux_like, Layout(2, 1, 1, False, 2))
    # a run that cannot take context parallelism (a step cache) lists none
    assert all(l.ulysses == 1 for l in enumerate_layouts(COSTS, 4, steps=10, context_parallel=False))


def test_no_cfg_parallel_without_a_cfg_batch_and_no_ulysses_without_a_plan_or_dividing_heads():
    two_passes = DenoiserCosts(**{**COSTS.to_dict(), "passes_per_step": 2, "pass_batch": 1, "attention_heads": 3,
                                  "sharded_unit_seconds": {3: (0.005, 0.008, 0.011, 0.014)}})
    # no CFG parallel; Ulysses only at 3, the one degree above 1 that divides 3 heads on 4 devices
    assert names(enumerate_layouts(two_passes, 4, steps=10, warmup=1)) == names(
        l for l in enumerate_layouts(COSTS, 4, steps=10, warmup=1) if not l.cfg_parallel and l.ulysses == 1) + [
        (1, 1, 0, False, 3)]
    no_plan = DenoiserCosts(**{**COSTS.to_dict(), "context_parallel": "no plan"})
    assert all(l.ulysses == 1 for l in enumerate_layouts(no_plan, 4, steps=10))
    with pytest.raises(ValueError, match="ulysses=2: no plan"):
        check_layout(no_plan, Layout(ulysses=2))
    with pytest.raises(ValueError, match="cfg_parallel: .* two passes"):
        check_layout(two_passes, Layout(cfg_parallel=True))
    with pytest.raises(ValueError, match="stages=5: this denoiser splits into 1 to 4 stages"):
        check_layout(COSTS, Layout(stages=5))


def test_exact_keeps_only_exact_layouts_with_a_warm_up_of_every_step():
    exact = enumerate_layouts(COSTS, 4, steps=10, exact=True)
    assert exact and all(l.is_exact(10) for l in exact)
    assert all(l.warmup == 10 for l in exact if l.stages > 1)
    # the same shapes as without --exact: stages become exact by warming up through every step
    shapes = {(l.stages, l.stride, l.cfg_parallel, l.ulysses) for l in exact}
    assert shapes == {(l.stages, l.stride, l.cfg_parallel, l.ulysses) for l in enumerate_layouts(COSTS, 4, steps=10)}
    assert not Layout(2, 1, 9).is_exact(10) and Layout(2, 1, 10).is_exact(10) and Layout(1, 1, 0, True, 2).is_exact(10)


def test_the_predicted_step_time_follows_the_formula():
    # AsyncDiff N=2: cuts balanced on cut_costs (1, 2, 3, 4) -> [0, 3, 4]; both ranks busy -> compute x 1.5
    p = predict(COSTS, LINK, Layout(2, 1, 1), steps=10)
    stage0, stage1 = 1.5 * (0.060 + 0.002), 1.5 * (0.040 + 0.002)
    boundary, prediction = 0.001 + 3000 / 1e6, 0.001 + 500 / 1e6  # the state after unit c; the prediction
    exact = stage0 + stage1 + boundary + prediction
    round_ = max(stage0 + boundary, stage1 + prediction)
    assert (p.exact_steps, p.rounds) == (1, 9)
    assert p.step_s == pytest.approx((exact + 9 * round_) / 10, **CLOSE)
    # warm-up 4, stride 2: 4 exact steps, ceil(6 / 2) = 3 rounds of two steps (stage 1 twice: its replica)
    p = predict(COSTS, LINK, Layout(2, 2, 4), steps=10)
    assert (p.exact_steps, p.rounds) == (4, 3)
    assert p.step_s == pytest.approx((4 * exact + 3 * round_) / 10, **CLOSE)
    # CFG parallel, one stage: half the batch each, then the half prediction to the other group
    p = predict(COSTS, LINK, Layout(cfg_parallel=True), steps=10)
    assert p.step_s == pytest.approx(1.5 * 0.5 * (0.100 + 0.002) + 0.001 + 250 / 1e6, **CLOSE)
    # Ulysses 2: the units as measured at the sharded shape (0.054 s, not 0.100 / 2), 4 all-to-alls per
    # self-attention call (one message of half the shard each way on 2 ranks), the output gathered; the shared part
    # is not sharded
    p = predict(COSTS, LINK, Layout(ulysses=2), steps=10)
    all_to_all = 0.001 + (4000 / 2 / 2) / 1e6
    assert p.step_s == pytest.approx(1.5 * (0.054 + 0.002) + 4 * 4 * all_to_all + 0.001 + 250 / 1e6, **CLOSE)
    # an all-to-all timed as such by the probe over 2 ranks replaces the two-message estimate there
    timed = Link(0.001, 1e6, 1.5, all_to_all_latency_s=0.003, all_to_all_bytes_per_s=2e6, all_to_all_world=2)
    assert predict(COSTS, timed, Layout(ulysses=2), steps=10).step_s == pytest.approx(
        1.5 * (0.054 + 0.002) + 4 * 4 * (0.003 + 2000 / 2e6) + 0.001 + 250 / 1e6, **CLOSE)
    # the hybrid, 2 stages x Ulysses 2: each stage its sharded units (cuts [0, 3, 4]), its all-to-alls, the
    # boundary state whole (gathered before it leaves); the output gathered on the last stage
    p = predict(COSTS, LINK, Layout(2, 1, 1, False, 2), steps=10)
    stage0 = 1.5 * (0.033 + 0.002) + 3 * 4 * all_to_all
    stage1 = 1.5 * (0.021 + 0.002) + 1 * 4 * all_to_all + 0.001 + 250 / 1e6
    boundary, prediction = 0.001 + 3000 / 2 / 1e6, 0.001 + 500 / 1e6
    assert p.step_s == pytest.approx((stage0 + stage1 + boundary + prediction
                                      + 9 * max(stage0 + boundary, stage1 + prediction)) / 10, **CLOSE)
    # CFG parallel x Ulysses without half-batch sharded times: half the sharded units
    assert predict(COSTS, LINK, Layout(1, 1, 0, True, 2), steps=10).compute_s == pytest.approx(
        [1.5 * 0.5 * (0.054 + 0.002)], **CLOSE)
    assert timed.all_to_all_s(2000, 4) == 3 * LINK.message_s(500)  # other degrees: the message estimate
    # CFG parallel with the units timed on half the batch: those times, not half the whole batch's
    halves = DenoiserCosts(**{**COSTS.to_dict(), "half_batch_unit_seconds": (0.007, 0.013, 0.018, 0.022)})
    assert predict(halves, LINK, Layout(cfg_parallel=True), steps=10).step_s == pytest.approx(
        1.5 * (0.060 + 0.5 * 0.002) + 0.001 + 250 / 1e6, **CLOSE)
    assert predict(halves, LINK, Layout(2, 1, 1), 10).step_s == predict(COSTS, LINK, Layout(2, 1, 1), 10).step_s
    # one device: no slowdown, no messages
    assert predict(COSTS, LINK, Layout(), steps=10).step_s == pytest.approx(0.102, **CLOSE)
    # two passes per step (Wan's CFG): each pass its own lane, so twice the time
    two = DenoiserCosts(**{**COSTS.to_dict(), "passes_per_step": 2, "pass_batch": 1})
    assert predict(two, LINK, Layout(2, 1, 1), 10).step_s == pytest.approx(
        2 * predict(COSTS, LINK, Layout(2, 1, 1), 10).step_s, **CLOSE)


def test_the_choice_is_the_fastest_and_may_be_a_hybrid():
    fast_link = Link(1e-6, 1e12, 1.0)  # communication nearly free: the more devices the faster
    choice = choose(COSTS, fast_link, 4, steps=10, warmup=1)
    assert choice.allowed == choice.candidates
    assert choice.chosen.step_s == min(p.step_s for p in choice.candidates)
    # with these sharded times CFG parallel x Ulysses 2 (0.028 s a step) beats 4 stages, Ulysses 4 (0.032) and
    # 2 stages x Ulysses 2 (0.035), which beats 2 stages x CFG parallel (0.036)
    assert choice.chosen.layout == Layout(1, 1, 0, True, 2)
    assert choice.reason.startswith("CFG parallel x Ulysses 2 on 4 device(s)")
    exact = choose(COSTS, fast_link, 4, steps=10, exact=True)
    assert exact.chosen.exact and exact.chosen.step_s == min(p.step_s for p in exact.allowed if p.exact)
    # on every device (asyncgen generate --parallel auto), without context parallelism (a step cache)
    plain = choose(COSTS, fast_link, 4, steps=10, warmup=1, use_all=True, context_parallel=False)
    assert plain.chosen.layout.ulysses == 1 and plain.chosen.layout.devices == 4
    assert plain.chosen.step_s == min(p.step_s for p in plain.candidates if p.layout.devices == 4)


def test_a_slow_link_makes_one_device_the_choice():
    slow = Link(1.0, 1e3, 2.0)  # every message a second, every busy rank twice as slow
    assert choose(COSTS, slow, 4, steps=10).chosen.layout == Layout()


def test_link_and_costs_refuse_bad_numbers():
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s=0"):
        Link(0.001, 0)
    with pytest.raises(ValueError, match="latency_s=-1"):
        Link(-1, 1e9)
    with pytest.raises(ValueError, match="boundary_bytes needs one entry per cut"):
        DenoiserCosts(**{**COSTS.to_dict(), "boundary_bytes": (1.0,)})


def test_shapes_counted_on_a_tiny_wan_transformer():
    from asyncgen.split.registry import split_denoiser

    model = tiny_models.wan_transformer()  # 3 blocks, 2 heads of 8, patch (1, 2, 2)
    split = split_denoiser(model)
    inputs = split.example_inputs(1, 8, 8)  # 3 latent frames of 8 x 8: 3 * 4 * 4 = 48 tokens
    counted = count_shapes(split, inputs)
    tokens_bytes = 1 * 48 * 2 * 8 * 4  # batch x tokens x heads x head width x float32
    # one self-attention per block; the cross-attention to the 8 text tokens is not exchanged by Ulysses
    assert counted["attention_calls"] == [1, 1, 1]
    assert counted["attention_bytes"] == tokens_bytes and counted["attention_heads"] == 2
    assert counted["boundary_bytes"] == [tokens_bytes, tokens_bytes]  # the hidden state, (1, 48, 16)
    assert counted["output_bytes"] == 1 * 4 * 3 * 8 * 8 * 4  # the prediction: the latent's shape
    assert all(f > 0 for f in counted["unit_flops"]) and counted["shared_flops"] > 0
    # measured unit times: the part outside the units is scaled from them by counted work (FLOPs + 8 per byte)
    costs = denoiser_costs(split, inputs, 2, unit_seconds=[0.01, 0.02, 0.03], cut_costs=[1.0, 1.0, 1.0])
    work = [fl + 8 * by for fl, by in zip(counted["unit_flops"], counted["unit_bytes"])]
    shared = counted["shared_flops"] + 8 * counted["shared_bytes"]
    assert costs.shared_seconds == pytest.approx(0.06 * shared / sum(work), rel=1e-12)  # float sums: rounding only
    assert (costs.passes_per_step, costs.pass_batch, costs.boundary_bytes) == (2, 1, (tokens_bytes, tokens_bytes))
    assert context_parallel_refusal(model) is None  # diffusers has a context-parallel plan for Wan
    assert "no context-parallel plan" in context_parallel_refusal(tiny_models.sd_unet())


def _probe(rank, world_size):
    import torch.distributed as dist

    from asyncgen.comm.link_probe import probe_link

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    return probe_link(sizes=(4, 2**16), repeats=2).to_dict()


def test_link_probe_on_two_gloo_processes_gives_finite_positive_numbers_on_every_rank():
    results = run_workers(_probe, 2, timeout=120)
    assert all(r.ok for r in results), [r.value for r in results]
    first, second = (r.value for r in results)
    assert first == second  # rank 0's measurement, broadcast
    assert math.isfinite(first["latency_s"]) and first["latency_s"] >= 0
    assert math.isfinite(first["bandwidth_bytes_per_s"]) and first["bandwidth_bytes_per_s"] > 0
    assert math.isfinite(first["parallel_slowdown"]) and first["parallel_slowdown"] > 0
    assert math.isfinite(first["all_to_all_latency_s"]) and first["all_to_all_latency_s"] >= 0
    assert math.isfinite(first["all_to_all_bytes_per_s"]) and first["all_to_all_bytes_per_s"] > 0
    assert (first["world_size"], first["backend"], first["device"]) == (2, "gloo", "cpu")
    assert Link.from_measurement(first).all_to_all_world == 2  # usable as is


def test_the_line_fit_recovers_a_made_up_link():
    from asyncgen.comm.link_probe import fit_line

    latency, bandwidth = fit_line([0.0, 1e6, 4e6], [2e-4, 2e-4 + 1e-3, 2e-4 + 4e-3])
    assert latency == pytest.approx(2e-4, rel=1e-9) and bandwidth == pytest.approx(1e9, rel=1e-9)
    with pytest.raises(ValueError, match="two different message sizes"):
        fit_line([4.0, 4.0], [1.0, 1.0])
