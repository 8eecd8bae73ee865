"""SD3, PixArt and Flux transformers: splitting, and the wrapper against their stock pipelines."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.cost.cuts import balanced_cuts
from asyncgen.cost.estimate import estimate_unit_costs
from asyncgen.split.units import make_stages
from asyncgen.split.registry import split_denoiser
from asyncgen.evaluation import support_matrix

FAMILIES = tiny_models.names("dit")


def _random_inputs(split):
    torch.manual_seed(0)
    inputs = split.example_inputs(batch=2)
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("timestep", "img_ids", "txt_ids", "guidance"):
            v = torch.randn_like(v)
        out[k] = v
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_stage_composition_equals_full_forward(family, n_stages):
    model = tiny_models.FAMILIES[family].denoiser()
    split = split_denoiser(model)
    inputs = _random_inputs(split)
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        rest = dict(inputs)
        sample, timestep = rest.pop("hidden_states"), rest.pop("timestep")
        cond = split.conditioning(sample, timestep, **rest)
        state = split.initial_state(sample, cond)
        for stage in make_stages(split, balanced_cuts(estimate_unit_costs(split), n_stages)):
            state = stage(split, state, cond)
    assert torch.equal(split.output(state), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_units_follow_the_block_lists(family):
    model = tiny_models.FAMILIES[family].denoiser()
    split = split_denoiser(model)
    names = [u.name for u in split.units]
    if family == "flux":
        assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                         "single_transformer_blocks.1"]
    else:
        assert names == [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    # every parameter is either one block's or shared (embeddings and head), never both
    owned = [p for u in split.units for p in u.parameters()] + [p for m in split.shared_modules() for p in m.parameters()]
    assert len({id(p) for p in owned}) == len(owned)
    assert {id(p) for p in owned} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("cuts", [[0, 3], [0, 1, 3], [0, 1, 2, 3], [0, 2, 3]])
def test_sd3_controlnet_residuals_and_skip_layers(cuts):
    # the forward adds residuals between blocks and leaves skipped layers out: stages run that code too
    model = tiny_models.FAMILIES["sd3"].denoiser()
    split = split_denoiser(model)
    inputs = _random_inputs(split)
    tokens = inputs["hidden_states"].shape[-2] * inputs["hidden_states"].shape[-1]  # patch size 1
    inputs["block_controlnet_hidden_states"] = [torch.randn(2, tokens, 32)]
    inputs["skip_layers"] = [1]
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        rest = dict(inputs)
        sample, timestep = rest.pop("hidden_states"), rest.pop("timestep")
        cond = split.conditioning(sample, timestep, **rest)
        state = split.initial_state(sample, cond)
        for stage in make_stages(split, cuts):
            state = stage(split, state, cond)
    assert torch.equal(split.output(state), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_stage_and_full_warmup_equal_stock(dit_paths, family):
    path = dit_paths[family]
    reference = tiny_models.load_family(path, family)(**tiny_models.family_call_kwargs(family)).images
    one = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=1)
    assert np.array_equal(one(**tiny_models.family_call_kwargs(family)).images, reference)
    exact = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=3, stride=1, warmup=6)
    np.testing.assert_allclose(exact(**tiny_models.family_call_kwargs(family)).images, reference, atol=1e-6, rtol=0)
    stale = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=2, stride=2, warmup=1)
    images = stale(**tiny_models.family_call_kwargs(family)).images
    assert np.isfinite(images).all() and not np.array_equal(images, reference)
    support_matrix.record(type(one.pipeline.transformer).__name__, pipeline=tiny_models.FAMILIES[family].pipeline,
                          one_stage="exact")


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_cfg_parallel_serial_matches_stock(dit_paths, family):
    path = dit_paths[family]
    reference = tiny_models.load_family(path, family)(**tiny_models.family_call_kwargs(family)).images
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=1, cfg_parallel=True)
    # each half runs at batch 1 instead of 2: same maths, kernels may round differently
    np.testing.assert_allclose(wrapped(**tiny_models.family_call_kwargs(family)).images, reference, atol=1e-5, rtol=0)


def test_cfg_parallel_refuses_guidance_distilled_flux(dit_paths):
    with pytest.raises(ValueError, match="guidance-distilled.*FluxPipeline makes no unconditional pass"):
        AsyncDiffPipeline(tiny_models.load_family(dit_paths["flux"], "flux"), stages=1, cfg_parallel=True)


def test_cfg_parallel_needs_an_even_batch(sd_path):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, cfg_parallel=True)
    with pytest.raises(ValueError, match="this call's batch is 1; use classifier-free guidance"):
        wrapped(**tiny_models.call_kwargs(guidance_scale=1.0))
    # without guidance an even batch is plain data parallelism over the images
    reference = tiny_models.load(sd_path)(**tiny_models.call_kwargs(guidance_scale=1.0, num_images_per_prompt=2)).images
    images = wrapped(**tiny_models.call_kwargs(guidance_scale=1.0, num_images_per_prompt=2)).images
    np.testing.assert_allclose(images, reference, atol=1e-5, rtol=0)


def test_flux_true_cfg_second_pass_runs_in_its_own_lane(dit_paths):
    # two denoiser passes per step ("cond", then "uncond"): each pass has its own schedule and stale states
    kwargs = dict(negative_prompt="blurry", true_cfg_scale=2.0)
    reference = tiny_models.load_family(dit_paths["flux"], "flux")(**tiny_models.family_call_kwargs("flux", **kwargs)).images
    exact = AsyncDiffPipeline(tiny_models.load_family(dit_paths["flux"], "flux"), stages=2, warmup=6)
    assert np.array_equal(exact(**tiny_models.family_call_kwargs("flux", **kwargs)).images, reference)
    stale = AsyncDiffPipeline(tiny_models.load_family(dit_paths["flux"], "flux"), stages=2, warmup=1)
    images = stale(**tiny_models.family_call_kwargs("flux", **kwargs)).images
    assert np.isfinite(images).all() and not np.array_equal(images, reference)
