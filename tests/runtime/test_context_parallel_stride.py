"""The hybrid (stages x diffusers' Ulysses) with a stride above 1: 2 stages x stride 2 x Ulysses 2 on 6 gloo ranks
against the serial simulator of the same AsyncDiff schedule. Correctness only: the ranks run oversubscribed on 2
cores."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen._compat import context_parallel_refusal_for_hybrid
from asyncgen.cli.launcher import launch
from asyncgen.pipelines import AsyncDiffPipeline

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None,
                                 reason=f"{context_parallel_refusal_for_hybrid()}")]

FAMILY = "wan"  # diffusers' plan for Wan splits its first block's inputs; 2 heads, 48 tokens: Ulysses 2 divides both
STEPS = 5  # one exact step, then two rounds of two steps


def _call():
    return tiny_models.family_call_kwargs(FAMILY, num_inference_steps=STEPS, output_type="latent")


def _hybrid(rank, world, path, layout):
    torch.set_num_threads(1)
    pipe = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), warmup=1, context_parallel=2, **layout)
    stage = pipe.stage_info()["stage"]
    seen = []  # the tokens each self-attention of this rank's stage is called on (after diffusers' split)
    for name in pipe.stages[stage].names:
        pipe.denoiser.get_submodule(name).attn1.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
            with_kwargs=True)
    first = pipe(**_call()).frames  # the first call also checks the split on the pipeline's call, unsharded
    seen.clear()
    frames = pipe(**_call()).frames
    return dict(frames=frames, first=first, stage=stage, group=pipe.ctx.world_size, seen=sorted(set(seen)))


def test_two_stages_stride_two_by_two_ulysses_ranks_equal_the_serial_simulator(family_path, one_thread):
    path = str(family_path(FAMILY))
    layout = dict(stages=2, stride=2)
    per_rank = launch(_hybrid, 6, path, layout, timeout=600)
    # (stages + stride - 1) = 3 AsyncDiff positions (stage 0, stage 1 and its replica), each on 2 sequence-sharing
    # ranks: ranks 0, 1 run stage 0; ranks 2..5 stage 1
    assert [r["stage"] for r in per_rank] == [0, 0, 1, 1, 1, 1] and all(r["group"] == 3 for r in per_rank)
    assert all(r["seen"] == [24] for r in per_rank), [r["seen"] for r in per_rank]  # half of the 48 tokens each
    expected = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), warmup=1, **layout)(**_call()).frames
    for rank, result in enumerate(per_rank):
        # Ulysses computes every head's attention over the whole sequence, as one process does; only the order of
        # float32 sums in the sharded matmuls may differ (the bound, 1e-5)
        np.testing.assert_allclose(result["frames"], expected, rtol=0, atol=1e-5, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(result["first"], result["frames"])  # a second call repeats the first
