"""Is asyncgen ready for this GPU? One script, one GPU, under eight minutes.

    python -m asyncgen.evaluation.gpu_check                      # CUDA, SD2.1- and SDXL-sized UNets
    python -m asyncgen.evaluation.gpu_check --quick              # fewer steps and repeats
    python -m asyncgen.evaluation.gpu_check --device cpu --tiny  # the same path on CPU, tiny UNets, seconds

Parts, each recorded in the JSON report (and skipped, with the reason, when the time
budget runs out):

1. **tests**: the suite's ``@pytest.mark.cuda`` tests, in a pytest subprocess.
2. **composition**: for each UNet (random weights, built from the public configs),
   the stages composed with every boundary state packed and unpacked as on the wire,
   against the model's own forward. float32 must agree to 1e-5 of the output's scale;
   bfloat16 must agree at least as well as bfloat16 agrees with float32 itself.
3. **overhead**: a CFG denoising loop (UNet + guidance + scheduler step) with the stock
   UNet and with the ``stages=1`` wrapper around the same module, timed alternately
   with CUDA events after warm-up loops; the wrapper may cost at most 2%.
   Host time per step (how long the CPU takes to queue a step) is reported beside GPU
   time: a host slower than the GPU is the Python overhead showing.
4. **stages**: the UNet split into N = 2, 3, 4 stages, each stage's compute timed on
   this GPU; sum / max is the speedup N GPUs could give if communication were free.
5. **two ranks**: two processes sharing this GPU (``cuda:0``) run the distributed runtime
   over a gloo group (NCCL refuses two ranks on one GPU), which exercises the side
   streams, events, ``record_stream`` and pinned staging of the CUDA path for real, and
   must reproduce the serial simulator (stages=2 stride 1, stages=1 stride 2).

Each part runs in its own ``try``; a failure is recorded with its traceback and the
next part runs. The JSON report and a Markdown table file beside it are rewritten after
every part, and output is unbuffered, so a crash or a timeout keeps what was done.

Needs: PyTorch and diffusers (the UNets are ``diffusers.UNet2DConditionModel``). On a
machine without diffusers the script still starts, records every part as skipped with
what to install, and writes its report.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from asyncgen.split.boundary import BoundaryLayout, pack, unpack
from asyncgen.split.units import DenoiserSplit, Stage, make_stages
from asyncgen.cost.cuts import choose_cuts

from .reporting import markdown_table, write_atomic, write_json

NEEDS_DIFFUSERS = (
    "needs diffusers (the UNets are diffusers.UNet2DConditionModel), which is not installed: on an offline "
    "machine copy its wheel and install it with `pip install --no-deps diffusers-*.whl` (it also imports "
    "huggingface_hub, safetensors, regex, requests, filelock, importlib_metadata, Pillow, numpy)"
)


def have_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def split_denoiser(denoiser):
    from asyncgen.split.registry import split_denoiser as split

    return split(denoiser)

# stabilityai/stable-diffusion-2-1, unet/config.json (865M parameters, 768x768 images).
# attention_head_dim is, by a historical naming slip, the number of heads per level.
SD21_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, num_class_embeds=None,
    only_cross_attention=False, out_channels=4, sample_size=96,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    upcast_attention=True, use_linear_projection=True,
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.57B parameters, 1024x1024 images).
# projection_class_embeddings_input_dim = 1280 (pooled text) + 6 * 256 (size/crop ids).
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5, norm_num_groups=32, num_attention_heads=None,
    num_class_embeds=None, only_cross_attention=False, out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, resnet_time_scale_shift="default", sample_size=128,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True,
)

MODELS = {"sd21": ("SD2.1 UNet", SD21_UNET), "sdxl": ("SDXL UNet", SDXL_UNET)}

FP32_TOLERANCE = 1e-5
OVERHEAD_TARGET = 0.02


def tiny_config(config: dict) -> dict:
    """The same architecture (block types, head layout, embeddings, depth pattern) at toy width.

    Widths shrink 10x-20x, heads to at most 4, transformer depth to at most 2 and the
    latent to 8x8, so a CPU runs every part of the check in seconds while the code
    paths (linear projections, text_time embeddings, per-level depths) stay the real ones.
    """
    config = copy.deepcopy(config)
    levels = len(config["block_out_channels"])
    config["block_out_channels"] = [16 * min(2**i, 4) for i in range(levels)]
    config["attention_head_dim"] = [min(2 * 2**i, 4) for i in range(levels)]  # heads per level, 8-16 wide
    config["norm_num_groups"] = 8
    config["cross_attention_dim"] = 32
    config["sample_size"] = 8
    if isinstance(config.get("transformer_layers_per_block"), list):
        config["transformer_layers_per_block"] = [min(d, 2) for d in config["transformer_layers_per_block"]]
    if config.get("addition_embed_type") == "text_time":
        config["addition_time_embed_dim"] = 8
        config["projection_class_embeddings_input_dim"] = 32 + 6 * 8  # pooled text 32 + six size/crop ids
    return config


# ------------------------------------------------------------------------ building


def build_unet(config: dict, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight ``UNet2DConditionModel`` initialised directly on ``device`` (seconds for SDXL on a GPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype).eval().requires_grad_(False)


def unet_inputs(split: DenoiserSplit, batch: int, height: int, width: int, seed: int = 0) -> dict:
    """Random forward inputs of the UNet's own shapes (from ``example_inputs``), size/crop ids set to the image size."""
    inputs = split.example_inputs(batch, height, width)
    generator = torch.Generator("cpu").manual_seed(seed)

    def randomise(value):
        if isinstance(value, dict):
            return {k: randomise(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return torch.randn(value.shape, generator=generator).to(value.device, value.dtype)
        return value

    inputs = {k: (v if k == "timestep" else randomise(v)) for k, v in inputs.items()}
    added = inputs.get("added_cond_kwargs")
    if added is not None and "time_ids" in added:
        pixels = [8 * height, 8 * width]
        ids = torch.tensor(pixels + [0, 0] + pixels, dtype=added["time_ids"].dtype)
        added["time_ids"] = ids.expand(batch, 6).to(added["time_ids"].device)
    return inputs


def staged_forward(split: DenoiserSplit, stages: list[Stage], inputs: dict, wire: bool = True) -> torch.Tensor:
    """The denoiser's output computed stage by stage, as the ranks compute it.

    With ``wire`` every boundary state between stages goes through exactly what a
    transfer does to it: layout header encoded and decoded, tensors packed into one
    flat buffer (a fresh copy, as a receive buffer is) and unpacked into views.
    """
    inputs = dict(inputs)
    sample, timestep = inputs.pop(split.sample_argument), inputs.pop("timestep")
    cond = split.conditioning(sample, timestep, **inputs)
    state = split.initial_state(sample, cond)
    for stage in stages:
        state = stage(split, state, cond)
        if wire and stage is not stages[-1]:
            layout = BoundaryLayout.decode(state.layout().encode(split.stream_names), split.stream_names)
            state = unpack(pack(state).clone(), layout)
    return split.output(state)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN matching NaN (random weights in half precision may overflow alike)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    scale = reference.abs().max().item()
    return (value.float() - reference).abs().max().item() / (scale if scale > 0 else 1.0)


# ------------------------------------------------------------------------- timing


class _Clock:
    """Elapsed seconds of queued work and of the host queueing it: ``(device, host)``.

    On a GPU the device time comes from CUDA events and the host time is how long the
    CPU took to issue the work (before waiting for it); on a CPU both are wall time.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float]:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            return elapsed, elapsed
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host = time.perf_counter()
        fn()
        host = time.perf_counter() - host
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, host


class DenoiserOnly:
    """The pipeline parts ``AsyncDiffPipeline`` touches: the denoiser, the scheduler and ``to()``."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler = unet, scheduler

    def to(self, device) -> "DenoiserOnly":
        self.unet.to(device)
        return self


def _denoise(model, latents: torch.Tensor, cond: dict, scheduler, steps: int, guidance: float = 7.5) -> torch.Tensor:
    # what a diffusers text-to-image pipeline does per step, minus the progress bar
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        eps = model(torch.cat([latents, latents]), t, **cond, return_dict=False)[0]
        uncond, text = eps.chunk(2)
        latents = scheduler.step(uncond + guidance * (text - uncond), t, latents, return_dict=False)[0]
    return latents


def time_overhead(unet, inputs: dict, steps: int, repeats: int, warmup_loops: int = 1) -> dict:
    """Per-step time of a CFG denoising loop, stock UNet against the ``stages=1`` wrapper around it."""
    from asyncgen.pipelines import AsyncDiffPipeline

    from .random_models import ddim_scheduler

    scheduler = ddim_scheduler()
    wrapped = AsyncDiffPipeline(DenoiserOnly(unet, scheduler), stages=1).denoiser
    inputs = dict(inputs)
    sample = inputs.pop("sample")[:1]
    inputs.pop("timestep")
    clock = _Clock(sample.device)
    outputs = {}

    def run(name, model):
        def loop():
            if model is wrapped:
                wrapped.reset()  # what AsyncDiffPipeline.__call__ does around the pipeline
            outputs[name] = _denoise(model, sample, inputs, scheduler, steps)
        device_s, host_s = clock(loop)
        return device_s / steps, host_s / steps

    with torch.no_grad():
        for _ in range(warmup_loops):
            run("stock", unet), run("wrapped", wrapped)
        stock, wrapper, stock_host, wrapper_host = [], [], [], []
        for r in range(repeats):
            # alternate which goes first so slow drifts (clocks, other tenants) cancel
            order = [("stock", unet, stock, stock_host), ("wrapped", wrapped, wrapper, wrapper_host)]
            for name, model, times, host in order if r % 2 == 0 else order[::-1]:
                device_s, host_s = run(name, model)
                times.append(device_s)
                host.append(host_s)
    return dict(
        stock_step_ms=1e3 * statistics.median(stock), wrapped_step_ms=1e3 * statistics.median(wrapper),
        stock_host_step_ms=1e3 * statistics.median(stock_host), wrapped_host_step_ms=1e3 * statistics.median(wrapper_host),
        overhead=statistics.median(wrapper) / statistics.median(stock) - 1.0,
        identical=_same(outputs["stock"], outputs["wrapped"]),
        stock_samples_ms=[1e3 * s for s in stock], wrapped_samples_ms=[1e3 * s for s in wrapper],
    )


def projected_speedup(stage_ms: list[float]) -> float:
    """Speedup of N stages on N devices over one device if communication were free.

    One device runs all stages per step (their sum); N devices run them at once, so a
    step takes as long as the slowest stage (the max).
    """
    return sum(stage_ms) / max(stage_ms)


def stage_times(split: DenoiserSplit, stages: list[Stage], inputs: dict, repeats: int) -> list[float]:
    """Median milliseconds of each stage's units on this device (the shared embeddings excluded)."""
    inputs = dict(inputs)
    sample, timestep = inputs.pop(split.sample_argument), inputs.pop("timestep")
    cuda = sample.device.type == "cuda"
    samples: list[list[float]] = [[] for _ in stages]
    with torch.no_grad():
        for r in range(repeats + 1):  # the first pass warms caches and the allocator
            cond = split.conditioning(sample, timestep, **inputs)
            state = split.initial_state(sample, cond)
            if cuda:
                marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(stages) + 1)]
                marks[0].record()
                for k, stage in enumerate(stages):
                    state = stage(split, state, cond)
                    marks[k + 1].record()
                marks[-1].synchronize()
                elapsed = [a.elapsed_time(b) for a, b in zip(marks[:-1], marks[1:])]
            else:
                elapsed = []
                for stage in stages:
                    start = time.perf_counter()
                    state = stage(split, state, cond)
                    elapsed.append(1e3 * (time.perf_counter() - start))
            if r:
                for k, ms in enumerate(elapsed):
                    samples[k].append(ms)
    return [statistics.median(s) for s in samples]


