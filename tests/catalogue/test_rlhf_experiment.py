"""The async-online-dpo miniature: the command writes its three files, the same seed gives identical metrics
(wall-clock *_measured metrics aside), the gold reward is the issue's formula, bad sizes are refused."""

import json

import pytest

from asyncgen.catalogue import get_experiment
from asyncgen.catalogue.frame import run_experiment
from asyncgen.catalogue.rlhf import sorting_task


def deterministic(metrics):
    # repr, so that NaN (written to JSON as "nan") compares equal to itself
    return {arm: {k: v if isinstance(v, str) else repr(float(v)) for k, v in row.items()
                  if "measured" not in k and k != "per_seed"} for arm, row in metrics.items()}


def test_quick_run_writes_three_files_and_repeats_exactly(tmp_path, capsys):
    from asyncgen.cli.main import main

    assert main(["catalogue", "run", "async-online-dpo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "results.png"]
    first = json.loads((tmp_path / "results.json").read_text())
    assert set(first["metrics"]) == {"online-dpo", "rloo"}
    assert {"win_rate_n1", "win_rate_n4", "kl_n4", "updates_per_s_async_measured"} <= set(
        first["metrics"]["online-dpo"])
    second = run_experiment(get_experiment("async-online-dpo"), quick=True, progress=False)
    assert deterministic(second["metrics"]) == deterministic(first["metrics"])


def test_gold_reward_is_the_issue_formula():
    assert sorting_task.gold_reward("31415926=", "11234569") == 1.0
    assert sorting_task.gold_reward("31415926=", "1123456") == 7 / 8 - 0.5 * 1 / 8
    assert sorting_task.gold_reward("31415926=", "9999999999") == 1 / 8 - 0.5 * 2 / 8


def test_too_few_updates_for_the_largest_n():
    with pytest.raises(ValueError, match=r"updates=2: needs at least max\(off_policy_steps\)=4"):
        run_experiment(get_experiment("async-online-dpo"), quick=True, overrides=["updates=2"], progress=False)
