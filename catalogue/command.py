"""``asyncgen catalogue``: list and show the asynchronous-learning catalogue, run and compare miniature experiments.

``list`` prints a table (name, family, goals met and CPU seconds of the committed default run,
claim) that fits the terminal (``--json``: everything, for scripts); ``show NAME`` describes one
experiment, with every ``--set`` key's type, accepted range, default and meaning; ``run NAME``
runs the experiment on seeds ``--seed .. --seed+--seeds-1`` and writes ``results.json``,
``results.md`` and ``results.png`` into ``--out`` (together: all whole, or none); ``render
DIR...`` rewrites each folder's ``results.md`` from its ``results.json`` (``--readme``: README.md's catalogue table
from every committed ``results.json``, see :mod:`asyncgen.catalogue.table`); ``compare DIR...``
puts several runs of one experiment side by side.

Everything a run needs is checked before it starts, each in one line (exit code 2): every
``--set`` value against its key's range, the seeds, and every file the run will write (``--out``
a file or inside one, a folder that is not writable or has no room). A run expected to take more
than 30 s says so first and shows its progress on standard error (a bar on a terminal, a line
every 30 s otherwise); progress output never decides the outcome. A write that fails after the
work (a full disk, a file-size limit) is one line naming the path and the errno (exit code 1),
with none of the files changed. The exit code is 0 when the run completed, whether or not its
goals passed.
"""

from __future__ import annotations

import argparse
import sys

from asyncgen.cli.errors import UsageError

# the command's line in ``asyncgen --help``
SUMMARY = "the asynchronous-learning catalogue: list and show the methods, run and compare miniature experiments"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the methods with their claims, goals met and run times",
                                 description="List every catalogue experiment: name, family, the committed default "
                                 "run's goals met and CPU time, and its claim (cut to the terminal's width, 100 "
                                 "columns when not a terminal). --json: everything, for scripts.")
    listing.add_argument("--json", action="store_true", help="a JSON array: each experiment's paper, claim, keys "
                         "(type, range, default, --quick value, meaning), seeds and committed run")
    show = actions.add_parser("show", help="one experiment: paper, claim, every --set key with its range",
                              description="Describe one catalogue experiment: its paper and claim, every --set key "
                              "with its type, accepted range, default, --quick value and meaning, the committed "
                              "run's time, tuned values and goals.")
    show.add_argument("name", help="experiment name (see 'asyncgen catalogue list')")
    run = actions.add_parser("run", help="run one experiment and write results.json/.md/.png",
                             description="Run one catalogue experiment (its paper's headline comparison in miniature) "
                             "and write results.json, results.md and results.png.",
                             epilog="Every --set key has a type and an accepted range, checked before the run: "
                             "'asyncgen catalogue show NAME' lists them with their defaults and meanings. Each "
                             "range keeps a run, with the other keys at their defaults, within a few hours on 2 "
                             "cores; a run expected to take more than 30 s says how long first and shows progress.")
    run.add_argument("name", help="experiment name (see 'asyncgen catalogue list')")
    run.add_argument("--quick", action="store_true", help="a reduced run (one seed, about a tenth of the work; "
                     "at most ~30 s on 2 cores) for smoke tests (default: the full run, at most ~5 min)")
    run.add_argument("--seeds", type=int, default=None, help="number of evaluation seeds, 1..1000 (default: the "
                     "experiment's own, usually 3; 1 with --quick)")
    run.add_argument("--seed", type=int, default=0, help="first seed, 0..1e9; seeds are SEED .. SEED+SEEDS-1 "
                     "(default: %(default)s; tuning used seeds from 100)")
    run.add_argument("--out", default=None, help="folder for the result files (default: catalogue_results/NAME)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a documented default (repeatable; keys, types and ranges: 'asyncgen catalogue "
                     "show NAME'); an unknown key lists the valid ones")
    run.add_argument("--trace", default=None, metavar="FILE", help="leo-pacing: run the dynamic-trace calls over "
                     "a measured link trace, a CSV of time, capacity and delay (the same as --set trace=FILE; "
                     "columns: docs/catalogue/netsim.md)")
    run.add_argument("--no-progress", action="store_true", help="no progress output")
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
    compare = actions.add_parser("compare", help="several runs of one experiment side by side",
                                 description="Compare several runs of one experiment (different --set values, seeds "
                                 "or code): the settings that differ, every goal and metric with one column per "
                                 "run, and a plot of the goals against their thresholds. Prints the tables; with "
                                 "--out, writes compare.json, compare.md and compare.png there.")
    compare.add_argument("folders", nargs="+", metavar="DIR", help="folders holding a results.json (or the files)")
    compare.add_argument("--out", default=None, help="folder for compare.json/.md/.png (default: print only)")
    render = actions.add_parser("render", help="rewrite results.md from results.json in each folder; --readme: "
                                "the README's catalogue table",
                                description="Rewrite each folder's results.md from its results.json (the "
                                "committed results are written only this way or by 'run'). --readme: rewrite the "
                                "catalogue table between README.md's <!-- catalogue-table --> markers from every "
                                "committed docs/catalogue/NAME/results.json.")
    render.add_argument("folders", nargs="*", metavar="DIR", help="folders holding a results.json")
    render.add_argument("--readme", action="store_true", help="rewrite README.md's catalogue table from the "
                        "committed docs/catalogue/*/results.json (after the folders given)")


