"""Asynchronous off-policy RLHF: ``AsyncOnlineDPOTrainer`` (a subclass of trl's
``OnlineDPOTrainer``) that learns from samples an older policy generated, synchronously in
rounds of ``off_policy_steps`` mini-batches or with generation in a separate worker process, and
the RLOO baseline with the same staleness (``StaleRLOOTrainer``, a subclass of trl's ``RLOOTrainer``).

This ``__init__`` imports nothing optional; the trainers live in :mod:`.async_online_dpo` and
:mod:`.stale_rloo` and need the ``rlhf`` extra (trl, datasets).
"""

from __future__ import annotations

from asyncgen.catalogue.frame import ExperimentInfo, Float, Int, Ints

EXPERIMENTS = [
    ExperimentInfo(
        name="async-online-dpo",
        paper_ids=('arXiv:2410.18252',),
        size_cut=('the paper tunes Pythia policies (410M-2.8B) on TL;DR summarisation, LLaMA 3.1 8B and Rho 1B; the '
                  'default run tunes a tiny GPT-2 (64-dimensional embeddings) on an 8-digit sorting task for 48 '
                  'updates, 1 seed'),
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
        keys={"off_policy_steps": Ints(1, 256, "off-policyness N values compared", items=8, cost=1.0),
              "updates": Int(1, 4800, "policy updates per run", cost=1.0),
              "prompts_per_update": Int(1, 256, "prompts per update"),
              "lr": Float(1e-7, 1.0, "policy learning rate"), "beta": Float(1e-4, 100.0, "DPO's β"),
              "temperature": Float(0.01, 10.0, "sampling temperature"),
              "n_embd": Int(8, 512, "policy width (GPT-2, 2 heads)", multiple_of=2, cost=1.5),
              "size_embds": Ints(8, 512, "other policy widths reported at the largest N", items=8, min_items=0,
                                 multiple_of=2),
              "sft_steps": Int(1, 30000, "supervised steps of the SFT policy", cost=0.3),
              "sft_lr": Float(1e-7, 1.0, "SFT learning rate"),
              "reward_pairs": Int(10, 200000, "preference pairs the reward model is trained on"),
              "reward_epochs": Int(1, 100, "reward model epochs"),
              "eval_prompts": Int(1, 25600, "evaluation prompts")},
        packages=("trl", "transformers", "datasets"),
        plot_caption="gold win-rate against SFT samples and KL to the SFT policy, against off-policyness N",
    ),
]
