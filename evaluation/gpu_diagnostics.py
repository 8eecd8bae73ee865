"""The GPU check's diagnostics, one function each: the CUDA tests, stage composition
against the full forward, the wrapper's overhead, per-stage times, two ranks on one GPU.

Each returns rows for the report; :mod:`asyncgen.evaluation.gpu_check` runs them in order
within a time budget and renders the report.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from asyncgen.cost.cuts import choose_cuts
from asyncgen.evaluation.unet_configs import SD21_UNET, tiny_config
from asyncgen.split.boundary import BoundaryLayout, pack, unpack
from asyncgen.split.units import DenoiserSplit, Stage, make_stages

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


FP32_TOLERANCE = 1e-5


OVERHEAD_TARGET = 0.02


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
    twin = copy.deepcopy(unet)  # the wrapper's hook goes on ``unet`` itself: the stock loop runs a twin
    attachment = AsyncDiffPipeline(DenoiserOnly(unet, scheduler), stages=1).attachment
    wrapped = unet
    inputs = dict(inputs)
    sample = inputs.pop("sample")[:1]
    inputs.pop("timestep")
    clock = _Clock(sample.device)
    outputs = {}

    def run(name, model):
        def loop():
            if model is wrapped:
                attachment.reset()  # what AsyncDiffPipeline.__call__ does around the pipeline
            outputs[name] = _denoise(model, sample, inputs, scheduler, steps)
        device_s, host_s = clock(loop)
        return device_s / steps, host_s / steps

    with torch.no_grad():
        for _ in range(warmup_loops):
            run("stock", twin), run("wrapped", wrapped)
        stock, wrapper, stock_host, wrapper_host = [], [], [], []
        for r in range(repeats):
            # alternate which goes first so slow drifts (clocks, other tenants) cancel
            order = [("stock", twin, stock, stock_host), ("wrapped", wrapped, wrapper, wrapper_host)]
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
    wrapper = AsyncDiffPipeline(DenoiserOnly(unet, scheduler), stages=stages, stride=stride, warmup=1,
                                process_group=process_group, device=device)
    with torch.no_grad():
        wrapper.attachment.reset()
        latents = _denoise(wrapper.denoiser, sample, inputs, scheduler, steps)
        wrapper.attachment.reset()  # settles the call's transfers, as AsyncDiffPipeline.__call__ does
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
