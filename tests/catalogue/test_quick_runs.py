"""Every experiment's ``--quick`` run, as ``asyncgen catalogue run NAME --quick`` makes it, within 30 s of CPU
(issue 24, §4): measured here, once per experiment, and the same runs feed the other checks of this file (the
three files, the re-rendered results.md, ``compare``), so the 13 runs cost about 25 s of CPU in all."""

import json
import math
import resource

import pytest

from asyncgen.catalogue import experiments, get_experiment
from asyncgen.catalogue.frame import load_report, resolve_config, results_markdown, run_experiment

QUICK_CPU_SECONDS = 30.0
NAMES = list(experiments())


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """NAME -> (report, out folder, CPU seconds of the whole call: the family's imports, the run, the files)."""
    runs = {}

    def run(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            start = cpu_seconds()
            report = run_experiment(get_experiment(name), quick=True, out=out, progress=False)
            runs[name] = report, out, cpu_seconds() - start
        return runs[name]

    return run


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_within_30_cpu_seconds_and_whole(quick_runs, name):
    report, out, cpu = quick_runs(name)
    info = get_experiment(name)
    assert report["cpu_seconds"] <= QUICK_CPU_SECONDS and cpu <= QUICK_CPU_SECONDS, (report["cpu_seconds"], cpu)
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]
    saved = load_report(out / "results.json")
    assert (out / "results.md").read_text() == results_markdown(saved)
    assert saved["config"] == json.loads(json.dumps(resolve_config(info, quick=True)))
    assert saved["seeds"] == list(range(info.quick_seeds))
    assert saved["goals"], "a run checks its paper's claims"
    for arm, row in saved["metrics"].items():
        for metric, values in row["per_seed"].items():
            assert len(values) == info.quick_seeds, (arm, metric)


def deterministic(metrics):
    # repr, so that NaN (written to JSON as "nan") compares equal to itself; wall-clock *_measured metrics aside
    return {arm: {k: v if isinstance(v, str) else repr(float(v)) for k, v in row.items()
                  if "measured" not in k and k != "per_seed"} for arm, row in metrics.items()}


def test_async_online_dpo_quick_repeats_exactly(quick_runs):
    first, out, _ = quick_runs("async-online-dpo")
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["metrics"]) == {"online-dpo", "rloo"}
    assert {"win_rate_n1", "win_rate_n4", "kl_n4", "updates_per_s_async_measured"} <= set(
        saved["metrics"]["online-dpo"])
    second = run_experiment(get_experiment("async-online-dpo"), quick=True, progress=False)
    assert deterministic(second["metrics"]) == deterministic(first["metrics"])


def test_leo_pacing_quick_arms_and_goals(quick_runs):
    report, out, _ = quick_runs("leo-pacing")
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert set(metrics) == {"fixed-200", "fixed-2000", "fixed-4000", "adaptive-oracle", "adaptive-predicted"}
    assert {"bitrate", "freezes_per_min", "p95_delay_ms", "bitrate_stable", "freezes_per_min_stable",
            "p95_delay_ms_stable"} <= set(metrics["adaptive-predicted"])
    assert len(report["goals"]) == 7


def test_compare_overlays_two_quick_runs(quick_runs, tmp_path, capsys):
    """``compare`` on a quick run and a second one of the same experiment with another --set value."""
    from asyncgen.cli.main import main

    _, first, _ = quick_runs("idhb")
    second = tmp_path / "noisy"
    assert main(["catalogue", "run", "idhb", "--quick", "--set", "noise=0.01", "--out", str(second)]) == 0
    capsys.readouterr()
    assert main(["catalogue", "compare", str(first), str(second), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "noise" in out and "0.002" in out and "0.01" in out  # the setting that differs, per run
    assert "eid_cost_vs_rerun" in out  # a goal, one column per run
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("| eid_cost_vs_rerun |") == 1
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["experiment"] == "idhb" and data["differs"] == {"noise": [0.002, 0.01]}
    assert all(math.isfinite(v) for v in data["goals"]["eid_cost_vs_rerun"]["values"])
