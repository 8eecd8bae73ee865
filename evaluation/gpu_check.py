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
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from asyncgen.evaluation.gpu_diagnostics import (
    NEEDS_DIFFUSERS,
    check_composition,
    check_two_ranks,
    find_tests,
    have_diffusers,
    profile_model,
    run_cuda_tests,
)
from asyncgen.evaluation.unet_configs import MODELS, tiny_config

from .reporting import markdown_table, write_atomic, write_json


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
