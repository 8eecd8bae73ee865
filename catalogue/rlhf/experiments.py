"""The ``async-online-dpo`` miniature (Noukhovitch et al., ICLR 2025): online DPO vs RLOO as the
off-policyness N grows, and asynchronous vs synchronous generation throughput, on the 8-digit sorting
task of :mod:`.sorting_task` (tiny GPT-2 SFT policy, proxy reward model trained on the SFT policy's own
samples, gold judge)."""

from __future__ import annotations

import os
import tempfile
import time
import warnings

from asyncgen.catalogue.frame import CatalogueError, ExperimentResult, Goal, Plot, Series, require_extra
from asyncgen.catalogue.tuning import check_tune_seeds, grid_search

require_extra("rlhf", "trl", "transformers", "datasets")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402
from trl import RLOOConfig  # noqa: E402
from trl.experimental.online_dpo import OnlineDPOConfig  # noqa: E402

from . import sorting_task as task  # noqa: E402
from .async_online_dpo import AsyncOnlineDPOTrainer  # noqa: E402
from .stale_rloo import StaleRLOOTrainer  # noqa: E402
from .tiny import char_tokenizer  # noqa: E402

METHODS = ("online-dpo", "rloo")
TUNING_CRITERION = ("gold win-rate against SFT samples at N=1 on the tuning seeds' own evaluation prompts, a run "
                    "whose KL(pi || pi_SFT) exceeds kl_budget scored win-rate - 1 (below every run within the "
                    "budget); mean over the tuning seeds; ties go to the earlier grid point (smaller lr, then "
                    "smaller beta)")


def arm_hyperparameters(config: dict, method: str) -> tuple[float, float]:
    """(lr, beta) of ``method`` in ``config`` (keys lr_METHOD, beta_METHOD; hyphens as underscores)."""
    key = method.replace("-", "_")
    return float(config[f"lr_{key}"]), float(config[f"beta_{key}"])


def _common(config: dict, lr: float, seed: int, output_dir: str) -> dict:
    return dict(output_dir=output_dir, max_steps=config["updates"], learning_rate=lr,
                lr_scheduler_type="constant", temperature=config["temperature"], logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, seed=seed, disable_tqdm=True, bf16=False)


def _train(method: str, n: int, policy_dir: str, reward, tokenizer, config: dict, seed: int, lr: float, beta: float,
           mode: str = "sync"):
    """One RL run from the SFT policy; returns (trained policy, measured seconds of train(), the trainer)."""
    prompts = config["prompts_per_update"]
    data = task.make_prompts(prompts * config["updates"], torch.Generator().manual_seed(10_000 + seed))
    dataset = Dataset.from_dict({"prompt": data})
    policy = GPT2LMHeadModel.from_pretrained(policy_dir)
    if method == "online-dpo":
        args = OnlineDPOConfig(per_device_train_batch_size=prompts, max_new_tokens=task.DIGITS + 1,
                               beta=[beta], **_common(config, lr, seed, policy_dir + "/out"))
        trainer = AsyncOnlineDPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=dataset,
                                        processing_class=tokenizer, off_policy_steps=n, mode=mode)
    else:  # RLOO, k = 2: each prompt appears twice in a mini-batch
        args = RLOOConfig(per_device_train_batch_size=2 * prompts, num_generations=2,
                          max_completion_length=task.DIGITS + 1, beta=beta, disable_dropout=True,
                          shuffle_dataset=True, **_common(config, lr, seed, policy_dir + "/out"))
        trainer = StaleRLOOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=dataset,
                                   processing_class=tokenizer, off_policy_steps=n)
    start = time.perf_counter()
    trainer.train()
    return trainer.model.eval(), time.perf_counter() - start, trainer


