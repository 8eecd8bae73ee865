"""The async-online-dpo miniature: the gold reward is the issue's formula, the proxy is trained on pairs of the
SFT policy's own samples, tuning sees only tuning seeds and picks its grid's best, bad sizes are refused. (Its
quick run, the three files and identical metrics for the same seed: test_quick_runs.py.)"""

import json
import warnings

import pytest
import torch

from asyncgen.catalogue import get_experiment
from asyncgen.catalogue.frame import run_experiment, run_tuning
from asyncgen.catalogue.rlhf import sorting_task
from asyncgen.catalogue.rlhf.tiny import char_tokenizer

warnings.filterwarnings("ignore")
# the smallest run that still goes through every step (SFT, proxy, both methods, evaluation)
TINY = ["off_policy_steps=1", "updates=2", "sft_steps=5", "reward_pairs=40", "accuracy_prompts=16",
        "eval_prompts=8"]


def test_gold_reward_is_the_issue_formula():
    assert sorting_task.gold_reward("31415926=", "11234569") == 1.0
    assert sorting_task.gold_reward("31415926=", "1123456") == 7 / 8 - 0.5 * 1 / 8
    assert sorting_task.gold_reward("31415926=", "9999999999") == 1 / 8 - 0.5 * 2 / 8


def test_too_few_updates_for_the_largest_n():
    with pytest.raises(ValueError, match=r"updates=2: needs at least max\(off_policy_steps\)=4"):
        run_experiment(get_experiment("async-online-dpo"), quick=True, overrides=["updates=2"], progress=False)


def test_sampled_pairs_are_the_policys_own_samples_gold_ordered():
    tokenizer = char_tokenizer()
    policy = sorting_task.train_sft_policy(tokenizer, n_embd=32, steps=5, batch=8, lr=3e-3, corruption=0.5, seed=0)
    pairs = sorting_task.sampled_pairs(policy, tokenizer, 24, 0.9, seed=3, batch=10)
    prompts = sorting_task.make_prompts(24, torch.Generator().manual_seed(3))
    assert 0 < len(pairs) <= 24
    # the first batch's first samples, drawn again with the same sampling seed: every pair holds one of them
    first, _ = sorting_task.sample(policy, tokenizer, prompts[:10], 0.9, 3 * 7919)
    again = {p: c for p, c in zip(prompts[:10], first)}
    for prompt, better, worse in pairs:
        assert prompt in prompts
        assert sorting_task.gold_reward(prompt, better) > sorting_task.gold_reward(prompt, worse)  # no ties kept
        if prompt in again:
            assert again[prompt] in (better, worse)


def test_tuning_sees_only_tuning_seeds_and_picks_the_grids_best(monkeypatch, tmp_path):
    from asyncgen.catalogue.rlhf import experiments as ex

    seen, real = [], ex._train

    def recording(method, n, policy_dir, reward, tokenizer, config, seed, lr, beta, mode="sync"):
        seen.append((method, n, seed, lr, beta))
        return real(method, n, policy_dir, reward, tokenizer, config, seed, lr, beta, mode)

    monkeypatch.setattr(ex, "_train", recording)
    info = get_experiment("async-online-dpo")
    report = run_tuning(info, quick=True, overrides=[*TINY, "lr_grid=1e-4,1e-3", "beta_grid=0.1"], out=tmp_path,
                        progress=False)
    tuning = report["tuning"]
    assert {seed for _, _, seed, _, _ in seen} == {100} == set(tuning["seeds"])
    grid = {"lr": [1e-4, 1e-3], "beta": [0.1]}
    for method in ("online-dpo", "rloo"):
        assert tuning["grid"][method] == grid  # the same budget for every arm
        assert sorted((lr, b) for m, n, _, lr, b in seen if m == method) == [(1e-4, 0.1), (1e-3, 0.1)]
        assert all(n == 1 for m, n, *_ in seen)  # tuned synchronously (N = 1)
        scores = tuning["scores"][method]
        assert list(scores) == ["lr=0.0001,beta=0.1", "lr=0.001,beta=0.1"]
        best = max(v["score"] for v in scores.values())
        first_best = next(label for label, v in scores.items() if v["score"] == best)  # ties: the earlier point
        assert f"lr={tuning[method]['lr']:g},beta={tuning[method]['beta']:g}" == first_best
        # every grid point's KL is kept beside its win-rate (one tuning seed: the means are that seed's), and a run
        # over the KL budget scores win-rate - 1
        for point in scores.values():
            over = point["kl"] > report["config"]["kl_budget"]
            assert point["score"] == point["win_rate"] - (1.0 if over else 0.0)
        key = method.replace("-", "_")
        assert report["defaults"][f"lr_{key}"] == tuning[method]["lr"]
        assert report["defaults"][f"beta_{key}"] == tuning[method]["beta"]
    assert json.loads((tmp_path / "tuning.json").read_text())["defaults"] == report["defaults"]

    # an evaluation run uses each arm's own values, records them under tuning, and sees only evaluation seeds
    seen.clear()
    values = ["lr_online_dpo=2e-4", "beta_online_dpo=0.05", "lr_rloo=3e-4", "beta_rloo=0.2"]
    run = run_experiment(info, quick=True, overrides=[*TINY, *values], progress=False)
    assert {seed for _, _, seed, _, _ in seen} == {0}
    assert {(m, lr, b) for m, _, _, lr, b in seen} == {("online-dpo", 2e-4, 0.05), ("rloo", 3e-4, 0.2)}
    assert run["tuning"]["online-dpo"] == {"lr": 2e-4, "beta": 0.05} and run["tuning"]["seeds"] == [100]
    with pytest.raises(Exception, match=r"tune_seeds"):
        run_tuning(info, quick=True, overrides=["tune_seeds=7"], progress=False)
