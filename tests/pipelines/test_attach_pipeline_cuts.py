"""The whole-model wrapper costs its cuts on the stock pipeline's own first call (issue 26 §1, pipelines/attach.py).

The config's example call has a few tokens, where a block's cost is mostly its weights; the
pipeline's call (Flux at its default 1024 px: 4096 image and 512 text tokens) is mostly
activations. On this Flux (2 double-stream blocks of about twice a single block's weights,
6 single-stream blocks) the two give different cuts, and ``asyncgen plan`` (which records the
pipeline's call on meta weights) chooses the pipeline's. A wrapper around the loaded pipeline
must choose the same, and fall back to the config's call, saying why, where the pipeline's
preparation cannot be recorded.
"""

import pytest
import torch

import tiny_models
from asyncgen.cost.cuts import choose_cuts
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.pipelines.from_configs import plan_from_configs
from asyncgen.split.registry import split_denoiser

PIPELINE_PATH = "the stock pipeline's first call, recorded on shapes (pipeline path)"


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=6,
                                         attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    return tiny_models.save_flux_pipeline(tmp_path_factory.mktemp("flux_cuts") / "flux", transformer.eval())


def test_the_wrappers_cuts_are_the_plans_on_the_pipelines_call(flux_path, one_thread):
    plan_cuts = plan_from_configs(str(flux_path), stages=2, estimate_activations=False).notes["cuts"]
    loaded = tiny_models.load_family(flux_path, "flux")
    config_cuts = choose_cuts(split_denoiser(loaded.transformer), 2, "flops")
    assert plan_cuts == [0, 4, 8] and config_cuts == [0, 3, 8]  # the two calls disagree on this model

    parameters = {name: p for name, p in loaded.components["text_encoder_2"].named_parameters()}
    rng = torch.get_rng_state()
    wrapped = AsyncDiffPipeline(loaded, stages=2)
    assert wrapped.attachment.cuts() == plan_cuts
    assert wrapped.attachment.cut_sources == {"transformer": PIPELINE_PATH}
    # the recording ran the pipeline's preparation on shapes: its weights are its own again (no fake left in a
    # slot), and the noise it drew is undone, so the user's next unseeded call draws what it would have
    assert all(p is parameters[name] for name, p in loaded.components["text_encoder_2"].named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    call = tiny_models.family_call_kwargs("flux")
    assert torch.isfinite(torch.as_tensor(wrapped(**call).images)).all()


def test_without_a_recordable_call_the_configs_is_used_and_the_reason_kept(flux_path, one_thread):
    loaded = tiny_models.load_family(flux_path, "flux")
    loaded.text_encoder_2 = None  # the prompt can no longer be encoded: the preparation fails on shapes too
    wrapped = AsyncDiffPipeline(loaded, stages=2)
    assert wrapped.attachment.cuts() == [0, 3, 8]
    source = wrapped.attachment.cut_sources["transformer"]
    assert source.startswith("the config's example call (FluxPipeline's own preparation did not run on shapes "
                             "alone (pipeline path: "), source


def test_one_stage_and_given_cuts_record_nothing(flux_path, monkeypatch, one_thread):
    from asyncgen.split.transformer import pipeline_example

    def refuse(*args, **kwargs):
        raise AssertionError("recorded a call no cut needs")

    monkeypatch.setattr(pipeline_example, "record_denoiser_call", refuse)
    assert AsyncDiffPipeline(tiny_models.load_family(flux_path, "flux"), stages=1).attachment.cuts() == [0, 8]
    given = AsyncDiffPipeline(tiny_models.load_family(flux_path, "flux"), stages=2, split=[0, 2, 8])
    assert given.attachment.cuts() == [0, 2, 8]


def _no_config_example(monkeypatch):
    """No argument of any forward can be built from its config: the config path fails as HiDream's does."""
    import inspect

    from asyncgen.split.transformer import example_inputs as config_examples

    monkeypatch.setattr(config_examples, "_argument", lambda *a, **k: inspect.Parameter.empty)
    monkeypatch.setattr(config_examples, "_LAYOUTS", type(config_examples._LAYOUTS)())


def _on_meta(pipe):
    """``pipe`` with its transformer rebuilt on ``meta`` (one rank's stage-only load, no stage read)."""
    with torch.device("meta"):
        pipe.transformer = type(pipe.transformer).from_config(pipe.transformer.config)
    return pipe


def test_a_meta_denoiser_without_a_config_example_splits_on_the_pipelines_call(family_path, monkeypatch, one_thread):
    from asyncgen.pipelines.attach import AsyncDiffConfig, apply_asyncdiff
    from asyncgen.split.transformer.trace import ExampleUnavailable

    path = family_path("sd3")
    _no_config_example(monkeypatch)
    attachment = apply_asyncdiff(_on_meta(tiny_models.load_family(path, "sd3")),
                                 AsyncDiffConfig(stages=2, split=[0, 1, 3]))
    split = attachment.hook.split
    assert split.example_source == "the pipeline's first denoiser call" and attachment.cuts() == [0, 1, 3]
    # SD3's own preparation: CLIP's 77 tokens and the T5's 256, the CFG batch
    assert split.example_inputs()["encoder_hidden_states"].shape[:2] == (2, 77 + 256)
    assert attachment.cut_sources == {"transformer": PIPELINE_PATH}

    # with neither path: one line naming both
    pipe = _on_meta(tiny_models.load_family(path, "sd3"))
    pipe.text_encoder = None
    with pytest.raises(ExampleUnavailable) as refused:
        apply_asyncdiff(pipe, AsyncDiffConfig(stages=2, split=[0, 1, 3]))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("StableDiffusion3Pipeline's own preparation did not run on shapes alone (pipeline "
                              "path: "), message
    assert "; then cannot build an example call of SD3Transformer2DModel.forward" in message
    assert "(config path; tried" in message
