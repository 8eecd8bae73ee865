"""StaleRLOOTrainer against trl's RLOOTrainer: N = 1 is the stock trainer (same losses, same weights), N = 4
trains update kN + i on samples from the weights of update kN and scores them ("old" log-probs, the clipped
ratio's denominator) with those generating weights, bad inputs are clear ValueErrors."""

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import GPT2LMHeadModel
from trl import RLOOConfig, RLOOTrainer

from asyncgen.catalogue.rlhf.stale_rloo import StaleRLOOTrainer
from asyncgen.catalogue.rlhf.tiny import char_tokenizer, tiny_policy

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
TOKENIZER = char_tokenizer()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    # trl's RLOO builds its reference model from the policy's path, so the tiny policy is saved once
    path = tmp_path_factory.mktemp("rloo_policy")
    tiny_policy(TOKENIZER, seed=0, n_embd=32, n_layer=1).save_pretrained(path)
    return str(path)


def prompts(count=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ["".join(str(d) for d in torch.randint(0, 10, (8,), generator=g).tolist()) + "=" for _ in range(count)]


def count_fives(prompts, completions, **kwargs):
    return [sum(c == "5" for c in completion) / 8.0 for completion in completions]


def make(cls, policy_dir, steps=5, **kwargs):
    args = RLOOConfig(output_dir="/tmp/asyncgen_rloo_test", per_device_train_batch_size=4, max_steps=steps,
                      learning_rate=1e-3, max_completion_length=9, beta=0.1, temperature=0.9, logging_steps=1,
                      report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                      **kwargs.pop("config", {}))
    return cls(model=GPT2LMHeadModel.from_pretrained(policy_dir), reward_funcs=count_fives, args=args,
               train_dataset=Dataset.from_dict({"prompt": prompts()}), processing_class=TOKENIZER, **kwargs)


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_n1_is_the_stock_trainer(policy_dir):
    stock = make(RLOOTrainer, policy_dir)
    stock.train()
    ours = make(StaleRLOOTrainer, policy_dir, off_policy_steps=1)
    ours.train()
    assert history(ours, "loss") == history(stock, "loss") and len(history(stock, "loss")) == 5
    for a, b in zip(stock.model.parameters(), ours.model.parameters()):
        assert torch.equal(a, b)
    assert ours.generation_log == [(step, step) for step in range(5)]


class Recording(StaleRLOOTrainer):
    """Keeps each round's starting weights and each step's scored inputs (old log-probs included)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.round_weights, self.scored = {}, []

    def _generate_round(self, epoch_iterator):
        self.round_weights[self.state.global_step] = copy.deepcopy(self.model.state_dict())
        super()._generate_round(epoch_iterator)

    def _generate_and_score_completions(self, inputs):
        current = copy.deepcopy(self.model.state_dict())
        out = super()._generate_and_score_completions(inputs)
        self.scored.append((self.state.global_step, {k: v.detach().clone() for k, v in out.items()
                                                     if torch.is_tensor(v)}, current))
        return out


def sequence_logps(trainer, weights, scored):
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(weights)
    ids = torch.cat([scored["prompt_ids"], scored["completion_ids"]], 1)
    mask = torch.cat([scored["prompt_mask"], scored["completion_mask"]], 1)
    with torch.no_grad():
        per_token, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, scored["completion_ids"].size(1))
    return (per_token * scored["completion_mask"]).sum(1)


def test_n4_lags_0_to_3_updates_and_takes_the_ratio_to_the_generating_policy(policy_dir):
    # dropout off, so a log-prob is a function of the weights alone
    trainer = make(Recording, policy_dir, steps=8, off_policy_steps=4, config={"disable_dropout": True})
    trainer.train()
    assert trainer.generation_log == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 4), (5, 4), (6, 4), (7, 4)]
    assert sorted(trainer.round_weights) == [0, 4]
    assert [step for step, _, _ in trainer.scored] == list(range(8))
    stale = 0
    for step, scored, current in trainer.scored:
        start = trainer.round_weights[step - step % 4]
        # the old log-probs are the generating weights' (same model, same inputs, same code: exactly equal)
        assert torch.equal(scored["old_logps"], sequence_logps(trainer, start, scored))
        if any(not torch.equal(current[k], start[k]) for k in start):  # an update since generation changed them
            # so they are not the scoring-time weights' (stock trl's ratio would be 1 by construction)
            assert not torch.allclose(scored["old_logps"], sequence_logps(trainer, current, scored))
            stale += 1
    assert stale >= 2  # not all 6: an update whose advantages are all 0 leaves the weights as they were


def test_bad_inputs(policy_dir):
    with pytest.raises(ValueError, match=r"off_policy_steps=0: must be an integer >= 1"):
        make(StaleRLOOTrainer, policy_dir, off_policy_steps=0)
    with pytest.raises(ValueError, match=r"steps_per_generation=2.*needs 1 and 1"):
        make(StaleRLOOTrainer, policy_dir, config={"steps_per_generation": 2, "generation_batch_size": None})
