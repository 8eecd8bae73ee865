"""Benchmark: the stock pipeline on one device against AsyncDiff configurations, side by side.

``asyncgen bench`` (same as ``python -m asyncgen.evaluation.bench_asyncdiff``). Every
configuration runs in its own launch on the same model, prompts, seeds and step count;
inside a launch the stock pipeline (rank 0 alone) and AsyncDiff (all ranks) are timed
alternately, each worker one CPU thread (on CPU a "device" is a process with one
thread) or one GPU. Reported per configuration, in the shape of the AsyncDiff paper's
Tables 1 and 2: latency per image, speedup over the one-device run, PSNR/SSIM against
the one-device images of the same seeds, CLIP score, resident parameter bytes per rank,
and the measured per-stage compute time (the balance of the split). Written as
``results.json``, ``results.md`` and ``results.png`` in ``--out``.

    asyncgen bench                                         # built-in miniature model, N=2
    asyncgen bench --configs n2s1,n3s1,n2s2 --warmups 1,3,5
    asyncgen bench --family unet --steps 50 --num-prompts 1   # a larger random-weight UNet: speed
    asyncgen bench --model stabilityai/stable-diffusion-2-1 --device cuda --clip openai/clip-vit-large-patch14
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from asyncgen.cli.launcher import launch
from asyncgen.cli.options import (DTYPES, add_asyncdiff_arguments, add_model_arguments, add_sampling_arguments,
                                  positive_int)
from asyncgen.runtime.asyncdiff_hook import default_warmup
from asyncgen.schedules.asyncdiff import AsyncSchedule, Topology

from .fidelity import psnr, ssim
from .reporting import markdown_table

# the command's line in ``asyncgen --help``
SUMMARY = "time and grade the stock pipeline against AsyncDiff configurations; JSON, Markdown and a plot"


def load_on_rank(model: str, rank: int, device: str = "cpu", dtype: str = "float32", allow_pickle: bool = False):
    """The pipeline at ``model``, progress bars off, on rank ``rank``'s device (for CUDA this process's GPU,
    :func:`asyncgen.comm.group.local_cuda_device`: ``LOCAL_RANK``, not the global rank)."""
    import torch
    from asyncgen.comm.group import local_cuda_device
    from asyncgen.pipelines.loading import load_pipeline

    pipe = load_pipeline(model, dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(local_cuda_device()) if device == "cuda" else pipe


def time_images(pipe, prompts: list[str], call: dict, seed: int) -> tuple[float, np.ndarray]:
    """Seconds per image over ``prompts`` (prompt ``i`` with a generator seeded ``seed + i``), and the images."""
    import torch

    start, images = time.perf_counter(), []
    for i, prompt in enumerate(prompts):
        output = pipe(prompt, **call, generator=torch.Generator().manual_seed(seed + i))
        # video pipelines return frames: (frames, H, W, C) per video
        images.append(output.frames[0] if hasattr(output, "frames") else output.images[0])
    return (time.perf_counter() - start) / len(prompts), np.stack(images)


class HostMemory:
    """Peak resident memory of this process over a span, from ``/proc/self/status`` (Linux).

    ``start()`` notes the current ``VmRSS`` and resets the high-water mark ``VmHWM``
    (writing ``5`` to ``/proc/self/clear_refs``); ``peak_growth()`` is ``VmHWM`` minus that
    ``VmRSS``: how much more memory the span needed at its peak. Where the mark cannot be
    reset the figure counts from the process start (``reset`` is then False) and where
    ``/proc`` is missing it is None.
    """

    def __init__(self):
        self.base, self.reset = None, False

    @staticmethod
    def _read(field: str) -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.base = self._read("VmRSS")

    def peak_growth(self) -> int | None:
        peak = self._read("VmHWM")
        return None if peak is None or self.base is None else peak - self.base


class DenoiserClock:
    """Seconds a pipeline spends inside its denoiser calls (``unet``/``transformer``, and ``transformer_2``).

    The rest of a call (text encoding, the scheduler, the VAE decode) runs once per image
    under AsyncDiff too, so the ceiling needs it apart from the denoising. Hooks on the
    denoiser's forward; on CUDA they record events and nothing waits for the GPU.
    """

    def __init__(self, pipeline, device):
        import torch
        from asyncgen.models import DENOISER_COMPONENTS, EXPERT_COMPONENTS
        from asyncgen.cost.timing import ComputeTimer

        self.device, self.timer, self._started = torch.device(device), ComputeTimer(), []
        for name in DENOISER_COMPONENTS + EXPERT_COMPONENTS:
            module = getattr(pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)

    def _enter(self, module, args):
        self._started.append(self.timer.start(self.device))

    def _leave(self, module, args, output):
        self.timer.stop(self._started.pop(), self.device)

    @property
    def seconds(self) -> float:
        return self.timer.seconds


def resident_parameter_bytes(pipeline) -> int:
    """Bytes of the parameters a pipeline holds on a real device (meta placeholders excluded, tied ones once)."""
    import torch

    seen, total = set(), 0
    for module in getattr(pipeline, "components", {}).values():
        if not isinstance(module, torch.nn.Module):
            continue
        for p in module.parameters():
            if id(p) not in seen and p.device.type != "meta":
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def _worker(rank: int, world_size: int, model: str, wrap: dict, call: dict, prompts: list[str], repeats: int,
            device: str, dtype: str, allow_pickle: bool = False):
    """Alternate timed passes over the prompts: the stock pipeline (rank 0 alone), then AsyncDiff (all ranks).

    Alternating inside one launch keeps the machine's slow drifts (other tenants, clock
    changes) out of the ratio; while rank 0 runs the stock pipeline the other ranks wait
    in a barrier, so rank 0's core has the machine to itself as a one-device run would.
    Prompt ``i`` uses a generator seeded ``seed + i`` in both.

    Memory, per rank: the wrapped pipeline is loaded first, through
    ``AsyncDiffPipeline.from_pretrained`` (what users call, so its lean path is what is
    measured), and its first (untimed) call runs before the stock pipeline is loaded, so
    the host peaks of the load and of the call are the wrapper's own.
    """
    import torch
    import torch.distributed as dist
    from asyncgen.comm.group import default_backend, local_cuda_device
    from asyncgen.pipelines import AsyncDiffPipeline

    if not dist.is_initialized():  # also with one process: the wrapper then runs its distributed runtime
        dist.init_process_group(backend=default_backend())
    call = dict(call)
    seed = call.pop("seed")
    cuda = device == "cuda"
    gpu = local_cuda_device() if cuda else None  # this rank's GPU (LOCAL_RANK)
    host = HostMemory()
    if cuda:
        torch.cuda.reset_peak_memory_stats(gpu)
    host.start()
    wrapped = AsyncDiffPipeline.from_pretrained(model, **wrap, device=gpu,
                                                dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
    wrapped.pipeline.set_progress_bar_config(disable=True)
    memory = dict(host_load_peak_bytes=host.peak_growth(), host_peak_reset=host.reset,
                  cuda_load_peak_bytes=torch.cuda.max_memory_allocated(gpu) if cuda else None,
                  resident_pipeline_bytes=resident_parameter_bytes(wrapped.pipeline))
    executor = wrapped.hook.executor

    def timed(pipe, count=len(prompts)):
        return time_images(pipe, prompts[:count], call, seed)

    if cuda:
        torch.cuda.reset_peak_memory_stats(gpu)
    host.start()
    timed(wrapped, 1)  # untimed warm-up calls: first-call allocations, lazy inits, caches
    memory.update(host_call_peak_bytes=host.peak_growth(),
                  cuda_call_peak_bytes=torch.cuda.max_memory_allocated(gpu) if cuda else None)
    stock = load_on_rank(model, rank, device, dtype, allow_pickle) if rank == 0 else None
    if stock is not None:
        timed(stock, 1)
        clock = DenoiserClock(stock, gpu or "cpu")
    def compute_seconds():
        # pipelines with two denoiser passes per step (Wan's CFG) run the second in a lane of its own
        lanes = wrapped.hook.lanes.values()
        return executor.compute_seconds + sum(lane.executor.compute_seconds for lane in lanes)

    seconds0, calls0 = compute_seconds(), executor.compute_calls
    result = {"stock": [], "stock_denoiser": [], "async": []}
    for _ in range(repeats):
        dist.barrier()
        if stock is not None:
            before = clock.seconds
            seconds, stock_images = timed(stock)
            result["stock"].append(seconds)
            result["stock_denoiser"].append((clock.seconds - before) / len(prompts))
        dist.barrier()
        seconds, images = timed(wrapped)
        result["async"].append(seconds)
    info = wrapped.stage_info()
    # the whole model: every stage's parameters, other stages' released (on "meta", sizes intact)
    whole = {id(p): p for m in wrapped.hook.split.shared_modules() + [m for s in wrapped.stages for m in s.modules()]
             for p in m.parameters()}
    result.update(stage=info["stage"], stage_units=info["stage_units"],
                  resident_parameter_bytes=info["resident_parameter_bytes"],
                  full_copy_bytes=sum(p.numel() * p.element_size() for p in whole.values()),
                  peak_cuda_bytes=torch.cuda.max_memory_allocated(gpu) if cuda else None, **memory,
                  # per step: every pass of the step (one call per lane) counted
                  compute_per_call_ms=1e3 * (compute_seconds() - seconds0) / max(executor.compute_calls - calls0, 1))
    if rank == 0:
        result.update(images=images, stock_images=stock_images)
    return result


def config_name(wrap: dict) -> str:
    stages, stride = wrap["stages"], wrap.get("stride", 1)
    name = "one stage" if (stages, stride) == (1, 1) else (
        f"AsyncDiff N={stages} S={stride} W={wrap.get('warmup') if wrap.get('warmup') is not None else 'default'}")
    return name + (" time-shift" if wrap.get("time_shift") else "") + (" + CFG parallel" if wrap.get("cfg_parallel") else "")


def world_size_of(wrap: dict) -> int:
    return (wrap["stages"] + wrap.get("stride", 1) - 1) * (2 if wrap.get("cfg_parallel") else 1)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compute_bound_speedup(stock_s: float, stock_denoiser_s: float, steps: int, exact_steps: int, stride: int,
                          slowest_stage_step_s: float) -> float:
    """The speedup if communication and bookkeeping were free, given the stage times measured in the run.

    The stock call's work outside the denoiser (text encoding, the VAE decode) stays serial;
    each exact warm-up step costs a stock denoising step; the other steps, ``stride`` at a
    time, cost the slowest stage's step. The stage times come from the run itself, so what
    the workers cost each other (CPU contention) is in the ceiling, communication is not.
    """
    serial = stock_s - stock_denoiser_s
    bound = (serial + exact_steps * stock_denoiser_s / steps
             + math.ceil((steps - exact_steps) / stride) * slowest_stage_step_s)
    return stock_s / bound


def run_benchmark(model: str, configs: list[dict], call: dict, repeats: int, device: str = "cpu",
                  timeout: float = 3600, pin_cpus: bool = True, prompts: list[str] | None = None,
                  dtype: str = "float32", allow_pickle: bool = False, progress: bool = False) -> list[dict]:
    """One row per AsyncDiff configuration, each timed against its own interleaved stock runs.

    ``progress`` says on standard error which configuration is running, and how much work it is (one line each).

    ``call`` holds the pipeline arguments (``seed`` included); ``prompts`` defaults to
    ``[call["prompt"]]``. Rows carry rank 0's images (``images``, ``stock_images``) for grading.
    """
    call = dict(call)
    prompts = prompts or [call.pop("prompt")]
    call.pop("prompt", None)
    rows = []
    for index, wrap in enumerate(configs):
        world = world_size_of(wrap)
        if progress:
            from asyncgen.cli.files import say

            say(f"asyncgen bench: configuration {index + 1}/{len(configs)}: {config_name(wrap)} on {world} "
                f"process{'es' if world > 1 else ''}, {repeats} x {len(prompts)} image(s) of "
                f"{call.get('num_inference_steps', '?')} steps, each with the stock pipeline and with AsyncDiff")
        per_rank = launch(_worker, world, model, wrap, call, prompts, repeats, device, dtype, allow_pickle,
                          timeout=timeout, pin_cpus=pin_cpus)
        stock, stock_denoiser = per_rank[0]["stock"], per_rank[0]["stock_denoiser"]
        # a repeat ends when the slowest rank returns
        asynchronous = [max(r["async"][i] for r in per_rank) for i in range(repeats)]
        stage_ms = {}
        for r in per_rank:
            stage_ms.setdefault(r["stage"], r["compute_per_call_ms"])
        total_ms = sum(stage_ms.values())
        steps, stride = call["num_inference_steps"], wrap.get("stride", 1)
        warmup = wrap.get("warmup")
        exact = AsyncSchedule(Topology(wrap["stages"], stride),
                              warmup if warmup is not None else default_warmup(steps)).exact_steps
        if wrap["stages"] == 1:  # nothing to warm up: every step is one pass of the (only) stage
            exact = 0
        denoise = statistics.median(stock_denoiser)
        images, stock_images = per_rank[0]["images"], per_rank[0]["stock_images"]
        rows.append(dict(
            config=config_name(wrap),
            devices=world,
            warmup="-" if (wrap["stages"], stride) == (1, 1) else warmup if warmup is not None else default_warmup(steps),
            oversubscribed=device == "cpu" and world > available_cores(),
            stock_s=statistics.median(stock),
            async_s=statistics.median(asynchronous),
            speedup=statistics.median(s / a for s, a in zip(stock, asynchronous)),
            # identical images (PSNR = inf) are possible: the median over prompts stays meaningful
            psnr_db=statistics.median(psnr(a, b) for a, b in zip(images, stock_images)),
            ssim=statistics.fmean(_ssim(a, b) for a, b in zip(images, stock_images)),
            stage_compute_ms=[stage_ms[k] for k in sorted(stage_ms)],
            max_stage_share=max(stage_ms.values()) / total_ms,
            compute_bound_speedup=compute_bound_speedup(statistics.median(stock), denoise, steps, exact, stride,
                                                        max(stage_ms.values()) / 1e3),
            stage_units=per_rank[0]["stage_units"],
            resident_parameter_mb=[r["resident_parameter_bytes"] / 2**20 for r in per_rank],
            full_copy_mb=per_rank[0]["full_copy_bytes"] / 2**20,
            peak_cuda_mb=[r["peak_cuda_bytes"] / 2**20 for r in per_rank] if device == "cuda" else None,
            memory_per_rank=[{k: r[k] for k in ("host_load_peak_bytes", "host_call_peak_bytes", "host_peak_reset",
                                                "resident_pipeline_bytes", "cuda_load_peak_bytes",
                                                "cuda_call_peak_bytes")} for r in per_rank],
            stock_latencies=stock,
            stock_denoiser_s=denoise,
            async_latencies=asynchronous,
            wrap=wrap,
            images=images,
            stock_images=stock_images,
        ))
    return rows


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two images, or the mean over the frames of two videos ``(frames, H, W, C)``."""
    if np.asarray(a).ndim == 4:
        return statistics.fmean(ssim(x, y) for x, y in zip(a, b))
    return ssim(a, b)


