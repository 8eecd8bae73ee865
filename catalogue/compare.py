"""``asyncgen catalogue compare DIR...``: several runs of one experiment (different ``--set`` values, seeds or
code) side by side: the settings that differ, every goal and every metric, one column per run, in one Markdown
table each, and one plot of the goals' values against their thresholds."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from .frame import CatalogueError, _format, load_report

COMPARE_FILES = ("compare.json", "compare.md", "compare.png")


def _results_path(item: str | os.PathLike) -> Path:
    path = Path(item)
    return path if path.name == "results.json" and not path.is_dir() else path / "results.json"


def load_runs(items: Sequence[str | os.PathLike]) -> list[tuple[str, dict]]:
    """``(label, report)`` per folder (or results.json), all of one experiment; one-line CatalogueErrors."""
    if len(items) < 2:
        raise CatalogueError("compare needs at least two folders holding a results.json")
    runs = []
    for item in items:
        path = _results_path(item)
        if not path.is_file():
            raise CatalogueError(f"{item}: no results.json there")
        try:
            report = load_report(path)
        except (OSError, ValueError) as exc:
            raise CatalogueError(f"{path}: not a readable results.json ({exc})") from None
        if not isinstance(report, dict) or not {"experiment", "config", "goals", "metrics"} <= set(report):
            raise CatalogueError(f"{path}: not a catalogue results.json (it lacks experiment, config, goals, metrics)")
        runs.append((path.parent, report))
    names = {report["experiment"] for _, report in runs}
    if len(names) > 1:
        raise CatalogueError("compare takes runs of one experiment; these are of " + ", ".join(sorted(names)))
    labels = [folder.name or str(folder) for folder, _ in runs]
    if len(set(labels)) < len(labels):
        labels = [str(folder) for folder, _ in runs]
    if len(set(labels)) < len(labels):
        raise CatalogueError("compare: the same folder is given twice")
    return [(label, report) for label, (_, report) in zip(labels, runs)]


def comparison(runs: Sequence[tuple[str, dict]]) -> dict[str, Any]:
    """What the runs differ in (config keys and seeds) and each goal's and scalar metric's value per run."""
    reports = [report for _, report in runs]
    keys = list(dict.fromkeys(k for report in reports for k in report["config"]))
    differs = {k: [report["config"].get(k) for report in reports] for k in keys
               if len({repr(report["config"].get(k)) for report in reports}) > 1}
    if len({repr(report.get("seeds")) for report in reports}) > 1:
        differs["seeds"] = [report.get("seeds") for report in reports]
    goals: dict[str, dict] = {}
    for report in reports:
        for name, goal in report["goals"].items():
            goals.setdefault(name, {"direction": goal["direction"], "threshold": goal["threshold"],
                                    "description": goal.get("description", "")})
    for name, goal in goals.items():
        goal["values"] = [float(report["goals"][name]["value"]) if name in report["goals"] else float("nan")
                          for report in reports]
        goal["passed"] = [bool(report["goals"][name]["passed"]) if name in report["goals"] else None
                          for report in reports]
    metrics: dict[str, list] = {}
    for report in reports:
        for arm, row in report["metrics"].items():
            for metric, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics.setdefault(f"{arm} · {metric}", [])
    for key in metrics:
        arm, _, metric = key.partition(" · ")
        metrics[key] = [report["metrics"].get(arm, {}).get(metric, float("nan")) for report in reports]
    return {"experiment": reports[0]["experiment"], "runs": [label for label, _ in runs], "differs": differs,
            "goals": goals, "metrics": metrics,
            "goals_met": [sum(bool(g["passed"]) for g in report["goals"].values()) for report in reports],
            "goals_total": [len(report["goals"]) for report in reports]}


def _cell(value) -> str:
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "(none)"
    if isinstance(value, float):
        return _format(value)
    return str(value)


def compare_markdown(data: dict[str, Any]) -> str:
    from asyncgen.evaluation.reporting import markdown_table

    runs = data["runs"]
    lines = [f"# {data['experiment']}: {len(runs)} runs compared", ""]
    if data["differs"]:
        rows = [{"setting": key, **{run: _cell(v) for run, v in zip(runs, values)}}
                for key, values in data["differs"].items()]
        lines += ["## Settings that differ", "", markdown_table(rows, ["setting", *runs]), ""]
    else:
        lines += ["The runs have the same settings and seeds.", ""]
    rows = []
    for name, goal in data["goals"].items():
        row = {"goal": name, "target": f"{goal['direction']} {_format(goal['threshold'])}"}
        for run, value, passed in zip(runs, goal["values"], goal["passed"]):
            row[run] = "" if passed is None else f"{_format(value)} {'PASS' if passed else 'MISSED'}"
        rows.append(row)
    met = {"goal": "goals met", "target": "", **{run: f"{m}/{t}" for run, m, t in
                                                  zip(runs, data["goals_met"], data["goals_total"])}}
    lines += ["## Goals", "", markdown_table([*rows, met], ["goal", "target", *runs]), ""]
    rows = [{"arm · metric": key, **{run: _cell(v) for run, v in zip(runs, values)}}
            for key, values in data["metrics"].items()]
    lines += ["## Metrics (seed means)", "", markdown_table(rows, ["arm · metric", *runs])]
    return "\n".join(lines) + "\n"


def compare_png(data: dict[str, Any]) -> bytes:
    """One small panel per goal: each run's value as a bar, the threshold as a dashed line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = list(data["goals"].items()) or [("(no goals)", {"values": [], "threshold": float("nan")})]
    columns = min(4, len(goals))
    rows = math.ceil(len(goals) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    runs = data["runs"]
    for axis, (name, goal) in zip(axes.flat, goals):
        values = [v if math.isfinite(v) else 0.0 for v in goal["values"]]
        colours = ["tab:green" if p else "tab:red" if p is not None else "tab:gray" for p in goal.get("passed", [])]
        axis.bar(range(len(values)), values, color=colours or None)
        if math.isfinite(goal["threshold"]):
            axis.axhline(goal["threshold"], color="k", ls="--", lw=1)
        axis.set_title(f"{name} ({goal.get('direction', '')} threshold)", fontsize=7)
        axis.set_xticks(range(len(runs)), runs, fontsize=6, rotation=30, ha="right")
        axis.tick_params(axis="y", labelsize=6)
    for axis in list(axes.flat)[len(goals):]:
        axis.axis("off")
    fig.suptitle(f"{data['experiment']}: goals per run (green: met, red: missed)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def compare(items: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> tuple[dict, str]:
    """Load, check and compare the runs; with ``out``, write compare.json/.md/.png there together (whole or none).
    ``out`` is checked before anything is read."""
    from asyncgen.cli.files import write_all
    from asyncgen.evaluation.reporting import json_text

    from .frame import check_out

    if out is not None:
        check_out(out, COMPARE_FILES)
    data = comparison(load_runs(items))
    text = compare_markdown(data)
    if out is not None:
        out = Path(out)
        write_all({out / "compare.json": json_text(data), out / "compare.md": text,
                   out / "compare.png": compare_png(data)})
    return data, text
