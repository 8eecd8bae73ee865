"""The config path's example call from the stock pipeline (issue 26): recorded on shapes, no weight read.

``record_denoiser_call`` runs the stock pipeline assembled on ``meta`` (``from_configs.pipeline_from_configs``)
and stops it at its first denoiser call. What it records must be what the loaded pipeline really passes:
the same arguments, tensors of the same shapes and dtypes, the same other values. ``split_from_configs``
splits on it, falls back to the config's example where the pipeline path fails, and says which paths it tried.
"""

import pytest
import torch

import tiny_models
from asyncgen.pipelines.from_configs import empty_pipeline_modules, pipeline_from_configs, split_from_configs
from asyncgen.split.transformer import example_inputs as config_examples
from asyncgen.split.transformer.pipeline_example import pipeline_call_arguments, record_denoiser_call
from asyncgen.split.transformer.trace import ExampleUnavailable


def _structure(value):
    """Shapes and dtypes of tensors, everything else as is (what the trace and the cost estimates see)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_structure(v) for v in value)
    return value


def _first_real_call(pipe, attribute: str, call: dict) -> dict:
    import inspect

    denoiser = getattr(pipe, attribute)
    seen = []

    def record(module, args, kwargs):
        if not seen:
            seen.append({k: v for k, v in inspect.signature(module.forward).bind(*args, **kwargs).arguments.items()
                         if k != "return_dict"})

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(**call, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen[0]


# sd3: batched CFG, three text encoders (one saved as null); flux: packed latents, ids, guidance;
# cogvideox: video (B, F, C, H, W) and the rotary tables the pipeline computes
@pytest.mark.parametrize("family", ["sd3", "flux", "cogvideox"])
def test_the_recorded_call_is_the_loaded_pipelines_first_call(family, family_path, one_thread):
    path = family_path(family)
    size = tiny_models.FAMILIES[family].call.get("height", 16)
    _, modules = empty_pipeline_modules(str(path))
    empty = pipeline_from_configs(str(path), modules)
    recorded = record_denoiser_call(empty, "transformer", pipeline_call_arguments(empty, size, size))
    assert all(t.is_meta for t in recorded.values() if isinstance(t, torch.Tensor))  # nothing real kept
    assert all(p.is_meta for p in empty.transformer.parameters())  # and no weight read

    loaded = tiny_models.load_family(path, family)
    loaded.set_progress_bar_config(disable=True)
    real = _first_real_call(loaded, "transformer", pipeline_call_arguments(loaded, size, size))
    assert _structure(recorded) == _structure(real)


def test_split_from_configs_takes_the_pipelines_call_and_falls_back_to_the_configs(family_path, one_thread):
    path = str(family_path("sd3"))
    _, modules = empty_pipeline_modules(path)
    split = split_from_configs(path, modules, "transformer", 16, 16)
    assert split.example_source == "the pipeline's first denoiser call"
    # the pipeline's own text length (its tokenizers' 77 + the T5's) and CFG batch, not the config example's 8 tokens
    call = split.example_inputs()
    assert call["encoder_hidden_states"].shape[:2] == (2, 77 + 256)
    # 15 px: SD3Pipeline refuses an odd size (its own check), so the config's example is the fallback
    fallback = split_from_configs(path, modules, "transformer", 15, 15)
    assert fallback.example_source == "the config"
    assert [u.name for u in fallback.units] == [u.name for u in split.units]


def test_a_refusal_names_both_paths_and_why(family_path, monkeypatch, one_thread):
    path = str(family_path("sd3"))
    _, modules = empty_pipeline_modules(path)
    # no argument of the forward can be built from the config: the config path fails as HiDream's does
    monkeypatch.setattr(config_examples, "_argument", lambda *a, **k: __import__("inspect").Parameter.empty)
    monkeypatch.setattr(config_examples, "_LAYOUTS", type(config_examples._LAYOUTS)())
    with pytest.raises(ExampleUnavailable) as refused:
        split_from_configs(path, modules, "transformer", 15, 15)
    message = str(refused.value)
    assert "\n" not in message
    assert "pipeline path" in message and "height" in message  # the pipeline's own check, named
    assert "then" in message and "config path; tried" in message  # each latent layout tried, with its error


def test_stage_only_loadings_components_are_completed_on_meta(family_path, one_thread):
    """Stage-only loading builds the denoiser and the placeable components on meta; the pipeline assembled around
    them builds the rest on meta too (from_pretrained would read their weights), so nothing is read."""
    from asyncgen.pipelines.lean_loading import empty_component
    from diffusers import DiffusionPipeline

    path = str(family_path("sd3"))
    index = DiffusionPipeline.load_config(path)
    some = {name: empty_component(path, name, index[name][1]) for name in ("transformer", "vae")}
    pipe = pipeline_from_configs(path, some)
    assert pipe.transformer is some["transformer"] and pipe.vae is some["vae"]
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) == 4  # the transformer, the VAE, two CLIP text encoders (the T5 is saved as null)
    assert all(p.is_meta for m in modules for p in m.parameters())
    split = split_from_configs(path, some, "transformer", 16, 16)
    assert split.example_source == "the pipeline's first denoiser call"
