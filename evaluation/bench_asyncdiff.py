"""Benchmark: the stock pipeline on one device against AsyncDiff on several, side by side.

Both run in the same launch on the same model, prompt, seed and step count, timed
alternately (stock on rank 0 alone, then AsyncDiff on all ranks), each worker one CPU
thread (on CPU a "device" is a process with one thread) or one GPU. The script prints a
table with latencies, speedup, fidelity to the one-device image, and the measured
per-stage compute time (the balance of the split), and writes the same as JSON.

    python -m asyncgen.evaluation.bench_asyncdiff                 # SD-architecture model, N=2
    python -m asyncgen.evaluation.bench_asyncdiff --stages 3 --steps 25
    python -m asyncgen.evaluation.bench_asyncdiff --model runwayml/stable-diffusion-v1-5 --device cuda
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from asyncgen.cli.launcher import launch
from asyncgen.proxy import default_warmup
from asyncgen.schedule import AsyncSchedule, Topology

from .fidelity import psnr
from .reporting import markdown_table, write_json


def _worker(rank: int, world_size: int, model: str, wrap: dict, call: dict, repeats: int, device: str):
    """Alternate timed calls of the stock pipeline (rank 0 alone) and of AsyncDiff (all ranks).

    Alternating inside one launch keeps the machine's slow drifts (other tenants, clock
    changes) out of the ratio; while rank 0 runs the stock pipeline the other ranks wait
    in a barrier, so rank 0's core has the machine to itself as a one-device run would.
    """
    import torch
    import torch.distributed as dist
    from asyncgen.pipelines import AsyncDiffPipeline
    from asyncgen.pipelines.loading import load_pipeline

    def load():
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(f"cuda:{rank}") if device == "cuda" else pipe

    call = dict(call)
    seed = call.pop("seed")
    stock = load() if rank == 0 else None
    wrapped = AsyncDiffPipeline(load(), **wrap)
    executor = wrapped.denoiser.executor

    def timed(pipe):
        start = time.perf_counter()
        images = pipe(**call, generator=torch.Generator().manual_seed(seed)).images
        return time.perf_counter() - start, images

    if stock is not None:
        timed(stock)  # untimed warm-up calls: first-call allocations, lazy inits, caches
    timed(wrapped)
    seconds0, calls0 = executor.compute_seconds, executor.compute_calls
    result = {"stock": [], "async": []}
    for _ in range(repeats):
        dist.barrier()
        if stock is not None:
            seconds, stock_images = timed(stock)
            result["stock"].append(seconds)
        dist.barrier()
        seconds, images = timed(wrapped)
        result["async"].append(seconds)
    info = wrapped.stage_info()
    full = wrapped.denoiser.denoiser  # the whole model object, other stages' weights released (on "meta")
    result.update(stage=info["stage"], stage_units=info["stage_units"],
                  resident_parameter_bytes=info["resident_parameter_bytes"],
                  full_copy_bytes=sum(p.numel() * p.element_size() for p in full.parameters()),
                  peak_cuda_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                  compute_per_call_ms=1e3 * (executor.compute_seconds - seconds0) / max(executor.compute_calls - calls0, 1))
    if rank == 0:
        result.update(images=np.asarray(images), stock_images=np.asarray(stock_images))
    return result


def run_benchmark(model: str, configs: list[dict], call: dict, repeats: int, device: str = "cpu",
                  timeout: float = 3600, pin_cpus: bool = True) -> list[dict]:
    """One row per AsyncDiff configuration, each timed against its own interleaved stock runs."""
    rows = []
    for wrap in configs:
        world = (wrap["stages"] + wrap.get("stride", 1) - 1) * (2 if wrap.get("cfg_parallel") else 1)
        per_rank = launch(_worker, world, model, wrap, call, repeats, device, timeout=timeout, pin_cpus=pin_cpus)
        stock = per_rank[0]["stock"]
        # a repeat ends when the slowest rank returns
        asynchronous = [max(r["async"][i] for r in per_rank) for i in range(repeats)]
        stage_ms = {}
        for r in per_rank:
            stage_ms.setdefault(r["stage"], r["compute_per_call_ms"])
        total_ms = sum(stage_ms.values())
        # speedup if communication and bookkeeping were free, given the stage times
        # measured in this run (so CPU contention between the workers is included)
        steps, stride = call["num_inference_steps"], wrap.get("stride", 1)
        warmup = wrap.get("warmup")
        exact = AsyncSchedule(Topology(wrap["stages"], stride),
                              warmup if warmup is not None else default_warmup(steps)).exact_steps
        stock_step = statistics.median(stock) / steps
        if wrap["stages"] == 1:  # nothing to warm up: every step is one pass of the (only) stage
            exact = 0
        bound = exact * stock_step + math.ceil((steps - exact) / stride) * max(stage_ms.values()) / 1e3
        rows.append(dict(
            config=(f"AsyncDiff N={wrap['stages']} S={wrap.get('stride', 1)} W={wrap.get('warmup') or 'default'}"
                    if wrap["stages"] > 1 or wrap.get("stride", 1) > 1 else "one stage")
                   + (" time-shift" if wrap.get("time_shift") else "") + (" + CFG parallel" if wrap.get("cfg_parallel") else ""),
            devices=world,
            stock_s=statistics.median(stock),
            async_s=statistics.median(asynchronous),
            speedup=statistics.median(s / a for s, a in zip(stock, asynchronous)),
            psnr_db=psnr(per_rank[0]["images"], per_rank[0]["stock_images"]),
            stage_compute_ms=[stage_ms[k] for k in sorted(stage_ms)],
            max_stage_share=max(stage_ms.values()) / total_ms,
            compute_bound_speedup=statistics.median(stock) / bound,
            stage_units=per_rank[0]["stage_units"],
            resident_parameter_mb=[r["resident_parameter_bytes"] / 2**20 for r in per_rank],
            full_copy_mb=per_rank[0]["full_copy_bytes"] / 2**20,
            peak_cuda_mb=[r["peak_cuda_bytes"] / 2**20 for r in per_rank] if device == "cuda" else None,
            stock_latencies=stock,
            async_latencies=asynchronous,
            wrap=wrap,
        ))
    return rows


def parse_configs(text: str) -> list[dict]:
    """``"n2s1,n2s2,cfg,n2s1cfg"`` -> wrapper settings; ``cfg`` alone is CFG parallelism with one stage."""
    configs = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        match = re.fullmatch(r"(?:n(\d+)s(\d+))?(cfg)?", token)
        if not match or token == "":
            raise ValueError(f"bad configuration {token!r}: expected nNsS (e.g. n2s1), cfg, or nNsScfg")
        stages, stride, cfg = match.groups()
        configs.append(dict(stages=int(stages or 1), stride=int(stride or 1), cfg_parallel=bool(cfg)))
    if not configs:
        raise ValueError("no configuration given")
    return configs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asyncgen.evaluation.bench_asyncdiff",
        description="Time the stock pipeline on one process against AsyncDiff on stages+stride-1 processes.",
    )
    parser.add_argument("--model", default=None, help="pipeline folder or hub id (default: a random-weight model "
                        "of --family, built in a temp folder)")
    parser.add_argument("--family", default="unet", choices=["unet", "sd3", "miniature"],
                        help="the model when --model is not given: unet = random-weight SD UNet with "
                        "block_out_channels (64,128,256,256), 64x64 images; sd3 = random-weight SD3 transformer, "
                        "8 joint blocks of width 384, 128x128 images; miniature = the trained built-in shapes model, "
                        "32x32 images (too small for speedups: it shows fidelity on real pictures) (default: unet)")
    parser.add_argument("--configs", default="n2s1", help="comma-separated configurations: nNsS = N stages, "
                        "stride S; a 'cfg' suffix adds CFG parallelism (twice the processes); 'cfg' alone is CFG "
                        "parallelism with one stage (default: %(default)s)")
    parser.add_argument("--warmups", default="default,1", help="comma-separated exact warm-up step counts to run, "
                        "'default' meaning the wrapper's default of 5%% of the steps (default: %(default)s)")
    parser.add_argument("--time-shift", action="store_true", help="stale stages use the previous timestep")
    parser.add_argument("--split", default="flops", choices=["flops", "time"],
                        help="how cut points are chosen: estimated FLOPs and bytes, or unit times measured on rank 0 "
                        "(default: flops)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: 64 for unet, "
                        "128 for sd3)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale; > 1 doubles the batch (default: 7.5)")
    parser.add_argument("--prompt", default="a large red circle on a blue background", help="the prompt")
    parser.add_argument("--seed", type=int, default=0, help="generator seed, the same for every run (default: 0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration, median reported (default: 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: one thread per process; "
                        "cuda: one GPU per process (default: cpu)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin each CPU worker to its own core (pinning is the default when cores suffice)")
    parser.add_argument("--out", default="bench_results/asyncdiff.json", help="JSON output path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 8, 1
    args.height = args.height or {"sd3": 128, "miniature": 32}.get(args.family, 64)
    args.width = args.width or args.height
    try:
        shapes = parse_configs(args.configs)
        warmups = [None if w.strip() == "default" else int(w) for w in args.warmups.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    configs = []
    for shape in shapes:
        # with one stage and stride 1 every step is exact: warm-up changes nothing
        for w in warmups if (shape["stages"], shape["stride"]) != (1, 1) else [None]:
            configs.append(dict(shape, warmup=w, time_shift=args.time_shift, split=args.split))

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and args.family == "miniature":
            from .miniature import miniature_sd_path

            model = str(miniature_sd_path())
        elif model is None:
            from . import synthetic

            build = synthetic.save_bench_sd3_pipeline if args.family == "sd3" else synthetic.save_bench_pipeline
            model = str(build(Path(tmp) / f"bench-{args.family}", seed=args.seed))
        call = dict(prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    height=args.height, width=args.width, output_type="np", seed=args.seed)
        start = time.perf_counter()
        rows = run_benchmark(model, configs, call, args.repeats, args.device, pin_cpus=args.pin)
    print(markdown_table(
        rows, ["config", "devices", "stock_s", "async_s", "speedup", "compute_bound_speedup", "psnr_db", "max_stage_share"],
        {"stock_s": ".3f", "async_s": ".3f", "speedup": ".3f", "compute_bound_speedup": ".3f", "psnr_db": ".2f",
         "max_stage_share": ".3f"}))
    print("stock_s: the stock pipeline, one device; speedup: median over repeats of stock/async, timed alternately;\n"
          "compute_bound_speedup: what the measured stage times allow if communication were free;\n"
          "psnr_db: AsyncDiff image against the stock image of the same seed")
    for row in rows:
        print(f"\n{row['config']}: per-stage compute per step (ms): "
              + ", ".join(f"{ms:.2f}" for ms in row["stage_compute_ms"])
              + "; resident parameters per rank (MiB): " + ", ".join(f"{mb:.1f}" for mb in row["resident_parameter_mb"])
              + f" (a full copy: {row['full_copy_mb']:.1f})"
              + ("; peak CUDA memory per rank (MiB): " + ", ".join(f"{mb:.0f}" for mb in row["peak_cuda_mb"])
                 if row.get("peak_cuda_mb") else ""))
        for k, units in enumerate(row["stage_units"]):
            print(f"  stage {k}: {units[0]} .. {units[-1]} ({len(units)} units)")
    path = write_json(args.out, dict(benchmark="asyncdiff", model=args.model or f"synthetic {args.family} (random weights)",
                                     call={k: v for k, v in call.items()}, device=args.device, repeats=args.repeats,
                                     rows=rows, wall_seconds=time.perf_counter() - start))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
