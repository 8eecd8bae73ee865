"""What every catalogue experiment shares: its description, its configuration, its goals,
and the three result files (``results.json``, ``results.md``, ``results.png``).

A family describes each experiment with an :class:`ExperimentInfo` in its light
``__init__`` (no optional imports there, so ``asyncgen catalogue list`` works without
the extras) and implements it as ``run(config, seeds, progress) -> ExperimentResult``
in its ``experiments`` module. This module runs it and writes the files; the CLI only
parses arguments.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

#: the comparison a goal asks for: the measured value must be ... the threshold
DIRECTIONS = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t, ">": lambda v, t: v > t}


class CatalogueError(ValueError):
    """Bad input to a catalogue method or experiment: one line naming the value and what is accepted."""


class MissingExtra(ImportError):
    """A family's optional packages are not installed."""


def require_extra(family: str, *modules: str) -> None:
    """Import-check ``modules``; if one is missing raise the one-line install hint for ``family``."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtra(
                f"asyncgen.catalogue.{family} needs optional packages: pip install 'asyncgen[{family}]' "
                f"(missing: {exc.name or name})"
            ) from None


#: the most seeds one run takes (``--seeds``), and the largest first seed (``--seed``)
MAX_SEEDS = 1000
MAX_SEED = 10**9


@dataclass(frozen=True)
class Key:
    """A documented ``--set`` key: its type, the range ``--set`` accepts, its meaning, and how it drives the cost.

    ``type`` is ``int``, ``float``, ``bool``, ``str`` (one of ``choices``) or ``path`` (an existing file, or
    empty for none), or a list of one of them
    (``items`` > 0: between ``min_items`` and ``items`` values). ``low`` and ``high`` are inclusive and
    apply to each number. ``cost``: the run's work grows as ``(value / committed value) ** cost`` (for a
    list, as its length), which scales the committed run's measured seconds into an estimate.
    """

    type: str
    low: float | None = None
    high: float | None = None
    meaning: str = ""
    choices: tuple = ()
    items: int = 0
    min_items: int = 1
    cost: float = 0.0
    multiple_of: int = 0  # ints: only multiples of this

    def describe(self) -> str:
        """The accepted values in words: ``int in 1..1e+09``, ``list of 1-8 float in 0..200``, ``one of a, b``."""
        if self.type == "bool":
            one = "true or false"
        elif self.type == "path":
            one = "path to an existing file (empty: none)"
        elif self.type == "str":
            one = f"one of {', '.join(self.choices)}"
        else:
            one = f"{self.type} in {_bound(self.low)}..{_bound(self.high)}"
            if self.multiple_of:
                one += f", a multiple of {self.multiple_of}"
        if not self.items:
            return one
        count = f"{self.min_items}-{self.items}" if self.items != self.min_items else f"{self.items}"
        return f"list of {count} values, each {one}"

    def check(self, name: str, value: Any, given: str | None = None, default: Any = None) -> Any:
        """``value`` as this key's type if it is in range; else a one-line CatalogueError naming key, value, range."""
        shown = f"--set {name}={given}" if given is not None else f"{name}={value!r}"
        accepted = f"{name} takes {_article(self.describe())}" + (
            f" (default {_plain(default)})" if default is not None else "")
        if self.items:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if not self.min_items <= len(values) <= self.items:
                raise CatalogueError(f"{shown}: {len(values)} value(s); {accepted}")
            try:
                return [self._one(v) for v in values]
            except (TypeError, ValueError):
                raise CatalogueError(f"{shown}: not accepted; {accepted}") from None
        try:
            return self._one(value)
        except (TypeError, ValueError):
            raise CatalogueError(f"{shown}: not accepted; {accepted}") from None

    def parse(self, name: str, text: str, default: Any = None) -> Any:
        """``--set name=text``: the value, checked (lists: comma-separated, or a Python list literal)."""
        if not self.items:
            return self.check(name, text.strip(), text, default)
        stripped = text.strip()
        if stripped.startswith(("[", "(")):
            try:
                values = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                raise CatalogueError(f"--set {name}={text}: not a list; {name} takes "
                                     f"{_article(self.describe())}") from None
            values = list(values) if isinstance(values, (list, tuple)) else [values]
        else:
            values = [v.strip() for v in stripped.split(",")] if stripped else []
        return self.check(name, values, text, default)

    def _one(self, value: Any) -> Any:
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if self.type == "path":
            text = str(value).strip()
            if text and not os.path.isfile(text):
                raise ValueError(value)
            return text
        if self.type == "str":
            if str(value) not in self.choices:
                raise ValueError(value)
            return str(value)
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(value)
        if self.type == "int":
            if number != int(number):
                raise ValueError(value)
            number = int(number)
            if self.multiple_of and number % self.multiple_of:
                raise ValueError(value)
        else:
            number = float(number)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise ValueError(value)
        return number


