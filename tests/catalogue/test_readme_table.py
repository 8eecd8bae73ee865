"""README.md's catalogue table is generated from the committed results (issue 24 §4): the text between its
``<!-- catalogue-table -->`` markers must equal what ``asyncgen catalogue render --readme`` renders from every
committed ``docs/catalogue/NAME/results.json``, so a hand edit of the table, or a results.json committed without
re-rendering the README, fails here."""

import pytest
from asyncgen.catalogue import experiments
from asyncgen.catalogue import table as table_module
from asyncgen.catalogue.frame import CatalogueError, ExperimentInfo, committed_report
from asyncgen.catalogue.table import (
    MARK_BEGIN,
    MARK_END,
    README,
    readme_table,
    render_table,
    result_cells,
    write_readme,
)
from asyncgen.cli.main import main


def test_readme_table_is_rendered_from_the_committed_results():
    assert README.is_file(), f"{README}: no README.md in this checkout"
    expected = render_table()
    assert readme_table(README.read_text(encoding="utf-8")) == expected, (
        "README.md's catalogue table differs from the committed docs/catalogue/*/results.json: edited by hand, or a "
        "results.json was committed without re-rendering; run 'asyncgen catalogue render --readme'")


def test_every_experiment_has_a_row_in_list_order_with_its_goals_met():
    rows = [line for line in render_table().splitlines() if line.startswith(("| [`", "| `"))]
    names = [row.split("`")[1] for row in rows]
    assert names == list(experiments())
    for name, row in zip(names, rows):
        goals = committed_report(name)["goals"]
        met = sum(g["passed"] for g in goals.values())
        assert row.endswith(f" | {met}/{len(goals)} |"), row
        assert row.count("**MISSED**") == len(goals) - met, row
        assert experiments()[name].paper.replace("|", "\\|") in row


INFO = ExperimentInfo(name="toy", family="optim", paper="Doe, Roe, ICML 2031", claim="waiting is | optional",
                      entry="nowhere:run", defaults={}, keys={})

REPORT = {
    "experiment": "toy", "seeds": [0, 1, 2],
    "metrics": {"async": {"loss": 2.0, "steps": 10.0, "per_seed": {"loss": [1.0, 2.0, 3.0], "steps": [10, 10, 10]}},
                "sync": {"loss": 4.0, "per_seed": {"loss": [4.0, 4.0, 4.0]}}},
    "goals": {
        "async_loss": {"value": 2.0, "threshold": 2.5, "direction": "<=", "passed": True,
                       "description": "async final loss", "reason": "it diverged"},
        "loss_vs_sync": {"value": 0.5, "threshold": 0.4, "direction": "<", "passed": False,
                         "description": "async / sync final loss", "reason": "the delay was too long; see the notes"},
        "async steps": {"value": 10.0, "threshold": 20.0, "direction": ">=", "passed": False, "description": "",
                        "reason": "the delay was too long; more words here"},
        "no_value": {"value": float("nan"), "threshold": 0.0, "direction": ">", "passed": False,
                     "description": "", "reason": ""},
    },
}


def test_synthetic_results_render_as_expected():
    result, met = result_cells(REPORT)
    assert met == "1/4"
    assert result.split("<br>") == [
        "3 seeds:",
        "async final loss: 2 (1–3 over 3 seeds) ≤ 2.5",  # the seed mean of async's loss: its min–max follows
        "async / sync final loss: 0.5 < 0.4 **MISSED** (the delay was too long)",  # a ratio: no per-seed values
        "async steps: 10 ≥ 20 **MISSED** (the reason above)",  # constant over the seeds: no range
        "no_value: NaN > 0 **MISSED**",
    ]
    assert render_table({"toy": INFO}, {"toy": REPORT}).splitlines()[:3] == [
        "| name | paper | claim | our miniature result (committed default run) | goals met |",
        "|---|---|---|---|---|",
        f"| [`toy`](docs/catalogue/toy/results.md) | Doe, Roe, ICML 2031 | waiting is \\| optional | {result} | 1/4 |",
    ]
    assert render_table({"toy": INFO}, {"toy": None}).splitlines()[2] == (
        "| `toy` | Doe, Roe, ICML 2031 | waiting is \\| optional | no committed default run | — |")


def test_tuned_hyperparameters_are_named_with_their_seeds():
    report = {**REPORT, "tuning": {"async": {"eta_g": 3.0}, "sync": {"eta_g": 1.0, "lr": 0.1}, "grid": {},
                                   "seeds": [100, 101], "criterion": "mean accuracy"}}
    assert result_cells(report)[0].split("<br>")[0] == "3 seeds; eta_g, lr tuned per arm on seeds 100, 101:"


def test_shared_descriptions_and_reasons_are_written_once():
    report = {"seeds": [0], "metrics": {}, "goals": {
        name: {"value": 1.0, "threshold": 0.0, "direction": "<=", "passed": False, "description": "shared words",
               "reason": "x" * 300} for name in ("first", "second")}}
    lines = result_cells(report)[0].split("<br>")
    assert lines[0] == "1 seed:"
    assert lines[1].startswith("first (shared words): 1 ≤ 0 **MISSED** (xxx") and lines[1].endswith("…)")
    assert len(lines[1]) < 200
    assert lines[2] == "second: 1 ≤ 0 **MISSED** (the reason above)"


def test_render_readme_rewrites_only_between_the_markers(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{MARK_BEGIN}\nold hand table\n{MARK_END}\n\nafter\n", encoding="utf-8")
    monkeypatch.setattr(table_module, "README", readme)
    assert main(["catalogue", "render", "--readme"]) == 0
    assert "(the catalogue table)" in capsys.readouterr().out
    assert readme.read_text(encoding="utf-8") == (
        f"# title\n\nbefore\n\n{MARK_BEGIN}\n{render_table()}\n{MARK_END}\n\nafter\n")
    assert write_readme(readme) == readme  # again: unchanged
    assert readme_table(readme.read_text(encoding="utf-8")) == render_table()


def test_render_readme_refuses_before_writing(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n", encoding="utf-8")
    monkeypatch.setattr(table_module, "README", readme)
    assert main(["catalogue", "render", "--readme"]) == 2
    assert "expected one <!-- catalogue-table --> line" in capsys.readouterr().err
    assert readme.read_text(encoding="utf-8") == "# no markers\n"
    monkeypatch.setattr(table_module, "README", tmp_path / "missing.md")
    assert main(["catalogue", "render", "--readme"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["catalogue", "render"]) == 2
    assert "give folders holding a results.json, or --readme" in capsys.readouterr().err
    with pytest.raises(CatalogueError):
        readme_table(f"{MARK_END}\n{MARK_BEGIN}\n")
