"""Asynchronous off-policy RLHF: ``AsyncOnlineDPOTrainer`` (a subclass of trl's
``OnlineDPOTrainer``) that learns from samples an older policy generated, synchronously in
rounds of ``off_policy_steps`` mini-batches or with generation in a separate worker process, and
the RLOO baseline with the same staleness (``StaleRLOOTrainer``, a subclass of trl's ``RLOOTrainer``).

This ``__init__`` imports nothing optional; the trainers live in :mod:`.async_online_dpo` and
:mod:`.stale_rloo` and need the ``rlhf`` extra (trl, datasets).
"""

from __future__ import annotations

from asyncgen.catalogue.frame import ExperimentInfo

EXPERIMENTS = [
    ExperimentInfo(
        name="async-online-dpo",
        family="rlhf",
        paper="Noukhovitch, Huang, Xhonneux, Hosseini, Agarwal, Courville, ICLR 2025",
        claim="train on samples an older policy generated; online DPO loses least as off-policyness N grows, "
              "and asynchronous generation is faster",
        entry="asyncgen.catalogue.rlhf.experiments:run_async_online_dpo",
        defaults={"off_policy_steps": [1, 4, 16], "updates": 48, "prompts_per_update": 8, "lr": 5e-4, "beta": 0.1,
                  "temperature": 0.9, "n_embd": 64, "size_embds": [32, 128], "sft_steps": 300, "sft_lr": 3e-3,
                  "reward_pairs": 2000, "reward_epochs": 2, "eval_prompts": 256},
        quick={"off_policy_steps": [1, 4], "updates": 4, "prompts_per_update": 4, "size_embds": [], "sft_steps": 20,
               "reward_pairs": 200, "reward_epochs": 1, "eval_prompts": 32},
        default_seeds=1,
        quick_seeds=1,
        packages=("trl", "transformers", "datasets"),
        plot_caption="gold win-rate against SFT samples and KL to the SFT policy, against off-policyness N",
    ),
]