def _bound(value) -> str:
    if value is None:
        return "any"
    if float(value) == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _plain(value: Any) -> str:
    if value == "":
        return "(none)"
    if isinstance(value, (list, tuple)):
        return ",".join(_plain(v) for v in value) if value else "(none)"
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def _article(text: str) -> str:
    return text if text.startswith(("one of", "true")) else f"an {text}" if text[0] in "aeiou" else f"a {text}"


def Int(low, high, meaning="", cost=0.0, multiple_of=0) -> Key:  # noqa: N802 (reads as a type in the tables)
    return Key("int", low, high, meaning, cost=cost, multiple_of=multiple_of)


def Float(low, high, meaning="", cost=0.0) -> Key:  # noqa: N802
    return Key("float", low, high, meaning, cost=cost)


def Bool(meaning="") -> Key:  # noqa: N802
    return Key("bool", meaning=meaning)


def FilePath(meaning="") -> Key:  # noqa: N802
    """A file given on the command line (``--set key=FILE``); empty: none."""
    return Key("path", meaning=meaning)


def Choice(choices, meaning="") -> Key:  # noqa: N802
    return Key("str", meaning=meaning, choices=tuple(choices))


def Ints(low, high, meaning="", items=8, min_items=1, cost=0.0, multiple_of=0) -> Key:  # noqa: N802
    return Key("int", low, high, meaning, items=items, min_items=min_items, cost=cost, multiple_of=multiple_of)


def Floats(low, high, meaning="", items=8, min_items=1, cost=0.0) -> Key:  # noqa: N802
    return Key("float", low, high, meaning, items=items, min_items=min_items, cost=cost)


def Choices(choices, meaning="", min_items=1, cost=0.0) -> Key:  # noqa: N802
    return Key("str", meaning=meaning, choices=tuple(choices), items=len(choices), min_items=min_items, cost=cost)


@dataclass(frozen=True)
class ExperimentInfo:
    """One runnable miniature experiment.

    ``defaults`` are the documented knobs (``--set key=value`` may override each); ``keys``
    gives each one its :class:`Key` (type, accepted range, meaning, cost), checked before a
    run; ``quick`` overrides some of them for ``--quick`` (≤ 30 s on 2 cores). ``entry`` is
    ``"module:function"``, imported only when the experiment runs.
    """

    name: str
    family: str
    paper: str  # authors, venue, year
    claim: str  # the paper's claim in one line
    entry: str
    defaults: Mapping[str, Any]
    quick: Mapping[str, Any] = field(default_factory=dict)
    default_seeds: int = 3
    quick_seeds: int = 1
    processes_key: str = ""  # the config key holding the number of worker processes, if the run forks any
    tune_entry: str = ""  # "module:function" (config, progress) -> {"tuning", "defaults"}, if the arms are tuned
    paper_ids: Sequence[str] = ()  # "arXiv:NNNN.NNNNN" / "DOI:10.x/y": where to read the paper
    size_cut: str = ""  # what the default run cut from the paper's size (data, model, budget, seeds)
    packages: Sequence[str] = ()  # distributions whose versions go into results.json
    plot_caption: str = ""
    keys: Mapping[str, Key] = field(default_factory=dict)

    def __post_init__(self):
        missing, extra = set(self.defaults) - set(self.keys), set(self.keys) - set(self.defaults)
        if missing or extra:
            raise ValueError(f"catalogue experiment {self.name}: keys without a documented range "
                             f"{sorted(missing)}, ranges without a key {sorted(extra)}")
        for source in (self.defaults, self.quick):
            for key, value in source.items():
                self.keys[key].check(key, value)  # a default outside its own range is the author's error

    def processes(self, config: Mapping[str, Any]) -> int:
        """How many processes a run with ``config`` computes in at once (1 unless it forks workers)."""
        return max(1, int(config[self.processes_key])) if self.processes_key else 1

    def load(self) -> Callable[..., "ExperimentResult"]:
        return _load(self.entry)

    def load_tuner(self) -> Callable[..., dict]:
        if not self.tune_entry:
            raise CatalogueError(f"{self.name} has no tuning step (its arms have no hyperparameters tuned here)")
        return _load(self.tune_entry)