# -------------------------------------------------------------------------- parts


def find_tests(explicit: str | None = None) -> Path | None:
    """The suite: ``explicit``, else the source tree's ``tests/`` beside this package, else ``./tests``."""
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parents[1] / "tests", Path.cwd() / "tests"]
    return next((c.resolve() for c in candidates if (c / "conftest.py").is_file()), None)


def run_cuda_tests(timeout: float, tests: Path | None) -> dict:
    """The suite's CUDA-marked tests in a pytest subprocess; counts from its summary line."""
    if tests is None:
        return dict(status="skipped", reason="no tests folder found (installed without the source tree?); pass --tests-dir")
    command = [sys.executable, "-m", "pytest", "-m", "cuda", str(tests), "-q", "-rs", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={int(timeout)}")
    start = time.perf_counter()
    try:
        # run from inside tests/: from the source root, `python -m` would put the bare engine
        # folder `asyncgen/` first on sys.path and hide an installed package's subpackages
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tests)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return dict(status="failed", reason=f"pytest still running after {timeout:.0f}s", output_tail=output[-3000:])
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", done.stdout)}
    # pytest exits 5 when nothing ran: that is a failed check, not a pass
    status = "passed" if done.returncode == 0 else "failed"
    return dict(status=status, returncode=done.returncode, counts=counts, seconds=time.perf_counter() - start,
                command=" ".join(command[1:]), output_tail=(done.stdout + done.stderr)[-3000:])


