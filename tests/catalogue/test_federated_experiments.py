"""The federated experiments through the catalogue frame: files, reproducibility, bad --set input."""

import json

import pytest

from asyncgen.catalogue import experiments, get_experiment
from asyncgen.catalogue.frame import CatalogueError, run_experiment

FEDERATED = ["fedbuff", "favano", "fedfix", "fedcompass", "fedast"]
# smaller than --quick so that the family's tests stay well under 90 s on a shared 2-core machine
TINY = {"fedbuff": ["rounds=2", "N=60", "concurrencies=5,20"], "favano": ["rounds=2", "N=20", "s=5"],
        "fedfix": ["rounds=3"], "fedcompass": ["rounds=1", "N=6", "Qmax=10"],
        "fedast": ["rounds=1", "N=60", "R=12", "g=2"]}


def test_listed_with_quick_overrides():
    listed = experiments()
    for name in FEDERATED:
        info = listed[name]
        assert info.family == "federated" and info.quick  # run times: the committed runs' (test_committed_results)


@pytest.mark.parametrize("name", FEDERATED)
def test_run_writes_three_files(name, tmp_path):
    report = run_experiment(get_experiment(name), quick=True, overrides=TINY[name], out=tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == report["seeds"] == [0]
    for arm, row in saved["metrics"].items():
        assert {"time_to_target", "transfers_to_target", "final_accuracy", "per_seed"} <= set(row), arm
        assert len(row["curves"]["accuracy"]) == 1
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Goals" in (tmp_path / "results.md").read_text()
    if get_experiment(name).tune_entry:  # the η_g each arm ran with, beside its grid and the tuning seeds
        tuning = saved["tuning"]
        arms = [a for a in tuning if a not in ("grid", "seeds", "criterion")]
        assert set(arms) <= set(saved["metrics"]) and all(s >= 100 for s in tuning["seeds"])
        assert len({len(tuning["grid"][a]["eta_g"]) for a in arms}) == 1  # the same grid size for every arm
        assert "## Tuning" in (tmp_path / "results.md").read_text()


def test_tuning_sees_only_tuning_seeds_and_picks_each_grid_best(monkeypatch, tmp_path):
    from federated_tuning import assert_each_arm_took_its_grid_best, tune_quick

    from asyncgen.catalogue.frame import run_tuning

    report = tune_quick(monkeypatch, tmp_path, "fedfix", ["rounds=3"])
    tuning = report["tuning"]
    references = {"fedavg": 1.0, "fedfix": 1.0, "fedfix_dt0.2": 1.0, "fedfix_dt0.8": 1.0, "async": 1.0,
                  "fedbuff": 20 / 5}  # M / fedbuff_K
    arms = assert_each_arm_took_its_grid_best(tuning, references)
    assert arms == ["fedavg", "fedfix", "fedfix_dt0.2", "fedfix_dt0.8", "async", "fedbuff"]
    assert report["defaults"] == {"eta_g_fedavg": tuning["fedavg"]["eta_g"], "eta_g_async": tuning["async"]["eta_g"],
                                  "eta_g_fedbuff": tuning["fedbuff"]["eta_g"],
                                  "eta_g_fedfix": [tuning[a]["eta_g"] for a in arms[1:4]]}
    assert json.loads((tmp_path / "tuning.json").read_text())["defaults"] == report["defaults"]
    with pytest.raises(CatalogueError, match=r"^--set tune_seeds=3: not accepted; tune_seeds takes a list of 1-16 "
                                             r"values, each int in 100..1e6 \(default 100,101\)$"):
        run_tuning(get_experiment("fedfix"), quick=True, overrides=["rounds=3", "tune_seeds=3"], progress=False)


def test_same_seed_same_metrics_other_seed_other_curves():
    info = get_experiment("fedfix")
    first = run_experiment(info, quick=True, overrides=TINY["fedfix"], progress=False)
    again = run_experiment(info, quick=True, overrides=TINY["fedfix"], progress=False)
    other = run_experiment(info, quick=True, seed=1, overrides=TINY["fedfix"], progress=False)
    assert json.dumps(first["metrics"], sort_keys=True) == json.dumps(again["metrics"], sort_keys=True)  # NaN-safe
    assert first["metrics"]["fedfix"]["curves"] != other["metrics"]["fedfix"]["curves"]


def test_bad_set_keys_and_values():
    with pytest.raises(CatalogueError, match="unknown key for fedbuff; valid keys: B, K, N"):
        run_experiment(get_experiment("fedbuff"), quick=True, overrides=["bogus=1"], progress=False)
    with pytest.raises(CatalogueError, match="C=20: cannot exceed the number of clients N=10"):
        run_experiment(get_experiment("fedbuff"), quick=True, overrides=["N=10", "concurrencies=5,20"],
                       progress=False)
    with pytest.raises(CatalogueError, match="s=60"):
        run_experiment(get_experiment("favano"), quick=True, overrides=["s=60"], progress=False)
    with pytest.raises(CatalogueError, match=r"M=0: not accepted; M takes an int in 1..3"):
        run_experiment(get_experiment("fedast"), quick=True, overrides=["M=0"], progress=False)
    with pytest.raises(CatalogueError, match="R=8: must be >= g·M"):
        run_experiment(get_experiment("fedast"), quick=True, overrides=["R=8"], progress=False)
