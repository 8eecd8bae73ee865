"""The RLOO baseline of the asynchronous-RLHF comparison (Noukhovitch et al., ICLR 2025) with the same
off-policyness as :class:`~asyncgen.catalogue.rlhf.async_online_dpo.AsyncOnlineDPOTrainer`: a subclass of
trl's top-level ``RLOOTrainer``.

RLOO with k = 2 samples per prompt: the leave-one-out baseline of ``y_i`` is the other sample's reward,
so the loss is ``-(r_i - r_other) * log pi_theta(y_i|x)`` with the KL penalty folded into the reward
(trl's ``beta * sum_t (log pi_theta - log pi_ref)``, the original RLOO form).

Why a subclass works: trl's ``_generate_and_score_completions`` calls ``self._generate(prompts)`` for
the completions and then scores them (rewards, reference and "old" log-probs, advantages) with the
*current* weights. ``get_batch_samples`` pre-generates a round of ``N = off_policy_steps`` mini-batches with
the weights at the start of the round (``theta_k``, trl's own ``_generate``) and keeps a frozen copy of those
weights; ``_generate`` hands each training step its pre-generated completions (mini-batch ``i`` of a round is
``i - 1`` updates stale), and the "old" log-probs trl computes for them come from that copy, the policy
that generated them. trl's loss is then the paper's off-policy RLOO: the sequence ratio
``pi_theta(y|x) / pi_theta_k(y|x)`` clipped to ``[1 - epsilon, 1 + epsilon]`` (PPO-style, trl's
``epsilon``), times the leave-one-out advantage; the KL penalty in the reward is likewise that of the
generating policy. (Scored with the current weights instead, as stock trl does, the ratio is 1 by
construction and stale samples get no correction.) ``off_policy_steps=1`` is the stock trainer (tested: same
losses and weights): the generating weights are the current ones.
``steps_per_generation`` must stay 1 (trl's own reuse of one generation over several steps would stack
a second, differently scored staleness on top).

Generation is synchronous here (rounds, no worker process): the asynchronous worker lives in the
online-DPO trainer, the paper's method; this class is the baseline it is compared with at equal
staleness. At scale: ``RLOOConfig(use_vllm=True, vllm_mode="server")`` with ``trl vllm-serve``; trl then
syncs weights at every step, so for staleness N use the online-DPO trainer's throttled push or
``trl.experimental.async_grpo`` (``max_staleness``).
"""

from __future__ import annotations

from asyncgen.catalogue.frame import require_extra

require_extra("rlhf", "trl", "transformers", "datasets")

import copy  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from trl import RLOOTrainer  # noqa: E402

from .async_online_dpo import checked_reward  # noqa: E402


@dataclass
class PregeneratedCompletions:
    """One mini-batch of trl's ``_generate`` output, made ahead of its training step."""

    rows: list  # the data collator's rows (what trl's training step receives)
    prompts: list
    generation: tuple  # (prompt_ids, completion_ids, completions)
    version: int  # global_step of the weights that generated it
    generator: object = None  # a frozen copy of those weights (None when N = 1: they are the current ones)


class StaleRLOOTrainer(RLOOTrainer):
    """trl's ``RLOOTrainer`` trained on samples from a policy up to ``off_policy_steps - 1`` updates old.

    Args (beyond ``RLOOTrainer``'s):
        off_policy_steps: ``N`` >= 1, mini-batches generated per round with one set of weights (default 1:
            on-policy, identical to the stock trainer).
    """

    def __init__(self, *args, off_policy_steps: int = 1, **kwargs):
        if isinstance(off_policy_steps, bool) or not isinstance(off_policy_steps, int) or off_policy_steps < 1:
            raise ValueError(f"off_policy_steps={off_policy_steps!r}: must be an integer >= 1")
        super().__init__(*args, **kwargs)
        if self.args.steps_per_generation != 1 or self.num_iterations != 1:
            raise ValueError(f"steps_per_generation={self.args.steps_per_generation}, num_iterations="
                             f"{self.num_iterations}: StaleRLOOTrainer needs 1 and 1 (staleness comes from "
                             "off_policy_steps)")
        if self.use_vllm and off_policy_steps > 1:
            raise ValueError("off_policy_steps > 1 with use_vllm=True: trl's RLOO syncs vLLM weights every step; "
                             "use AsyncOnlineDPOTrainer or trl.experimental.async_grpo for stale vLLM generation")
        self.off_policy_steps = off_policy_steps
        self.reward_funcs = [f if isinstance(f, nn.Module) else checked_reward(f) for f in self.reward_funcs]
        self._ready: deque[PregeneratedCompletions] = deque()  # generated, not yet handed to the loop
        self._serving: deque[PregeneratedCompletions] = deque()  # handed to the loop, not yet trained on
        #: (global_step when trained, version of the weights that generated its samples) per mini-batch
        self.generation_log: list[tuple[int, int]] = []
        self._behaviour = None  # the generating weights of the mini-batch being scored

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        samples = []
        for _ in range(num_batches):
            if not self._ready:
                self._generate_round(epoch_iterator)
            if not self._ready:
                break
            entry = self._ready.popleft()
            self._serving.append(entry)
            samples.append(entry.rows)
        return samples, self._get_num_items_in_batch(samples, device)

    def _generate_round(self, epoch_iterator) -> None:
        """Generate the next N mini-batches now, all with the current weights theta_k."""
        version = self.state.global_step
        self.model.train()  # trl generates inside training_step, i.e. in train mode (dropout, if any, is on)
        generator = None
        if self.off_policy_steps > 1:  # kept to score the round's samples under the policy that generated them
            generator = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            generator.requires_grad_(False)
        for _ in range(self.off_policy_steps):
            try:
                rows = next(epoch_iterator)
            except StopIteration:
                break
            prompts = [row["prompt"] for row in rows]
            self._ready.append(PregeneratedCompletions(rows, prompts, RLOOTrainer._generate(self, prompts), version,
                                                       generator))

    def _generate(self, prompts):
        """trl scores a mini-batch and asks for its completions: hand it the pre-generated ones."""
        if not self._serving:
            raise RuntimeError("StaleRLOOTrainer: a training step ran without pre-generated completions")
        entry = self._serving.popleft()
        if list(entry.prompts) != list(prompts):
            raise RuntimeError("StaleRLOOTrainer: the pre-generated completions belong to other prompts")
        self.generation_log.append((self.state.global_step, entry.version))
        # the first model call trl makes next, without gradients, is the "old" log-probs (then the reference's)
        self._behaviour = entry.generator
        return entry.generation

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        """The "old" log-probs of a stale mini-batch come from the weights that generated it."""
        behaviour = self._behaviour
        if behaviour is not None and model is self.model and not torch.is_grad_enabled():
            self._behaviour = None
            behaviour.train(self.model.training)  # the same dropout mode trl scores in
            model = behaviour
        return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._ready.clear()
            self._serving.clear()
            self._behaviour = None


__all__ = ["StaleRLOOTrainer", "PregeneratedCompletions"]