def check_composition(name: str, config: dict, device: torch.device, stage_counts: list[int], seed: int) -> dict:
    """Stage composition against the full forward: float32 to 1e-5, bfloat16 as well as bfloat16 can."""
    unet = build_unet(config, device, torch.float32, seed)
    split = split_denoiser(unet)
    size = config["sample_size"]
    inputs = unet_inputs(split, 1, size, size, seed)
    cuts = {n: choose_cuts(split, n, "flops", inputs=inputs) for n in stage_counts}  # counted in float32, kept for bf16
    rows = []
    with torch.no_grad():
        reference = unet(**inputs).sample
        for n in stage_counts:
            stages = make_stages(split, cuts[n])
            rows.append(dict(model=name, dtype="float32", stages=n, error=_relative_error(staged_forward(split, stages, inputs), reference),
                             tolerance=FP32_TOLERANCE))
        unet.to(torch.bfloat16)
        low = {k: v for k, v in unet_inputs(split, 1, size, size, seed).items()}  # same draws, now bf16
        full = unet(**low).sample
        dtype_error = _relative_error(full, reference)
        for n in stage_counts:
            stages = make_stages(split, cuts[n])
            staged = staged_forward(split, stages, low)
            rows.append(dict(model=name, dtype="bfloat16", stages=n, error=_relative_error(staged, full),
                             tolerance=dtype_error, boundary_dtype=str(staged.dtype).removeprefix("torch.")))
    for row in rows:
        row["passed"] = row["error"] <= row["tolerance"]
    del unet
    return rows


