"""dtype, attention kernels, torch.compile and device placement: the CPU-checkable parts."""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.split.boundary import BoundaryLayout, BoundaryState, pack, unpack
from asyncgen.comm.p2p import control_device, p2p_device
from asyncgen.comm.group import local_cuda_device
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.pipelines.acceleration import compile_options, enable_attention, resolve_dtype
from tiny_models import call_kwargs

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# ------------------------------------------------------------------ devices and backends


@pytest.mark.parametrize("backend, device, expected", [
    ("cpu:gloo,cuda:nccl", CUDA, CUDA),  # NCCL moves CUDA tensors itself
    ("nccl", CUDA, CUDA),
    ("gloo", CUDA, CPU),  # gloo reads host memory: stage through pinned buffers
    ("gloo", CPU, CPU),
    ("cpu:gloo,cuda:nccl", CPU, CPU),
])
def test_p2p_device(backend, device, expected):
    assert p2p_device(backend, device) == expected


def test_p2p_device_refuses_what_no_backend_carries():
    with pytest.raises(ValueError, match="backend 'nccl' cannot carry cpu tensors"):
        p2p_device("nccl", CPU)


@pytest.mark.parametrize("backend, expected", [("cpu:gloo,cuda:nccl", CPU), ("gloo", CPU), ("nccl", CUDA)])
def test_control_device(backend, expected):
    # seeds, cut points and layout headers are read by the host: CPU wherever gloo can carry them
    assert control_device(backend, CUDA) == expected


def test_local_cuda_device_names_the_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_cuda_device("cuda") == torch.device("cuda", 1)  # "cuda" means this rank's GPU, not GPU 0
    assert local_cuda_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match="LOCAL_RANK=3 asks for CUDA device 3, but this process sees 2"):
        local_cuda_device(None)


def test_one_visible_gpu_is_cuda_0_whatever_local_rank(monkeypatch):
    """SLURM/Kubernetes give each process its own CUDA_VISIBLE_DEVICES: LOCAL_RANK 3 then sees one GPU, cuda:0."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_cuda_device(None) == torch.device("cuda", 0)
    assert local_cuda_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device='cuda:1' asks for CUDA device 1, but this process sees 1"):
        local_cuda_device("cuda:1")  # an explicit index is still checked


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_wire_format_keeps_the_dtype(dtype):
    state = BoundaryState(torch.randn(2, 3, 4).to(dtype), (torch.randn(2, 5).to(dtype),), {"text": torch.randn(7).to(dtype)})
    layout = BoundaryLayout.decode(state.layout().encode(("text",)), ("text",))
    buffer = pack(state)
    received = unpack(buffer.clone(), layout)
    assert layout.dtype == buffer.dtype == dtype
    for sent, got in zip(state.tensors(), received.tensors()):
        assert got.dtype == dtype and torch.equal(sent, got)


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

    model = tiny_models.dit_model("sd3")
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
        seen.append((wrapped.denoiser._upcoming is None, len(wrapped.denoiser._timesteps)))
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
