"""One Ulysses rank's work run in one process (asyncgen/cost/sharded.py): the shapes it runs at, the work it counts,
and the layout chooser's costs built from it (pipelines/layout_costs.with_sharded_units)."""

import pytest
import torch

import tiny_models
from asyncgen._compat import context_parallel_refusal_for_hybrid
from asyncgen.cost.device_rate import DeviceRate
from asyncgen.cost.layout import count_units
from asyncgen.cost.sharded import (heads_to_sequence_layout, sequence_to_heads_layout, sharded_unit_times,
                                   ulysses_share)
from asyncgen.runtime.context_parallel import stages_refusal
from asyncgen.split.registry import split_denoiser

RATE = DeviceRate(2e10, 5e9, "cpu", "float32", 1)


def _wan():
    model = tiny_models.wan_transformer()  # 3 blocks, 2 heads of 8, patch (1, 2, 2)
    split = split_denoiser(model)
    return model, split, split.example_inputs(1, 8, 8)  # 3 latent frames of 8 x 8: 48 tokens


def test_one_rank_runs_its_share_of_the_tokens_and_attention_over_all_of_them_with_half_the_heads(one_thread):
    model, split, inputs = _wan()
    with torch.no_grad():
        whole = model(**split.model_arguments(inputs), return_dict=False)[0]
        with ulysses_share(model, 2) as run:
            shared = model(**split.model_arguments(inputs), return_dict=False)[0]
    # diffusers' plan for Wan: the rotary tables' two outputs and the first block's hidden state, cut on the tokens
    assert run.splits == [("rope", 0, (1, 48, 1, 8), (1, 24, 1, 8)), ("rope", 1, (1, 48, 1, 8), (1, 24, 1, 8)),
                          ("blocks.0", "hidden_states", (1, 48, 16), (1, 24, 16))]
    # one self-attention per block, called on 24 tokens x 2 heads, run on all 48 tokens x 1 head
    assert run.attention == [((1, 2, 24, 8), (1, 1, 48, 8))] * 3
    assert shared.shape == whole.shape  # the output gathered (the chunk repeated): the forward ends as usual
    with torch.no_grad():  # the hooks are gone afterwards
        torch.testing.assert_close(model(**split.model_arguments(inputs), return_dict=False)[0], whole, rtol=0, atol=0)


def test_the_exchange_layouts_are_each_others_inverse_and_have_the_ranks_shapes():
    x = torch.randn(2, 24, 6, 8).transpose(1, 2)  # (batch, heads, tokens, width) viewed from (batch, tokens, heads, w)
    gathered = heads_to_sequence_layout(x, 3)
    assert gathered.shape == (2, 2, 72, 8) and gathered.transpose(1, 2).is_contiguous()
    back = sequence_to_heads_layout(gathered, 3)
    assert back.shape == x.shape and back.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(back, x, rtol=0, atol=0)  # a relabelling of the same numbers, both ways


def test_counted_work_at_the_sharded_shape_is_half_the_flops_and_more_than_half_the_bytes(one_thread):
    _, split, inputs = _wan()
    whole, half = count_units(split, inputs), count_units(split, inputs, 2)
    # every matmul and attention on the video tokens runs on half of them, or over all of them with half the heads,
    # so its FLOPs halve exactly; the cross-attention's key and value projections of the 8 text tokens (width 16)
    # run whole on every rank
    text_kv = 2 * (2 * 8 * 16 * 16)
    assert half["unit_flops"] == [(f - text_kv) / 2 + text_kv for f in whole["unit_flops"]]
    # the weights are read whole either way, so the bytes do not halve
    assert all(w / 2 < h < w for w, h in zip(whole["unit_bytes"], half["unit_bytes"]))
    assert half["attention_calls"] == whole["attention_calls"] == [1, 1, 1]


def test_timed_units_run_at_the_sharded_shape(one_thread):
    model, split, inputs = _wan()
    seen = []
    handles = [block.attn1.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True) for block in model.blocks]
    try:
        times = sharded_unit_times(split, inputs, 2, repeats=2)
    finally:
        for handle in handles:
            handle.remove()
    assert len(times) == 3 and all(t > 0 for t in times)
    assert set(seen) == {24}  # every timed self-attention block ran on the rank's 24 of the 48 tokens


def test_a_degree_that_does_not_divide_the_tokens_or_a_class_without_a_plan_is_refused(one_thread):
    model, split, _ = _wan()
    odd = split.example_inputs(1, 6, 6)  # 3 frames of 3 x 3 patches: 27 tokens
    with pytest.raises(ValueError, match=r"Ulysses degree 2 does not divide .*\(27\)"):
        count_units(split, odd, 2)
    with pytest.raises(ValueError, match="no context-parallel plan"):
        with ulysses_share(tiny_models.sd_unet(), 2):
            pass


@pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None, reason=f"{context_parallel_refusal_for_hybrid()}")
def test_costs_carry_each_degree_priced_at_its_sharded_shape(family_path, one_thread):
    from asyncgen.pipelines.layout_costs import costs_from_configs

    wan = costs_from_configs(str(family_path("wan")), 64, 64, rate=RATE, devices=4)
    _, split, inputs = _wan()
    counted = count_units(split, inputs, 2)
    assert sorted(wan.sharded_unit_seconds) == [2]  # 2 heads: 2 is the only degree up to 4 that divides them
    assert set(wan.ulysses_refusals) == {3, 4} and "divide the attention heads (2)" in wan.ulysses_refusals[4]
    assert wan.sharded_unit_seconds[2] == tuple(RATE.seconds(f, b) for f, b in
                                                zip(counted["unit_flops"], counted["unit_bytes"]))
    assert wan.stages_context_parallel is None  # Wan's plan splits its first block's inputs: stages take it
    one = costs_from_configs(str(family_path("wan")), 64, 64, rate=RATE)
    assert one.sharded_unit_seconds == {} and one.unit_seconds == wan.unit_seconds
    sd = costs_from_configs(str(family_path("sd")), rate=RATE, devices=2)
    assert sd.sharded_unit_seconds == {} and "no context-parallel plan" in sd.context_parallel


@pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None, reason=f"{context_parallel_refusal_for_hybrid()}")
def test_a_plan_that_splits_the_models_inputs_is_not_taken_inside_stages():
    assert stages_refusal(split_denoiser(tiny_models.wan_transformer())) is None
    refusal = stages_refusal(split_denoiser(tiny_models.flux_transformer()))
    assert "splits the sequence at the model's inputs" in refusal


@pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None, reason=f"{context_parallel_refusal_for_hybrid()}")
def test_a_plan_that_splits_the_text_of_a_cross_attention_is_not_priced(family_path, one_thread):
    """LTX-Video's plan cuts its text too, so Ulysses would exchange its cross-attention (uncounted here): no degree is
    offered, with the reason (diffusers 0.42's own Ulysses run of the tiny LTX fails on that call's mask as well)."""
    from asyncgen.pipelines.layout_costs import costs_from_configs

    ltx = costs_from_configs(str(family_path("ltx")), rate=RATE, devices=2)
    assert ltx.context_parallel is None and ltx.sharded_unit_seconds == {}
    assert "cross-attention whose 4 keys come from a sequence the context-parallel plan splits" in \
        ltx.ulysses_refusals[2]