def profile_model(name: str, config: dict, device: torch.device, dtype: torch.dtype, resolution: int,
                  stage_counts: list[int], steps: int, repeats: int, seed: int) -> tuple[dict, list[dict]]:
    """Overhead of the wrapper and per-stage compute times for one UNet, at ``resolution`` pixels."""
    unet = build_unet(config, device, dtype, seed)
    parameters = sum(p.numel() for p in unet.parameters())
    split = split_denoiser(unet)
    latent = resolution // 8
    inputs = unet_inputs(split, 2, latent, latent, seed)  # batch 2: the CFG pair
    overhead = dict(model=name, resolution=resolution, dtype=str(dtype).removeprefix("torch."), steps=steps,
                    repeats=repeats, parameters_m=parameters / 1e6, **time_overhead(unet, inputs, steps, repeats))
    overhead["target_met"] = overhead["overhead"] <= OVERHEAD_TARGET
    rows = []
    for n in stage_counts:
        for method in ("flops", "time"):
            cuts = choose_cuts(split, n, method, inputs=inputs)
            ms = stage_times(split, make_stages(split, cuts), inputs, repeats)
            rows.append(dict(model=name, resolution=resolution, stages=n, split=method, cuts=cuts, stage_ms=ms,
                             step_ms=sum(ms), max_stage_ms=max(ms), projected_speedup=projected_speedup(ms)))
    del unet
    return overhead, rows


