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
    from diffusers import DiffusionPipeline

    from asyncgen.pipelines import AsyncDiffPipeline

    def load():
        pipe = DiffusionPipeline.from_pretrained(model)
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
    result.update(stage=info["stage"], stage_units=info["stage_units"],
                  resident_parameter_bytes=info["resident_parameter_bytes"],
                  compute_per_call_ms=1e3 * (executor.compute_seconds - seconds0) / max(executor.compute_calls - calls0, 1))
    if rank == 0:
        result.update(images=np.asarray(images), stock_images=np.asarray(stock_images))
    return result


def run_benchmark(model: str, configs: list[dict], call: dict, repeats: int, device: str = "cpu",
                  timeout: float = 3600, pin_cpus: bool = True) -> list[dict]:
    """One row per AsyncDiff configuration, each timed against its own interleaved stock runs."""
    rows = []
    for wrap in configs:
        world = wrap["stages"] + wrap.get("stride", 1) - 1
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
        bound = exact * stock_step + math.ceil((steps - exact) / stride) * max(stage_ms.values()) / 1e3
        rows.append(dict(
            config=f"AsyncDiff N={wrap['stages']} S={wrap.get('stride', 1)} W={wrap.get('warmup') or 'default'}"
                   + (" time-shift" if wrap.get("time_shift") else ""),
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
            stock_latencies=stock,
            async_latencies=asynchronous,
            wrap=wrap,
        ))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asyncgen.evaluation.bench_asyncdiff",
        description="Time the stock pipeline on one process against AsyncDiff on stages+stride-1 processes.",
    )
    parser.add_argument("--model", default=None, help="pipeline folder or hub id (default: a random-weight "
                        "SD-architecture model, UNet block_out_channels (64,128,256,256), built in a temp folder)")
    parser.add_argument("--stages", type=int, default=2, help="AsyncDiff stages N (default: 2)")
    parser.add_argument("--stride", type=int, default=1, help="AsyncDiff stride S (default: 1)")
    parser.add_argument("--warmups", default="default,1", help="comma-separated exact warm-up step counts to run, "
                        "'default' meaning the wrapper's default of 5%% of the steps (default: %(default)s)")
    parser.add_argument("--time-shift", action="store_true", help="stale stages use the previous timestep")
    parser.add_argument("--split", default="flops", choices=["flops", "time"],
                        help="how cut points are chosen: estimated FLOPs and bytes, or unit times measured on rank 0 "
                        "(default: flops)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--height", type=int, default=64, help="image height in pixels (default: 64)")
    parser.add_argument("--width", type=int, default=64, help="image width in pixels (default: 64)")
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

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from .synthetic import save_bench_pipeline

            model = str(save_bench_pipeline(Path(tmp) / "bench-sd", seed=args.seed))
        warmups = [None if w.strip() == "default" else int(w) for w in args.warmups.split(",")]
        configs = [dict(stages=args.stages, stride=args.stride, warmup=w, time_shift=args.time_shift, split=args.split)
                   for w in warmups]
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
              + f"; resident parameters per rank (MiB): " + ", ".join(f"{mb:.1f}" for mb in row["resident_parameter_mb"]))
        for k, units in enumerate(row["stage_units"]):
            print(f"  stage {k}: {units[0]} .. {units[-1]} ({len(units)} units)")
    path = write_json(args.out, dict(benchmark="asyncdiff", model=args.model or "synthetic SD-architecture (random weights)",
                                     call={k: v for k, v in call.items()}, device=args.device, repeats=args.repeats,
                                     rows=rows, wall_seconds=time.perf_counter() - start))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
