"""The miniature RLHF task of the ``async-online-dpo`` experiment: sort 8 digits.

Prompt: 8 random digits and ``=``. Gold reward (used only for evaluation, like the paper's 6.9B
judge): the fraction of the 8 positions that hold the sorted digit, minus ``0.5 * |len - 8| / 8``.
The SFT policy is a tiny GPT-2 trained on targets whose characters are each replaced by a random
digit with probability 0.5 (so it starts near a gold score of 0.5); the proxy reward model is the
same tiny GPT-2 with a scalar head trained with the Bradley–Terry loss on pairs labelled by the gold
reward, and is the only reward the RL trainers see. Everything is built from configs with random
weights and trained here; no file I/O.
"""

from __future__ import annotations

from asyncgen.catalogue.frame import require_extra

require_extra("rlhf", "transformers", "tokenizers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .tiny import tiny_policy, tiny_reward_model  # noqa: E402

DIGITS = 8
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def make_prompts(count: int, generator: torch.Generator) -> list[str]:
    rows = torch.randint(0, 10, (count, DIGITS), generator=generator).tolist()
    return ["".join(map(str, row)) + "=" for row in rows]


def sorted_target(prompt: str) -> str:
    return "".join(sorted(prompt[:DIGITS]))


def gold_reward(prompt: str, completion: str) -> float:
    target = sorted_target(prompt)
    hits = sum(1 for a, b in zip(completion, target) if a == b)
    return hits / DIGITS - 0.5 * abs(len(completion) - DIGITS) / DIGITS


def corrupt(text: str, rate: float, generator: torch.Generator) -> str:
    """Each character replaced by a random digit with probability ``rate``."""
    flips = (torch.rand(len(text), generator=generator) < rate).tolist()
    digits = torch.randint(0, 10, (len(text),), generator=generator).tolist()
    return "".join(str(d) if f else c for c, f, d in zip(text, flips, digits))


def encode(tokenizer, texts: list[str], eos: bool = False) -> list[list[int]]:
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    return [[vocab.get(c, unk) for c in text] + ([tokenizer.eos_token_id] if eos else []) for text in texts]


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def train_sft_policy(tokenizer, *, n_embd: int, steps: int, batch: int, lr: float, corruption: float,
                     seed: int):
    """Supervised training on prompt + corrupted sorted target + EOS (loss on the completion only)."""
    generator = torch.Generator().manual_seed(seed)
    model = tiny_policy(tokenizer, n_embd=n_embd, seed=seed, **NO_DROPOUT)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        prompts = make_prompts(batch, generator)
        targets = [corrupt(sorted_target(p), corruption, generator) for p in prompts]
        ids = torch.tensor([p + t for p, t in zip(encode(tokenizer, prompts), encode(tokenizer, targets, eos=True))])
        logits = model(input_ids=ids).logits[:, :-1]
        labels = ids[:, 1:].clone()
        labels[:, :DIGITS] = -100  # prompt tokens (the first DIGITS + 1 ids; their next-token labels are masked)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def preference_pairs(count: int, generator: torch.Generator) -> list[tuple[str, str, str]]:
    """(prompt, completion a, completion b): sorted targets corrupted at a random rate in [0, 1], and with
    probability 0.2 cut or padded to a length in 6..10, so the reward model sees the range RL visits."""
    pairs = []
    for prompt in make_prompts(count, generator):
        made = []
        for _ in range(2):
            text = corrupt(sorted_target(prompt), float(torch.rand((), generator=generator)), generator)
            if float(torch.rand((), generator=generator)) < 0.2:
                length = int(torch.randint(6, 11, (), generator=generator))
                text = (text + "".join(str(d) for d in torch.randint(0, 10, (4,), generator=generator).tolist()))[:length]
            made.append(text)
        pairs.append((prompt, made[0], made[1]))
    return pairs


class ProxyReward:
    """The proxy reward as a trl reward function (``prompts``, ``completions`` -> one float each)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.__name__ = "proxy_reward"

    def scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        ids, mask = _right_pad(encode(self.tokenizer, [p + c for p, c in zip(prompts, completions)]),
                               self.tokenizer.pad_token_id)
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0]

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        with torch.no_grad():
            return self.scores(list(prompts), list(completions)).tolist()


def train_proxy_reward(tokenizer, *, pairs: int, epochs: int, batch: int, lr: float, seed: int) -> tuple:
    """Bradley–Terry on gold-labelled pairs (ties dropped); returns (reward, held-out pair accuracy)."""
    generator = torch.Generator().manual_seed(seed + 1)
    data = [(p, a, b) if gold_reward(p, a) > gold_reward(p, b) else (p, b, a)
            for p, a, b in preference_pairs(pairs + 256, generator) if gold_reward(p, a) != gold_reward(p, b)]
    train, held = data[:-256], data[-256:]
    reward = ProxyReward(tiny_reward_model(tokenizer, seed=seed + 1, **NO_DROPOUT), tokenizer)
    optimizer = torch.optim.Adam(reward.model.parameters(), lr=lr)
    reward.model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), batch):
            rows = [train[i] for i in order[start:start + batch]]
            prompts = [r[0] for r in rows]
            margin = reward.scores(prompts, [r[1] for r in rows]) - reward.scores(prompts, [r[2] for r in rows])
            loss = -F.logsigmoid(margin).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    reward.model.eval()
    with torch.no_grad():
        prompts = [r[0] for r in held]
        accuracy = (reward.scores(prompts, [r[1] for r in held]) > reward.scores(prompts, [r[2] for r in held]))
    return reward, float(accuracy.float().mean())


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], temperature: float, seed: int) -> tuple[list[str], torch.Tensor]:
    """One completion per prompt (all prompts have the same length, so no padding); (texts, token ids)."""
    ids = torch.tensor(encode(tokenizer, prompts))
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                         top_k=0, top_p=1.0, max_new_tokens=DIGITS + 1, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    completion = out[:, ids.size(1):]
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    return texts, out


@torch.no_grad()
def sequence_logprob(model, out: torch.Tensor, prompt_len: int, eos_id: int, temperature: float) -> torch.Tensor:
    """Sum of completion-token log-probs at the sampling temperature (up to and including the first EOS)."""
    logits = model(input_ids=out).logits[:, prompt_len - 1:-1] / temperature
    tokens = out[:, prompt_len:]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    is_eos = tokens == eos_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # positions after the first EOS are padding
    return (logps * (~after)).sum(1)


def evaluate(policy, sft, tokenizer, prompts: list[str], temperature: float, seed: int) -> dict[str, float]:
    """Gold win-rate of policy vs SFT samples (ties 1/2), mean gold score, per-sequence KL(pi || pi_SFT)."""
    policy.eval()
    texts, out = sample(policy, tokenizer, prompts, temperature, seed)
    sft_texts, _ = sample(sft, tokenizer, prompts, temperature, seed + 1)
    gold = [gold_reward(p, c) for p, c in zip(prompts, texts)]
    gold_sft = [gold_reward(p, c) for p, c in zip(prompts, sft_texts)]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold, gold_sft)]
    prompt_len = DIGITS + 1
    kl = (sequence_logprob(policy, out, prompt_len, tokenizer.eos_token_id, temperature)
          - sequence_logprob(sft, out, prompt_len, tokenizer.eos_token_id, temperature))
    return {"win_rate": sum(wins) / len(wins), "gold": sum(gold) / len(gold), "kl": float(kl.mean())}
