"""``asyncgen plan``: what each rank would hold, from a model's configs alone.

    asyncgen plan --model black-forest-labs/FLUX.1-dev --devices 4 --dtype bf16
    asyncgen plan --model ./my-sdxl --devices 8 --cfg-parallel --height 1024 --width 1024 --max-memory 16GB --json

Only ``model_index.json`` and each component's ``config.json`` are read (a hub model
needs no weight download): every component is built on the meta device, the denoiser
is cut where ``asyncgen generate`` would cut it, and the planner
(:mod:`asyncgen.placement.planner`) places the text encoders and the VAE on the ranks.
"""

from __future__ import annotations

import argparse
import json
import re

from .errors import UsageError
from .options import check_image_side, positive_int

# the command's line in ``asyncgen --help``
SUMMARY = ("what each rank would hold (stages, text encoders, VAE, bytes), from a model's configs alone: "
           "no weights needed")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_size(text: str) -> int:
    """``24GB`` (10**9 bytes a GB, as GPU makers count), ``24GiB`` (2**30), or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text}: need a positive size like 24GB, 16GiB, 800MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def dtype_name(text: str) -> str:
    from asyncgen.models import DTYPE_ALIASES, dtype_name

    if text.lower() not in DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(f"{text}: need one of {', '.join(DTYPE_ALIASES)}")
    return dtype_name(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a built-in model (miniature, the shapes UNet model; "
                        "miniature-dit, the shapes SD3 transformer) or a diffusers pipeline: hub id or local folder; "
                        "only its configs are read (default: miniature)")
    parser.add_argument("--devices", type=positive_int, default=1, help="GPUs (ranks) to plan for "
                        "(default: %(default)s)")
    parser.add_argument("--stages", type=positive_int, default=None, help="AsyncDiff stages (default: as many as the "
                        "devices allow: devices - stride + 1, halved first with --cfg-parallel)")
    parser.add_argument("--stride", type=positive_int, default=1, help="AsyncDiff stride (default: %(default)s)")
    parser.add_argument("--cfg-parallel", action="store_true", help="split the classifier-free-guidance batch over "
                        "two groups of devices (default: off)")
    parser.add_argument("--dtype", type=dtype_name, default=None, help="dtype the weights will have: bf16, fp16, "
                        "fp32 (or bfloat16, float16, float32; default: each config's own, float32)")
    parser.add_argument("--height", type=positive_int, default=None, help="image height in pixels for the "
                        "activation estimate (default: the model's native size)")
    parser.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: native)")
    parser.add_argument("--max-memory", type=memory_size, default=None, help="memory of one device, e.g. 24GB or "
                        "16GiB: fail (exit 2), saying by how much, when the largest rank needs more")
    parser.add_argument("--whole-encoders", action="store_true", help="never split a text encoder into layer "
                        "ranges over several ranks (default: split one that fits no rank's share)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import torch

    from asyncgen.placement.planner import PlanDoesNotFit, check_fits
    from asyncgen.pipelines.from_configs import plan_from_configs
    from asyncgen.pipelines.miniature import resolve_model

    from .generate import stages_for

    model, _ = resolve_model(args.model)
    check_image_side("--height", args.height)  # the estimate runs on fake tensors, but the plan is for real ones
    check_image_side("--width", args.width)
    stages = stages_for(args.devices, args.stages, args.stride, args.cfg_parallel)
    if args.devices == 1 and stages > 1:
        raise UsageError(f"--stages {stages} on --devices 1: one device runs every stage (the serial simulator); "
                         "plan for stages + stride - 1 devices")
    if stages > 1:  # named by the options given, before anything is built
        from .generate import _describe_model

        facts = _describe_model(model, False)
        if facts.splittable_units is not None and stages > facts.splittable_units:
            given = f"--stages {stages}" if args.stages is not None else f"--devices {args.devices} ({stages} stages)"
            raise UsageError(f"{given}: this {facts.denoiser_class} splits into at most {facts.splittable_units} "
                             "stages")
    try:
        plan = plan_from_configs(model, stages, args.stride, args.cfg_parallel,
                                 getattr(torch, args.dtype) if args.dtype else None, args.height, args.width,
                                 split_encoders=not args.whole_encoders)
    except (ValueError, TypeError, OSError) as exc:  # bad folder, size, stage count; a denoiser it cannot split
        raise UsageError(str(exc)) from None
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    if args.max_memory is not None:
        try:
            check_fits(plan, args.max_memory)
        except PlanDoesNotFit as exc:
            raise UsageError(str(exc).replace("max_memory=", "--max-memory ")) from None
    return 0


def format_plan(plan) -> str:
    """The plan as a text table, then the full-copy comparison."""
    from asyncgen.placement.planner import format_bytes

    notes = plan.notes
    rows = [("rank", "stage", "stage units", "components", "parameters", "activations*", "total")]
    for r in plan.ranks:
        units = r.stage_units
        span = f"{units[0]} .. {units[-1]} ({len(units)})" if len(units) > 1 else units[0]
        placed = [p.component + (f"[{p.layers[0]}:{p.layers[1]}]" if p.layers else "") for p in r.placements]
        rows.append((str(r.rank), str(r.stage), span, ", ".join(placed) or "-", format_bytes(r.total_parameter_bytes),
                     format_bytes(r.activation_bytes), format_bytes(r.total_bytes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{notes.get('model')}: {notes.get('denoiser')}, {notes.get('dtype') or 'config dtype'}, "
             f"{notes.get('height')}x{notes.get('width')} px, denoiser batch {notes.get('batch_per_rank')} per rank; "
             f"{len(plan.ranks)} rank(s): {notes.get('stages')} stage(s), stride {notes.get('stride')}"
             + (", cfg-parallel" if notes.get("cfg_parts") == 2 else "")]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if j < 4 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    largest = plan.largest
    lines += [
        f"full copy per rank (AsyncDiff, xDiT): {format_bytes(plan.full_pipeline_bytes)} parameters + "
        f"{format_bytes(plan.full_activation_bytes)} activations* = {format_bytes(plan.full_copy_total_bytes)}",
        f"largest rank: {largest.rank}, {format_bytes(largest.total_bytes)} "
        f"({100 * largest.total_bytes / plan.full_copy_total_bytes:.1f} % of a full copy); its parameters are "
        f"{100 * plan.largest_parameter_fraction:.1f} % of the full pipeline's",
        "* estimated: peak live tensors of the stage's forward under FakeTensorMode (fused attention; no CUDA "
        "context, workspace or communication buffers)",
    ]
    if notes.get("replicated"):
        lines.append("kept whole on every rank: " + ", ".join(notes["replicated"]))
    return "\n".join(lines)
