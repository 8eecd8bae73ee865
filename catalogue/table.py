"""The README's catalogue table, generated from the committed default runs (``docs/catalogue/NAME/results.json``).

One row per experiment, in ``asyncgen catalogue list`` order: the name (linking to its ``results.md``), the paper
and the claim as the experiment declares them, the committed default run's goals in one cell, and the goals met.
The result cell has the seeds (and the hyperparameters tuned per arm), then one line per goal, ``label: value op
threshold``: the label is the goal's description (a goal named in words: its name, then its description; see
:func:`goal_label`), the value is what results.json holds (a seed mean, or a ratio, difference or median over the
seeds), and where the value is the seed mean of one metric whose per-seed values results.json holds (and which
vary), their min–max follows it. A goal not met is marked **MISSED** with the first clause of its reason (the
whole reason is in ``results.md``).

``asyncgen catalogue render --readme`` writes the table between README.md's ``<!-- catalogue-table -->`` markers;
a test compares the README with :func:`render_table` of the committed files, so a hand edit of the table, or a
results.json committed without re-rendering, fails.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .frame import (
    COMMITTED,
    TUNING_META,
    CatalogueError,
    ExperimentInfo,
    committed_report,
)

MARK_BEGIN, MARK_END = "<!-- catalogue-table -->", "<!-- /catalogue-table -->"
README = COMMITTED.parent.parent / "README.md"
COMMAND = "asyncgen catalogue render --readme"

_OPS = {"<=": "≤", ">=": "≥", "<": "<", ">": ">"}
#: a MISSED goal's reason is cut at its first "; " or ": " after this many characters, and at most this long
_REASON_MIN, _REASON_MAX = 20, 140


def number(value: Any) -> str:
    """Three significant digits, no trailing zeros, short exponents: ``0.22``, ``1.41e-3``, ``7.1e8``, ``NaN``."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    text = f"{value:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text.replace("-", "−")


def seed_range(report: Mapping[str, Any], value: float) -> tuple[float, float, int] | None:
    """(min, max, seeds) of the per-seed values of the metric whose seed mean is ``value``, where results.json holds
    such a metric with more than one seed and values that differ; None otherwise, or where several metrics with
    different values match (a goal's value that is a ratio or a difference of means has no per-seed values here)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    found = set()
    for row in report.get("metrics", {}).values():
        for seq in (row.get("per_seed") or {}).values():
            if not isinstance(seq, list) or len(seq) < 2:
                continue
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in seq):
                continue
            if math.isclose(sum(seq) / len(seq), value, rel_tol=1e-9, abs_tol=1e-300) and min(seq) < max(seq):
                found.add((min(seq), max(seq), len(seq)))
    return found.pop() if len(found) == 1 else None


def short_reason(reason: str) -> str:
    """The first clause of a MISSED goal's reason (up to its first "; " or ": " past the first few words)."""
    reason = " ".join(str(reason).split())
    cuts = [i for sep in ("; ", ": ") for i in [reason.find(sep, _REASON_MIN)] if i > 0]
    if cuts:
        reason = reason[:min(cuts)]
    if len(reason) > _REASON_MAX:
        reason = reason[:_REASON_MAX - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"
    return reason


def _cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def goal_label(name: str, goal: Mapping[str, Any], goals: Mapping[str, Mapping[str, Any]], shown: set) -> str:
    """A goal's words: its description (a goal named as an identifier), its name then its description (a goal named
    in words), its name alone (no description, or one shared with another goal of the run, shown with the first)."""
    description = goal.get("description") or ""
    if not description:
        return name
    shared = sum((g.get("description") or "") == description for g in goals.values()) > 1
    if shared:
        if description in shown:
            return name
        shown.add(description)
        return f"{name} ({description})"
    return f"{name} ({description})" if " " in name else description


def goal_text(report: Mapping[str, Any], name: str, goal: Mapping[str, Any], shown: set | None = None) -> str:
    """``label: value (min–max over k seeds) op threshold``, then **MISSED** and the reason's first clause."""
    shown = set() if shown is None else shown
    value = goal["value"]
    text = f"{goal_label(name, goal, report.get('goals', {name: goal}), shown)}: {number(value)}"
    spread = seed_range(report, value)
    if spread is not None:
        text += f" ({number(spread[0])}–{number(spread[1])} over {spread[2]} seeds)"
    text += f" {_OPS.get(goal['direction'], goal['direction'])} {number(goal['threshold'])}"
    if not goal["passed"]:
        text += " **MISSED**"
        reason = short_reason(goal["reason"]) if goal.get("reason") else ""
        if reason and ("reason", reason) in shown:
            text += " (the reason above)"
        elif reason:
            shown.add(("reason", reason))
            text += f" ({reason})"
    return text


def result_cells(report: Mapping[str, Any] | None) -> tuple[str, str]:
    """(result, goals met) of one committed run: the seeds (and what was tuned, on which seeds), then one line per
    goal (``<br>``); and ``met/total``."""
    if report is None:
        return "no committed default run", "—"
    goals = report.get("goals", {})
    seeds = report.get("seeds") or []
    shown: set = set()
    head = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    tuning = report.get("tuning") or {}
    params = list(dict.fromkeys(param for arm, values in tuning.items() if arm not in TUNING_META
                                and isinstance(values, Mapping) for param in values))
    if params:
        head += f"; {', '.join(params)} tuned per arm on seeds {', '.join(map(str, tuning.get('seeds') or []))}"
    parts = [_cell(head) + ":"]
    parts += [_cell(goal_text(report, name, goal, shown)) for name, goal in goals.items()]
    return "<br>".join(parts), f"{sum(bool(g['passed']) for g in goals.values())}/{len(goals)}"


def render_table(infos: Mapping[str, ExperimentInfo] | None = None,
                 reports: Mapping[str, Mapping[str, Any] | None] | None = None) -> str:
    """The table (and one line on where it comes from), for ``infos`` (default: every experiment, in list order)
    with ``reports`` (default: each one's committed results.json)."""
    if infos is None:
        from . import experiments

        infos = experiments()
    lines = ["| name | paper | claim | our miniature result (committed default run) | goals met |",
             "|---|---|---|---|---|"]
    met = total = 0
    for name, info in infos.items():
        report = committed_report(name) if reports is None else reports.get(name)
        result, goals = result_cells(report)
        if report is not None:
            met += sum(bool(g["passed"]) for g in report.get("goals", {}).values())
            total += len(report.get("goals", {}))
        link = f"[`{name}`](docs/catalogue/{name}/results.md)" if report is not None else f"`{name}`"
        lines.append(f"| {link} | {_cell(info.paper)} | {_cell(info.claim)} | {result} | {goals} |")
    lines += ["", (f"{met} of {total} goals met. Generated by `{COMMAND}` from `docs/catalogue/*/results.json`: a "
                   "goal reads `value op threshold`, the value as the run measured it (a seed mean, or a ratio, "
                   "difference or median over the seeds); where it is the mean of one metric's per-seed values, their "
                   "min–max over the seeds follows it. Each goal's full reason and every metric are in the linked "
                   "`results.md`.")]
    return "\n".join(lines)


def readme_with_table(text: str, table: str, where: str = "README.md") -> str:
    """``text`` (README.md) with ``table`` between the markers; a CatalogueError where the markers are missing."""
    if text.count(MARK_BEGIN) != 1 or text.count(MARK_END) != 1 or text.index(MARK_BEGIN) > text.index(MARK_END):
        raise CatalogueError(f"{where}: expected one {MARK_BEGIN} line and one {MARK_END} line after it")
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    return f"{head}{MARK_BEGIN}\n{table}\n{MARK_END}{tail}"


def readme_table(text: str, where: str = "README.md") -> str:
    """What README.md's text holds between the markers (without the newlines next to them)."""
    readme_with_table(text, "", where)  # the markers, once each, in order
    return text.split(MARK_BEGIN, 1)[1].split(MARK_END, 1)[0].strip("\n")


def check_readme(readme: str | os.PathLike = README) -> Path:
    """Before any work: ``readme`` exists, can be replaced, and has the markers (else a one-line CatalogueError)."""
    from asyncgen.cli.files import check_output_paths

    readme = Path(readme)
    if not readme.is_file():
        raise CatalogueError(f"{readme}: no such file (--readme rewrites the README of a checkout)")
    try:
        check_output_paths([readme], kind="file")
    except ValueError as exc:
        raise CatalogueError(str(exc)) from None
    readme_with_table(readme.read_text(encoding="utf-8"), "", str(readme))
    return readme


def write_readme(readme: str | os.PathLike = README) -> Path:
    """Rewrite the table between ``readme``'s markers from the committed results, whole or not at all (checked
    first with :func:`check_readme`)."""
    from asyncgen.cli.files import write_all

    readme = check_readme(readme)
    text = readme_with_table(readme.read_text(encoding="utf-8"), render_table(), str(readme))
    return write_all({readme: text})[0]