def parse_configs(text: str) -> list[dict]:
    """``"n2s1,n2s2,cfg,n2s1cfg"`` -> wrapper settings; ``cfg`` alone is CFG parallelism with one stage."""
    configs = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        match = re.fullmatch(r"(?:n(\d+)s(\d+))?(cfg)?", token)
        if not match or token == "":
            raise ValueError(f"bad configuration {token!r}: expected nNsS (e.g. n2s1), cfg, or nNsScfg")
        stages, stride, cfg = match.groups()
        if stages is not None and (int(stages) < 1 or int(stride) < 1):
            raise ValueError(f"bad configuration {token!r}: stages and stride must be at least 1 (e.g. n2s1)")
        configs.append(dict(stages=int(stages or 1), stride=int(stride or 1), cfg_parallel=bool(cfg)))
    if not configs:
        raise ValueError("no configuration given")
    return configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "the model of --family")
    parser.add_argument("--family", default="miniature", choices=["miniature", "unet", "sd3", "wan", "flux"],
                        help="the model when --model is not given: miniature = the trained built-in shapes model, "
                        "32x32 images (real pictures, so quality numbers mean something; too small for large "
                        "speedups); unet = random-weight SD UNet with block_out_channels (64,128,256,256), 64x64 "
                        "images (speed); sd3 = random-weight SD3 transformer, 8 joint blocks of width 384, 128x128 "
                        "images; wan = random-weight Wan-architecture video transformer, 8 blocks of width 384, 9 frames of 192x192 "
                        "(CFG as two passes per step; no CLIP score); flux = random-weight Flux-architecture "
                        "transformer, 4 double and 8 single blocks of width 384, 256x256 images, 32 text tokens "
                        "(guidance distilled: one pass per step) (default: %(default)s)")
    parser.add_argument("--configs", default="n2s1", help="comma-separated configurations: nNsS = N stages, "
                        "stride S; a 'cfg' suffix adds CFG parallelism (twice the processes); 'cfg' alone is CFG "
                        "parallelism with one stage; n1s1 is the wrapper with one stage (default: %(default)s)")
    parser.add_argument("--warmups", default="default", help="comma-separated exact warm-up step counts, each run "
                        "with every configuration; 'default' is the wrapper's 5%% of the steps (default: %(default)s)")
    add_asyncdiff_arguments(parser)
    parser.add_argument("--prompts", default=None, metavar="FILE", help="prompt file (.txt, one per line, or .csv)")
    parser.add_argument("--prompt", default=None, help="a single prompt instead of a prompt set")
    parser.add_argument("--num-prompts", type=positive_int, default=None, help="without --prompts/--prompt: this many "
                        "captions of the built-in shapes prompt set (default: %(default)s)")
    add_sampling_arguments(parser, steps_help="25 for the miniature models (--family miniature, --model miniature or miniature-dit), 50 otherwise",
                           guidance_help="4.0 for the miniature models, 7.5 otherwise; > 1 doubles the batch",
                           size_help="32 for miniature, 64 for unet, 128 for sd3, 192 for wan, 256 for flux, the pipeline's own for --model")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed passes over the prompts per configuration, "
                        "median reported (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: one thread per process; "
                        "cuda: one GPU per process (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="weights and activations (default: %(default)s)")
    parser.add_argument("--clip", default="miniature", help="CLIP for the score: 'miniature', a transformers CLIP "
                        "hub id or folder, open_clip:ARCH:PRETRAINED, or 'none' (default: %(default)s)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin each CPU worker to its own core (pinning is the default when cores suffice)")
    parser.add_argument("--out", default="bench_results", metavar="DIR",
                        help="folder for results.json, results.md and results.png (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 1 repeat, 2 prompts")
    parser.add_argument("--peer", default=None, metavar="NAME", help="instead of the configuration table: stock, a "
                        "peer and asyncgen (one --configs entry and one --warmups value) alternated in one launch, "
                        "with fidelity, resident parameters and bytes and time of every collective per step. "
                        "diffusers-cp[:ulysses|ring|tp] is diffusers' own context (Ulysses, the default, or ring) "
                        "or tensor parallelism at the asyncgen configuration's process count (at least 2); on CPU "
                        "only Ulysses runs. Writes results.json and results.md")
    parser.add_argument("--cache", default=None, metavar="NAME[:KEY=VALUE,...]", help="instead of the configuration "
                        "table: stock, the step cache alone (1 process), AsyncDiff alone (one --configs entry) and "
                        "both composed, alternated in one launch, with PSNR/SSIM to stock, CLIP and (miniature models) "
                        "attribute accuracy. deepcache (SD/SDXL UNets: asyncgen's DeepCache, interval=3, branch=0), "
                        "fbcache, taylorseer, magcache (transformers: diffusers' caches at their defaults, TaylorSeer on "
                        "every block's attention and feed-forward; MagCache calibrated on the stock pipeline first); settings after a colon, e.g. deepcache:interval=5. "
                        "Writes results.json and results.md")


