"""Does the layout chooser predict what the benchmarks measure, and does it pick the layout that measures fastest?

    python -m asyncgen.evaluation.validate_plan [--families wan,sd3,unet] [--devices 2] [--steps 20] [--repeats 3]
    python -m asyncgen.evaluation.validate_plan --from-results DIR     # predictions against benches already run

For each bench model (``asyncgen bench --family ...``: the same random-weight model, same seed, same call):

1. *Predict.* The pipeline runs once (2 steps) with its denoiser's calls recorded; the units are
   timed on the first call on one thread (:func:`asyncgen.pipelines.layout_costs.costs_from_call`:
   the pipeline's own batch, size and text length), and again at each Ulysses degree up to
   ``--devices`` as one rank of that degree runs them (:mod:`asyncgen.cost.sharded`: the tokens cut
   by the class's plan, self-attention over every token with a share of the heads), where the class
   has a context-parallel plan; the link between ``--devices`` processes is
   probed (:func:`asyncgen.comm.link_probe.probe_link`, pinned as the benches pin), and
   :func:`asyncgen.cost.layout.choose` predicts every layout's mean step time.
2. *Measure* every layout the devices allow that runs today, with the existing harnesses:
   ``asyncgen bench`` (:func:`~asyncgen.evaluation.bench_asyncdiff.run_benchmark`: the stock pipeline,
   AsyncDiff stages and CFG parallel) and, where diffusers has a context-parallel plan for the
   class, ``asyncgen bench --peer diffusers-cp`` (:func:`~asyncgen.evaluation.bench_peer_diffusers_cp.run_comparison`:
   Ulysses; diffusers' own run, which asyncgen's ``stages=1, context_parallel=P`` equals). With
   ``--from-results DIR`` the benches are not run; their ``results.json`` are read from ``DIR/FAMILY/``
   and ``DIR/FAMILY-peer/`` (or ``DIR/FAMILY/`` holding a peer run).
3. *Compare.* The benches time whole images; the chooser predicts denoising steps. A measured
   mean step is ``(latency - serial) / steps``, where ``serial`` is the image's time outside the
   denoiser (text encoding, decoding), the same in every layout: from the bench's own stock run
   (its denoiser clock) where it has one, else from the recorded 2-step run here. Reported per
   layout: predicted and measured ms per step and the error; per model: whether every error is
   within ``--tolerance`` (15 %) and whether the chosen layout is the one that measured fastest.

Timings are only as good as the machine is quiet: the load average is recorded at the start
and the end, and the report says so. Written as ``validate_plan.json`` and ``validate_plan.md``
in ``--out``, with each model's bench records as ``FAMILY/results.json`` and
``FAMILY-peer/results.json`` (``--from-results`` reads them back).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .reporting import json_text, markdown_table

FAMILIES = ("wan", "sd3", "unet")
# what `asyncgen bench --family F` calls the pipeline with (bench_asyncdiff.run's defaults)
SIZES = {"unet": 64, "sd3": 128, "wan": 192, "flux": 256}


def bench_call(family: str, steps: int, seed: int = 0) -> dict:
    size = SIZES[family]
    call = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np", seed=seed)
    if family == "wan":
        call.update(num_frames=9, max_sequence_length=32)
    if family == "flux":
        call.update(max_sequence_length=32)
    return call


def build_model(family: str, folder: Path, seed: int = 0) -> str:
    from . import random_models

    build = {"sd3": random_models.save_bench_sd3_pipeline, "wan": random_models.save_bench_wan_pipeline,
             "flux": random_models.save_bench_flux_pipeline, "unet": random_models.save_bench_pipeline}[family]
    return str(build(folder / f"bench-{family}", seed=seed))


def _probe_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from asyncgen.comm.group import default_backend
    from asyncgen.comm.link_probe import probe_link

    if not dist.is_initialized():
        dist.init_process_group(backend=default_backend())
    return probe_link().to_dict()


def predicted_costs(model: str, call: dict, prompt: str, repeats: int, devices: int = 1):
    """The denoiser's costs timed on the pipeline's own first call, and its time outside the denoiser per image."""
    import torch
    from asyncgen.evaluation.bench_asyncdiff import DenoiserClock, load_on_rank
    from asyncgen.pipelines.layout_costs import capture_denoiser_calls, costs_from_call

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a CPU device is one thread, as the benches run each rank
    try:
        pipe = load_on_rank(model, 0)
        short = {k: v for k, v in call.items() if k != "seed"}
        short.update(num_inference_steps=2, prompt=prompt, generator=torch.Generator().manual_seed(call["seed"]))
        denoiser_call, passes = capture_denoiser_calls(pipe, short)
        clock = DenoiserClock(pipe, "cpu")
        serial = []
        for _ in range(repeats):  # what an image costs outside the denoiser (the same in every layout)
            before, start = clock.seconds, time.perf_counter()
            pipe(**{**short, "generator": torch.Generator().manual_seed(call["seed"])})
            serial.append((time.perf_counter() - start) - (clock.seconds - before))
        costs = costs_from_call(pipe, denoiser_call, passes, repeats, devices)
    finally:
        torch.set_num_threads(threads)
    return costs, statistics.median(serial)


def measured_steps(asyncdiff: dict | None, peer: dict | None, steps: int, serial_here: float) -> dict[tuple, dict]:
    """Measured mean ms per step per layout key ``(stages, stride, cfg_parallel, ulysses)`` from bench results."""
    out: dict[tuple, dict] = {}
    if asyncdiff is not None:
        for row in asyncdiff["rows"]:
            serial = row["stock_s"] - row["stock_denoiser_s"]
            out.setdefault((1, 1, False, 1), dict(ms=1e3 * row["stock_denoiser_s"] / steps, source="bench (stock)"))
            wrap = row["wrap"]
            key = (wrap["stages"], wrap.get("stride", 1), bool(wrap.get("cfg_parallel")), 1)
            out[key] = dict(ms=1e3 * (row["async_s"] - serial) / steps, source="bench",
                            oversubscribed=row.get("oversubscribed", False))
    if peer is not None:
        stock_row, peer_row, ours_row = peer["rows"]
        out.setdefault((1, 1, False, 1), dict(ms=1e3 * (stock_row["latency_s"] - serial_here) / steps,
                                              source="bench --peer (stock)"))
        out[(1, 1, False, peer_row["ranks"])] = dict(ms=1e3 * (peer_row["latency_s"] - serial_here) / steps,
                                                     source="bench --peer")
        wrap = peer["wrap"]
        key = (wrap["stages"], wrap.get("stride", 1), bool(wrap.get("cfg_parallel")), 1)
        out.setdefault(key, dict(ms=1e3 * (ours_row["latency_s"] - serial_here) / steps, source="bench --peer"))
    return out


def run_benches(family: str, model: str, costs, call: dict, prompt: str, devices: int, repeats: int,
                pin: bool) -> tuple[dict | None, dict | None]:
    """The existing harnesses on every runnable layout of ``devices`` ranks with stages or CFG parallel or Ulysses."""
    from .bench_asyncdiff import run_benchmark
    from .bench_peer_diffusers_cp import run_comparison

    configs = [dict(stages=devices, stride=1, cfg_parallel=False, warmup=None, time_shift=False, split="flops")]
    if costs.pass_batch == 2 and devices % 2 == 0:
        configs.append(dict(stages=devices // 2, stride=1, cfg_parallel=True, warmup=None, time_shift=False,
                            split="flops"))
    rows = run_benchmark(model, configs, {**call, "prompt": prompt}, repeats, pin_cpus=pin)
    asyncdiff = dict(benchmark="asyncdiff", model=f"built-in {family}", call=call, prompts=[prompt],
                     rows=[{k: v for k, v in r.items() if k not in ("images", "stock_images")} for r in rows])
    peer = None
    if costs.context_parallel is None:
        seed = call["seed"]
        peer_call = {k: v for k, v in call.items() if k != "seed"}
        peer_rows = run_comparison(model, "ulysses", configs[0], {**peer_call, "seed": seed}, [prompt], repeats,
                                   pin_cpus=pin)
        peer = dict(benchmark="peer_diffusers_cp", model=f"built-in {family}", call=call, prompts=[prompt],
                    rows=peer_rows, wrap=configs[0])
    return asyncdiff, peer


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def results_from(folder: Path, family: str) -> tuple[dict | None, dict | None]:
    asyncdiff = peer = None
    for candidate in (folder / family / "results.json", folder / f"{family}-peer" / "results.json"):
        data = _read(candidate)
        if data is None:
            continue
        if data.get("benchmark") == "peer_diffusers_cp":
            peer = data
        else:
            asyncdiff = data
    return asyncdiff, peer


def key_of(layout) -> tuple:
    return (layout.stages, layout.stride, layout.cfg_parallel, layout.ulysses)


def validate(args, written=lambda record: None, saved=lambda family, asyncdiff, peer: None) -> dict:
    """The record of every family (``written(record)`` after each: a long run keeps what it finished;
    ``saved(family, ...)`` the bench records it measured)."""
    from asyncgen.cli.launcher import launch
    from asyncgen.cost.layout import Link, choose

    from .prompts import miniature_prompts

    prompt = miniature_prompts(1, seed=args.seed)[0]
    record = dict(devices=args.devices, steps=args.steps, repeats=args.repeats, tolerance=args.tolerance,
                  cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                  load_average={"start": list(os.getloadavg())}, families={})
    link_data = launch(_probe_worker, args.devices, timeout=600, pin_cpus=args.pin)[0]
    link = Link.from_measurement(link_data)
    record["link"] = link_data
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            model = build_model(family, Path(tmp), args.seed)
            call = bench_call(family, args.steps, args.seed)
            started = time.perf_counter()
            costs, serial = predicted_costs(model, call, prompt, args.repeats, args.devices)
            choice = choose(costs, link, args.devices, args.steps)
            if args.from_results:
                asyncdiff, peer = results_from(Path(args.from_results), family)
            else:
                asyncdiff, peer = run_benches(family, model, costs, call, prompt, args.devices, args.repeats, args.pin)
                # as `asyncgen bench` writes them, so --from-results can predict against them again
                saved(family, asyncdiff, peer)
            measured = measured_steps(asyncdiff, peer, args.steps, serial)
            rows = []
            for p in choice.candidates:
                m = measured.get(key_of(p.layout))
                rows.append(dict(layout=p.layout.name, devices=p.layout.devices, predicted_ms=1e3 * p.step_s,
                                 measured_ms=m["ms"] if m else None,
                                 error_pct=100 * (1e3 * p.step_s / m["ms"] - 1) if m else None,
                                 source=m["source"] if m else "-", chosen=p is choice.chosen))
            compared = [r for r in rows if r["measured_ms"] is not None]
            fastest = min(compared, key=lambda r: r["measured_ms"]) if compared else None
            record["families"][family] = dict(
                rows=rows, reason=choice.reason, serial_s=serial, passes_per_step=costs.passes_per_step,
                unit_ms=[1e3 * s for s in costs.unit_seconds], shared_ms=1e3 * costs.shared_seconds,
                sharded_unit_ms={str(p): [1e3 * s for s in times] for p, times in costs.sharded_unit_seconds.items()},
                ulysses_refusals={str(p): why for p, why in costs.ulysses_refusals.items()},
                context_parallel=costs.context_parallel or "available",
                within_tolerance=all(abs(r["error_pct"]) <= args.tolerance for r in compared) if compared else None,
                worst_error_pct=max((abs(r["error_pct"]) for r in compared), default=None),
                measured_fastest=fastest["layout"] if fastest else None,
                chose_the_fastest=fastest is not None and fastest["chosen"],
                load_average_end=list(os.getloadavg()), seconds=time.perf_counter() - started)
            record["load_average"]["end"] = list(os.getloadavg())
            written(record)
    record["load_average"]["end"] = list(os.getloadavg())
    return record


COLUMNS = ["layout", "devices", "predicted_ms", "measured_ms", "error_pct", "source", "chosen"]
FORMATS = {"predicted_ms": ".1f", "measured_ms": ".1f", "error_pct": "+.1f"}


def report(record: dict) -> str:
    lines = [f"# Layout chooser against the benches: {record['devices']} devices, {record['steps']} steps, "
             f"{record['repeats']} repeats", ""]
    link = record["link"]
    lines.append(f"link: latency {1e6 * link['latency_s']:.0f} us, bandwidth {link['bandwidth_bytes_per_s'] / 1e9:.2f} "
                 f"GB/s, all-to-all {1e6 * link['all_to_all_latency_s']:.0f} us + "
                 f"{link['all_to_all_bytes_per_s'] / 1e9:.2f} GB/s, parallel slowdown {link['parallel_slowdown']:.2f}x; "
                 f"{record['cores']} cores, load average "
                 f"{' / '.join(f'{x:.1f}' for x in record['load_average']['start'])} at the start, "
                 f"{' / '.join(f'{x:.1f}' for x in record['load_average']['end'])} at the end (1/5/15 min)")
    for family, result in record["families"].items():
        rows = [dict(r, measured_ms=r["measured_ms"] if r["measured_ms"] is not None else "-",
                     error_pct=r["error_pct"] if r["error_pct"] is not None else "-",
                     chosen="yes" if r["chosen"] else "") for r in result["rows"]]
        lines += ["", f"## {family}", "", markdown_table(rows, COLUMNS, FORMATS), "",
                  f"chosen: {result['reason']}",
                  f"measured fastest: {result['measured_fastest']}; chose it: {result['chose_the_fastest']}; "
                  f"worst error {result['worst_error_pct']:.1f} % (within {record['tolerance']:g} %: "
                  f"{result['within_tolerance']})" if result["worst_error_pct"] is not None else "nothing measured",
                  f"time outside the denoiser per image: {result['serial_s']:.3f} s; {result['passes_per_step']} "
                  f"pass(es) per step; units (ms per pass): {', '.join(f'{u:.1f}' for u in result['unit_ms'])}, "
                  f"outside the units {result['shared_ms']:.1f}"]
        for degree, times in result.get("sharded_unit_ms", {}).items():
            lines.append(f"units at Ulysses {degree}'s sharded shape (ms per pass, one rank): "
                         f"{', '.join(f'{u:.1f}' for u in times)} (sum {sum(times):.1f} against "
                         f"{sum(result['unit_ms']):.1f} / {degree} = {sum(result['unit_ms']) / int(degree):.1f})")
    lines += ["", "predicted_ms / measured_ms: mean ms per denoising step (every pass of the step); measured = (bench "
              "latency - the image's time outside the denoiser) / steps. Timings on a loaded machine say little: "
              "rerun on an idle one."]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated bench models "
                        f"({', '.join(SIZES)}) (default: %(default)s)")
    parser.add_argument("--devices", type=int, default=2, help="ranks (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of every bench arm and of the unit "
                        "timings (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="model and noise seed, as asyncgen bench (default: 0)")
    parser.add_argument("--tolerance", type=float, default=15.0, help="the prediction error allowed, in %% "
                        "(default: %(default)s)")
    parser.add_argument("--from-results", default=None, metavar="DIR", help="read the benches' results.json from "
                        "DIR/FAMILY/ and DIR/FAMILY-peer/ instead of running them (same --steps and --seed)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin each worker to a core")
    parser.add_argument("--out", default="validate_plan_results", metavar="DIR", help="folder for validate_plan.json "
                        "and validate_plan.md (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from asyncgen.cli.errors import UsageError
    from asyncgen.cli.files import write_all

    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in SIZES]
    if unknown or not args.families:
        raise UsageError(f"--families {','.join(args.families)}: unknown {', '.join(unknown) or 'none given'}; "
                         f"accepted: {', '.join(SIZES)}")
    for name in ("devices", "steps", "repeats"):
        if getattr(args, name) < (2 if name == "devices" else 1):
            raise UsageError(f"--{name} {getattr(args, name)}: need at least {2 if name == 'devices' else 1}")
    out = Path(args.out)

    def written(record: dict) -> str:  # both files whole, or neither
        text = report(record)
        write_all({out / "validate_plan.json": json_text(record), out / "validate_plan.md": text})
        return text

    def saved(family: str, asyncdiff: dict | None, peer: dict | None) -> None:
        write_all({out / name / "results.json": json_text(data)
                   for name, data in ((family, asyncdiff), (f"{family}-peer", peer)) if data is not None})

    text = written(validate(args, written, saved))
    print(text)
    print(f"written to {out / 'validate_plan.json'} and {out / 'validate_plan.md'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncgen.evaluation.validate_plan",
                                     description="The layout chooser's predictions against the benches' measurements.")
    add_arguments(parser)
    from asyncgen.cli.errors import run_module_command

    return run_module_command(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
