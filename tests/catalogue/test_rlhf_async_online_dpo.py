"""AsyncOnlineDPOTrainer against trl's OnlineDPOTrainer: N = 1 sync is the stock trainer, N = 4 lags the
generator by 0..3 updates, async overlaps with one round of extra lag, a crashing worker stops training
with its traceback, bad inputs are clear ValueErrors."""

import warnings

import pytest
import torch
from datasets import Dataset
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from asyncgen.catalogue.rlhf.async_online_dpo import AsyncOnlineDPOTrainer
from asyncgen.catalogue.rlhf.tiny import char_tokenizer, tiny_policy

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
TOKENIZER = char_tokenizer()


def prompts(count=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ["".join(str(d) for d in torch.randint(0, 10, (8,), generator=g).tolist()) + "=" for _ in range(count)]


def count_fives(prompts, completions, **kwargs):
    return [sum(c == "5" for c in completion) / 8.0 for completion in completions]


def make(cls, steps=5, reward=count_fives, data=None, max_new_tokens=9, **kwargs):
    args = OnlineDPOConfig(output_dir="/tmp/asyncgen_dpo_test", per_device_train_batch_size=4, max_steps=steps,
                           learning_rate=1e-3, max_new_tokens=max_new_tokens, logging_steps=1, report_to=[],
                           save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    dataset = Dataset.from_dict({"prompt": data or prompts()})
    # the smallest GPT-2 that still exercises generation, reference log-probs and the DPO loss
    return cls(model=tiny_policy(TOKENIZER, seed=0, n_embd=32, n_layer=1), reward_funcs=reward, args=args,
               train_dataset=dataset,
               processing_class=TOKENIZER, **kwargs)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_n1_sync_is_the_stock_trainer():
    stock = make(OnlineDPOTrainer)
    stock.train()
    ours = make(AsyncOnlineDPOTrainer, off_policy_steps=1, mode="sync")
    ours.train()
    assert losses(ours) == losses(stock) and len(losses(stock)) == 5
    for a, b in zip(stock.model.parameters(), ours.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)  # the tolerance; measured difference is 0.0
    assert ours.generation_log == [(step, step) for step in range(5)]


def test_n4_generator_lags_0_to_3_updates():
    trainer = make(AsyncOnlineDPOTrainer, steps=8, off_policy_steps=4)
    trainer.train()
    assert trainer.generation_log == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 4), (5, 4), (6, 4), (7, 4)]
    assert [step - version for step, version in trainer.generation_log] == [0, 1, 2, 3] * 2


def test_sync_rounds_are_timed_generation_then_learning():
    trainer = make(AsyncOnlineDPOTrainer, steps=6, off_policy_steps=2)
    trainer.train()
    # one split per round of 2 updates, each part measured (wall clock, so only its sign is known); sync never waits
    assert len(trainer.round_timings) == 3
    assert all(r.prompts > 0 and r.generate > 0 and r.learn > 0 and r.handover > 0 and r.wait == 0
               for r in trainer.round_timings)


def test_async_generates_next_round_with_previous_weights():
    trainer = make(AsyncOnlineDPOTrainer, steps=6, off_policy_steps=2, mode="async", worker_timeout=120)
    trainer.train()
    # round 0 and 1 from theta_0 (round 1 generated while round 0 trains), round 2 from theta_2
    assert trainer.generation_log == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 2), (5, 2)]
    assert trainer._worker is None  # stopped after training
    # every round split on the learner's clock (learning, hand-over, waiting) and timed by the worker (generation)
    assert len(trainer.round_timings) == 3
    assert all(r.prompts > 0 and r.generate > 0 and r.learn > 0 and r.handover > 0 and r.wait >= 0
               for r in trainer.round_timings)


def test_async_hand_over_is_the_learners_weights_in_the_shared_generator():
    trainer = make(AsyncOnlineDPOTrainer, steps=4, off_policy_steps=1, mode="async", worker_timeout=120)
    trainer.train()
    learner = trainer.model.state_dict()
    generator = trainer.generator_model.state_dict()
    # the last hand-over (before the last round) left theta_3 in the generator; the learner took one more step
    assert all(t.is_shared() for t in generator.values())  # the worker's copy is this one (shared memory)
    assert any(not torch.equal(generator[k], learner[k]) for k in learner)
    trainer._hand_over()
    assert all(torch.equal(generator[k], learner[k]) for k in learner)  # a copy_, exact


def test_async_worker_crash_surfaces_traceback():
    trainer = make(AsyncOnlineDPOTrainer, steps=4, off_policy_steps=1, mode="async", worker_timeout=120)

    def broken_forward(*args, **kwargs):
        raise ArithmeticError("generator exploded on purpose")

    trainer.generator_model.forward = broken_forward  # the forked worker inherits the broken copy
    with pytest.raises(RuntimeError, match=r"(?s)generation worker failed:.*Traceback.*generator exploded on purpose"):
        trainer.train()
    assert trainer._worker is None and trainer.state.global_step == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"off_policy_steps=0: must be an integer >= 1"):
        make(AsyncOnlineDPOTrainer, off_policy_steps=0)
    with pytest.raises(ValueError, match=r"mode='later': accepted modes are sync, async"):
        make(AsyncOnlineDPOTrainer, mode="later")
    with pytest.raises(ValueError, match=r"exceed the model's n_positions=64"):
        make(AsyncOnlineDPOTrainer, data=["1" * 60 + "="] * 8)

    def too_few(prompts, completions, **kwargs):
        return [0.0] * (len(completions) - 1)

    with pytest.raises(ValueError, match=r"returned 7 rewards for 8 completions"):
        make(AsyncOnlineDPOTrainer, steps=1, reward=too_few).train()

    def not_a_number(prompts, completions, **kwargs):
        return [float("nan")] * len(completions)

    with pytest.raises(ValueError, match=r"non-finite reward \(nan\)"):
        make(AsyncOnlineDPOTrainer, steps=1, reward=not_a_number).train()


def test_round_split_excess_parts_sum_to_the_async_rounds_excess():
    from asyncgen.catalogue.rlhf.async_online_dpo import RoundTiming
    from asyncgen.catalogue.rlhf.experiments import round_split

    # the first round of each run is left out (the async one cannot overlap); values exact in binary
    sync = [RoundTiming(prompts=9.0, generate=9.0, learn=9.0, handover=9.0, wait=0.0)] + \
        [RoundTiming(prompts=0.25, generate=4.0, learn=3.0, handover=0.5, wait=0.0)] * 2
    async_ = [RoundTiming(prompts=9.0, generate=9.0, learn=9.0, handover=9.0, wait=9.0)] + \
        [RoundTiming(prompts=0.5, generate=5.0, learn=4.0, handover=0.25, wait=2.0)] * 2
    split = round_split(sync, async_)
    assert split["round_s_sync_measured"] == 0.25 + 0.5 + 4.0 + 3.0
    assert split["round_s_async_measured"] == 0.5 + 0.25 + 2.0 + 4.0
    assert split["async_speedup_ceiling_measured"] == 7.75 / (0.25 + 4.0)  # prompts + max(generate, learn)
    # hand-over 0.25, learning 1.0 slower, waiting 2.0 - (4.0 - 3.0) = 1.0 beyond, prompts 0.25 slower
    parts = [split[f"async_excess_{k}_s_measured"] for k in ("handover", "learn_slowdown", "wait", "prompts")]
    assert parts == [0.25, 1.0, 1.0, 0.25]
    assert sum(parts) == split["round_s_async_measured"] - (0.25 + 4.0)
