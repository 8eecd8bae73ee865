"""Video pipelines: their denoisers split into stages, and the wrapper against the stock pipelines.

Checks per family (tiny_models.names("video")): the chained stages equal the denoiser's
forward bit for bit; ``stages=1`` and ``warmup >= steps`` equal the stock pipeline; CFG
parallel in one process equals the stock pipeline; on 2 gloo ranks the wrapper equals
the serial simulator (one launch runs every family).
"""

import inspect

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.split.registry import split_denoiser
from asyncgen.evaluation import support_matrix
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.cost.cuts import balanced_cuts
from asyncgen.cost.estimate import estimate_unit_costs
from asyncgen.split.units import make_stages

FAMILIES = tiny_models.names("video")
UNET_FAMILIES = ["animatediff", "svd"]


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def _recorded_call(path, family):
    """The denoiser's keyword inputs of the stock pipeline's first step, and the denoiser."""
    pipe = tiny_models.load_family(path, family)
    denoiser, seen = _denoiser(pipe), {}

    signature = inspect.signature(denoiser.forward)

    def record(module, args, kwargs):
        if not seen:
            seen.update(signature.bind(*args, **kwargs).arguments)

    denoiser.register_forward_pre_hook(record, with_kwargs=True)
    pipe(**tiny_models.family_call_kwargs(family, num_inference_steps=1))
    return denoiser, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_composition_equals_full_forward(family_path, family, one_thread):
    denoiser, inputs = _recorded_call(family_path(family), family)
    split = split_denoiser(denoiser)
    names = [u.name for u in split.units]
    if family == "animatediff":  # motion modules are units of their own, after each resnet/attention
        assert "down0.motion0" in names and names.index("down0.motion0") == names.index("down0.attn0") + 1
    owned = [p for u in split.units for p in u.parameters()] + [p for m in split.shared_modules() for p in m.parameters()]
    assert len({id(p) for p in owned}) == len(owned) and {id(p) for p in owned} == {id(p) for p in denoiser.parameters()}
    rest = {k: v for k, v in inputs.items() if k != "return_dict"}
    sample, timestep = rest.pop(split.sample_argument), rest.pop("timestep")
    with torch.no_grad():
        reference = denoiser(**{split.sample_argument: sample, "timestep": timestep}, **rest, return_dict=False)[0]
        costs = estimate_unit_costs(split)
        for n_stages in (1, 2, 3):
            cond = split.conditioning(sample, timestep, **rest)
            state = split.initial_state(sample, cond)
            for stage in make_stages(split, balanced_cuts(costs, n_stages)):
                state = stage(split, state, cond)
            assert torch.equal(split.output(state), reference), n_stages
    path_kind = "generic" if family not in UNET_FAMILIES else "per-class UNet split (asyncgen/split/video_unet.py)"
    support_matrix.record(type(denoiser).__name__, kind="video", split=path_kind,
                          composition=f"exact ({len(split.units)} units, 1-3 stages, pipeline inputs)")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_stage_and_full_warmup_equal_stock(family_path, family, one_thread):
    path = family_path(family)
    reference = tiny_models.load_family(path, family)(**tiny_models.family_call_kwargs(family)).frames
    one = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=1)
    assert np.array_equal(one(**tiny_models.family_call_kwargs(family)).frames, reference)
    exact = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=3, warmup=4)
    assert np.array_equal(exact(**tiny_models.family_call_kwargs(family)).frames, reference)
    stale = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=2, warmup=1)
    frames = stale(**tiny_models.family_call_kwargs(family)).frames
    assert np.isfinite(frames).all() and not np.array_equal(frames, reference)
    support_matrix.record(type(one.denoiser).__name__, pipeline=tiny_models.FAMILIES[family].pipeline,
                          one_stage="exact")


# Wan runs CFG as two denoiser passes per step ("cond", "uncond": two lanes, see asyncgen.runtime.asyncdiff_hook), each of batch 1:
# there is no CFG batch to split, so CFG parallel applies to the batched-CFG pipelines only
@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_cfg_parallel_serial_matches_stock(family_path, family, one_thread):
    path = family_path(family)
    reference = tiny_models.load_family(path, family)(**tiny_models.family_call_kwargs(family)).frames
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=1, cfg_parallel=True)
    # each half runs at batch 1 instead of 2: same maths, kernels may round differently
    np.testing.assert_allclose(wrapped(**tiny_models.family_call_kwargs(family)).frames, reference, atol=1e-5, rtol=0)
    support_matrix.record(type(wrapped.denoiser).__name__, cfg_parallel="yes (serial == stock, ≤ 1e-5)")


def test_non_stock_motion_block_is_refused():
    from diffusers.models.unets.unet_motion_model import DownBlockMotion

    class PatchedBlock(DownBlockMotion):
        def forward(self, *args, **kwargs):  # a user's own block: the units cannot know what it does
            return super().forward(*args, **kwargs)

    unet, _ = tiny_models.animatediff_unet()
    unet.down_blocks[1].__class__ = PatchedBlock
    with pytest.raises(TypeError, match=r"cannot split UNetMotionModel.down_blocks\[1\] of class PatchedBlock"):
        split_denoiser(unet)


# (family, stages, stride, cfg_parallel) on 2 ranks
DISTRIBUTED = [(family, 2, 1, False) for family in FAMILIES] + [("animatediff", 1, 1, True), ("svd", 1, 2, False)]


def _video_configs(rank, world_size, paths):
    torch.set_num_threads(1)
    out = []
    for family, stages, stride, cfg in DISTRIBUTED:
        # components="planned" (the default in a group): text encoders and the VAE run on one rank each
        wrapped = AsyncDiffPipeline(tiny_models.load_family(paths[family], family), stages=stages, stride=stride,
                                    warmup=1, cfg_parallel=cfg)
        out.append(wrapped(**tiny_models.family_call_kwargs(family)).frames)
    return out


@pytest.mark.distributed
def test_distributed_equals_serial_on_two_ranks(family_path, one_thread):
    paths = {family: str(family_path(family)) for family in FAMILIES}
    per_rank = launch(_video_configs, 2, paths, timeout=300)
    for i, (family, stages, stride, cfg) in enumerate(DISTRIBUTED):
        serial = AsyncDiffPipeline(tiny_models.load_family(paths[family], family), stages=stages, stride=stride,
                                   warmup=1, cfg_parallel=cfg)
        expected = serial(**tiny_models.family_call_kwargs(family)).frames
        for rank, frames in enumerate(per_rank):
            # received states sit at aligned offsets of one flat buffer (comm/wire.py): see assert_equals_simulator
            tiny_models.assert_equals_simulator(frames[i], expected, err_msg=f"{family} rank {rank}")
        if stages == 2:
            support_matrix.record(type(serial.denoiser).__name__, pipeline=tiny_models.FAMILIES[family].pipeline,
                                  distributed="yes (pipeline, exact)")
        if cfg:
            support_matrix.record(type(serial.denoiser).__name__, cfg_parallel="yes (2 ranks == serial, exact)")
