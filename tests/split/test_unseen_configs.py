"""Issue 26: configs the generic split had never seen, through their stock pipelines.

Each case (``unseen_configs.CASES``) failed before: ZImage and HiDream (per-prompt lists,
a timestep named ``t`` / ``timesteps``) could not be called, AuraFlow's stages handed the
text stream through as the image stream when the prompt length differed from the
example's, CogVideoX with learned positions accepts only its configured size. Now the
split takes its example from the pipeline's first denoiser call: ``stages=1`` must equal
the stock pipeline bit for bit and 2 gloo ranks must equal the serial simulator.
"""

import re

import pytest
import torch

import embedding_pipelines
import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.evaluation import support_matrix
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.split.registry import split_denoiser
from asyncgen.split.transformer.trace import ExampleUnavailable, SplitRefused
from unseen_configs import CASES

NAMES = [name for name in CASES if hasattr(__import__("diffusers"), name)]
MISSING = [name for name in CASES if name not in NAMES]


def _pipeline(name: str):
    case = CASES[name]
    return embedding_pipelines.pipeline(name, case["config"], height=case["size"], width=case["size"])


@pytest.mark.skipif(bool(MISSING), reason=f"this diffusers has no {', '.join(MISSING)}")
@pytest.mark.parametrize("name", NAMES)
def test_one_stage_equals_the_stock_pipeline(name, one_thread):
    pipe, call = _pipeline(name)
    stock = embedding_pipelines.run(pipe, call)
    wrapped = AsyncDiffPipeline(pipe, stages=1)
    assert torch.equal(embedding_pipelines.run(wrapped, call), stock)
    split = wrapped.hook.split
    assert split.example_source == "the pipeline's first denoiser call"
    assert split.timestep_argument in split.example_inputs()
    support_matrix.record(name, pipeline=type(pipe).__name__, one_stage="exact")


# ZImage passes its denoiser (1000 - t) / 1000 for the scheduler's t: at stride 2 the round looks later steps up
# ahead, on the map learnt from the steps taken (runtime/asyncdiff_hook.py), on each rank
STRIDE_2 = "ZImageTransformer2DModel"


def _two_ranks(rank, world_size, names):
    torch.set_num_threads(1)
    out = {}
    for name in names:
        pipe, call = _pipeline(name)
        out[name] = embedding_pipelines.run(AsyncDiffPipeline(pipe, stages=2, warmup=1), call)
    if STRIDE_2 in names:
        pipe, call = _pipeline(STRIDE_2)
        out["stride 2"] = embedding_pipelines.run(AsyncDiffPipeline(pipe, stages=1, stride=2, warmup=1), call)
    return out


@pytest.mark.distributed
def test_two_ranks_equal_the_serial_simulator(one_thread):
    per_rank = launch(_two_ranks, 2, NAMES, timeout=600)
    for name in NAMES:
        pipe, call = _pipeline(name)
        stock = embedding_pipelines.run(pipe, call)
        serial = embedding_pipelines.run(AsyncDiffPipeline(_pipeline(name)[0], stages=2, warmup=1), call)
        assert torch.isfinite(serial).all() and not torch.equal(serial, stock)  # the stale state was used
        for rank, result in enumerate(per_rank):
            tiny_models.assert_equals_simulator(result[name].numpy(), serial.numpy(), err_msg=f"{name} rank {rank}")
        support_matrix.record(name, pipeline=type(pipe).__name__, distributed="yes (pipeline, exact)")
    if STRIDE_2 in NAMES:
        pipe, call = _pipeline(STRIDE_2)
        stock = embedding_pipelines.run(pipe, call)
        serial = embedding_pipelines.run(AsyncDiffPipeline(_pipeline(STRIDE_2)[0], stages=1, stride=2, warmup=1), call)
        assert torch.isfinite(serial).all() and not torch.equal(serial, stock)  # step 2 was predicted at step 1
        for rank, result in enumerate(per_rank):
            tiny_models.assert_equals_simulator(result["stride 2"].numpy(), serial.numpy(),
                                                err_msg=f"{STRIDE_2} stride 2 rank {rank}")


@pytest.mark.skipif("HiDreamImageTransformer2DModel" not in NAMES, reason="this diffusers has no HiDream")
def test_a_config_path_refusal_names_the_path_and_the_inputs_tried():
    import diffusers

    model = diffusers.HiDreamImageTransformer2DModel(**CASES["HiDreamImageTransformer2DModel"]["config"]).eval()
    with pytest.raises(ExampleUnavailable) as refused:
        split_denoiser(model)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("cannot build an example call of HiDreamImageTransformer2DModel.forward")
    assert "(config path;" in message and "hidden_states image (1, 4, 8, 8)" in message


def test_a_stage_that_fails_is_refused_with_its_boundary_and_shapes(one_thread):
    """Issue 26's AuraFlow failure, put back by hand: the last joint block handing its image stream through as the
    text stream. With the pipeline's own call (5 text tokens) a later stage then fails; the refusal says which
    stage, the boundary state it entered with and the shapes, on one line."""
    pipe, call = _pipeline("AuraFlowTransformer2DModel")
    wrapped = AsyncDiffPipeline(pipe, stages=1)
    embedding_pipelines.run(wrapped, call)
    split = wrapped.hook.split
    last_joint = max(i for i, name in enumerate(split.trace.names) if name.startswith("joint_transformer_blocks"))
    kind, container, (first, second) = split.trace.passthrough[last_joint]
    split.trace.passthrough[last_joint] = (kind, container, [second, first])
    with pytest.raises(SplitRefused) as refused, wrapped.hook.stock_forward():  # the split's own runs, not the hook's
        split.verify(split.example_inputs())
    message = str(refused.value)
    assert "\n" not in message
    # the last stage: its head cuts the image tokens out of the joint sequence at the text length handed through
    assert re.match(r"AuraFlowTransformer2DModel: a stage of blocks (single_transformer_blocks\.\d+) fed the boundary "
                    r"state at \1 \(hidden_states \(2, 29, 16\)\) fails: RuntimeError: shape '\[2, 4, 4, 2, 2, 4\]' "
                    r"is invalid for input of size 416$", message), message


@pytest.mark.skipif("ZImageTransformer2DModel" not in NAMES, reason="this diffusers has no ZImageTransformer2DModel")
def test_zimage_cfg_parallel_cuts_its_per_prompt_lists(one_thread):
    """ZImage's CFG batch is per-sample lists ([cond..., uncond...] caption features): each half gets its prompts."""
    pipe, call = _pipeline("ZImageTransformer2DModel")
    stock = embedding_pipelines.run(pipe, call)
    split = split_denoiser(pipe.transformer, call=None)
    sample = torch.zeros(2, 4, 1, 2, 2)
    # caption features of 2 tokens: the generic rule would cut inside them (first size == batch), not the list
    caps = [torch.full((2, 16), float(k)) for k in range(2)]
    for part in range(2):
        _, _, args = split.batch_part((sample, torch.zeros(2), {"cap_feats": caps}), part, 2, 2)
        assert len(args["cap_feats"]) == 1 and torch.equal(args["cap_feats"][0], caps[part])
    wrapped = AsyncDiffPipeline(pipe, stages=1, cfg_parallel=True)
    # each half runs at batch 1 instead of 2: same maths, kernels may round differently (the matrix's tolerance)
    torch.testing.assert_close(embedding_pipelines.run(wrapped, call), stock, atol=1e-5, rtol=0)
    support_matrix.record("ZImageTransformer2DModel", cfg_parallel="yes (serial == stock, ≤ 1e-5)")
