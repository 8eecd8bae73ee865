"""``asyncgen catalogue``: list the asynchronous-learning catalogue, or run one miniature experiment.

``list`` prints a table (name, family, paper, claim, and the CPU and wall seconds the committed
default run measured); ``run NAME`` runs the experiment on seeds ``--seed .. --seed+--seeds-1``
and writes ``results.json``, ``results.md`` and ``results.png`` into ``--out`` (each whole or
not at all); ``render DIR...`` rewrites each folder's ``results.md`` from its ``results.json``.
The exit code is 0 when the run completed, whether or not its goals passed.
"""

from __future__ import annotations

import argparse
import sys

from asyncgen.cli.errors import UsageError

# the command's line in ``asyncgen --help``
SUMMARY = "the asynchronous-learning catalogue: list the methods, run a miniature experiment"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="the methods with their papers, claims and run times",
                       description="List every catalogue experiment: name, family, paper, claim, default run time.")
    run = actions.add_parser("run", help="run one experiment and write results.json/.md/.png",
                             description="Run one catalogue experiment (its paper's headline comparison in miniature) "
                             "and write results.json, results.md and results.png.")
    run.add_argument("name", help="experiment name (see 'asyncgen catalogue list')")
    run.add_argument("--quick", action="store_true", help="a reduced run (one seed, about a tenth of the work; "
                     "at most ~30 s on 2 cores) for smoke tests (default: the full run, at most ~5 min)")
    run.add_argument("--seeds", type=int, default=None, help="number of evaluation seeds (default: the "
                     "experiment's own, usually 3; 1 with --quick)")
    run.add_argument("--seed", type=int, default=0, help="first seed; seeds are SEED .. SEED+SEEDS-1 "
                     "(default: %(default)s; tuning used seeds from 100)")
    run.add_argument("--out", default=None, help="folder for the result files (default: catalogue_results/NAME)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a documented default (repeatable); an unknown key lists the valid ones")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune = actions.add_parser("tune", help="choose each arm's tuned hyperparameters on the tuning seeds",
                              description="Run an experiment's tuning step: each arm's hyperparameters (e.g. the "
                              "server step eta_g) from a grid of the same size for every arm, on tuning seeds >= 100 "
                              "only; writes tuning.json and prints the values to commit as the defaults.")
    tune.add_argument("name", help="experiment name (see 'asyncgen catalogue list')")
    tune.add_argument("--quick", action="store_true", help="the --quick configuration and a smaller grid")
    tune.add_argument("--out", default=None, help="folder for tuning.json (default: catalogue_results/NAME)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a documented default (repeatable)")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    render = actions.add_parser("render", help="rewrite results.md from results.json in each folder",
                                description="Rewrite each folder's results.md from its results.json (the "
                                "committed results are written only this way or by 'run').")
    render.add_argument("folders", nargs="+", metavar="DIR", help="folders holding a results.json")


def _list() -> int:
    from asyncgen.catalogue import experiments

    from asyncgen.catalogue.frame import measured_seconds

    def seconds(name):
        measured = measured_seconds(name)
        return "not measured" if measured is None else f"{measured[1]:.0f} s CPU, {measured[0]:.0f} s wall"

    rows = [(i.name, i.family, i.paper, i.claim, seconds(i.name)) for i in experiments().values()]
    header = ("name", "family", "paper", "claim", "default run (committed)")
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _run(args) -> int:
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.frame import CatalogueError, MissingExtra, run_experiment

    try:
        info = get_experiment(args.name)
        out = args.out or f"catalogue_results/{info.name}"
        report = run_experiment(info, quick=args.quick, seeds=args.seeds, seed=args.seed, overrides=args.overrides,
                                out=out, progress=not args.no_progress and sys.stderr.isatty())
    except (CatalogueError, MissingExtra) as exc:
        raise UsageError(str(exc)) from None
    passed = sum(g["passed"] for g in report["goals"].values())
    print(f"{info.name}: {len(report['seeds'])} seed(s) in {report['wall_seconds']:.1f} s, "
          f"goals passed {passed}/{len(report['goals'])}; wrote {out}/results.json, results.md, results.png")
    for name, goal in report["goals"].items():
        print(f"  {'PASS  ' if goal['passed'] else 'MISSED'} {name}: {goal['value']:.4g} {goal['direction']} "
              f"{goal['threshold']:.4g}")
    return 0


def _render(args) -> int:
    from pathlib import Path

    from asyncgen.catalogue.frame import render_markdown

    for folder in args.folders:
        if not (Path(folder) / "results.json").is_file():
            raise UsageError(f"{folder}: no results.json there")
    for folder in args.folders:
        print(f"wrote {render_markdown(folder)}")
    return 0


def _tune(args) -> int:
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.frame import CatalogueError, MissingExtra, run_tuning

    try:
        info = get_experiment(args.name)
        out = args.out or f"catalogue_results/{info.name}"
        report = run_tuning(info, quick=args.quick, overrides=args.overrides, out=out,
                            progress=not args.no_progress and sys.stderr.isatty())
    except (CatalogueError, MissingExtra) as exc:
        raise UsageError(str(exc)) from None
    print(f"{info.name}: tuned on seeds {report['tuning']['seeds']} in {report['cpu_seconds']:.0f} s of CPU; "
          f"wrote {out}/tuning.json; the defaults to commit:")
    for key, value in report["defaults"].items():
        print(f"  {key}: {value!r}")
    return 0


def run(args) -> int:
    if args.action == "list":
        return _list()
    return {"render": _render, "tune": _tune, "run": _run}[args.action](args)
