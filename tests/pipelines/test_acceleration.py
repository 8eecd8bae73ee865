"""dtype, attention kernels and torch.compile through the wrapper: the CPU-checkable parts.

Which device the wire and control messages use is in tests/comm/, the wire format's dtypes in
tests/split/test_boundary.py.
"""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.models import resolve_dtype
from asyncgen.pipelines.acceleration import compile_options, enable_attention
from tiny_models import call_kwargs

# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("name, dtype", [("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16),
                                         ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
                                         ("float32", torch.float32), (torch.float16, torch.float16)])
def test_resolve_dtype(name, dtype):
    assert resolve_dtype(name) is dtype


@pytest.mark.parametrize("bad", ["float8", "int8", torch.int64, 16])
def test_resolve_dtype_rejects(bad):
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(bad)


def test_bfloat16_pipeline_through_the_stages(sd_path):
    """The pipeline dtype flows through every stage: full warm-up equals the stock bf16 pipeline."""
    reference = tiny_models.load(sd_path, torch_dtype=torch.bfloat16)(**call_kwargs(num_inference_steps=3)).images
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=3, warmup=3, dtype="bfloat16")
    assert wrapped.denoiser.dtype == torch.bfloat16
    np.testing.assert_allclose(wrapped(**call_kwargs(num_inference_steps=3)).images, reference, atol=1e-6, rtol=0)


def test_from_pretrained_dtype_conflict(sd_path):
    with pytest.raises(ValueError, match="disagree"):
        AsyncDiffPipeline.from_pretrained(str(sd_path), dtype="float16", torch_dtype=torch.bfloat16)


# ------------------------------------------------------------------ attention


def test_attention_backend_names_the_accepted_values(sd_path):
    with pytest.raises(ValueError, match="attention='flash' is not one of 'sdpa', 'xformers'"):
        AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, attention="flash")


@pytest.mark.skipif(__import__("importlib").util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_missing_names_the_extra(sd_path):
    with pytest.raises(ImportError, match=r"pip install 'asyncgen\[xformers\]'"):
        AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, attention="xformers")


def test_sdpa_replaces_the_classic_processor_through_the_proxy(sd_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2)
    wrapped.unet.set_attn_processor(AttnProcessor())
    changed = enable_attention(wrapped, "sdpa")
    processors = list(wrapped.unet.attn_processors.values())
    assert changed >= len(processors) > 0
    assert all(type(p) is AttnProcessor2_0 for p in processors)


def test_sdpa_keeps_joint_attention():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model = tiny_models.FAMILIES["sd3"].denoiser()
    before = {type(p) for p in model.attn_processors.values()}
    enable_attention(model, "sdpa")  # already SDPA: nothing to change, and joint layers stay joint
    assert {type(p) for p in model.attn_processors.values()} == before
    assert JointAttnProcessor2_0 in before


def test_enable_attention_rejects_other_objects():
    with pytest.raises(TypeError, match="needs a pipeline or an nn.Module, got int"):
        enable_attention(3, "sdpa")


# ------------------------------------------------------------------ compile


@pytest.mark.parametrize("bad, message", [
    ("yes", "compile='yes' is not accepted"),
    ({"backend": "eager", "fullgraf": True}, r"\['fullgraf'\] are not torch.compile arguments"),
])
def test_compile_options_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        compile_options(bad)


def test_compile_options():
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"mode": "max-autotune"}) == {"mode": "max-autotune"}


class _GraphCounter:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as captured."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def test_compile_compiles_every_stage_once(sd_path):
    """One compiled function per stage, however many modules it holds; the results do not move.

    With ``module.compile()`` per module, the tiny UNet's stage modules (more than 8) shared
    nn.Module's one ``_call_impl`` code object and dynamo stopped at its recompile limit of
    8, leaving the rest eager. Counting the graphs the backend receives shows every stage
    is captured, each once (static shapes: later steps and calls reuse the graphs).
    """
    torch._dynamo.reset()
    plain = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1)(**call_kwargs(num_inference_steps=3)).images
    counter = _GraphCounter()
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1, compile={"backend": counter})
    modules = [m for s in wrapped.stages for m in s.modules()]
    assert len(modules) > 8 and len({type(m) for m in modules}) < len(modules)
    first = wrapped(**call_kwargs(num_inference_steps=3)).images
    assert counter.graphs == 2  # one graph per stage, no graph breaks
    second = wrapped(**call_kwargs(num_inference_steps=3)).images
    assert counter.graphs == 2  # no recompilation in later steps or calls
    assert np.array_equal(first, plain) and np.array_equal(second, plain)


def test_compile_passes_through_from_pretrained(sd_path):
    from asyncgen.pipelines.acceleration import CompiledStage

    wrapped = AsyncDiffPipeline.from_pretrained(str(sd_path), stages=1, compile={"backend": "eager"})
    assert [type(s) for s in wrapped.stages] == [CompiledStage]


# ------------------------------------------------------------------ one stage, no lookups


def test_one_stage_needs_no_timestep_lookup(sd_path):
    """stages=1 never copies the scheduler's timesteps to the host (a GPU sync) and keeps two timesteps at most."""
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=1)
    seen = []

    def probe(pipe, step, timestep, callback_kwargs):
        seen.append((wrapped.hook.main._upcoming is None, len(wrapped.hook.main._timesteps)))
        return callback_kwargs

    wrapped(**call_kwargs(num_inference_steps=5), callback_on_step_end=probe)
    assert seen == [(True, min(i + 1, 2)) for i in range(5)]


@pytest.fixture(autouse=True, scope="module")
def _reset_dynamo():
    yield
    torch._dynamo.reset()  # compiled-module caches hold the models: do not carry them into other modules


def test_from_pretrained_loads_in_the_dtype(sd_path):
    wrapped = AsyncDiffPipeline.from_pretrained(str(sd_path), stages=1, dtype="bf16")
    assert wrapped.denoiser.dtype == torch.bfloat16 and wrapped.pipeline.vae.dtype == torch.bfloat16
