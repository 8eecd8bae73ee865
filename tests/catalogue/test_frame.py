"""The catalogue frame: configuration, goals, the three result files, the command."""

import json
import math

import pytest

from asyncgen.catalogue import experiments
from asyncgen.catalogue.frame import (Bool, CatalogueError, Choice, ExperimentInfo, ExperimentResult, Float, Goal,
                                      Ints, MissingExtra, Plot, Series, load_report, require_extra, resolve_config,
                                      results_markdown, run_experiment, seed_means)


def toy_experiment(config, seeds, progress):
    """A deterministic experiment: arm 'a' scores seed * scale, arm 'b' the square."""
    progress.set_total(len(seeds))
    per_seed = {"a": {"score": []}, "b": {"score": []}}
    for s in seeds:
        per_seed["a"]["score"].append(s * config["scale"])
        per_seed["b"]["score"].append(float(s * s))
        progress.update()
    curve = Series(x=[0, 1, 2], y=[[s, s + 1, s + 2] for s in seeds])
    mean_a = sum(per_seed["a"]["score"]) / len(seeds)
    return ExperimentResult(per_seed=per_seed, goals=[Goal("a_small", mean_a, 1.0, "<=", "a stays small",
                                                           reason="scale too large")],
                            plot=Plot(panels=[{"title": "t", "xlabel": "x", "ylabel": "y", "series": {"a": curve}}]),
                            notes=["toy"])


TOY = ExperimentInfo(name="toy", family="test", paper="Nobody, Nowhere 2026", claim="a is small",
                     entry=f"{__name__}:toy_experiment", defaults={"scale": 1.0, "label": "x", "flag": False,
                                                                   "sizes": [1, 2]},
                     quick={"scale": 0.5},
                     keys={"scale": Float(0.0, 10.0, "a's factor"), "label": Choice(("x", "y"), "a label"),
                           "flag": Bool("a flag"), "sizes": Ints(1, 9, "sizes", items=3)})


def test_config_defaults_quick_and_overrides():
    assert resolve_config(TOY, quick=False) == {"scale": 1.0, "label": "x", "flag": False, "sizes": [1, 2]}
    assert resolve_config(TOY, quick=True)["scale"] == 0.5
    config = resolve_config(TOY, quick=True, overrides=["scale=3", "flag=true", "label=y", "sizes=4,5"])
    assert config == {"scale": 3.0, "label": "y", "flag": True, "sizes": [4, 5]}
    with pytest.raises(CatalogueError, match=r"unknown key for toy; valid keys: flag, label, scale, sizes"):
        resolve_config(TOY, quick=False, overrides=["scal=1"])
    with pytest.raises(CatalogueError, match=r"^--set scale=nan: not accepted; scale takes a float in 0..10 "
                                             r"\(default 1\)$"):
        resolve_config(TOY, quick=False, overrides=["scale=nan"])
    with pytest.raises(CatalogueError, match="expected key=value"):
        resolve_config(TOY, quick=False, overrides=["scale"])


def test_goals_and_seed_means():
    assert Goal("g", 0.5, 1.0, "<=").passed and not Goal("g", 1.5, 1.0, "<=").passed
    assert Goal("g", 2.0, 1.0, ">").passed and not Goal("g", float("nan"), 1.0, ">").passed
    with pytest.raises(ValueError, match="direction"):
        Goal("g", 1, 1, "==")
    means = seed_means({"a": {"m": [1.0, 2.0, 6.0]}})
    assert means == {"a": {"m": 3.0, "per_seed": {"m": [1.0, 2.0, 6.0]}}}


def test_run_writes_three_files_and_is_reproducible(tmp_path):
    report = run_experiment(TOY, seeds=3, seed=1, out=tmp_path / "r", progress=False)
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(saved) >= {"experiment", "paper", "config", "seeds", "versions", "wall_seconds", "cpu_seconds", "metrics",
                          "goals"}
    assert 0 <= saved["cpu_seconds"]
    assert saved["seeds"] == [1, 2, 3]
    assert saved["metrics"]["a"]["score"] == 2.0 and saved["metrics"]["b"]["per_seed"]["score"] == [1.0, 4.0, 9.0]
    assert saved["goals"]["a_small"] == {"value": 2.0, "threshold": 1.0, "direction": "<=", "passed": False,
                                         "description": "a stays small", "reason": "scale too large"}
    assert saved["claim"] == "a is small" and saved["processes"] == 1
    md = (tmp_path / "r" / "results.md").read_text()
    assert md == results_markdown(load_report(tmp_path / "r" / "results.json"))
    assert "MISSED" in md and "scale too large" in md and "| a |" in md
    assert (tmp_path / "r" / "results.png").read_bytes()[:4] == b"\x89PNG"
    again = run_experiment(TOY, seeds=3, seed=1, progress=False)
    assert again["metrics"] == report["metrics"]
    assert not math.isnan(report["wall_seconds"])


def test_missing_extra_is_one_line():
    require_extra("hpo", "json")
    with pytest.raises(MissingExtra, match=r"^asyncgen.catalogue.hpo needs optional packages: "
                                           r"pip install 'asyncgen\[hpo\]' \(missing: no_such_module_x\)$"):
        require_extra("hpo", "no_such_module_x")


def test_every_listed_experiment_is_complete():
    for name, info in experiments().items():
        assert info.name == name and info.paper and info.claim  # run times: test_committed_results
        module, _, function = info.entry.partition(":")
        assert module.startswith(f"asyncgen.catalogue.{info.family}.") and function
        assert set(info.quick) <= set(info.defaults)


def test_command_list_and_errors(capsys):
    from asyncgen.cli.main import main

    assert main(["catalogue", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "family", "goals", "CPU", "s", "claim"]
    assert len(lines) == len(experiments()) + 2 and max(len(line) for line in lines) <= 100  # fits 100 columns
    assert any(line.startswith("idhb ") and " 10/10 " in line for line in lines)  # goals met, committed run
    assert main(["catalogue", "run", "no-such-experiment"]) == 2
    assert "unknown experiment 'no-such-experiment'; known:" in capsys.readouterr().err


def test_workers_are_spawned_where_a_forked_child_could_not_run_autograd(monkeypatch):
    # torch refuses autograd in a child forked from a process whose autograd engine has started its threads (a
    # full test run hit this once, by the order files ran in one worker): then the workers are spawned instead,
    # with the same results in the same order
    import multiprocessing

    from asyncgen.catalogue import frame

    used, real = [], multiprocessing.get_context

    def recording(method=None):
        used.append(method)
        return real(method)

    class Ticks:
        count = 0

        def update(self):
            Ticks.count += 1

    monkeypatch.setattr(multiprocessing, "get_context", recording)
    monkeypatch.setattr(frame, "_fork_can_backward", lambda: False)
    assert list(frame.map_in_processes(math.sqrt, [1.0, 4.0, 9.0], 2, Ticks())) == [1.0, 2.0, 3.0]
    assert used == ["spawn"] and Ticks.count == 3
    used.clear()
    monkeypatch.setattr(frame, "_fork_can_backward", lambda: True)
    assert list(frame.map_in_processes(math.sqrt, [16.0], 2, Ticks())) == [4.0]
    assert used == ["fork"]
