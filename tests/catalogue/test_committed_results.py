"""The committed default runs under docs/catalogue/: written only by the code, and the run times they measured.

Each ``results.md`` must equal what ``results_markdown`` renders from the ``results.json`` beside it, so a hand
edit (or a results.md from before a fix) fails here; ``asyncgen catalogue render DIR`` rewrites one from its
json after a change to the layout, ``asyncgen catalogue run NAME --out docs/catalogue/NAME`` regenerates both.
"""

import json
import math

import pytest

from asyncgen.catalogue import experiments
from asyncgen.catalogue.frame import (COMMITTED, committed_report, committed_tuning, load_report, measured_seconds,
                                      render_markdown, resolve_config, results_markdown)

RESULT_FOLDERS = sorted(p.parent for p in COMMITTED.rglob("results.md"))


def test_every_results_md_has_its_json():
    assert RESULT_FOLDERS, f"no committed results under {COMMITTED}"
    missing = [str(f.relative_to(COMMITTED)) for f in RESULT_FOLDERS if not (f / "results.json").is_file()]
    assert not missing, f"results.md without the results.json it was rendered from: {missing}"


@pytest.mark.parametrize("folder", RESULT_FOLDERS, ids=[str(f.relative_to(COMMITTED)) for f in RESULT_FOLDERS])
def test_committed_results_md_renders_from_its_json(folder):
    if not (folder / "results.json").is_file():
        pytest.fail(f"{folder}: no results.json")
    rendered = results_markdown(load_report(folder / "results.json"))
    assert (folder / "results.md").read_text() == rendered, (
        f"{folder}/results.md differs from its results.json's rendering: edited by hand or left from an older run; "
        f"regenerate it with 'asyncgen catalogue run' (or 'asyncgen catalogue render' after a layout change)")


@pytest.mark.parametrize("name", list(experiments()))
def test_every_experiment_has_a_committed_default_run_within_budget(name):
    info = experiments()[name]
    report = committed_report(name)
    assert report is not None, f"docs/catalogue/{name}/results.json: no committed default run"
    # the committed run is the default run: every documented default, the default evaluation seeds
    defaults = json.loads(json.dumps(resolve_config(info, quick=False)))
    assert report["config"] == defaults, f"{name}: the committed run's config is not today's defaults"
    assert report["seeds"] == list(range(info.default_seeds))
    assert set(report["goals"]) and all(isinstance(g["passed"], bool) for g in report["goals"].values())
    # the frame's budget, on what the run measured: 5 minutes of 2 cores. CPU seconds, not wall seconds: the
    # committed runs share their 2 cores with other work, which stretches wall time but not CPU time; a run
    # forking k worker processes has min(k, 2) cores' worth of CPU per wall second
    wall, cpu = measured_seconds(name)
    assert math.isfinite(wall) and 0 < cpu
    assert cpu / min(2, report["processes"]) <= 300, f"{name}: {cpu:.0f} s of CPU in {report['processes']} process(es)"


@pytest.mark.parametrize("name", [name for name, info in experiments().items() if info.tune_entry])
def test_tuned_defaults_come_from_the_committed_tuning_run(name):
    info = experiments()[name]
    tuning = committed_tuning(name)
    assert tuning is not None, f"docs/catalogue/{name}/tuning.json: no committed tuning run ('asyncgen catalogue tune')"
    assert tuning["tuning"]["seeds"] and all(s >= 100 for s in tuning["tuning"]["seeds"])
    for key, value in tuning["defaults"].items():
        assert info.defaults[key] == value, f"{name}: default {key}={info.defaults[key]!r}, tuned {value!r}"
    # tuned with today's defaults for everything else
    tuned = set(tuning["defaults"])
    defaults = json.loads(json.dumps(resolve_config(info, quick=False)))
    assert {k: v for k, v in tuning["config"].items() if k not in tuned} == \
        {k: v for k, v in defaults.items() if k not in tuned}
    report = committed_report(name)
    assert report is not None and {a: v for a, v in report["tuning"].items() if a not in ("grid", "seeds", "criterion")} \
        == {a: v for a, v in tuning["tuning"].items() if a not in ("grid", "seeds", "criterion", "scores")}


def test_render_rewrites_results_md_from_json(tmp_path):
    source = RESULT_FOLDERS[0]
    (tmp_path / "results.json").write_text((source / "results.json").read_text())
    (tmp_path / "results.md").write_text("edited by hand\n")
    render_markdown(tmp_path)
    assert (tmp_path / "results.md").read_text() == (source / "results.md").read_text()
