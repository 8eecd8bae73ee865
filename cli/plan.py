"""``asyncgen plan``: what each rank would hold, from a model's configs alone; or which layout to run.

    asyncgen plan --model black-forest-labs/FLUX.1-dev --devices 4 --dtype bf16
    asyncgen plan --model ./my-sdxl --devices 8 --cfg-parallel --height 1024 --width 1024 --max-memory 16GB --json
    asyncgen plan --model ./my-wan --devices 2 --parallel auto --steps 50 [--exact] [--json]

Only ``model_index.json`` and each component's ``config.json`` are read (a hub model
needs no weight download): every component is built on the meta device, the denoiser
is cut where ``asyncgen generate`` would cut it, and the planner
(:mod:`asyncgen.placement.planner`) places the text encoders and the VAE on the ranks.

``--parallel auto`` instead predicts the step time of every layout the devices allow (AsyncDiff
stages and stride, CFG parallel, diffusers' Ulysses context parallelism run by asyncgen's ``--sp``, their
products; Ulysses priced at one rank's sharded shape) with
:mod:`asyncgen.cost.layout` and says which it would run and why. It needs this machine's numbers:
the link between the ranks and the compute rate of one (:func:`probe`: a few seconds with
``--devices`` worker processes), measured once and kept in a cache file
(``--probe-cache``; ``--reprobe`` measures again) keyed by host, device kind, device count and dtype.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
from pathlib import Path

from .errors import UsageError
from .options import check_image_side, non_negative_int, positive_int

# the command's line in ``asyncgen --help``
SUMMARY = ("what each rank would hold (stages, text encoders, VAE, bytes), from a model's configs alone: "
           "no weights needed; --parallel auto: the fastest layout, predicted")
PROBE_CACHE_VERSION = 1
DEFAULT_STEPS = 50

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
    auto = parser.add_argument_group("choosing the layout (--parallel auto)",
                                     "predict every layout's step time from the cost model and this machine's measured "
                                     "link and compute rate, and choose the fastest")
    auto.add_argument("--parallel", choices=["auto"], default=None, help="auto: list every layout the --devices "
                      "allow (stages/stride, CFG parallel, Ulysses context parallelism (--sp), their products) with its "
                      "predicted step time and choose the fastest; without it, plan the memory of "
                      "--stages/--stride/--cfg-parallel")
    auto.add_argument("--exact", action="store_true", help="with --parallel auto: only layouts that give the one-device "
                      "picture exactly (one stage with CFG parallel or context parallelism, or stages whose warm-up "
                      "covers every step)")
    auto.add_argument("--steps", type=positive_int, default=None, help=f"with --parallel auto: denoising steps "
                      f"(default: {DEFAULT_STEPS})")
    auto.add_argument("--warmup", type=non_negative_int, default=None, help="with --parallel auto: exact warm-up steps "
                      "of layouts with stages (default: the wrapper's, 5%% of the steps, at least 1)")
    auto.add_argument("--compute", choices=["flops", "time"], default="flops", help="with --parallel auto: each "
                      "unit's compute from its counted FLOPs and bytes over the measured device rate (flops), or timed "
                      "on random weights built from the config on one --device (time: only models that fit in its "
                      "memory; a CPU device is one thread) (default: %(default)s)")
    auto.add_argument("--device", choices=["cpu", "cuda"], default=None, help="with --parallel auto: the devices to "
                      "measure the link and compute rate on (default: cuda when available, else cpu)")
    auto.add_argument("--probe-cache", default=None, metavar="FILE", help="with --parallel auto: the file that keeps "
                      "the measured link and compute rate (default: $XDG_CACHE_HOME/asyncgen/probe.json, else "
                      "~/.cache/asyncgen/probe.json)")
    auto.add_argument("--reprobe", action="store_true", help="with --parallel auto: measure the link and compute rate "
                      "again even when the cache has them")


def run(args: argparse.Namespace) -> int:
    import torch

    from asyncgen.placement.planner import PlanDoesNotFit, check_fits
    from asyncgen.pipelines.from_configs import plan_from_configs
    from asyncgen.pipelines.miniature import resolve_model

    from .generate import stages_for

    model, _ = resolve_model(args.model)
    check_image_side("--height", args.height)  # the estimate runs on fake tensors, but the plan is for real ones
    check_image_side("--width", args.width)
    if args.parallel == "auto":
        return run_auto(args, model)
    given = [f"--{n.replace('_', '-')}" for n in ("exact", "steps", "warmup", "device", "probe_cache", "reprobe")
             if getattr(args, n) not in (None, False)] + (["--compute time"] if args.compute != "flops" else [])
    if given:
        raise UsageError(f"{', '.join(given)}: only with --parallel auto (choosing the layout)")
    stages = stages_for(args.devices, args.stages, args.stride, args.cfg_parallel)
    if args.devices == 1 and stages > 1:
        raise UsageError(f"--stages {stages} on --devices 1: one device runs every stage (the serial simulator); "
                         "plan for stages + stride - 1 devices")
    if stages > 1:  # named by the options given, before anything is built
        from .generate import describe_model

        facts = describe_model(model, False)
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


# ------------------------------------------------------------------------------------------ --parallel auto


def default_probe_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncgen" / "probe.json"


def probe_key(device: str, devices: int, dtype: str) -> str:
    """One measurement per host, device kind, device count and dtype (what the numbers depend on)."""
    return f"{socket.gethostname()}/{device}/{devices}/{dtype}"


def _probe_worker(rank: int, world: int, device: str, dtype: str) -> dict:
    import torch
    import torch.distributed as dist
    from asyncgen.comm.group import default_backend, local_cuda_device
    from asyncgen.comm.link_probe import probe_link
    from asyncgen.cost.device_rate import measure_device_rate

    if not dist.is_initialized():
        dist.init_process_group(backend=default_backend())
    where = local_cuda_device() if device == "cuda" else torch.device("cpu")
    link = probe_link(None, where)
    dist.barrier()
    rate = measure_device_rate(where, getattr(torch, dtype)) if rank == 0 else None
    dist.barrier()  # the others idle while rank 0 measures its rate alone, as one device would run
    return dict(link=link.to_dict(), rate=rate.to_dict() if rate is not None else None)


def probe(devices: int, device: str, dtype: str) -> dict:
    """The link between ``devices`` ranks and one rank's compute rate, measured now (a few seconds)."""
    if devices == 1:  # no link to measure: the one-device layout sends nothing
        import torch
        from asyncgen.cost.device_rate import measure_device_rate

        where = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(1)  # a CPU "device" is one thread, as the launcher gives each worker
        try:
            rate = measure_device_rate(where, getattr(torch, dtype))
        finally:
            torch.set_num_threads(threads)
        return dict(link=None, rate=rate.to_dict())
    from .launcher import launch

    results = launch(_probe_worker, devices, device, dtype, timeout=600, device_type=device)
    return results[0]


