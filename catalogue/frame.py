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


@dataclass(frozen=True)
class ExperimentInfo:
    """One runnable miniature experiment.

    ``defaults`` are the documented knobs (``--set key=value`` may override each; the
    value's type is the default's type); ``quick`` overrides some of them for
    ``--quick`` (≤ 30 s on 2 cores). ``entry`` is ``"module:function"``, imported only
    when the experiment runs.
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
    packages: Sequence[str] = ()  # distributions whose versions go into results.json
    plot_caption: str = ""

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


def _parse_value(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise CatalogueError(f"--set {key}={text}: expected true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise CatalogueError(f"--set {key}={text}: expected an integer") from None
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise CatalogueError(f"--set {key}={text}: expected a number") from None
        if not math.isfinite(value):
            raise CatalogueError(f"--set {key}={text}: expected a finite number")
        return value
    if isinstance(default, (list, tuple)):
        try:
            value = ast.literal_eval(text) if text.strip().startswith(("[", "(")) else [
                ast.literal_eval(p) if p.strip() else p for p in text.split(",")]
        except (ValueError, SyntaxError):
            value = [p.strip() for p in text.split(",")]
        return type(default)(value if isinstance(value, (list, tuple)) else [value])
    return text


def resolve_config(info: ExperimentInfo, quick: bool, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults, then ``quick`` overrides, then ``key=value`` overrides (typed like the default)."""
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
        config[key] = _parse_value(key, text, info.defaults[key])
    return config


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
    """A tqdm bar over the experiment's units of work, shown only when the run takes more than a few seconds."""

    def __init__(self, total: int = 0, desc: str = "", enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, disable=not enabled, delay=3.0, leave=False, dynamic_ncols=True)

    def set_total(self, total: int) -> None:
        self._bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def map_in_processes(function, tasks, processes: int, progress: Progress):
    """``map(function, tasks)`` in ``processes`` forked workers (results in order), one progress tick each.

    Forked, not spawned: the workers inherit the imported libraries instead of paying for
    them again; ``function`` must be a module-level function.
    """
    if processes <= 1:
        for task in tasks:
            yield function(task)
            progress.update()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        for out in pool.map(function, tasks):
            yield out
            progress.update()


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_experiment(info: ExperimentInfo, *, quick: bool = False, seeds: int | None = None, seed: int = 0,
                   overrides: Sequence[str] = (), out: str | os.PathLike | None = None,
                   progress: bool = True) -> dict:
    """Run ``info`` on seeds ``seed .. seed+seeds-1``; write the three files into ``out`` (if given); the report."""
    from asyncgen.evaluation.reporting import write_atomic, write_json

    config = resolve_config(info, quick, overrides)
    count = seeds if seeds is not None else (info.quick_seeds if quick else info.default_seeds)
    if count < 1:
        raise CatalogueError(f"--seeds {count}: need at least 1")
    if seed < 0:
        raise CatalogueError(f"--seed {seed}: need a seed >= 0")
    seed_list = list(range(seed, seed + count))
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
    if out is not None:
        out = Path(out)
        path = write_json(out / "results.json", report)
        # results.md is rendered from what results.json holds, so it can be re-rendered from the file alone
        write_atomic(out / "results.md", results_markdown(load_report(path)))
        if result.plot is not None:
            write_atomic(out / "results.png", plot_png(result.plot))
    return report


def render_markdown(folder: str | os.PathLike) -> Path:
    """Rewrite ``folder/results.md`` from ``folder/results.json`` (after a change to the results.md layout)."""
    from asyncgen.evaluation.reporting import write_atomic

    folder = Path(folder)
    return write_atomic(folder / "results.md", results_markdown(load_report(folder / "results.json")))


def run_tuning(info: ExperimentInfo, *, quick: bool = False, overrides: Sequence[str] = (),
               out: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Run ``info``'s tuning step (on its tuning seeds, >= 100) and write ``tuning.json`` into ``out`` (if given).

    The report holds the chosen values per arm, the grids, the tuning seeds and each grid value's score, and
    ``defaults``: the config keys to commit as the experiment's defaults.
    """
    from asyncgen.evaluation.reporting import write_json

    config = resolve_config(info, quick, overrides)
    tuner = info.load_tuner()
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
        write_json(Path(out) / "tuning.json", report)
    return report
