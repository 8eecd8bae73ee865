"""Text encoders and the VAE placed on some ranks (components="planned", asyncgen/placement/components.py) against
every rank running them. Layer ranges alone are in tests/split/test_text_encoder.py, the proxies in test_proxies.py."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.evaluation import random_models
from asyncgen.placement.planner import Placement
from asyncgen.pipelines import AsyncDiffPipeline
from tiny_models import call_kwargs, family_call_kwargs

STEPS = 2
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def test_bad_components_value(sd_path):
    with pytest.raises(ValueError, match="components='everywhere' is not one of 'replicated', 'planned'"):
        AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, components="everywhere")


# ------------------------------------------------------------------ two ranks, every configuration in one launch


def _deep_t5_pixart(path):
    """The tiny PixArt with a 3-block T5 (seeded: equal on every rank), so it splits into layer ranges."""
    pipe = tiny_models.load_family(path, "pixart")
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
        ("flux", lambda: tiny_models.load_family(dit_paths["flux"], "flux"), {},
         lambda: family_call_kwargs("flux", num_inference_steps=STEPS)),
        # layer ranges across ranks: SD3's first CLIP (2 blocks) over both ranks (the second
        # range on rank 0), a 3-block T5 of PixArt over both (with its attention mask)
        ("sd3-split", lambda: tiny_models.load_family(dit_paths["sd3"], "sd3"),
         {"components": [Placement("text_encoder", 1, (0, 1)), Placement("text_encoder", 0, (1, 2)),
                         Placement("text_encoder_2", 1), Placement("vae", 1)]},
         lambda: family_call_kwargs("sd3", num_inference_steps=STEPS)),
        ("pixart-split", lambda: _deep_t5_pixart(dit_paths["pixart"]),
         {"components": [Placement("text_encoder", 0, (0, 2)), Placement("text_encoder", 1, (2, 3)),
                         Placement("vae", 0)]},
         lambda: family_call_kwargs("pixart", num_inference_steps=STEPS)),
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