def _complete(entry) -> bool:
    """Whether a cached entry has every number this version reads: one written before a field was added (the
    all-to-all fit came later) is measured again and replaced, not read into a KeyError."""
    from asyncgen.comm.link_probe import LinkMeasurement
    from asyncgen.cost.device_rate import DeviceRate

    try:
        if entry["link"] is not None:
            LinkMeasurement.from_dict(entry["link"])
        DeviceRate.from_dict(entry["rate"])
    except (KeyError, TypeError, ValueError):
        return False
    return True


def cached_probe(path: Path, devices: int, device: str, dtype: str, reprobe: bool) -> tuple[dict, bool]:
    """``(measurement, measured_now)``: from the cache file, or measured and written into it (whole)."""
    from .files import write_atomic

    key = probe_key(device, devices, dtype)
    cache = {"version": PROBE_CACHE_VERSION, "entries": {}}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
            if not isinstance(cache, dict) or cache.get("version") != PROBE_CACHE_VERSION \
                    or not isinstance(cache.get("entries"), dict):
                raise ValueError("not a probe cache of this version")
        except (OSError, ValueError) as exc:
            raise UsageError(f"--probe-cache {path}: cannot read it ({exc}); delete it or name another file") from None
    entry = cache["entries"].get(key)
    if entry is not None and not reprobe and _complete(entry):
        return entry, False
    entry = dict(probe(devices, device, dtype), measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"))
    cache["entries"][key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(cache, indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"--probe-cache {path}: cannot write it ({exc}); name another file") from None
    return entry, True


def run_auto(args: argparse.Namespace, model: str) -> int:
    import torch

    from asyncgen.cost.device_rate import DeviceRate
    from asyncgen.cost.layout import Link, choose
    from asyncgen.pipelines.layout_costs import costs_from_configs

    from .generate import check_scheduler_steps
    from .options import check_steps

    explicit = [o for o, given in (("--stages", args.stages is not None), ("--stride", args.stride != 1),
                                   ("--cfg-parallel", args.cfg_parallel), ("--max-memory", args.max_memory is not None),
                                   ("--whole-encoders", args.whole_encoders)) if given]
    if explicit:
        raise UsageError(f"{', '.join(explicit)}: --parallel auto chooses the layout itself; give either these or "
                         "--parallel auto")
    steps = args.steps or DEFAULT_STEPS
    check_steps(steps)
    if args.warmup is not None and args.exact:
        raise UsageError(f"--warmup {args.warmup} with --exact: exact layouts warm up for every step; drop one")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and args.devices > torch.cuda.device_count():
        raise UsageError(f"--devices {args.devices} --device cuda: this machine has {torch.cuda.device_count()} GPU(s) "
                         "to measure the link on")
    dtype = args.dtype or "float32"
    check_scheduler_steps(model, steps)  # reads the scheduler's config only; a folder without one is not checked
    cache_path = Path(args.probe_cache) if args.probe_cache else default_probe_cache()
    measured, fresh = cached_probe(cache_path, args.devices, device, dtype, args.reprobe)
    link_data = measured["link"]
    link = Link.from_measurement(link_data)
    rate = DeviceRate.from_dict(measured["rate"])
    try:
        costs = costs_from_configs(model, args.height, args.width, getattr(torch, dtype) if args.dtype else None,
                                   args.compute, rate, device="cuda:0" if device == "cuda" else "cpu",
                                   devices=args.devices)
        choice = choose(costs, link, args.devices, steps, args.warmup, args.exact)
    except (ValueError, TypeError, OSError) as exc:  # bad folder or size; a denoiser it cannot split
        raise UsageError(str(exc)) from None
    record = dict(model=str(model), devices=args.devices, steps=steps, exact_only=args.exact, compute=args.compute,
                  device=device, dtype=dtype, height=args.height, width=args.width,
                  probe=dict(cache=str(cache_path), measured_now=fresh, measured_at=measured.get("measured_at"),
                             link=link_data, rate=measured["rate"]),
                  passes_per_step=costs.passes_per_step, pass_batch=costs.pass_batch,
                  context_parallel=costs.context_parallel or "available",
                  ulysses_degrees=sorted(costs.sharded_unit_seconds),
                  ulysses_refusals={str(k): v for k, v in sorted(costs.ulysses_refusals.items())},
                  stages_context_parallel=costs.stages_context_parallel or "available", **choice.to_dict(),
                  command=run_command(choice.chosen.layout, args.devices, model))
    print(json.dumps(record, indent=2) if args.json else format_choice(record))
    return 0


def run_command(layout, devices: int, model: str) -> str:
    """How to run the chosen layout."""
    return f"asyncgen generate --model {model} --devices {layout.devices}" + (
        f" {generate_options(layout)}" if layout.devices > 1 else "")


def generate_options(layout) -> str:
    """The ``asyncgen generate`` options that run ``layout`` (beside ``--devices``)."""
    return (f"--stages {layout.stages} --stride {layout.stride}" + (f" --warmup {layout.warmup}" if layout.stages > 1
                                                                     else "")
            + (" --cfg-parallel" if layout.cfg_parallel else "") + (f" --sp {layout.ulysses}" if layout.ulysses > 1
                                                                     else ""))


def format_choice(record: dict) -> str:
    """The candidates as a table, fastest first, then the choice and why."""
    from asyncgen.cost.layout import Layout

    rows = [("layout", "devices", "exact", "generate options", "step ms", "exact step ms", "round ms", "vs chosen")]
    best = record["chosen"]["predicted_step_ms"]
    for c in sorted(record["candidates"], key=lambda c: c["predicted_step_ms"]):
        mark = "*" if c["name"] == record["chosen"]["name"] else ("" if c["allowed"] else "-")
        rows.append((mark + c["name"], str(c["devices"]), "yes" if c["exact"] else "no",
                     generate_options(Layout(c["stages"], c["stride"], c["warmup"], c["cfg_parallel"], c["ulysses"])),
                     f"{c['predicted_step_ms']:.1f}", f"{c['exact_step_ms']:.1f}",
                     f"{c['round_ms']:.1f}" if c["rounds"] else "-", f"{c['predicted_step_ms'] / best:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    link, rate = record["probe"]["link"], record["probe"]["rate"]
    lines = [f"{record['model']}: {record['steps']} steps, {record['devices']} {record['device']} device(s), "
             f"{record['passes_per_step']} denoiser pass(es) per step of batch {record['pass_batch']}; context "
             f"parallel: {record['context_parallel']}; compute from {record['compute']}"]
    if record["context_parallel"] == "available":
        refused = "; ".join(f"{k}: {v}" for k, v in record["ulysses_refusals"].items())
        lines.append(f"Ulysses degrees priced at their sharded shape: {record['ulysses_degrees'] or 'none'}"
                     + (f" (not: {refused})" if refused else "") + "; inside stages: "
                     + record["stages_context_parallel"])
    lines.append("measured " + ("now" if record["probe"]["measured_now"] else f"at {record['probe']['measured_at']}")
                 + f" (cache {record['probe']['cache']}): "
                 + (f"link latency {1e6 * link['latency_s']:.0f} us, bandwidth {link['bandwidth_bytes_per_s'] / 1e9:.2f} "
                    f"GB/s; all-to-all {1e6 * link['all_to_all_latency_s']:.0f} us + "
                    f"{link['all_to_all_bytes_per_s'] / 1e9:.2f} GB/s per rank; "
                    f"{link['parallel_slowdown']:.2f}x slower compute with all ranks busy; " if link else "")
                 + f"one device {rate['flops_per_s'] / 1e9:.1f} GFLOP/s, {rate['bytes_per_s'] / 1e9:.1f} GB/s")
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if j < 4 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["* chosen" + ("; every layout listed is exact" if record["exact_only"] else ""),
              f"chosen: {record['reason']}", f"run it: {record['command']}"]
    return "\n".join(lines)


def auto_layout(model: str, devices: int, device: str, dtype: str, steps: int, height: int | None,
                width: int | None, warmup: int | None, context_parallel: bool = True):
    """``asyncgen generate --parallel auto``: the fastest predicted layout asyncgen runs on all ``devices``.

    The probe comes from the default cache (measured now when missing), the compute from
    counted FLOPs; Ulysses (``--sp``) only with ``context_parallel``; returns the
    :class:`~asyncgen.cost.layout.Choice`.
    """
    import torch

    from asyncgen.pipelines.layout_costs import auto_layout_from_configs

    measured, _ = cached_probe(default_probe_cache(), devices, device, dtype, reprobe=False)
    try:  # the engine's choice, as AsyncDiffPipeline(parallel="auto") makes it
        return auto_layout_from_configs(model, measured, devices, steps, height, width, warmup, getattr(torch, dtype),
                                        context_parallel)
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"--parallel auto: {exc}") from None
