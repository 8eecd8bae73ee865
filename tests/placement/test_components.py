"""Text encoders and the VAE placed on some ranks (components="planned") against every rank running them."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.split.text_encoder import encoder_blocks, modules_for_layers, run_layers, split_call_arguments
from asyncgen.evaluation import random_models
from asyncgen.placement.planner import Placement
from asyncgen.pipelines import AsyncDiffPipeline
from tiny_models import call_kwargs, dit_call_kwargs

STEPS = 2
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


# ------------------------------------------------------------------ layer ranges in one process


def _umt5(layers: int = 3):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=random_models.BYTE_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=layers,
                        num_heads=2, relative_attention_num_buckets=8)
    return UMT5EncoderModel(config).eval()


ENCODERS = {
    "t5": lambda: random_models.t5_text_encoder(32, layers=3),
    "umt5": _umt5,
    "clip": lambda: random_models.clip_text_encoder(32, layers=3),
    "clip_projection": lambda: random_models.clip_text_encoder(32, layers=3, projection=True),
}


def _assert_outputs_equal(out, ref, what):
    assert type(out) is type(ref), what
    if isinstance(ref, tuple):
        assert len(out) == len(ref), what
        for o, r in zip(out, ref):
            _assert_outputs_equal(o, r, what)
        return
    if isinstance(ref, torch.Tensor):
        assert torch.equal(out, ref), what
        return
    assert list(out.keys()) == list(ref.keys()), what
    for key in ref.keys():
        _assert_outputs_equal(out[key], ref[key], f"{what}: {key}")


@pytest.mark.parametrize("family", list(ENCODERS))
def test_layer_ranges_chain_to_the_stock_encoder(family):
    torch.manual_seed(0)
    model = ENCODERS[family]()
    ids = torch.randint(0, 200, (2, 9))
    ids[:, -1] = random_models.BYTE_VOCAB_SIZE - 1  # CLIP pools at the eos token
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    n = len(encoder_blocks(model))
    with torch.no_grad():  # as in a pipeline's __call__; the same grad mode picks the same kernels
        for kwargs in ({}, {"output_hidden_states": True}, {"attention_mask": mask, "output_hidden_states": True},
                       {"attention_mask": mask, "return_dict": False}):
            reference = model(ids, **kwargs)
            call = split_call_arguments(model, (ids,), kwargs)
            for cuts in ([0, n], [0, 1, n], [0, 2, n], [0, 1, 2, n]):
                carry = None
                for a, b in zip(cuts, cuts[1:]):
                    carry = run_layers(model, a, b, call, carry)
                # float32 on the CPU, the same operations in the same order: bit for bit
                _assert_outputs_equal(carry, reference, f"{family} {sorted(kwargs)} cuts {cuts}")


@pytest.mark.parametrize("family", list(ENCODERS))
def test_layer_ranges_cover_every_parameter_once(family):
    model = ENCODERS[family]()
    n = len(encoder_blocks(model))
    ranges = [(0, 1), (1, 2), (2, n)]
    owned = [{id(p) for m in modules_for_layers(model, a, b, n) for p in m.parameters()} for a, b in ranges]
    assert set().union(*owned) == {id(p) for p in model.parameters()}
    assert sum(map(len, owned)) == len({id(p) for p in model.parameters()})


def test_layer_range_errors():
    model = ENCODERS["t5"]()
    with pytest.raises(ValueError, match=r"\[2, 5\)"):
        modules_for_layers(model, 2, 5)
    with pytest.raises(TypeError, match="AutoencoderKL cannot be split"):
        encoder_blocks(random_models.vae())
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        split_call_arguments(model, (), {"inputs_embeds": torch.zeros(1, 3, 32)})
    with pytest.raises(ValueError, match="needs the carry"):
        run_layers(model, 1, 3, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone: a proxy's wire needs a group, and world size 1 sends nothing."""
    import torch.distributed as dist

    from asyncgen.comm.group import resolve_context

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield resolve_context()
    finally:
        dist.destroy_process_group()


