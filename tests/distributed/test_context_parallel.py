"""The hybrid (stages x diffusers' context parallelism) on gloo ranks: against the serial simulator of the same
AsyncDiff schedule, and with one stage against diffusers' own context-parallel run. Correctness only: 4 ranks run
oversubscribed on 2 cores."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen._compat import context_parallel_refusal_for_hybrid
from asyncgen.cli.launcher import launch
from asyncgen.evaluation.bench_peer_diffusers_cp import cpu_accelerator_count
from asyncgen.pipelines import AsyncDiffPipeline

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None,
                                 reason=f"{context_parallel_refusal_for_hybrid()}")]

FAMILY = "wan"  # diffusers' plan for Wan splits its first block's inputs; 2 heads, 48 tokens: Ulysses 2 divides both
STEPS = 3


def _call(steps=STEPS):
    return tiny_models.family_call_kwargs(FAMILY, num_inference_steps=steps, output_type="latent")


def _hybrid(rank, world, path, layout, steps=STEPS, second_wrapper=True):
    torch.set_num_threads(1)
    pipe = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), warmup=1, context_parallel=2, **layout)
    stage = pipe.stage_info()["stage"]
    seen = []  # the tokens each self-attention of this rank's stage is called on (after diffusers' split)
    for name in pipe.stages[stage].names:
        pipe.denoiser.get_submodule(name).attn1.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
            with_kwargs=True)
    first = pipe(**_call(steps)).frames  # the first call also checks the split on the pipeline's call, unsharded
    seen.clear()
    frames = pipe(**_call(steps)).frames
    result = dict(frames=frames, first=first, stage=stage, group=pipe.ctx.world_size, seen=sorted(set(seen)))
    if second_wrapper:  # a second wrapper in the same process (its mesh is the first's) computes the same
        again = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), warmup=1, context_parallel=2, **layout)
        result["again"] = again(**_call(steps)).frames
    return result


def test_two_stages_by_two_ulysses_ranks_equal_the_serial_simulator(family_path, one_thread):
    path = str(family_path(FAMILY))
    per_rank = launch(_hybrid, 4, path, dict(stages=2), timeout=600)
    # ranks 0, 1 share stage 0's sequence, ranks 2, 3 stage 1's; each AsyncDiff group holds one rank of each stage
    assert [r["stage"] for r in per_rank] == [0, 0, 1, 1] and all(r["group"] == 2 for r in per_rank)
    # every rank's blocks ran on half of the 48 video tokens (3 latent frames of 4 x 4 patches)
    assert all(r["seen"] == [24] for r in per_rank), [r["seen"] for r in per_rank]
    expected = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), stages=2, warmup=1)(**_call()).frames
    for rank, result in enumerate(per_rank):
        # Ulysses computes every head's attention over the whole sequence, as one process does; only the order of
        # float32 sums in the sharded matmuls may differ (0.0 measured on this model; 1e-5 is the bound)
        np.testing.assert_allclose(result["frames"], expected, rtol=0, atol=1e-5, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(result["first"], result["frames"])  # a second call repeats the first
        np.testing.assert_array_equal(result["again"], result["frames"])


def _one_stage(rank, world, path, which):
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    if which == "ours":
        return AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), stages=1, context_parallel=2)(**_call()).frames
    from asyncgen.comm.group import resolve_context

    resolve_context()  # the launcher's group, as the wrapper makes it
    stock = tiny_models.load_family(path, FAMILY)
    # the benchmark's patch: diffusers 0.42 asks torch.accelerator.device_count(), 0 on a CPU-only machine
    with cpu_accelerator_count():
        stock.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    return stock(**_call()).frames


def test_one_stage_equals_diffusers_context_parallel_exactly(family_path, one_thread):
    path = str(family_path(FAMILY))
    # two launches: torch 2.6 refuses to slice a second device mesh in a process that built one ("Cannot create a
    # submesh from a submesh"), so each process builds one
    ours, theirs = (launch(_one_stage, 2, path, which, timeout=600) for which in ("ours", "diffusers"))
    for rank in range(2):
        np.testing.assert_array_equal(ours[rank], theirs[rank], err_msg=f"rank {rank}")


def test_two_stages_stride_two_by_two_ulysses_ranks_equal_the_serial_simulator(family_path, one_thread):
    path = str(family_path(FAMILY))
    layout, steps = dict(stages=2, stride=2), 5  # one exact step, then two rounds of two steps
    per_rank = launch(_hybrid, 6, path, layout, steps, False, timeout=600)
    # (stages + stride - 1) = 3 AsyncDiff positions (stage 0, stage 1 and its replica), each on 2 sequence-sharing
    # ranks: ranks 0, 1 run stage 0; ranks 2..5 stage 1
    assert [r["stage"] for r in per_rank] == [0, 0, 1, 1, 1, 1] and all(r["group"] == 3 for r in per_rank)
    assert all(r["seen"] == [24] for r in per_rank), [r["seen"] for r in per_rank]  # half of the 48 tokens each
    expected = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), warmup=1, **layout)(**_call(steps)).frames
    for rank, result in enumerate(per_rank):
        # as above: only the order of float32 sums in the sharded matmuls may differ (the bound, 1e-5)
        np.testing.assert_allclose(result["frames"], expected, rtol=0, atol=1e-5, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(result["first"], result["frames"])  # a second call repeats the first