def _sft(tokenizer, config: dict, seed: int, n_embd: int, folder: str):
    sft = task.train_sft_policy(tokenizer, n_embd=n_embd, steps=config["sft_steps"], batch=64, lr=config["sft_lr"],
                                corruption=0.5, seed=seed)
    path = os.path.join(folder, f"sft{n_embd}")
    sft.save_pretrained(path)  # trl's RLOO builds its reference model from the policy's path; the reward starts here
    return sft, path


def _proxy_reward(tokenizer, config: dict, sft, sft_path: str, seed: int):
    """The proxy reward trained on pairs of the SFT policy's samples (gold-ordered), and its held-out pair
    accuracy on fresh SFT samples (other prompts, other sampling seeds)."""
    pairs = task.sampled_pairs(sft, tokenizer, config["reward_pairs"], config["temperature"], seed)
    held = task.sampled_pairs(sft, tokenizer, config["accuracy_prompts"], config["temperature"], 1_000_000 + seed)
    reward = task.train_proxy_reward(tokenizer, sft_path, pairs, epochs=config["reward_epochs"], batch=64,
                                     lr=config["reward_lr"], seed=seed)
    return reward, task.pair_accuracy(reward, held)


def _eval_prompts(config: dict, seed: int) -> list[str]:
    # per seed: a tuning seed (>= 100) never sees an evaluation seed's prompts
    return task.make_prompts(config["eval_prompts"], torch.Generator().manual_seed(123_456 + seed))


def _check_config(config: dict) -> None:
    ns = [int(n) for n in config["off_policy_steps"]]
    if config["updates"] < max(ns):
        raise ValueError(f"updates={config['updates']}: needs at least max(off_policy_steps)={max(ns)}")
    for key in ("lr_grid", "beta_grid"):
        if not config[key]:
            raise CatalogueError(f"{key}=[]: give at least one value")
    check_tune_seeds(config["tune_seeds"])


# ----------------------------------------------------------------------------- tuning
def _tuning_grid(config: dict) -> dict:
    return {"lr": sorted(float(v) for v in config["lr_grid"]), "beta": sorted(float(v) for v in config["beta_grid"])}


def tuning_record(config: dict) -> dict:
    """What results.json records under ``tuning``: the values each arm ran with, its grid, the tuning seeds."""
    record = {m: dict(zip(("lr", "beta"), arm_hyperparameters(config, m))) for m in METHODS}
    grid = _tuning_grid(config)
    return {**record, "grid": {m: grid for m in METHODS}, "seeds": check_tune_seeds(config["tune_seeds"]),
            "criterion": TUNING_CRITERION}