def _configs(args) -> list[dict]:
    from asyncgen.cli.errors import UsageError

    try:
        shapes = parse_configs(args.configs)
        warmups = [None if w.strip() == "default" else int(w) for w in args.warmups.split(",")]
    except ValueError as exc:
        raise UsageError(f"--configs {args.configs} --warmups {args.warmups}: {exc}") from exc
    if any(w is not None and w < 0 for w in warmups):
        raise UsageError(f"--warmups {args.warmups}: warm-up counts must be >= 0 or 'default'")
    if args.device == "cuda":
        import torch

        need = max(world_size_of(s) for s in shapes)
        if need > torch.cuda.device_count():
            raise UsageError(f"--configs {args.configs} needs {need} GPUs, this machine has {torch.cuda.device_count()}")
    configs = []
    for shape in shapes:
        # with one stage and stride 1 every step is exact: warm-up changes nothing
        for w in warmups if (shape["stages"], shape["stride"]) != (1, 1) else [None]:
            configs.append(dict(shape, warmup=w, time_shift=args.time_shift, split=args.split))
    return configs


def _prompts(args) -> list[str]:
    from asyncgen.cli.errors import UsageError
    from asyncgen.cli.files import load_prompts

    from .prompts import miniature_prompts

    given = [f"--{n.replace('_', '-')}" for n in ("prompt", "prompts", "num_prompts") if getattr(args, n) is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)}: give one of --prompt TEXT, --prompts FILE or --num-prompts N "
                         "(built-in captions), not several")
    try:
        if args.prompts is not None:
            return load_prompts(args.prompts)
        if args.prompt is not None:
            return [args.prompt]
    except (OSError, ValueError) as exc:
        raise UsageError(f"--prompts {args.prompts}: {exc}") from exc
    count = args.num_prompts or (2 if args.quick else 4)
    available = len(miniature_prompts())
    if count > available:
        raise UsageError(f"--num-prompts {count}: the built-in prompt set has {available} captions; give at most "
                         f"{available}, or --prompts FILE")
    return miniature_prompts(count, seed=args.seed)


