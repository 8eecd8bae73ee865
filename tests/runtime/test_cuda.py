"""The CUDA path: dtypes and devices through stages and wire, stages=1 == stock, NCCL ranks, compile, xformers.

Every test here is marked ``cuda`` and skipped where no GPU is visible (see conftest);
``python -m asyncgen.evaluation.gpu_check`` runs them on a GPU machine. Tests needing
two GPUs skip themselves on one.
"""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.split.boundary import BoundaryLayout, pack, unpack
from asyncgen.evaluation import random_models
from asyncgen.evaluation.gpu_diagnostics import DenoiserOnly, staged_forward, unet_inputs
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.cost.cuts import balanced_cuts
from asyncgen.cost.estimate import estimate_unit_costs
from asyncgen.split.units import make_stages
from asyncgen.split.registry import split_denoiser
from tiny_models import call_kwargs

pytestmark = pytest.mark.cuda

HALF = [torch.float16, torch.bfloat16]
STEPS = 7


@pytest.fixture(autouse=True)
def _no_tf32():
    # TF32 rounding depends on the kernel cuDNN/cuBLAS picks; exactness tests compare float32 with float32
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _need_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPUs, this machine has {torch.cuda.device_count()}")


def _unet(builder: str, dtype: torch.dtype):
    torch.manual_seed(0)
    return getattr(tiny_models, builder)().to("cuda", dtype)


def _max_error(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


# ------------------------------------------------------------------ stages and wire


@pytest.mark.parametrize("builder", ["sd_unet", "sdxl_unet"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_stage_composition_on_cuda(builder, dtype):
    reference_unet = _unet(builder, torch.float32)
    unet = _unet(builder, dtype)
    split = split_denoiser(unet)
    inputs = unet_inputs(split, 2, 8, 8)
    stages = make_stages(split, balanced_cuts(estimate_unit_costs(split, inputs), 3))
    with torch.no_grad():
        full = unet(**inputs).sample
        staged = staged_forward(split, stages, inputs)  # boundary states packed and unpacked twice
        exact = reference_unet(**unet_inputs(split_denoiser(reference_unet), 2, 8, 8)).sample
    assert staged.dtype == dtype and staged.device.type == "cuda"
    if dtype == torch.float32:
        # same kernels on the same values: at most last-bit differences from buffer alignment
        assert _max_error(staged, full) <= 1e-5 * float(full.abs().max())
    else:
        # splitting may cost no more than the half-precision dtype itself costs
        assert _max_error(staged, full) <= _max_error(full, exact)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_boundary_states_keep_dtype_and_device_on_cuda(dtype):
    unet = _unet("sdxl_unet", dtype)
    split = split_denoiser(unet)
    inputs = unet_inputs(split, 2, 8, 8)
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")
    with torch.no_grad():
        cond = split.conditioning(sample, timestep, **inputs)
        state = make_stages(split, [0, 5, len(split.units)])[0](split, split.initial_state(sample, cond), cond)
    buffer = pack(state)
    header = state.layout().encode(split.stream_names)
    received = unpack(buffer.clone(), BoundaryLayout.decode(header, split.stream_names))
    assert buffer.dtype == dtype and buffer.device == sample.device
    for sent, got in zip(state.tensors(), received.tensors()):
        assert got.dtype == dtype and got.device == sample.device and torch.equal(sent, got)


# ------------------------------------------------------------------ one device


@pytest.mark.parametrize("dtype", HALF)
def test_one_stage_equals_stock_on_cuda(sd_path, dtype):
    reference = tiny_models.load(sd_path, torch_dtype=dtype).to("cuda")(**call_kwargs()).images
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path, torch_dtype=dtype), stages=1, device="cuda")
    assert wrapped.denoiser.dtype == dtype and wrapped.denoiser.device.type == "cuda"
    assert np.array_equal(wrapped(**call_kwargs()).images, reference)


def test_full_warmup_equals_stock_on_cuda(sdxl_path):
    reference = tiny_models.load(sdxl_path, "StableDiffusionXLPipeline").to("cuda")(**call_kwargs()).images
    wrapped = AsyncDiffPipeline(tiny_models.load(sdxl_path, "StableDiffusionXLPipeline"), stages=3, warmup=6, device="cuda")
    np.testing.assert_allclose(wrapped(**call_kwargs()).images, reference, atol=1e-5, rtol=0)


def test_one_stage_proxy_adds_no_host_sync():
    """The stages=1 proxy must let the host run ahead of the GPU exactly as the stock UNet does."""
    unet = _unet("sd_unet", torch.float16)
    scheduler = random_models.ddim_scheduler()
    scheduler.set_timesteps(5, device="cuda")
    wrapped = AsyncDiffPipeline(DenoiserOnly(unet, scheduler), stages=1).denoiser
    inputs = unet_inputs(split_denoiser(unet), 2, 8, 8)
    sample, _ = inputs.pop("sample"), inputs.pop("timestep")

    def denoise(model):
        with torch.no_grad():
            for t in scheduler.timesteps:
                model(sample, t, **inputs, return_dict=False)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        try:
            denoise(unet)
        except RuntimeError as exc:
            pytest.skip(f"the stock UNet synchronises by itself in this diffusers version: {exc}")
        wrapped.reset()
        denoise(wrapped)
        denoise(wrapped)  # and on the next call
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------ several GPUs


def _ranks_worker(rank, world_size, sd_path, dtype_name, backend):
    import torch.distributed as dist

    import asyncgen.runtime.asyncdiff as runtime

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if backend == "gloo":  # CUDA ranks on a CPU-only backend: transfers staged through pinned memory
        dist.init_process_group("gloo")
    wire = set()
    pack = runtime.pack

    def recording_pack(state, out=None):
        buffer = pack(state, out)
        wire.add((str(buffer.dtype), buffer.device.type))
        return buffer

    runtime.pack = recording_pack
    dtype = getattr(torch, dtype_name)
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path, torch_dtype=dtype), stages=world_size, warmup=2)
    images = wrapped(**call_kwargs(num_inference_steps=STEPS)).images
    return images, dict(wrapped.stage_info(), device=str(wrapped.ctx.device), wire=sorted(wire),
                        staged=wrapped.hook.executor._staged)