# ---------------------------------------------------------------------- two ranks

TWO_RANK_CONFIGS = ((2, 1), (1, 2))  # (stages, stride): two ranks each


def _staged_denoise(config: dict, device: torch.device, stages: int, stride: int, steps: int, seed: int,
                    process_group=None) -> torch.Tensor:
    """A CFG denoising loop through ``AsyncDiffPipeline``'s proxy: serial simulator, or ranks of ``process_group``."""
    from asyncgen.pipelines import AsyncDiffPipeline

    from .random_models import ddim_scheduler

    unet = build_unet(config, device, torch.float32, seed)
    size = config["sample_size"]
    inputs = unet_inputs(split_denoiser(unet), 2, size, size, seed)  # before other stages' weights are released
    sample = inputs.pop("sample")[:1]
    inputs.pop("timestep")
    scheduler = ddim_scheduler()
    wrapped = AsyncDiffPipeline(DenoiserOnly(unet, scheduler), stages=stages, stride=stride, warmup=1,
                                process_group=process_group, device=device).denoiser
    with torch.no_grad():
        wrapped.reset()
        latents = _denoise(wrapped, sample, inputs, scheduler, steps)
        wrapped.reset()  # settles the call's transfers, as AsyncDiffPipeline.__call__ does
    return latents.cpu()


def _exact_float32() -> None:
    # TF32 rounding depends on the kernel picked; the comparison is float32 against float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def _two_rank_worker(rank: int, world_size: int, config: dict, device: str, steps: int, seed: int, timeout: float):
    import torch.distributed as dist

    _exact_float32()
    # gloo only: NCCL refuses two ranks on one GPU, and a gloo group makes the runtime stage
    # CUDA tensors through pinned memory with its side streams and events
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    return [_staged_denoise(config, torch.device(device), stages, stride, steps, seed, dist.group.WORLD)
            for stages, stride in TWO_RANK_CONFIGS]