def grade(rows: list[dict], prompts: list[str], clip: str, device: str = "cpu") -> dict:
    """Add CLIP scores to the rows (unless ``clip == "none"``); return the one-device row of the table."""
    stock_row = dict(config="stock pipeline", devices=1, warmup="-", oversubscribed=False,
                     stock_s=statistics.median(r["stock_s"] for r in rows), speedup=1.0, psnr_db=float("inf"),
                     ssim=1.0, resident_parameter_mb=[rows[0]["full_copy_mb"]])
    stock_row["async_s"] = stock_row["stock_s"]
    if clip != "none":
        from .evaluate_folder import clip_scorer

        scorer = clip_scorer(clip, device)
        stock_row["clip_score"] = scorer.score(rows[0]["stock_images"], prompts)
        for row in rows:
            row["clip_score"] = scorer.score(row["images"], prompts)
            row["clip_score_stock"] = stock_row["clip_score"]
    return stock_row


TABLE_COLUMNS = ["config", "devices", "warmup", "latency_s", "speedup", "compute_bound_speedup", "clip_score",
                 "psnr_db", "ssim", "resident_mb_per_rank"]
TABLE_FORMATS = {"latency_s": ".3f", "speedup": ".2f", "compute_bound_speedup": ".2f", "clip_score": ".2f",
                 "psnr_db": ".2f", "ssim": ".4f"}