@pytest.mark.distributed
@pytest.mark.parametrize("backend, dtype", [("default", "float32"), ("default", "float16"), ("gloo", "float32")])
def test_two_cuda_ranks_equal_the_serial_simulator(sd_path, backend, dtype):
    _need_gpus(2)
    from asyncgen.cli.launcher import launch

    per_rank = launch(_ranks_worker, 2, str(sd_path), dtype, backend, timeout=300)
    torch_dtype = getattr(torch, dtype)
    serial = AsyncDiffPipeline(tiny_models.load(sd_path, torch_dtype=torch_dtype), stages=2, warmup=2, device="cuda")
    expected = serial(**call_kwargs(num_inference_steps=STEPS)).images
    if torch_dtype == torch.float32:
        tolerance = 1e-5
    else:  # the same schedule in float32: what half precision itself moves the picture by
        exact = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=2, device="cuda")
        tolerance = _max_error(expected, exact(**call_kwargs(num_inference_steps=STEPS)).images)
    for rank, (images, info) in enumerate(per_rank):
        assert info["device"] == f"cuda:{rank}"
        assert info["staged"] == (backend == "gloo")
        if rank == 0:  # stage 0 sends; stage 1 only receives
            assert info["wire"] == [(str(torch_dtype), "cuda")]
        assert _max_error(images, expected) <= tolerance, f"rank {rank}, {info}"


# ------------------------------------------------------------------ compile, attention


def test_compile_on_cuda(sd_path):
    pytest.importorskip("triton")
    plain = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1, device="cuda")(**call_kwargs()).images
    eager = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1, device="cuda", compile={"backend": "eager"})
    assert np.array_equal(eager(**call_kwargs()).images, plain)  # tracing alone changes no arithmetic
    compiled = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1, device="cuda", compile=True)
    images = compiled(**call_kwargs()).images
    assert all(type(s).__name__ == "CompiledStage" for s in compiled.stages)
    # inductor fuses and reorders float32 arithmetic: the same picture to well under one 8-bit level
    assert _max_error(images, plain) <= 0.25 / 255
    assert np.array_equal(compiled(**call_kwargs()).images, images)  # second call: no recompile drift


def test_xformers_attention_on_cuda(sd_path):
    pytest.importorskip("xformers")
    from diffusers.models.attention_processor import XFormersAttnProcessor

    sdpa = AsyncDiffPipeline(tiny_models.load(sd_path, torch_dtype=torch.float16), stages=1, device="cuda",
                             attention="sdpa")
    reference = sdpa(**call_kwargs()).images
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path, torch_dtype=torch.float16), stages=2, warmup=6,
                                device="cuda", attention="xformers")
    processors = wrapped.unet.attn_processors.values()
    assert processors and all(isinstance(p, XFormersAttnProcessor) for p in processors)
    # the same attention in other kernels: rounding only, well under one 8-bit level on average
    assert float(np.abs(wrapped(**call_kwargs()).images - reference).mean()) < 1 / 255


# ------------------------------------------------------------------ no per-step host work


def test_time_split_measures_on_the_rank_device(sd_path, monkeypatch):
    """split="time" times the units on the GPU they will run on, not on the CPU they were loaded to."""
    from asyncgen.pipelines import asyncdiff

    seen, measure = [], asyncdiff.measure_unit_costs

    def spy(split, *args, **kwargs):
        seen.append(next(split.denoiser.parameters()).device.type)
        return measure(split, *args, **kwargs)

    monkeypatch.setattr(asyncdiff, "measure_unit_costs", spy)
    AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, split="time", device="cuda")
    assert seen == ["cuda"]


def test_upcoming_timesteps_go_to_the_gpu_once_per_call(sd_path, monkeypatch):
    """stride 2 looks timesteps up ahead: one copy to the GPU per call, and the check of the
    pipeline's CUDA timesteps deferred to the call's end (no per-step .item())."""
    from asyncgen.runtime import asyncdiff_hook

    copies, on_device = [], asyncdiff_hook._on_device
    monkeypatch.setattr(asyncdiff_hook, "_on_device",
                        lambda values, device: copies.append(device.type) or on_device(values, device))
    serial = AsyncDiffPipeline(tiny_models.load(sd_path), stages=1, stride=2, device="cuda")
    checked, lane = [], serial.hook.main
    monkeypatch.setattr(lane, "_check_timesteps",
                        lambda: checked.append(len(lane._unchecked)) or asyncdiff_hook.AsyncDiffLane._check_timesteps(lane))
    serial(**call_kwargs(num_inference_steps=STEPS))
    assert copies == ["cuda"]
    assert checked and max(checked) == STEPS // 2  # every looked-up step, checked at once at the end