def tune_async_online_dpo(config: dict, progress) -> dict:
    """``asyncgen catalogue tune async-online-dpo``: online DPO and RLOO each search the same lr x beta grid at
    N=1 on the same tuning seeds (>= 100; each seed its own SFT policy, proxy reward, training and evaluation
    prompts), scored by gold win-rate within the KL budget (``TUNING_CRITERION``)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    _check_config(config)
    tokenizer = char_tokenizer()
    folder = tempfile.mkdtemp(prefix="asyncgen_rlhf_tune_")
    prepared: dict[int, tuple] = {}
    runs: dict[tuple, list] = {}  # (arm, grid point) -> its evaluation on each tuning seed

    def score(method: str, params: dict, seed: int) -> float:
        if seed not in prepared:
            sft, path = _sft(tokenizer, config, seed, config["n_embd"], os.path.join(folder, str(seed)))
            reward, _ = _proxy_reward(tokenizer, config, sft, path, seed)
            prepared[seed] = (sft, path, reward)
        sft, path, reward = prepared[seed]
        policy, _, _ = _train(method, 1, path, reward, tokenizer, config, seed, params["lr"], params["beta"])
        scores = task.evaluate(policy, sft, tokenizer, _eval_prompts(config, seed), config["temperature"], seed)
        runs.setdefault((method, f"lr={params['lr']:g},beta={params['beta']:g}"), []).append(scores)
        within = scores["kl"] <= config["kl_budget"]
        return scores["win_rate"] if within else scores["win_rate"] - 1.0

    try:
        tuning = grid_search(METHODS, _tuning_grid(config), config["tune_seeds"], score, TUNING_CRITERION, progress)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    # each grid point's score with the mean win-rate and KL it came from (the KL beside every win-rate)
    tuning["scores"] = {m: {label: {"score": score, **{k: sum(r[k] for r in runs[m, label]) / len(runs[m, label])
                                                       for k in ("win_rate", "kl")}}
                            for label, score in tuning["scores"][m].items()} for m in METHODS}
    defaults = {f"{param}_{m.replace('-', '_')}": tuning[m][param] for m in METHODS for param in ("lr", "beta")}
    return {"tuning": tuning, "defaults": defaults}


# ----------------------------------------------------------------------------- the run
def run_async_online_dpo(config: dict, seeds: list[int], progress) -> ExperimentResult:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    _check_config(config)
    ns = [int(n) for n in config["off_policy_steps"]]
    sizes = [int(e) for e in config["size_embds"]]
    tokenizer = char_tokenizer()
    runs_per_seed = len(METHODS) * len(ns) + 2 + len(sizes)
    progress.set_total(len(seeds) * (runs_per_seed + 1))
    per_seed: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    temperature = config["temperature"]
    loads = []

    def record(arm, metric, value):
        per_seed[arm].setdefault(metric, []).append(float(value))

    for seed in seeds:
        eval_prompts = _eval_prompts(config, seed)
        with tempfile.TemporaryDirectory(prefix="asyncgen_rlhf_") as folder:
            sft, sft_path = _sft(tokenizer, config, seed, config["n_embd"], folder)
            reward, accuracy = _proxy_reward(tokenizer, config, sft, sft_path, seed)
            base = task.evaluate(sft, sft, tokenizer, eval_prompts, temperature, seed)
            for arm in METHODS:
                record(arm, "proxy_accuracy_sft", accuracy)
                record(arm, "gold_sft", base["gold"])
            progress.update()
            for method in METHODS:
                lr, beta = arm_hyperparameters(config, method)
                for n in ns:
                    policy, _, trainer = _train(method, n, sft_path, reward, tokenizer, config, seed, lr, beta)
                    scores = task.evaluate(policy, sft, tokenizer, eval_prompts, temperature, seed)
                    record(method, f"win_rate_n{n}", scores["win_rate"])
                    record(method, f"kl_n{n}", scores["kl"])
                    record(method, f"gold_n{n}", scores["gold"])
                    # is the proxy still right where this policy samples? (pairs of its own samples, gold-ordered)
                    own = task.sampled_pairs(policy, tokenizer, config["accuracy_prompts"], temperature,
                                             2_000_000 + seed)
                    record(method, f"proxy_accuracy_policy_n{n}", task.pair_accuracy(reward, own))
                    if method == "online-dpo" and n == ns[0]:
                        rounds = [r for r in trainer.round_seconds if r[1] == r[1]]  # learning measured (not NaN)
                        generate = sum(r[0] for r in rounds) / len(rounds)
                        learn = sum(r[1] for r in rounds) / len(rounds)
                        record(method, "generate_s_per_round_measured", generate)
                        record(method, "learn_s_per_round_measured", learn)
                        record(method, "generate_learn_ratio_measured", generate / learn)
                    progress.update()
            # throughput at N = 1: sync generates then learns; async overlaps the next round's generation
            lr, beta = arm_hyperparameters(config, "online-dpo")
            for mode in ("sync", "async"):
                loads.append(os.getloadavg()[0])
                policy, seconds, _ = _train("online-dpo", 1, sft_path, reward, tokenizer, config, seed, lr, beta,
                                            mode=mode)
                record("online-dpo", f"updates_per_s_{mode}_measured", config["updates"] / seconds)
                if mode == "async":
                    scores = task.evaluate(policy, sft, tokenizer, eval_prompts, temperature, seed)
                    record("online-dpo", "win_rate_async_n1", scores["win_rate"])
                    record("online-dpo", "kl_async_n1", scores["kl"])
                progress.update()
            speedup = (per_seed["online-dpo"]["updates_per_s_async_measured"][-1]
                       / per_seed["online-dpo"]["updates_per_s_sync_measured"][-1])
            record("online-dpo", "async_speedup_measured", speedup)
            record("online-dpo", "load_1min_at_timing_measured", max(loads[-2:]))
            for n_embd in sizes:  # report only: robustness against policy size at the largest N
                small_sft, small_path = _sft(tokenizer, config, seed, n_embd, folder)
                policy, _, _ = _train("online-dpo", ns[-1], small_path, reward, tokenizer, config, seed, lr, beta)
                scores = task.evaluate(policy, small_sft, tokenizer, eval_prompts, temperature, seed)
                record("online-dpo", f"win_rate_n{ns[-1]}_embd{n_embd}", scores["win_rate"])
                record("online-dpo", f"kl_n{ns[-1]}_embd{n_embd}", scores["kl"])
                progress.update()

    def mean(values):
        return sum(values) / len(values)

    dpo = per_seed["online-dpo"]
    n_max = ns[-1]
    # the fraction of the sync gain kept is only defined when there is a gain (win-rate above 1/2); otherwise
    # NaN, which the frame reports as MISSED (a ratio of two losses would "pass" vacuously). Per seed in the
    # table; the goal divides the seed means
    for method in METHODS:
        per_seed[method][f"gain_kept_n{n_max}"] = [
            (win_n - 0.5) / (win_1 - 0.5) if win_1 > 0.5 else float("nan")
            for win_1, win_n in zip(per_seed[method][f"win_rate_n{ns[0]}"], per_seed[method][f"win_rate_n{n_max}"])]
    gains = {m: mean(per_seed[m][f"win_rate_n{ns[0]}"]) - 0.5 for m in METHODS}
    kept = {m: (mean(per_seed[m][f"win_rate_n{n_max}"]) - 0.5) / gains[m] if gains[m] > 0 else float("nan")
            for m in METHODS}
    ratio = mean(dpo["generate_learn_ratio_measured"])
    load = max(loads)
    goals = [
        Goal("sync online-DPO win-rate", mean(dpo[f"win_rate_n{ns[0]}"]), 0.70, ">=",
             f"online DPO at N={ns[0]} vs SFT samples, gold judge, ties 1/2 (KL beside it: kl_n{ns[0]})",
             reason=f"the policy gains {mean(dpo[f'gold_n{ns[0]}']) - mean(dpo['gold_sft']):+.3f} gold over SFT at "
                    f"KL {mean(dpo[f'kl_n{ns[0]}']):.2f} nats in {config['updates']} updates at the tuned lr; the "
                    f"proxy ranks SFT pairs at {mean(dpo['proxy_accuracy_sft']):.2f} and the final policy's at "
                    f"{mean(dpo[f'proxy_accuracy_policy_n{ns[0]}']):.2f}"),
        Goal(f"online-DPO gain kept at N={n_max}", kept["online-dpo"], 0.80, ">=",
             f"(win_N{n_max} - 0.5) / (win_N{ns[0]} - 0.5), seed means, equal updates",
             reason="undefined (NaN) when synchronous online DPO has no gain over SFT (win-rate <= 0.5); otherwise "
                    f"stale samples cost it the gain (KL at N={n_max}: kl_n{n_max})"),
        Goal(f"RLOO keeps less than online DPO at N={n_max}", kept["online-dpo"] - kept["rloo"], 0.0, ">",
             "gain kept by online DPO minus gain kept by RLOO (RLOO with the clipped ratio to the generating policy)",
             reason="undefined (NaN) when either method has no synchronous gain over SFT (win-rate <= 0.5); "
                    "otherwise RLOO kept at least as much"),
        Goal("async / sync updates per second", mean(dpo["updates_per_s_async_measured"])
             / mean(dpo["updates_per_s_sync_measured"]), 1.25, ">=",
             f"online DPO, N=1, measured wall clock, generation worker and learner one thread each; generation / "
             f"learning per round {ratio:.2f} (generate_learn_ratio_measured)",
             reason=f"timed on a shared machine (1-minute load up to {load:.1f} on 2 cores while timing): the worker "
                    "and the learner did not each have a core, so the overlap cannot show; to be measured idle"
                    if load >= 1.5 else
                    f"generation costs {ratio:.2f} of learning per round, so overlapping it can save at most "
                    f"{min(ratio, 1.0) / (1 + ratio):.0%} of a round"),
    ]
    x = [float(n) for n in ns]
    plot = Plot(title="async-online-dpo: win-rate against SFT vs off-policyness N", panels=[
        {"title": "gold win-rate vs SFT", "xlabel": "N (off-policy steps)", "ylabel": "win-rate", "logx": True,
         "series": {m: Series(x, [list(v) for v in zip(*[per_seed[m][f"win_rate_n{n}"] for n in ns])])
                    for m in METHODS}},
        {"title": "KL(pi || pi_SFT) per sequence", "xlabel": "N (off-policy steps)", "ylabel": "KL (nats)",
         "logx": True,
         "series": {m: Series(x, [list(v) for v in zip(*[per_seed[m][f"kl_n{n}"] for n in ns])]) for m in METHODS}},
    ])
    (lr_dpo, beta_dpo), (lr_rloo, beta_rloo) = (arm_hyperparameters(config, m) for m in METHODS)
    notes = [
        f"Sized for 2 CPU cores: {config['updates']} updates x {config['prompts_per_update']} prompts per arm "
        f"(the issue: 200 x 16), SFT {config['sft_steps']} steps, policy n_embd={config['n_embd']}, temperature "
        f"{temperature}, AdamW (weight decay 0, constant lr). Tuned on seeds {config['tune_seeds']} (never an "
        f"evaluation seed): online DPO lr {lr_dpo:g}, beta {beta_dpo:g}; RLOO lr {lr_rloo:g}, beta {beta_rloo:g} "
        f"(grid lr {_tuning_grid(config)['lr']} x beta {_tuning_grid(config)['beta']}, KL budget "
        f"{config['kl_budget']:g} nats; tuning.json has every grid point's win-rate and KL).",
        f"Proxy reward: the SFT policy's GPT-2 with a per-token scalar head summed over the completion, trained "
        f"(Bradley-Terry, {config['reward_epochs']} epochs, lr {config['reward_lr']:g}) on pairs of SFT samples of "
        f"{config['reward_pairs']} prompts ordered by the gold reward (ties dropped); proxy_accuracy_sft is its "
        f"held-out pair accuracy on fresh SFT samples, proxy_accuracy_policy_nN on samples of the final policy.",
        "RLOO is trl's RLOOTrainer (k=2) with completions pre-generated in rounds and scored with the generating "
        "policy's log-probs, so its loss carries the clipped ratio pi_theta/pi_generator (epsilon 0.2) and the KL "
        "penalty in the reward is the generating policy's.",
        "generate_s_per_round / learn_s_per_round: online DPO at N=1, sync, measured per round (generation of the "
        "2 completions per prompt vs the learner's step on them: log-probs, reference, proxy reward, backward, "
        "optimizer).",
        "*_measured metrics are wall-clock measurements on this (shared) machine and vary run to run; every "
        "other metric is identical for the same seed.",
    ]
    if sizes:
        notes.append(f"win_rate_n{n_max}_embd*: report-only policy-size arm (online DPO at N={n_max}, own SFT of that "
                     f"size, the {config['n_embd']}-wide proxy reward).")
    return ExperimentResult(per_seed=per_seed, goals=goals, plot=plot, notes=notes, tuning=tuning_record(config))