TABLE_NOTES = """latency_s: seconds per image (median over repeats); speedup: median over repeats of one-device latency /
configuration latency, timed alternately in the same launch; compute_bound_speedup: what the measured stage times allow
if communication were free (the stock call's work outside the denoiser, text encoding and decoding, stays serial); clip_score (unless --clip none): mean over the prompts; psnr_db (median) and ssim (mean): against the one-device
image of the same prompt and seed; resident_mb_per_rank: parameter MiB each rank holds."""


def memory_lines(per_rank: list[dict]) -> str:
    """Per rank: host peak growth over loading and over the first call, resident parameters, CUDA peaks."""
    def mb(value):
        return "-" if value is None else f"{value / 2**20:.1f}"

    lines = ["  memory per rank (MiB): host peak growth during load / during the first call, parameters resident"
             + (", CUDA peak allocated during load / call" if per_rank[0]["cuda_load_peak_bytes"] is not None else "")]
    for rank, m in enumerate(per_rank):
        line = (f"    rank {rank}: host {mb(m['host_load_peak_bytes'])} / {mb(m['host_call_peak_bytes'])}"
                f"{'' if m['host_peak_reset'] else ' (peaks since process start)'}, "
                f"parameters {mb(m['resident_pipeline_bytes'])}")
        if m["cuda_load_peak_bytes"] is not None:
            line += f", CUDA {mb(m['cuda_load_peak_bytes'])} / {mb(m['cuda_call_peak_bytes'])}"
        lines.append(line)
    return "\n".join(lines)


