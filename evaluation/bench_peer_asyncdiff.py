"""Side by side: the stock pipeline, the original AsyncDiff code and asyncgen, alternated in one run.

    python -m asyncgen.evaluation.bench_peer_asyncdiff --peer PATH [--steps 50] [--repeats 5] [--out DIR] [--quick]

``PATH`` is a checkout of the original AsyncDiff: the folder holding its ``asyncdiff``
package. To run on CPU it must be patched to create its process group with gloo and to
leave the pipeline on the CPU (it uses NCCL and ``cuda:RANK`` as published). The peer is
imported only inside this benchmark's worker processes, from ``PATH`` put on their
``sys.path``; nothing in asyncgen imports or copies it. What the benchmark uses of it is
``asyncdiff.async_sd.AsyncDiff(pipeline, model_n, stride, warm_up, time_shift)``, which
creates the default process group itself from the launcher's environment, and its
``reset_state(warm_up)``; the tests run it against a stand-in with that interface
(``tests/fixtures/stand_in_asyncdiff.py``).

All three run the same model (``asyncgen bench --family unet``'s random-weight SD-architecture
UNet, 64x64 images), prompt, seed, step count and warm-up, two ranks each for the two
AsyncDiff implementations (N=2 stages, stride 1), timed alternately in one launch the
way ``asyncgen bench`` times (see :mod:`asyncgen.evaluation.bench_asyncdiff`). The peer
picks its split from a table keyed by hub id, so the model is presented to it as
Stable Diffusion 2.1, whose table fits this architecture. Reported: latency per image,
speedup over stock, PSNR against the stock image, resident UNet parameter MiB per rank,
and the machine's load average (other tenants slow every run, not every run equally).
Written as ``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from asyncgen.cli.launcher import launch
from asyncgen.runtime.asyncdiff_hook import default_warmup

from . import peer_harness
from .bench_asyncdiff import available_cores, load_on_rank
from .reporting import markdown_table, write_atomic, write_json

PEER_TABLE = "stabilityai/stable-diffusion-2-1"  # the peer's split table used for this architecture
PEER_MODULE = Path("asyncdiff") / "async_sd.py"
DEFAULT_PROMPT = "a red circle above a blue square"


def _worker(rank: int, world_size: int, model: str, peer: str, call: dict, prompt: str, warmup: int, repeats: int):
    """Stock (rank 0 alone), the peer and asyncgen (both ranks), alternated (:func:`peer_harness.alternate`);
    timings, images, parameter bytes."""
    sys.path.insert(0, peer)  # this worker only: the peer is measured, never a dependency
    from asyncdiff.async_sd import AsyncDiff

    from asyncgen._compat import record_name_or_path
    from asyncgen.pipelines import AsyncDiffPipeline

    call = dict(call)
    seed = call.pop("seed")
    peer_pipe = load_on_rank(model, rank)
    record_name_or_path(peer_pipe, PEER_TABLE)  # it refuses local folders
    # the peer initialises the default process group itself (gloo, from the launcher's environment) ...
    peer_wrapper = AsyncDiff(peer_pipe, model_n=2, stride=1, warm_up=warmup, time_shift=False)
    # ... and asyncgen runs on that same group
    ours = AsyncDiffPipeline(load_on_rank(model, rank), stages=2, stride=1, warmup=warmup)
    stock = load_on_rank(model, rank) if rank == 0 else None

    def run_peer(*args, **kwargs):
        peer_wrapper.reset_state(warm_up=warmup)  # its per-image reset, as its README says
        return peer_pipe(*args, **kwargs)

    seconds, images = peer_harness.alternate({"asyncdiff": run_peer, "asyncgen": ours}, stock, [prompt], call, seed,
                                             repeats)
    return dict(seconds=seconds, images=images if rank == 0 else None,
                resident_bytes={"stock": peer_harness.parameter_bytes(stock.unet) if stock is not None else None,
                                "asyncdiff": peer_harness.parameter_bytes(peer_pipe.unet),
                                "asyncgen": peer_harness.parameter_bytes(ours.denoiser)})


def run_comparison(model: str, peer: str, call: dict, prompt: str, warmup: int, repeats: int,
                   timeout: float = 3600) -> list[dict]:
    """One row each for stock, the original AsyncDiff and asyncgen (2 ranks each for the last two)."""
    per_rank = launch(_worker, 2, model, peer, call, prompt, warmup, repeats, timeout=timeout)
    arms = {"asyncdiff": dict(config="original AsyncDiff (SD2.1 split table)", ranks=2),
            "asyncgen": dict(config="asyncgen", ranks=2)}
    rows = peer_harness.rows(per_rank, arms, repeats)
    for row in rows:
        row["resident_mib"] = [b / 2**20 for b in row.pop("resident_bytes")]
    return rows


TABLE_COLUMNS = ["config", "ranks", "latency_s", "speedup", "psnr_db", "resident_mib_per_rank"]
TABLE_FORMATS = {"latency_s": ".3f", "speedup": ".2f", "psnr_db": ".1f"}
TABLE_NOTES = """latency_s: seconds per image, median over repeats (a repeat of a 2-rank run ends when its slower rank
returns); speedup: median over repeats of stock latency / latency, the three timed alternately in one launch, one CPU
thread per rank; psnr_db: against the stock image of the same prompt and seed; resident_mib_per_rank: UNet parameter
MiB each rank holds."""


def _table(rows: list[dict]) -> str:
    shown = [dict(r, resident_mib_per_rank=" / ".join(f"{mb:.1f}" for mb in r["resident_mib"])) for r in rows]
    return markdown_table(shown, TABLE_COLUMNS, TABLE_FORMATS)


def check_peer(path: str | os.PathLike) -> Path:
    """The peer checkout's folder, or a one-line error saying what is missing."""
    from asyncgen.cli.errors import UsageError

    folder = Path(path).resolve()
    if not (folder / PEER_MODULE).is_file():
        raise UsageError(f"--peer {path}: {folder / PEER_MODULE} not found; give the folder of an AsyncDiff "
                         "checkout (the one holding its asyncdiff/ package)")
    return folder