def _load(entry: str):
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass
class Goal:
    """A paper's claim turned into a check: ``value direction threshold``."""

    name: str
    value: float
    threshold: float
    direction: str  # one of DIRECTIONS
    description: str = ""
    reason: str = ""  # why it was missed, when it was (written beside MISSED)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"goal {self.name!r}: direction {self.direction!r} is not one of {sorted(DIRECTIONS)}")

    @property
    def passed(self) -> bool:
        value, threshold = float(self.value), float(self.threshold)
        return math.isfinite(value) and DIRECTIONS[self.direction](value, threshold)


@dataclass
class Series:
    """One arm's curve: ``x`` shared by the seeds, ``y`` one list per seed (drawn as mean and min–max band)."""

    x: Sequence[float]
    y: Sequence[Sequence[float]]


@dataclass
class Plot:
    """The figure a reader of the paper looks for; one or more panels of series."""

    panels: list[dict] = field(default_factory=list)  # {"title", "xlabel", "ylabel", "series": {arm: Series}, "logy"/"logx"}
    title: str = ""


@dataclass
class ExperimentResult:
    """What an experiment returns: per-seed metrics per arm, goals, a plot and notes for results.md."""

    per_seed: dict[str, dict[str, list[float]]]  # arm -> metric -> one value per seed
    goals: list[Goal] = field(default_factory=list)
    plot: Plot | None = None
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> extra JSON (e.g. curves)
    notes: list[str] = field(default_factory=list)  # lines for results.md (simulated clocks, reasons...)
    # {arm: {param: value}, "grid": {arm: {param: [values]}}, "seeds": [tuning seeds], "criterion": str}
    tuning: dict | None = None


def seed_means(per_seed: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, dict[str, Any]]:
    """``metrics`` for results.json: each metric's mean over seeds, the values themselves under ``per_seed``."""
    metrics: dict[str, dict[str, Any]] = {}
    for arm, values in per_seed.items():
        row: dict[str, Any] = {}
        for metric, seq in values.items():
            seq = [float(v) for v in seq]
            row[metric] = sum(seq) / len(seq) if seq else float("nan")
        row["per_seed"] = {metric: [float(v) for v in seq] for metric, seq in values.items()}
        metrics[arm] = row
    return metrics