def table_rows(stock_row: dict, rows: list[dict]) -> list[dict]:
    out = []
    for row in [stock_row, *rows]:
        row = {k: v for k, v in row.items() if k not in ("images", "stock_images")}
        row["latency_s"] = row["async_s"]
        row["resident_mb_per_rank"] = "/".join(f"{mb:.1f}" for mb in row["resident_parameter_mb"])
        if row.get("oversubscribed"):
            row["config"] += " (oversubscribed)"
        out.append(row)
    return out


def check_against_model(model: str, configs: list[dict], args) -> None:
    """The limits the model's configs set, before any worker is spawned: stages against the units its denoiser
    splits into, and the image size against the step it needs (VAE factor x patch size)."""
    from asyncgen.cli.errors import UsageError
    from asyncgen.cli.generate import check_size, describe_model, check_scheduler_steps

    facts = describe_model(model, args.allow_pickle)
    stages = max(c["stages"] for c in configs)
    if stages > 1 and facts.splittable_units is None:
        raise UsageError(f"--configs {args.configs}: asyncgen cannot split a {facts.denoiser_class} into {stages} "
                         "stages (use n1s1 or cfg)")
    if facts.splittable_units is not None and stages > facts.splittable_units:
        raise UsageError(f"--configs {args.configs}: {stages} stages, but this {facts.denoiser_class} splits into at "
                         f"most {facts.splittable_units} stages")
    check_size("height", args.height, facts)
    check_size("width", args.width, facts)
    check_scheduler_steps(model, args.steps)