def _list(args) -> int:
    import json
    import shutil

    from asyncgen.catalogue import experiments
    from asyncgen.catalogue.frame import catalogue_entry

    entries = [catalogue_entry(info) for info in experiments().values()]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    try:
        width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 100
    except (OSError, ValueError, AttributeError):
        width = 100
    width = max(width, 60)
    header = ("name", "family", "goals", "CPU s", "claim")
    rows = []
    for entry in entries:
        run = entry["committed"]
        goals = f"{run['goals_met']}/{run['goals_total']}" if run else "-"
        cpu = f"{run['cpu_seconds']:.0f}" if run and run.get("cpu_seconds") is not None else "-"
        rows.append((entry["name"], entry["family"], goals, cpu, entry["claim"]))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    room = max(10, width - sum(widths) - 2 * 4)
    for row in [header, *rows]:
        claim = row[4] if len(row[4]) <= room else row[4][:room - 1].rstrip() + "…"
        print("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                         row[3].rjust(widths[3]), claim]))
    print("goals met and CPU seconds of the committed default run; more: asyncgen catalogue show NAME"[:width])
    return 0


def _progress_mode(args, long: bool) -> str:
    """A bar on a terminal; on a file or pipe, a line every 30 s for a long run only; nothing with --no-progress."""
    if args.no_progress:
        return "off"
    try:
        terminal = sys.stderr.isatty()
    except (OSError, ValueError, AttributeError):  # closed standard error
        terminal = False
    return "bar" if terminal else "lines" if long else "off"


def _run(args) -> int:
    from asyncgen.catalogue import experiments, get_experiment
    from asyncgen.catalogue.frame import CatalogueError, MissingExtra, plan_run, run_experiment
    from asyncgen.cli.files import say

    try:
        info = get_experiment(args.name)
        out = args.out or f"catalogue_results/{info.name}"
        if args.trace is not None:
            if "trace" not in info.keys:
                takers = [n for n, i in experiments().items() if "trace" in i.keys]
                raise CatalogueError(f"--trace: {info.name} takes no trace file (experiments that do: "
                                     f"{', '.join(takers)})")
            args.overrides = [*args.overrides, f"trace={args.trace}"]
        plan = plan_run(info, quick=args.quick, seeds=args.seeds, seed=args.seed, overrides=args.overrides, out=out)
        info.load()  # a missing extra is one line before the run, too
        if plan.long:
            say(plan.announcement())
        report = run_experiment(info, plan=plan, progress=_progress_mode(args, plan.long))
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

    from asyncgen.catalogue.frame import CatalogueError, render_markdown
    from asyncgen.catalogue.table import README, check_readme, write_readme
    from asyncgen.cli.files import check_output_paths

    if not args.folders and not args.readme:
        raise UsageError("render: give folders holding a results.json, or --readme")
    for folder in args.folders:
        if not (Path(folder) / "results.json").is_file():
            raise UsageError(f"{folder}: no results.json there")
    try:
        check_output_paths([Path(folder) / "results.md" for folder in args.folders]
                           + ([README] if args.readme else []), kind="file")
        if args.readme:
            check_readme(README)
    except (ValueError, CatalogueError) as exc:
        raise UsageError(str(exc)) from None
    for folder in args.folders:
        print(f"wrote {render_markdown(folder)}")
    if args.readme:  # after the folders: the table reads the committed results.json files
        print(f"wrote {write_readme(README)} (the catalogue table)")
    return 0


def _tune(args) -> int:
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.frame import CatalogueError, MissingExtra, run_tuning

    try:
        info = get_experiment(args.name)
        out = args.out or f"catalogue_results/{info.name}"
        report = run_tuning(info, quick=args.quick, overrides=args.overrides, out=out,
                            progress=_progress_mode(args, True))
    except (CatalogueError, MissingExtra) as exc:
        raise UsageError(str(exc)) from None
    print(f"{info.name}: tuned on seeds {report['tuning']['seeds']} in {report['cpu_seconds']:.0f} s of CPU; "
          f"wrote {out}/tuning.json; the defaults to commit:")
    for key, value in report["defaults"].items():
        print(f"  {key}: {value!r}")
    return 0


def _show(args) -> int:
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.frame import CatalogueError, describe

    try:
        info = get_experiment(args.name)
    except CatalogueError as exc:
        raise UsageError(str(exc)) from None
    print(describe(info))
    return 0


def _compare(args) -> int:
    from asyncgen.catalogue.compare import compare
    from asyncgen.catalogue.frame import CatalogueError

    try:
        _, text = compare(args.folders, out=args.out)
    except CatalogueError as exc:
        raise UsageError(str(exc)) from None
    print(text, end="")
    if args.out:
        print(f"wrote {args.out}/compare.json, compare.md, compare.png")
    return 0


def run(args) -> int:
    if args.action == "list":
        return _list(args)
    return {"render": _render, "tune": _tune, "run": _run, "show": _show, "compare": _compare}[args.action](args)