def test_vae_proxy_keeps_signatures_and_own_buffers(one_process_group):
    """Pipelines inspect the VAE's signatures (SVD/Latte pass num_frames only when forward has it) and read its own
    buffers on every rank (LTX's latents_mean/latents_std): the proxy shows both, also where the VAE runs elsewhere."""
    import inspect

    from diffusers import AutoencoderKLLTXVideo, AutoencoderKLTemporalDecoder

    from asyncgen.placement.proxies import make_proxy
    from asyncgen.placement.residency import release_weights

    torch.manual_seed(0)
    svd_vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                           down_block_types=("DownEncoderBlock2D",) * 2).eval()
    proxy = make_proxy("vae", svd_vae, [Placement("vae", 0)], one_process_group)
    for method in ("forward", "decode", "encode"):
        assert inspect.signature(getattr(proxy, method)) == inspect.signature(getattr(svd_vae, method)), method
    assert "num_frames" in inspect.signature(proxy.forward).parameters
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():  # the owner's output, passed through unchanged
        assert torch.equal(proxy.decode(latents, num_frames=2).sample, svd_vae.decode(latents, num_frames=2).sample)

    ltx_vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1).eval()
    mean = ltx_vae.latents_mean.clone()
    # placed on a rank other than this one: nothing of it runs here
    elsewhere = make_proxy("vae", ltx_vae, [Placement("vae", 1)], one_process_group)
    assert release_weights(ltx_vae, list(elsewhere.resident)) > 0
    assert all(p.is_meta for p in ltx_vae.parameters())
    assert torch.equal(elsewhere.latents_mean, mean) and not elsewhere.latents_std.is_meta
    elsewhere.to(torch.float64)
    assert elsewhere.latents_mean.dtype == torch.float64 and torch.equal(elsewhere.latents_mean, mean.double())
    assert elsewhere.dtype == torch.float64


def test_vae_proxy_keeps_submodule_statistics(one_process_group):
    """Flux2KleinPipeline reads ``vae.bn.running_mean``/``running_var`` (a submodule's persistent buffers) on every
    rank: they stay allocated where the VAE runs elsewhere, and the lean-loading holder reads them."""
    from diffusers import AutoencoderKLFlux2

    from asyncgen.placement.proxies import make_proxy
    from asyncgen.placement.residency import own_buffers, release_weights

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                             latent_channels=4).eval()
    vae.bn.running_mean.normal_()
    mean = vae.bn.running_mean.clone()
    assert {id(t) for t in own_buffers(vae)[0].buffers()} == {id(t) for t in vae.buffers()}  # bn's three
    elsewhere = make_proxy("vae", vae, [Placement("vae", 1)], one_process_group)
    assert release_weights(vae, list(elsewhere.resident)) > 0
    assert all(p.is_meta for p in vae.parameters())
    assert torch.equal(elsewhere.bn.running_mean, mean) and not elsewhere.bn.running_var.is_meta
    elsewhere.to(torch.float64)
    assert elsewhere.bn.running_mean.dtype == torch.float64 and torch.equal(elsewhere.bn.running_mean, mean.double())


def test_bad_components_value(sd_path):
    with pytest.raises(ValueError, match="components='everywhere' is not one of 'replicated', 'planned'"):
        AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, components="everywhere")


# ------------------------------------------------------------------ two ranks, every configuration in one launch


def _deep_t5_pixart(path):
    """The tiny PixArt with a 3-block T5 (seeded: equal on every rank), so it splits into layer ranges."""
    pipe = tiny_models.load_dit(path, "pixart")
    torch.manual_seed(1)
    object.__setattr__(pipe, "text_encoder", random_models.t5_text_encoder(32, layers=3))
    return pipe


def _configs(sd_path, sdxl_path, dit_paths):
    """(name, pipeline loader, wrapper kwargs, call kwargs maker) run with components planned and replicated."""
    image = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    return [
        ("sd", lambda: tiny_models.load(sd_path), {}, lambda: call_kwargs(num_inference_steps=STEPS)),
        ("sd-img2img", lambda: tiny_models.load(sd_path, "StableDiffusionImg2ImgPipeline"), {},
         lambda: call_kwargs(num_inference_steps=2 * STEPS, image=image, strength=0.6)),
        ("sdxl", lambda: tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"), {},
         lambda: call_kwargs(num_inference_steps=STEPS)),
        ("flux", lambda: tiny_models.load_dit(dit_paths["flux"], "flux"), {},
         lambda: dit_call_kwargs("flux", num_inference_steps=STEPS)),
        # layer ranges across ranks: SD3's first CLIP (2 blocks) over both ranks (the second
        # range on rank 0), a 3-block T5 of PixArt over both (with its attention mask)
        ("sd3-split", lambda: tiny_models.load_dit(dit_paths["sd3"], "sd3"),
         {"components": [Placement("text_encoder", 1, (0, 1)), Placement("text_encoder", 0, (1, 2)),
                         Placement("text_encoder_2", 1), Placement("vae", 1)]},
         lambda: dit_call_kwargs("sd3", num_inference_steps=STEPS)),
        ("pixart-split", lambda: _deep_t5_pixart(dit_paths["pixart"]),
         {"components": [Placement("text_encoder", 0, (0, 2)), Placement("text_encoder", 1, (2, 3)),
                         Placement("vae", 0)]},
         lambda: dit_call_kwargs("pixart", num_inference_steps=STEPS)),
    ]