def resolve_config(info: ExperimentInfo, quick: bool, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults, then ``quick`` overrides, then ``key=value`` overrides, each checked against its :class:`Key`
    (type and range) before anything runs: a bad one is a one-line CatalogueError naming the key, the value
    and the accepted range."""
    config = dict(info.defaults)
    if quick:
        config.update(info.quick)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CatalogueError(f"--set {item!r}: expected key=value")
        if key not in info.defaults:
            raise CatalogueError(
                f"--set {key}: unknown key for {info.name}; valid keys: {', '.join(sorted(info.defaults))}")
        config[key] = info.keys[key].parse(key, text, info.defaults[key])
    return config


def check_seeds(seeds: int, seed: int) -> list[int]:
    """The evaluation seeds ``seed .. seed+seeds-1``, or a one-line CatalogueError for a count or start out of range."""
    if not 1 <= seeds <= MAX_SEEDS:
        raise CatalogueError(f"--seeds {seeds}: takes 1..{MAX_SEEDS}")
    if not 0 <= seed <= MAX_SEED:
        raise CatalogueError(f"--seed {seed}: takes 0..{MAX_SEED}")
    return list(range(seed, seed + seeds))


def key_table(info: ExperimentInfo) -> list[dict[str, str]]:
    """Each ``--set`` key of ``info``: name, default, --quick value, accepted values, meaning (for help and show)."""
    rows = []
    for name, default in info.defaults.items():
        spec = info.keys[name]
        rows.append({"key": name, "default": _plain(default),
                     "quick": _plain(info.quick[name]) if name in info.quick else "",
                     "accepted": spec.describe(), "meaning": spec.meaning})
    return rows


def _versions(info: ExperimentInfo) -> dict[str, str]:
    names = ["asyncgen", "torch", "numpy", *info.packages]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _format(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        return f"{value:.4g}" if magnitude and (magnitude < 1e-2 or magnitude >= 1e5) else f"{value:.3f}"
    return str(value)


#: where the committed default runs live: docs/catalogue/NAME/results.{json,md,png} in a checkout (an
#: installed copy without the docs has none, and says "not measured")
COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "catalogue"

_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _revive(value: Any) -> Any:
    """Undo ``write_json``'s one change: non-finite floats are stored as the strings nan / inf / -inf."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return value


def report_from_json(text: str) -> dict:
    """A ``results.json``'s text as the report ``results_markdown`` renders (non-finite values restored)."""
    import json

    return _revive(json.loads(text))


def load_report(path: str | os.PathLike) -> dict:
    return report_from_json(Path(path).read_text())


def committed_report(name: str) -> dict | None:
    """The committed default run of experiment ``name`` (its ``results.json``), or None where there is none."""
    path = COMMITTED / name / "results.json"
    return load_report(path) if path.is_file() else None


def committed_tuning(name: str) -> dict | None:
    """The committed tuning run of experiment ``name`` (its ``tuning.json``), or None where there is none."""
    path = COMMITTED / name / "tuning.json"
    return load_report(path) if path.is_file() else None


def measured_seconds(name: str) -> tuple[float, float] | None:
    """(wall, CPU) seconds of the committed default run of ``name``, as that run measured them; None if none."""
    report = committed_report(name)
    if report is None or "cpu_seconds" not in report:  # none, or from before CPU time was recorded
        return None
    return float(report["wall_seconds"]), float(report["cpu_seconds"])


def results_markdown(report: dict) -> str:
    """``results.md`` from a report alone (what ``results.json`` holds), so the committed file can be re-rendered."""
    from asyncgen.evaluation.reporting import markdown_table

    metrics = report["metrics"]
    names: list[str] = []
    for row in metrics.values():
        names += [m for m, v in row.items() if m != "per_seed" and isinstance(v, (int, float)) and m not in names]
    rows = [{"arm": arm, **{m: _format(row[m]) if m in row else "" for m in names}} for arm, row in metrics.items()]
    lines = [
        f"# {report['experiment']}",
        "",
        f"{report['paper']}. Claim: {report['claim']}",
        "",
        f"Seeds {report['seeds']} (values are seed means), wall time {report['wall_seconds']:.1f} s "
        f"(CPU {report['cpu_seconds']:.1f} s in {report['processes']} process(es)), "
        f"config: `{', '.join(f'{k}={v}' for k, v in report['config'].items())}`.",
        "",
        markdown_table(rows, ["arm", *names]),
        "",
        "## Goals",
        "",
    ]
    for name, goal in report["goals"].items():
        verdict = "PASS" if goal["passed"] else "MISSED"
        line = f"- **{verdict}** {name}: {_format(goal['value'])} {goal['direction']} {_format(goal['threshold'])}"
        if goal.get("description"):
            line += f" ({goal['description']})"
        if not goal["passed"] and goal.get("reason"):
            line += f". Reason: {goal['reason']}"
        lines.append(line)
    if report.get("tuning"):
        lines += ["", "## Tuning", ""] + tuning_lines(report["tuning"])
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def describe(info: ExperimentInfo, width: int = 100) -> str:
    """``asyncgen catalogue show NAME``: paper, claim, seeds, every ``--set`` key (default, --quick value, accepted
    values, meaning), the committed default run's time, tuned values and goals; lines of at most ``width``."""
    import textwrap

    def wrapped(text: str, indent: str = "", first: str = "") -> list[str]:
        return textwrap.wrap(text, width, initial_indent=first or indent, subsequent_indent=indent) or [first]

    lines = [f"{info.name} ({info.family})"]
    lines += wrapped(info.paper, "  ", "paper: ")
    if info.paper_ids:
        lines += wrapped(", ".join(info.paper_ids), "  ", "ids: ")
    lines += wrapped(info.claim, "  ", "claim: ")
    if info.size_cut:
        lines += wrapped(info.size_cut, "  ", "cut from the paper's size: ")
    lines += wrapped(f"{info.default_seeds} by default, {info.quick_seeds} with --quick; evaluation seeds start at "
                     f"--seed (0), tuning seeds are >= 100", "  ", "seeds: ")
    report = committed_report(info.name)
    measured = measured_seconds(info.name)
    if measured is not None:
        lines += wrapped(f"{measured[0]:.1f} s wall, {measured[1]:.1f} s CPU in {report.get('processes', 1)} "
                         f"process(es) on seeds {report.get('seeds')}", "  ", "committed default run: ")
    lines += ["", "keys (--set KEY=VALUE, checked before the run; a list is comma-separated):"]
    for row in key_table(info):
        quick = f"  (--quick: {row['quick']})" if row["quick"] else ""
        lines += wrapped(f"{row['key']} = {row['default']}{quick}", "      ", "  ")
        lines += wrapped(f"{row['accepted']}" + (f"; {row['meaning']}" if row["meaning"] else ""), "      ")
    tuning = (report or {}).get("tuning") or (committed_tuning(info.name) or {}).get("tuning")
    if tuning:
        lines += ["", "tuned values (asyncgen catalogue tune):"]
        for line in tuning_lines(tuning):
            lines += wrapped(line[2:], "    ", "  - ")
    if report is not None and report.get("goals"):
        goals = report["goals"]
        lines += ["", f"goals of the committed run ({sum(g['passed'] for g in goals.values())}/{len(goals)} met):"]
        for name, goal in goals.items():
            lines += wrapped(f"{'PASS  ' if goal['passed'] else 'MISSED'} {name}: {_format(goal['value'])} "
                             f"{goal['direction']} {_format(goal['threshold'])}", "           ", "  ")
    return "\n".join(lines)


def catalogue_entry(info: ExperimentInfo) -> dict[str, Any]:
    """What ``asyncgen catalogue list --json`` says of ``info``: its description, every key (type, range, default,
    --quick value, meaning), its seeds, and the committed default run (times, goals met, each goal), or None."""
    keys = {}
    for name, default in info.defaults.items():
        spec = info.keys[name]
        keys[name] = {"type": f"list of {spec.type}" if spec.items else spec.type, "low": spec.low, "high": spec.high,
                      "choices": list(spec.choices) or None, "min_items": spec.min_items if spec.items else None,
                      "max_items": spec.items or None, "multiple_of": spec.multiple_of or None,
                      "accepted": spec.describe(), "default": default, "quick": info.quick.get(name),
                      "meaning": spec.meaning}
    report = committed_report(info.name)
    committed = None
    if report is not None:
        goals = report.get("goals", {})
        committed = {"wall_seconds": report.get("wall_seconds"), "cpu_seconds": report.get("cpu_seconds"),
                     "processes": report.get("processes", 1), "seeds": report.get("seeds"),
                     "goals_met": sum(bool(g["passed"]) for g in goals.values()), "goals_total": len(goals),
                     "goals": goals, "tuning": report.get("tuning")}
    from asyncgen.evaluation.reporting import _jsonable

    return _jsonable({"name": info.name, "family": info.family, "paper": info.paper,
                      "paper_ids": list(info.paper_ids), "size_cut": info.size_cut, "claim": info.claim,
                      "default_seeds": info.default_seeds, "quick_seeds": info.quick_seeds, "keys": keys,
                      "committed": committed})


TUNING_META = ("grid", "seeds", "criterion", "scores")


def tuning_lines(tuning: dict) -> list[str]:
    """results.md's tuning section: each arm's chosen values beside its grid, then the seeds and the criterion."""
    lines = []
    for arm, values in tuning.items():
        if arm in TUNING_META:
            continue
        grid = tuning.get("grid", {}).get(arm, {})
        lines.append(f"- {arm}: " + ", ".join(
            f"{param} = {_format_plain(value)}"
            + (f" (grid {', '.join(_format_plain(v) for v in grid[param])})" if param in grid else "")
            for param, value in values.items()))
    lines.append(f"- tuning seeds {tuning.get('seeds')} (evaluation seeds are never used); criterion: "
                 f"{tuning.get('criterion', 'n/a')}")
    return lines


def _format_plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_png(plot: Plot) -> bytes:
    """Seed means with a min–max band per arm, one axis per panel."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = plot.panels or [{}]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for arm, series in panel.get("series", {}).items():
            y = np.asarray(series.y, dtype=float).reshape(-1, len(series.x))
            mean = np.nanmean(y, axis=0)
            (line,) = axis.plot(series.x, mean, label=arm, lw=1.4)
            if y.shape[0] > 1:
                axis.fill_between(series.x, np.nanmin(y, axis=0), np.nanmax(y, axis=0), color=line.get_color(),
                                  alpha=0.18, lw=0)
        if panel.get("logy"):
            axis.set_yscale("log")
        if panel.get("logx"):
            axis.set_xscale("log")
        axis.set_title(panel.get("title", ""), fontsize=9)
        axis.set_xlabel(panel.get("xlabel", ""))
        axis.set_ylabel(panel.get("ylabel", ""))
        if panel.get("series"):
            axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    if plot.title:
        fig.suptitle(plot.title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


class Progress:
    """Progress over the experiment's units of work, on standard error: a tqdm bar (``mode="bar"``, for a
    terminal; shown once the run has taken a few seconds), a line every ``interval`` seconds (``"lines"``,
    for a long run whose standard error is a file or a pipe), or nothing (``"off"``; ``True``/``False`` mean
    ``"bar"``/``"off"``). Writing it can never fail the run: a closed or full standard error only stops it."""

    def __init__(self, total: int = 0, desc: str = "", enabled: bool | str = True, interval: float = 30.0):
        mode = {True: "bar", False: "off"}.get(enabled, enabled) if isinstance(enabled, bool) else enabled
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode {enabled!r}: expected bar, lines or off")
        self.mode, self.desc, self.total, self.done, self.interval = mode, desc, total, 0, interval
        self._start = self._last = time.monotonic()
        self._bar = self._stream = None
        if mode == "bar":
            self._guard(self._open_bar)

    def _open_bar(self):
        import sys

        from tqdm.auto import tqdm

        from asyncgen.cli.files import TolerantStream

        # tqdm must never see a failed write: it takes its process-wide lock around a write without a finally, so an
        # exception there leaves the lock held and every other thread's progress bar waits for it forever
        self._stream = sys.stderr if isinstance(sys.stderr, TolerantStream) else TolerantStream(sys.stderr)
        self._bar = tqdm(total=self.total, desc=self.desc, delay=3.0, leave=False, dynamic_ncols=True,
                         file=self._stream)

    def _guard(self, action) -> None:
        try:
            action()
        except (OSError, ValueError, AttributeError):  # closed (ValueError, or None) or failing standard error
            self.mode, self._bar = "off", None
        if self._bar is not None and self._stream.error is not None:  # the bar's writes failed (and were dropped)
            self.mode, self._bar = "off", None

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._guard(lambda: self._bar.reset(total=total))

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._guard(lambda: self._bar.update(n))
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last >= self.interval or (self.total and self.done >= self.total):
                self._last = now
                self._guard(lambda: self._line(now))

    def _line(self, now: float) -> None:
        import sys

        elapsed = now - self._start
        share = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f} %)" if self.total else f"{self.done}"
        left = ""
        if self.total and 0 < self.done < self.total:
            left = f", about {duration(elapsed * (self.total - self.done) / self.done)} left"
        print(f"{self.desc}: {share} done after {duration(elapsed)}{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._guard(self._bar.close)
            self._bar = None


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


#: a run expected to take longer than this (wall seconds) says so before it starts and shows its progress
LONG_SECONDS = 30.0


def expected_seconds(info: ExperimentInfo, config: Mapping[str, Any], seeds: int) -> tuple[float, float] | None:
    """(wall, CPU) seconds a run of ``info`` with ``config`` on ``seeds`` seeds is expected to take: the committed
    default run's measured CPU seconds scaled by the seeds and by each key's ``cost`` (value against the committed
    run's), wall time as CPU over the processes that compute at once. None where no run was measured."""
    report = committed_report(info.name)
    if report is None or "cpu_seconds" not in report:
        return None
    base = report.get("config", {})
    factor = seeds / max(1, len(report.get("seeds", ())) or 1)
    for key, spec in info.keys.items():
        if not spec.cost or key not in config:
            continue
        was, now = base.get(key, info.defaults[key]), config[key]
        if spec.items:
            was, now = len(was), len(now)
        try:
            ratio = float(now) / float(was)
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if ratio >= 0:
            factor *= ratio ** spec.cost
    cpu = float(report["cpu_seconds"]) * factor
    return cpu / max(1, min(info.processes(config), os.cpu_count() or 1)), cpu


def _backward_probe() -> bool:
    import torch

    x = torch.ones(1, requires_grad=True)
    (2 * x).sum().backward()
    return True


def _fork_can_backward() -> bool:
    """Whether a child forked from this process can run autograd: not once this process has run a backward
    itself (torch's autograd engine refuses in the child), which a library caller or a test may have done."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        try:
            return pool.submit(_backward_probe).result()
        except RuntimeError:
            return False


def map_in_processes(function, tasks, processes: int, progress: Progress):
    """``map(function, tasks)`` in ``processes`` worker processes (results in order), one progress tick each.

    Forked where a forked child can run autograd: the workers inherit the imported libraries
    instead of paying for them again. Spawned where it cannot (this process has run a backward
    already: torch refuses autograd in its forked children). ``function`` must be a
    module-level function. Either way the workers are this process's children, so their CPU
    time counts in the run's measured CPU seconds.
    """
    if processes <= 1:
        for task in tasks:
            yield function(task)
            progress.update()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if _fork_can_backward() else "spawn"
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method)) as pool:
        for out in pool.map(function, tasks):
            yield out
            progress.update()


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


RESULT_FILES = ("results.json", "results.md", "results.png")


def check_out(out: str | os.PathLike, files: Sequence[str]) -> list[Path]:
    """Fail before any work, in one line (``--out ...``), if ``out`` cannot receive ``files``: ``out`` or a parent
    is a file, a name is too long, the folder is not writable or has no room, a file is a folder."""
    from asyncgen.cli.files import check_output_paths

    paths = [Path(out) / name for name in files]
    try:
        return check_output_paths(paths, kind="file")
    except ValueError as exc:
        raise CatalogueError(f"--out {exc}") from None


@dataclass
class RunPlan:
    """A run checked before it starts: its configuration, seeds, output files and expected seconds."""

    info: ExperimentInfo
    config: dict[str, Any]
    seeds: list[int]
    out: Path | None
    expected: tuple[float, float] | None  # (wall, CPU) seconds; None if no run was measured

    @property
    def long(self) -> bool:
        return self.expected is not None and self.expected[0] > LONG_SECONDS

    def announcement(self) -> str:
        wall, cpu = self.expected
        return (f"{self.info.name}: this run is expected to take about {duration(wall)} ({duration(cpu)} of CPU; "
                f"the committed default run's measured time scaled by --seeds and --set); progress follows on "
                f"standard error")


def plan_run(info: ExperimentInfo, *, quick: bool = False, seeds: int | None = None, seed: int = 0,
             overrides: Sequence[str] = (), out: str | os.PathLike | None = None) -> RunPlan:
    """Everything a run checks before it starts (configuration and ranges, seeds, output paths): one-line
    CatalogueErrors, nothing written."""
    config = resolve_config(info, quick, overrides)
    count = seeds if seeds is not None else (info.quick_seeds if quick else info.default_seeds)
    seed_list = check_seeds(count, seed)
    if out is not None:
        check_out(out, RESULT_FILES)
    return RunPlan(info, config, seed_list, None if out is None else Path(out),
                   expected_seconds(info, config, len(seed_list)))


def run_experiment(info: ExperimentInfo, *, quick: bool = False, seeds: int | None = None, seed: int = 0,
                   overrides: Sequence[str] = (), out: str | os.PathLike | None = None,
                   progress: bool | str = True, plan: RunPlan | None = None) -> dict:
    """Run ``info`` on seeds ``seed .. seed+seeds-1``; write the three files into ``out`` (if given); the report.

    The configuration, the seeds and ``out`` are checked before the run (:func:`plan_run`); the three files are
    written together after it, whole or none (an OutputError, one line with the path and the errno, if that fails).
    ``progress``: ``"bar"``/True, ``"lines"`` or ``"off"``/False (see :class:`Progress`).
    """
    if plan is None:
        plan = plan_run(info, quick=quick, seeds=seeds, seed=seed, overrides=overrides, out=out)
    config, seed_list = plan.config, plan.seeds
    run = info.load()
    bar = Progress(desc=info.name, enabled=progress)
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    try:
        result: ExperimentResult = run(dict(config), seed_list, bar)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    metrics = seed_means(result.per_seed)
    for arm, extra in result.extra.items():
        metrics.setdefault(arm, {}).update(extra)
    report = {
        "experiment": info.name,
        "paper": info.paper,
        "claim": info.claim,
        "config": config,
        "seeds": seed_list,
        "versions": _versions(info),
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # this process and its finished children: on a shared machine wall time inflates
        "processes": info.processes(config),  # computing at once; idle-machine wall time is about cpu / processes
        "metrics": metrics,
        "goals": {g.name: {"value": float(g.value), "threshold": float(g.threshold), "direction": g.direction,
                           "passed": g.passed, "description": g.description, "reason": g.reason}
                  for g in result.goals},
        "notes": list(result.notes),
    }
    if result.tuning is not None:
        report["tuning"] = result.tuning
    if plan.out is not None:
        write_results(plan.out, report, result.plot)
    return report


def write_results(out: str | os.PathLike, report: dict, plot: Plot | None) -> list[Path]:
    """``results.json``, ``results.md`` (rendered from what results.json holds, so it can be re-rendered from the
    file alone) and ``results.png`` (if there is a plot), written together: all whole, or none changed."""
    from asyncgen.cli.files import write_all
    from asyncgen.evaluation.reporting import json_text

    out = Path(out)
    text = json_text(report)
    files = {out / "results.json": text, out / "results.md": results_markdown(report_from_json(text))}
    if plot is not None:
        files[out / "results.png"] = plot_png(plot)
    return write_all(files)


def render_markdown(folder: str | os.PathLike) -> Path:
    """Rewrite ``folder/results.md`` from ``folder/results.json`` (after a change to the results.md layout)."""
    from asyncgen.cli.files import write_all

    folder = Path(folder)
    text = results_markdown(load_report(folder / "results.json"))
    return write_all({folder / "results.md": text})[0]


def run_tuning(info: ExperimentInfo, *, quick: bool = False, overrides: Sequence[str] = (),
               out: str | os.PathLike | None = None, progress: bool | str = True) -> dict:
    """Run ``info``'s tuning step (on its tuning seeds, >= 100) and write ``tuning.json`` into ``out`` (if given).

    The report holds the chosen values per arm, the grids, the tuning seeds and each grid value's score, and
    ``defaults``: the config keys to commit as the experiment's defaults. The configuration and ``out`` are
    checked before the tuning runs.
    """
    from asyncgen.cli.files import write_all
    from asyncgen.evaluation.reporting import json_text

    config = resolve_config(info, quick, overrides)
    tuner = info.load_tuner()
    if out is not None:
        check_out(out, ["tuning.json"])
    bar = Progress(desc=f"tune {info.name}", enabled=progress)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    try:
        result = tuner(dict(config), bar)
    finally:
        bar.close()
    report = {"experiment": info.name, "config": config, "versions": _versions(info),
              "wall_seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu_start,
              "tuning": result["tuning"], "defaults": result["defaults"]}
    if out is not None:
        write_all({Path(out) / "tuning.json": json_text(report)})
    return report
