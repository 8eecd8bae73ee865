"""The async-online-dpo miniature: the gold reward is the issue's formula, bad sizes are refused. (Its quick run,
the three files and identical metrics for the same seed: test_quick_runs.py.)"""

import pytest

from asyncgen.catalogue import get_experiment
from asyncgen.catalogue.frame import run_experiment
from asyncgen.catalogue.rlhf import sorting_task


def test_gold_reward_is_the_issue_formula():
    assert sorting_task.gold_reward("31415926=", "11234569") == 1.0
    assert sorting_task.gold_reward("31415926=", "1123456") == 7 / 8 - 0.5 * 1 / 8
    assert sorting_task.gold_reward("31415926=", "9999999999") == 1 / 8 - 0.5 * 2 / 8


def test_too_few_updates_for_the_largest_n():
    with pytest.raises(ValueError, match=r"updates=2: needs at least max\(off_policy_steps\)=4"):
        run_experiment(get_experiment("async-online-dpo"), quick=True, overrides=["updates=2"], progress=False)