def _allocated_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
               if t.device.type != "meta")


def _worker(rank, world_size, sd_path, sdxl_path, dit_paths):
    results = {}
    for name, load, wrap_kwargs, kwargs in _configs(sd_path, sdxl_path, dit_paths):
        planned_kwargs = {"components": "planned", **wrap_kwargs}
        planned = AsyncDiffPipeline(load(), stages=2, warmup=1, **planned_kwargs)
        planned.pipeline.to("cpu")  # must move only what this rank runs
        pipe = planned.pipeline
        facts = {
            "placements": {k: list(v) for k, v in planned.component_placements.items()},
            "allocated": {c: _allocated_bytes(getattr(pipe, c).component) for c in (*TEXT_ENCODERS, "vae")
                          if hasattr(getattr(pipe, c, None), "component")},
            "calls": {c: getattr(pipe, c).calls for c in (*TEXT_ENCODERS, "vae")
                      if hasattr(getattr(pipe, c, None), "component")},
        }
        images = planned(**kwargs()).images
        facts["calls"] = {c: getattr(pipe, c).calls - n for c, n in facts["calls"].items()}
        replicated = AsyncDiffPipeline(load(), stages=2, warmup=1, components="replicated")
        assert not any(hasattr(getattr(replicated.pipeline, c, None), "component") for c in (*TEXT_ENCODERS, "vae"))
        results[name] = (images, replicated(**kwargs()).images, facts)
    return results


@pytest.mark.distributed
def test_planned_components_equal_replicated(sd_path, sdxl_path, dit_paths):
    paths = {k: str(v) for k, v in dit_paths.items()}
    per_rank = launch(_worker, 2, str(sd_path), str(sdxl_path), paths, timeout=400)
    names = [name for name, *_ in _configs(sd_path, sdxl_path, dit_paths)]
    for name in names:
        reference = per_rank[0][name][1]
        placements = per_rank[0][name][2]["placements"]
        assert placements, name
        for rank, results in enumerate(per_rank):
            planned, replicated, facts = results[name]
            assert facts["placements"] == placements, (name, rank)
            # the owner's output travels unchanged and the denoiser is the same: bit for bit
            np.testing.assert_array_equal(planned, replicated, err_msg=f"{name}, rank {rank}")
            np.testing.assert_array_equal(planned, reference, err_msg=f"{name}, rank {rank} vs rank 0")
            for component, where in placements.items():
                runs_here = any(p.rank == rank for p in where)
                if not runs_here:  # none of its weights: everything stays on meta
                    assert facts["allocated"][component] == 0, (name, rank, component)
                else:
                    assert facts["allocated"][component] > 0, (name, rank, component)
                last = max(where, key=lambda p: p.layers or (0, 0)).rank
                # each output computed once per use, by the owner (the last range's rank) only
                assert (facts["calls"][component] > 0) == (rank == last), (name, rank, component, facts["calls"])
    # some rank holds no text encoder at all, so the goal's check above is not vacuous
    # (SDXL's two encoders go one to each rank: each then holds one)
    for name in ("sd", "sd-img2img"):
        placed = per_rank[0][name][2]["placements"]
        without = [r for r in range(2)
                   if not any(p.rank == r for c in TEXT_ENCODERS for p in placed.get(c, []))]
        assert without, (name, placed)


def test_generate_components_option():
    import argparse

    from asyncgen.cli import generate

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    assert parser.parse_args(["a prompt"]).components == "planned"
    assert parser.parse_args(["a prompt", "--components", "replicated"]).components == "replicated"
    with pytest.raises(SystemExit):
        parser.parse_args(["a prompt", "--components", "everywhere"])
