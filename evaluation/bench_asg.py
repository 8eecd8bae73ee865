"""Benchmark: ASG high-resolution generation against naive large-size inference, on the miniature model.

For each scale (default 2x2 and 3x3 the native 32x32) and each prompt (shapes captions,
each asking for ONE object), with the same seed for every method:

1. ``stock``: the stock pipeline called directly at the large size;
2. ``windows``: overlapping native-size windows averaged (MultiDiffusion-style; ASG with
   ``structure_fraction=0``);
3. ``asg_sync_1p``: ASG, synchronous structure guidance, one process;
4. ``asg_async_1p``: ASG, asynchronous, one process;
5. ``asg_async_2p``: ASG, asynchronous, two processes.

Everything runs inside one launch of two worker processes with one thread each (on
CPU a "device" is a process with one thread): 1-4 run on rank 0 alone, in a one-rank
process group, while rank 1 waits; 3 and 5 are timed alternately, ``--repeats`` times
per prompt, so that the machine's drifts fall on both. A two-process latency is the
slower rank's.

Quality, on the large picture:

- CLIP score with the miniature CLIP (``clip_score.ClipScorer.miniature``; its
  processor resizes the picture to its input size);
- attribute accuracy: the pixel checker (``pixel_checker.grade``) applied to the whole
  large picture as if it were a shapes picture (it reads the background from the
  border, the colour and shape from the largest blob, and judges the size relative to
  the picture's side, so it is scale-free); ``attributes`` is the mean of its colour,
  background, shape and size accuracies, ``all_correct`` the share of pictures with
  all four right;
- duplicates: the number of separate 4-connected blobs of pixels close to the
  requested shape colour (closer than the checker's own foreground distance), ignoring
  specks smaller than a quarter of the smallest shape the model draws at its native
  size; the prompt asks for one, so 1 is right and more is repetition.

    python -m asyncgen.evaluation.bench_asg                   # 2x2 and 3x3, 6 prompts, 25 steps
    python -m asyncgen.evaluation.bench_asg --quick           # seconds: 2x2, 1 prompt, 4 steps

Writes ``asg.json`` and ``asg.md`` (summary, then one row per scale and method) and
``asg_side_by_side_<scale>.png`` (methods 1, 2, 3, 5 for the first prompt) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from asyncgen.cli.launcher import launch

from . import pixel_checker, prompts as prompt_sets, shapes
from asyncgen.pipelines.miniature import DEFAULT_GUIDANCE

from .miniature_quality import save_grid, write_report

METHODS = ("stock", "windows", "asg_sync_1p", "asg_async_1p", "asg_async_2p")
SIDE_BY_SIDE = ("stock", "windows", "asg_sync_1p", "asg_async_2p")
ATTRIBUTES = ("colour", "background", "shape", "size")


def parse_scales(text: str) -> list[tuple[int, int]]:
    """``"2x2,3x3"`` -> ``[(2, 2), (3, 3)]``."""
    scales = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        parts = token.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"bad scale {token!r}: expected HxW with whole numbers >= 1, e.g. 2x2 or 2x3")
        scales.append((int(parts[0]), int(parts[1])))
    if not scales:
        raise ValueError("no scale given")
    return scales


# --------------------------------------------------------------------------- workers


def _worker(rank: int, world_size: int, model: str, scales, prompts, seed: int, call: dict, repeats: int,
            options: dict):
    """Generate with every method on rank 0 (a one-rank group) and ASG on all ranks, timing 3 and 5 alternately."""
    import torch
    import torch.distributed as dist

    from asyncgen.pipelines import ASGPipeline
    from asyncgen.pipelines.loading import load_pipeline

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    world = ASGPipeline(pipe, mode="async", **options)  # resolves the launcher's group: all ranks
    alone = dist.new_group([0])  # every rank makes it; only rank 0 is in it
    single = {}
    if rank == 0:
        single = {
            "windows": ASGPipeline(pipe, process_group=alone, **{**options, "structure_fraction": 0.0}),
            "asg_sync_1p": ASGPipeline(pipe, mode="sync", process_group=alone, **options),
            "asg_async_1p": ASGPipeline(pipe, mode="async", process_group=alone, **options),
        }

    def timed(method, prompt, seed, h, w, **overrides):
        run = {"stock": pipe, "asg_async_2p": world}.get(method) or single[method]
        start = time.perf_counter()
        image = run(prompt, height=h, width=w, generator=torch.Generator().manual_seed(seed),
                    **{**call, **overrides}).images[0]
        return time.perf_counter() - start, np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)

    native = world.native_size
    # untimed warm-up calls (first-call allocations, lazy inits), two steps each
    warm_size = (scales[0][0] * native[0], scales[0][1] * native[1])
    for method in METHODS if rank == 0 else ():
        if method != "asg_async_2p":
            timed(method, prompts[0], seed, *warm_size, num_inference_steps=2)
    timed("asg_async_2p", prompts[0], seed, *warm_size, num_inference_steps=2)
    out = []
    for s_h, s_w in scales:
        h, w = s_h * native[0], s_w * native[1]
        for index, prompt in enumerate(prompts):
            record = {"scale": f"{s_h}x{s_w}", "prompt": prompt, "seed": seed + index, "seconds": {}, "images": {}}
            dist.barrier()
            if rank == 0:
                for method in ("stock", "windows", "asg_async_1p"):
                    seconds, record["images"][method] = timed(method, prompt, seed + index, h, w)
                    record["seconds"][method] = [seconds]
            record["seconds"].update(asg_sync_1p=[], asg_async_2p=[])
            for _ in range(repeats):
                dist.barrier()
                if rank == 0:
                    seconds, record["images"]["asg_sync_1p"] = timed("asg_sync_1p", prompt, seed + index, h, w)
                    record["seconds"]["asg_sync_1p"].append(seconds)
                dist.barrier()
                seconds, image = timed("asg_async_2p", prompt, seed + index, h, w)
                record["seconds"]["asg_async_2p"].append(seconds)
                if rank == 0:
                    record["images"]["asg_async_2p"] = image
            out.append(record)
    return out


# --------------------------------------------------------------------------- metrics


def duplicates(image: np.ndarray, colour: str, native: int) -> int:
    """Separate blobs of the requested colour in ``image`` (uint8 RGB), specks left out (see module notes)."""
    distance = np.linalg.norm(image.astype(np.float64) - np.asarray(shapes.COLOURS[colour], dtype=np.float64), axis=-1)
    scale = native / shapes.IMAGE_SIZE
    smallest = min(pixel_checker._UNIT_AREA.values()) * (shapes.SIZES["small"][0] * scale) ** 2
    sizes = [int(blob.sum()) for blob in pixel_checker.blobs(distance < pixel_checker._FOREGROUND_DISTANCE)]
    return int(sum(size >= smallest / 4 for size in sizes))


def score(records: list[dict], scorer, native: int) -> list[dict]:
    """One row per (scale, method): latency, CLIP score, attribute accuracy, duplicates."""
    rows = []
    for scale in dict.fromkeys(r["scale"] for r in records):
        mine = [r for r in records if r["scale"] == scale]
        for method in METHODS:
            images = [r["images"][method] for r in mine]
            prompts = [r["prompt"] for r in mine]
            grades = [pixel_checker.grade(image, prompt) for image, prompt in zip(images, prompts)]
            blobs = [duplicates(image, shapes.parse_caption(p)["colour"], native) for image, p in zip(images, prompts)]
            accuracy = {k: float(np.mean([g[k] for g in grades])) for k in ATTRIBUTES}
            rows.append(dict(
                scale=scale, method=method,
                latency_s=statistics.median(s for r in mine for s in r["seconds"][method]),
                clip_score=float(scorer.score(images, prompts)),
                attributes=float(np.mean(list(accuracy.values()))),
                all_correct=float(np.mean([all(g[k] for k in ATTRIBUTES) for g in grades])),
                **{f"{k}_accuracy": v for k, v in accuracy.items()},
                duplicates=float(np.mean(blobs)),
                one_object=float(np.mean([b == 1 for b in blobs])),
                blobs=blobs,
            ))
    return rows


def summarise(rows: list[dict], records: list[dict], load_before, load_after, args, options: dict, wall: float) -> dict:
    summary = dict(model=args.model or "miniature", steps=args.steps, guidance=args.guidance, prompts=args.prompts,
                   asg_options=", ".join(f"{k}={v}" for k, v in options.items()) or "defaults",
                   repeats=args.repeats, seed_of_prompt_i=f"{args.seed} + i", threads_per_process=1,
                   loadavg_before=list(load_before), loadavg_after=list(load_after), wall_seconds=wall)
    for scale in dict.fromkeys(r["scale"] for r in rows):
        by = {r["method"]: r for r in rows if r["scale"] == scale}
        pairs = [(a, b) for r in records if r["scale"] == scale
                 for a, b in zip(r["seconds"]["asg_sync_1p"], r["seconds"]["asg_async_2p"])]
        summary[f"{scale} speedup 5 over 3 (median of alternating pairs)"] = statistics.median(a / b for a, b in pairs)
        summary[f"{scale} CLIP 5 - 3"] = by["asg_async_2p"]["clip_score"] - by["asg_sync_1p"]["clip_score"]
        summary[f"{scale} attributes 5 - 3"] = by["asg_async_2p"]["attributes"] - by["asg_sync_1p"]["attributes"]
        summary[f"{scale} duplicates 1 (stock)"] = by["stock"]["duplicates"]
        summary[f"{scale} duplicates 5"] = by["asg_async_2p"]["duplicates"]
    return summary


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asyncgen.evaluation.bench_asg",
        description="ASG against the stock pipeline at the large size and against plain windows, on the miniature "
                    "model: latency, speedup of two processes over one, CLIP score, attribute accuracy, duplicates.")
    parser.add_argument("--model", default=None, help="an SD-style pipeline folder of a shapes model "
                        "(default: the shipped miniature)")
    parser.add_argument("--scales", default="2x2,3x3", help="comma-separated HxW multiples of the native size "
                        "(default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=6, help="how many shapes captions (default: %(default)s)")
    parser.add_argument("--prompt-seed", type=int, default=0, help="which captions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed calls of 3 and 5 per prompt "
                        "(default: %(default)s)")
    parser.add_argument("--structure-fraction", type=float, default=None,
                        help="ASG's structure-phase fraction p (default: the pipeline's, 0.7)")
    parser.add_argument("--structure-guidance", type=float, default=None, help="ASG's peak w (default: the pipeline's)")
    parser.add_argument("--guidance-schedule", default=None, help="ASG's w_t schedule (default: the pipeline's)")
    parser.add_argument("--untiled-decoding", action="store_true",
                        help="ASG decodes the large latent in one piece instead of in tiles")
    parser.add_argument("--out", default="bench_results/asg", help="output folder (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the workers are stopped")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2x2, 1 prompt, 4 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.scales, args.prompts, args.steps, args.repeats = "2x2", 1, 4, 1
    try:
        scales = parse_scales(args.scales)
        captions = prompt_sets.miniature_prompts(args.prompts, seed=args.prompt_seed)
    except ValueError as exc:
        parser.error(str(exc))
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps={args.steps} and --repeats={args.repeats} must be at least 1")
    from asyncgen.cli.errors import OutputError
    from asyncgen.cli.files import check_output_paths

    try:  # before the workers start: an unwritable --out must not cost the run
        check_output_paths([Path(args.out) / "asg.json", Path(args.out) / "asg.md"], kind="file")
    except ValueError as exc:
        parser.error(f"--out {exc}")
    try:
        return _run(args, scales, captions)
    except OutputError as exc:  # after the work: one line naming the file and the errno
        parser.exit(1, f"{parser.prog}: error: {exc}\n")


def _run(args, scales, captions) -> int:
    options = {k: v for k, v in (("structure_fraction", args.structure_fraction),
                                 ("structure_guidance", args.structure_guidance),
                                 ("guidance_schedule", args.guidance_schedule),
                                 ("tiled_decoding", False if args.untiled_decoding else None)) if v is not None}
    from .clip_score import ClipScorer
    from asyncgen.pipelines.miniature import miniature_sd_path

    model = args.model or str(miniature_sd_path())
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")
    load_before, start = os.getloadavg(), time.perf_counter()
    per_rank = launch(_worker, 2, model, scales, captions, args.seed, call, args.repeats, options, timeout=args.timeout)
    wall, load_after = time.perf_counter() - start, os.getloadavg()
    records = per_rank[0]
    for record, other in zip(records, per_rank[1]):  # a two-process call ends when its slower rank does
        record["seconds"]["asg_async_2p"] = [max(a, b) for a, b in zip(record["seconds"]["asg_async_2p"],
                                                                          other["seconds"]["asg_async_2p"])]
    native = records[0]["images"]["stock"].shape[0] // scales[0][0]
    rows = score(records, ClipScorer.miniature(), native)
    summary = summarise(rows, records, load_before, load_after, args, options, wall)

    out = Path(args.out)
    columns = ["scale", "method", "latency_s", "clip_score", "attributes", "all_correct", "duplicates", "one_object"]
    formats = {"latency_s": ".3f", "clip_score": ".2f", "attributes": ".3f", "all_correct": ".3f",
               "duplicates": ".2f", "one_object": ".2f"}
    json_path, md_path = write_report(out, "asg", summary, rows, columns, formats)
    pictures = []
    for scale in dict.fromkeys(r["scale"] for r in records):
        first = next(r for r in records if r["scale"] == scale)
        pictures.append(save_grid([first["images"][m] for m in SIDE_BY_SIDE],
                                  out / f"asg_side_by_side_{scale}.png", columns=len(SIDE_BY_SIDE)))
    print(Path(md_path).read_text())
    print(f"side by side ({', '.join(SIDE_BY_SIDE)}), prompt {records[0]['prompt']!r}: "
          + ", ".join(str(p) for p in pictures))
    print(f"results written to {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