def run(args: argparse.Namespace) -> int:
    from asyncgen.cli.errors import UsageError

    from . import random_models

    if args.quick:
        args.steps, args.repeats = 4, 1
    for name in ("steps", "repeats", "warmup"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: need at least 1")
    peer = check_peer(args.peer)
    warmup = args.warmup if args.warmup is not None else default_warmup(args.steps)
    call = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=64, width=64, output_type="np",
                seed=args.seed)
    load_before = peer_harness.load_average()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(random_models.save_bench_pipeline(Path(tmp) / "bench-unet", seed=args.seed))
        rows = run_comparison(model, str(peer), call, args.prompt, warmup, args.repeats)
    table = _table(rows)
    record = dict(benchmark="peer_asyncdiff", model="built-in unet (random weights, SD architecture)",
                  peer=str(peer), peer_split_table=PEER_TABLE, command=args.command, call=call,
                  prompt=args.prompt, warmup=warmup, repeats=args.repeats, cores=available_cores(),
                  # other tenants' load (1, 5, 15 min averages) when the run started and ended
                  load_average={"start": load_before, "end": peer_harness.load_average()},
                  rows=rows, wall_seconds=time.perf_counter() - start)
    out = Path(args.out)
    write_json(out / "results.json", record)
    load = ", ".join(f"{x:.1f}" for x in record["load_average"]["end"])
    write_atomic(out / "results.md", f"# Original AsyncDiff and asyncgen, side by side\n\n{table}\n\n{TABLE_NOTES}\n\n"
                 f"{args.steps} steps, warm-up {warmup}, {args.repeats} repeats; {record['cores']} cores, load average "
                 f"{load} (1/5/15 min) at the end.\n")
    print(table)
    print(TABLE_NOTES)
    print(f"load average (1/5/15 min): {load}; results written to {out / 'results.json'} and {out / 'results.md'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncgen.evaluation.bench_peer_asyncdiff",
                                     description="The stock pipeline, the original AsyncDiff code and asyncgen on "
                                     "the same model, alternated in one run.")
    parser.add_argument("--peer", required=True, metavar="PATH", help="folder of an AsyncDiff checkout (holding its "
                        "asyncdiff/ package), patched to run on CPU")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, median reported "
                        "(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=None, help="exact warm-up steps, the same for both "
                        "implementations, at least 1 (default: asyncgen's, 5%% of the steps)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt (default: %(default)r)")
    parser.add_argument("--seed", type=int, default=0, help="model weights and generator seed (default: 0)")
    parser.add_argument("--out", default="bench_peer_results", metavar="DIR",
                        help="folder for results.json and results.md (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 1 repeat")
    from asyncgen.cli.errors import UsageError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = " ".join([parser.prog, *argv])
    try:
        return run(args)
    except UsageError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