def run(args: argparse.Namespace) -> int:
    from asyncgen.cli.errors import UsageError
    from asyncgen.cli.files import check_output_paths, write_all
    from asyncgen.cli.options import check_image_side, check_steps

    from .plots import benchmark_plot_png
    from .reporting import json_text

    if args.quick:
        args.steps, args.repeats = 8, 1
    for name in ("steps", "repeats", "num_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: need at least 1")
    from asyncgen.pipelines.miniature import BUILTIN_MODELS, resolve_model

    # the built-in shapes models (either by name or as the default family) sample with their own settings
    miniature = args.model in BUILTIN_MODELS or (args.model is None and args.family == "miniature")
    args.steps = args.steps or (25 if miniature else 50)
    args.guidance = args.guidance if args.guidance is not None else (4.0 if miniature else 7.5)
    video = args.model is None and args.family == "wan"
    if video and args.clip == "miniature":
        args.clip = "none"  # CLIP scores images; the fidelity numbers cover the video
    if args.model is None:
        args.height = args.height or {"sd3": 128, "wan": 192, "flux": 256, "miniature": 32}.get(args.family, 64)
    args.width = args.width or args.height
    check_image_side("--height", args.height)
    check_image_side("--width", args.width)
    check_steps(args.steps)
    configs, prompts = _configs(args), _prompts(args)
    if args.peer is not None:
        from . import bench_peer_diffusers_cp

        peer_kind = bench_peer_diffusers_cp.check_request(args, configs)  # before any model is built
    out = Path(args.out)
    outputs = [out / "results.json", out / "results.md", out / "results.png"]
    try:  # before any work: an unwritable --out must not cost the whole run
        check_output_paths(outputs, kind="file")
    except ValueError as exc:
        raise UsageError(f"--out {exc}") from None
    oversubscribed = [config_name(c) for c in configs if args.device == "cpu" and world_size_of(c) > available_cores()]
    if oversubscribed and not args.oversubscribe:
        raise UsageError(f"--configs {args.configs}: {', '.join(oversubscribed)} need more processes than the "
                         f"{available_cores()} cores here; pass --oversubscribe to run them anyway (their images and "
                         "quality are valid, their latency is not)")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if miniature:
            model, _ = resolve_model(model)
        elif model is None:
            from . import random_models

            build = {"sd3": random_models.save_bench_sd3_pipeline, "wan": random_models.save_bench_wan_pipeline,
                     "flux": random_models.save_bench_flux_pipeline}.get(args.family, random_models.save_bench_pipeline)
            model = str(build(Path(tmp) / f"bench-{args.family}", seed=args.seed))
        check_against_model(model, configs, args)  # before any worker is spawned
        if args.cache is not None:
            from asyncgen.cli.generate import describe_model

            from . import bench_cache

            if args.peer is not None:
                raise UsageError(f"--peer {args.peer} --cache {args.cache}: give one of them")
            cache = bench_cache.check_request(args, configs, describe_model(model, args.allow_pickle).denoiser_class)
        if oversubscribed:
            print(f"note: {', '.join(oversubscribed)} need more processes than the {available_cores()} cores here: they "
                  "run (their images and quality are valid) but their latency and speedup are not meaningful")
        call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                    width=args.width, output_type="np", seed=args.seed)
        if video:
            call.update(num_frames=9, max_sequence_length=32)
        if args.model is None and args.family == "flux":
            call.update(max_sequence_length=32)  # not Flux's 512: text tokens would outnumber the 256 image tokens
        call = {k: v for k, v in call.items() if v is not None}
        if args.cache is not None:
            return bench_cache.run_cache(args, model, configs[0], prompts, call, args.model or f"built-in {args.family}",
                                         cache, miniature)
        if args.peer is not None:
            return bench_peer_diffusers_cp.run_peer(args, peer_kind, model, configs[0], prompts, call,
                                                    args.model or f"built-in {args.family}")
        start = time.perf_counter()
        rows = run_benchmark(model, configs, call, args.repeats, args.device, pin_cpus=args.pin, prompts=prompts,
                             dtype=args.dtype, allow_pickle=args.allow_pickle, progress=True)
        stock_row = grade(rows, prompts, args.clip)
    table = markdown_table(table_rows(stock_row, rows), [c for c in TABLE_COLUMNS if c != "clip_score" or
                                                        args.clip != "none"], TABLE_FORMATS)
    print(table)
    print(TABLE_NOTES)
    for row in rows:
        print(f"\n{row['config']}: per-stage compute per step (ms): "
              + ", ".join(f"{ms:.2f}" for ms in row["stage_compute_ms"])
              + f"; a full copy holds {row['full_copy_mb']:.1f} MiB of parameters"
              + ("; peak CUDA memory per rank (MiB): " + ", ".join(f"{mb:.0f}" for mb in row["peak_cuda_mb"])
                 if row.get("peak_cuda_mb") else ""))
        for k, units in enumerate(row["stage_units"]):
            print(f"  stage {k}: {units[0]} .. {units[-1]} ({len(units)} units)")
        print(memory_lines(row["memory_per_rank"]))
    record = dict(benchmark="asyncdiff", model=args.model or f"built-in {args.family}", call=call, prompts=prompts,
                  device=args.device, dtype=args.dtype, repeats=args.repeats, clip=args.clip,
                  cores=available_cores(), load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                  stock=table_rows(stock_row, [])[0],
                  rows=[{k: v for k, v in r.items() if k not in ("images", "stock_images")} for r in rows],
                  wall_seconds=time.perf_counter() - start)
    # the three files whole, or none of them (a full disk or a file-size limit leaves nothing half-written)
    write_all({outputs[0]: json_text(record),
               outputs[1]: f"# asyncgen bench: {record['model']}\n\n{table}\n\n{TABLE_NOTES}\n",
               outputs[2]: benchmark_plot_png(stock_row, rows, title=f"{record['model']}, {args.steps} steps, "
                                                                     f"{args.device}")})
    print(f"\nresults written to {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncgen.evaluation.bench_asyncdiff",
                                     description="The stock pipeline on one device against AsyncDiff configurations "
                                     "(same as `asyncgen bench`).")
    add_arguments(parser)
    from asyncgen.cli.errors import run_module_command

    return run_module_command(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
