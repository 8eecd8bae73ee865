"""What the side-by-side benchmarks against other implementations share: alternated timing in one launch, rows.

Inside one launch the stock pipeline runs on rank 0 alone (the other ranks wait in a
barrier, so rank 0's core has the machine to itself as a one-device run would), then each
arm on its ranks; the arms swap order every repeat, so none always runs right after
stock. Every call gets the same prompts, step count and generator seeds. A row per arm:
latency (a repeat ends when its slowest rank returns), speedup over stock (the median of
the per-repeat ratios: the machine's slow drifts cancel in each), PSNR against the stock
image of the same prompt and seed (the median over prompts) and the largest difference,
resident parameter bytes per rank. The machine's load average is recorded with the
results: other tenants slow every run, and not every run equally.
"""

from __future__ import annotations

import os
import statistics
from typing import Callable

import numpy as np

from .bench_asyncdiff import time_images
from .fidelity import psnr


def parameter_bytes(module) -> int:
    """Bytes of parameters held in memory (released stages sit on the meta device and hold none)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type != "meta")


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where the platform has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def alternate(arms: dict[str, Callable | None], stock, prompts: list[str], call: dict, seed: int,
              repeats: int) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """Run stock (``stock`` is None on ranks other than 0) and the arms alternately; seconds and images per name.

    Every rank calls this with the same arm names; an arm that is None on this rank is not
    one of its ranks (it waits at the barriers). One untimed call of each first: first-call
    allocations, lazy initialisations, caches. ``seconds[name]`` holds seconds per image over
    ``prompts`` (prompt ``i`` seeded ``seed + i``), None for the repeats this rank did not run;
    ``images[name]`` the images (or videos) of the last repeat, one per prompt.
    """
    import torch.distributed as dist

    names = list(arms)
    if stock is not None:
        time_images(stock, prompts[:1], call, seed)
    for name in names:
        dist.barrier()
        if arms[name] is not None:
            time_images(arms[name], prompts[:1], call, seed)
    seconds = {name: [] for name in ("stock", *names)}
    images = {}
    for repeat in range(repeats):
        dist.barrier()
        if stock is not None:
            elapsed, images["stock"] = time_images(stock, prompts, call, seed)
            seconds["stock"].append(elapsed)
        for name in names if repeat % 2 == 0 else names[::-1]:
            dist.barrier()
            if arms[name] is None:
                seconds[name].append(None)
                continue
            elapsed, images[name] = time_images(arms[name], prompts, call, seed)
            seconds[name].append(elapsed)
    return seconds, images


def rows(per_rank: list[dict], arms: dict[str, dict], repeats: int) -> list[dict]:
    """The stock row and one per arm from the workers' results.

    Each worker returns ``seconds`` and ``resident_bytes`` (per name, ``stock`` included, None
    where a rank holds none), and rank 0 ``images``; ``arms`` maps each arm's name to the
    fields its row starts from (``config``, ``ranks``, ...).
    """
    stock = per_rank[0]["seconds"]["stock"]
    images = per_rank[0]["images"]
    out = [dict(config="stock pipeline", ranks=1, latency_s=statistics.median(stock), speedup=1.0,
                psnr_db=float("inf"), max_abs_diff=0.0, resident_bytes=[per_rank[0]["resident_bytes"]["stock"]],
                latencies=stock)]
    for name, fields in arms.items():
        ran = [r for r in per_rank if r["seconds"][name][0] is not None]
        latencies = [max(r["seconds"][name][i] for r in ran) for i in range(repeats)]
        image, reference = np.asarray(images[name], np.float64), np.asarray(images["stock"], np.float64)
        out.append(dict(fields, latency_s=statistics.median(latencies),
                        speedup=statistics.median(s / a for s, a in zip(stock, latencies)),
                        psnr_db=statistics.median(psnr(a, b) for a, b in zip(image, reference)), max_abs_diff=float(np.abs(image - reference).max()),
                        resident_bytes=[r["resident_bytes"][name] for r in ran], latencies=latencies))
    return out