def check_two_ranks(device: torch.device, steps: int, seed: int, timeout: float) -> list[dict]:
    """Two processes on ``device`` (``cuda:0``, or the CPU) against the serial simulator, per configuration."""
    from asyncgen.cli.launcher import first_failure, run_workers

    device = torch.device("cuda", 0) if device.type == "cuda" else device
    config, label = tiny_config(SD21_UNET), "SD2.1 UNet (tiny)"
    results = run_workers(_two_rank_worker, 2, config, str(device), steps, seed, timeout, timeout=timeout)
    failure = first_failure(results)
    if failure is not None:
        raise RuntimeError(f"rank {failure.rank} failed:\n{failure.value}")
    _exact_float32()
    rows = []
    for index, (stages, stride) in enumerate(TWO_RANK_CONFIGS):
        serial = _staged_denoise(config, device, stages, stride, steps, seed)
        error = max(_relative_error(r.value[index], serial) for r in results)
        rows.append(dict(model=label, device=str(device), stages=stages, stride=stride, steps=steps, error=error,
                         tolerance=FP32_TOLERANCE, passed=error <= FP32_TOLERANCE))
    return rows


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncgen.evaluation.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to run (default: cuda)")
    parser.add_argument("--tiny", action="store_true", help="toy-width UNets of the same architectures, 64x64 images "
                        "(the CPU fallback; seconds)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (about half the time)")
    parser.add_argument("--models", default="sd21,sdxl", help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--stages", default="2,3,4", help="stage counts to split into (default: %(default)s)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="dtype of the timing parts (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per timed loop (default: 20, quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed loops per variant (default: 5, quick 3)")
    parser.add_argument("--tests", dest="tests", action="store_true", default=None,
                        help="run the CUDA-marked tests (default: on CUDA only)")
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="skip the CUDA-marked tests")
    parser.add_argument("--tests-dir", default=None, help="the test suite folder (default: the source tree's tests/)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds after which remaining parts are skipped "
                        "(default: %(default)s, under 8 minutes with the part in flight)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results/gpu_check.json", help="JSON report path (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False; use --device cpu --tiny for the CPU path")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        parser.error(f"--models {args.models!r}: {bad or 'nothing'} not among {', '.join(MODELS)}")
    try:
        stage_counts = sorted({int(n) for n in args.stages.split(",")})
    except ValueError:
        parser.error(f"--stages {args.stages!r} is not a comma-separated list of integers")
    if stage_counts[0] < 1:
        parser.error(f"--stages {args.stages!r}: stage counts must be >= 1")
    device = torch.device(args.device)
    from asyncgen.models import resolve_dtype

    dtype = resolve_dtype(args.dtype or ("float16" if device.type == "cuda" else "float32"))
    steps = args.steps or (8 if args.quick else 20)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.tiny:
        steps, repeats = (args.steps or 3), (args.repeats or 2)
    run_tests = args.tests if args.tests is not None else device.type == "cuda"
    out = Path(args.out)

    start = time.perf_counter()
    deadline = start + args.budget
    report: dict[str, Any] = dict(
        check="gpu_check", device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, tiny=args.tiny, quick=args.quick, dtype=str(dtype).removeprefix("torch."),
        steps=steps, repeats=repeats, budget_seconds=args.budget, skipped=[], errors=[],
        tests=dict(status="skipped", reason="not requested (CPU run)"), composition=[], overhead=[], stages=[], two_ranks=[],
    )
    say(f"gpu_check on {report['device']} (torch {report['torch']}, CUDA {report['cuda']}); report: {out}")

    def save() -> None:
        report["wall_seconds"] = time.perf_counter() - start
        write_json(out, report)
        write_atomic(out.with_suffix(".md"), "\n\n".join(render(report, section) for section in SECTIONS) + "\n")

    def part(name: str, section: str, fn: Callable[[], Any], needs_diffusers: bool = True) -> None:
        """Run one part: skipped past the budget or without diffusers, its error recorded, the report saved."""
        if needs_diffusers and not have_diffusers():
            report["skipped"].append(f"{name}: {NEEDS_DIFFUSERS}")
        elif time.perf_counter() >= deadline:
            report["skipped"].append(f"{name}: time budget of {args.budget:.0f}s spent")
        else:
            say(f"\n[{name}] running ({time.perf_counter() - start:.0f}s in)")
            try:
                fn()
            except Exception as exc:
                report["errors"].append(dict(part=name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
                say(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
        say(render(report, section))

    if run_tests:
        part("tests", "tests", lambda: report.update(tests=run_cuda_tests(max(60.0, min(240.0, 0.5 * args.budget)),
                                                                          find_tests(args.tests_dir))), needs_diffusers=False)
    for key in models:
        label, config = MODELS[key]
        if args.tiny:
            config, label = tiny_config(config), f"{label} (tiny)"
        resolution = 8 * config["sample_size"]
        part(f"composition {label}", "composition",
             lambda: report["composition"].extend(check_composition(label, config, device, stage_counts, args.seed)))

        def timing(label=label, config=config, resolution=resolution):
            row, rows = profile_model(label, config, device, dtype, resolution, stage_counts, steps, repeats, args.seed)
            report["overhead"].append(row)
            report["stages"].extend(rows)
        part(f"timing {label}", "overhead", timing)
        say(render(report, "stages"))
    part("two ranks", "two_ranks", lambda: report["two_ranks"].extend(
        check_two_ranks(device, steps=max(steps, 3), seed=args.seed, timeout=max(180.0, min(300.0, deadline - time.perf_counter())))))

    # on CPU and at toy sizes Python overhead is a visible share of a step: only a GPU run at real sizes judges it
    judged = device.type == "cuda" and not args.tiny
    failed_parts = {e["part"].split()[0] for e in report["errors"]}

    def verdict(key: str, rows_pass) -> bool | None:
        if key in failed_parts:
            return False
        return rows_pass

    report["passed"] = dict(
        tests=verdict("tests", report["tests"]["status"] != "failed"),
        composition=verdict("composition", all(r["passed"] for r in report["composition"]) if report["composition"] else None),
        overhead=verdict("timing", all(r["target_met"] for r in report["overhead"]) if judged and report["overhead"] else None),
        two_ranks=verdict("two", all(r["passed"] for r in report["two_ranks"]) if report["two_ranks"] else None),
    )
    save()
    for line in report["skipped"]:
        say(f"skipped: {line}")
    say(f"\nreport written to {out} (tables: {out.with_suffix('.md')}), {report['wall_seconds']:.0f}s")
    failed = [k for k, v in report["passed"].items() if v is False]
    if failed:
        say(f"FAILED: {', '.join(failed)}")
    if not have_diffusers():
        say(f"NOTHING MODEL-BASED WAS CHECKED: {NEEDS_DIFFUSERS}")
        return 1
    return 1 if failed else 0


def say(*args) -> None:
    """print, flushed at once: a run cut short by a timeout still shows how far it got."""
    print(*args, flush=True)


SECTIONS = ("tests", "composition", "overhead", "stages", "two_ranks")


def render(report: dict, section: str) -> str:
    """One section of the report as text (a Markdown table under a title)."""
    if section == "tests":
        tests = report["tests"]
        return (f"tests (-m cuda): {tests['status']}" + (f" {tests.get('counts')}" if tests.get("counts") else "")
                + (f" ({tests['reason']})" if tests.get("reason") else ""))
    if section == "composition":
        return "stage composition against the full forward (relative max error):\n" + markdown_table(
            report["composition"], ["model", "dtype", "stages", "error", "tolerance", "passed"], {"error": ".2e", "tolerance": ".2e"})
    if section == "overhead":
        return (f"stages=1 wrapper against the stock UNet, per denoising step ({report['dtype']}, CFG batch 2); "
                "GPU time, and host time to queue the step:\n" + markdown_table(
                    report["overhead"], ["model", "resolution", "stock_step_ms", "wrapped_step_ms", "stock_host_step_ms",
                                         "wrapped_host_step_ms", "overhead", "identical", "target_met"],
                    {"stock_step_ms": ".2f", "wrapped_step_ms": ".2f", "stock_host_step_ms": ".2f",
                     "wrapped_host_step_ms": ".2f", "overhead": "+.2%"}))
    if section == "stages":
        rows = [dict(r, stage_ms=", ".join(f"{ms:.2f}" for ms in r["stage_ms"])) for r in report["stages"]]
        return "per-stage compute on this device; projected speedup = sum / max (communication free):\n" + markdown_table(
            rows, ["model", "stages", "split", "stage_ms", "max_stage_ms", "projected_speedup"],
            {"max_stage_ms": ".2f", "projected_speedup": ".2f"})
    if section == "two_ranks":
        return ("two ranks on one device over gloo (staged CUDA path) against the serial simulator (relative max error):\n"
                + markdown_table(report["two_ranks"], ["model", "device", "stages", "stride", "steps", "error", "tolerance", "passed"],
                                 {"error": ".2e", "tolerance": ".2e"}))
    raise ValueError(section)


if __name__ == "__main__":
    sys.exit(main())
