"""Asynchronous off-policy RLHF: ``AsyncOnlineDPOTrainer`` (a subclass of trl's
``OnlineDPOTrainer``) that learns from samples an older policy generated, synchronously in
rounds of ``off_policy_steps`` mini-batches or with generation in a separate worker process, and
the RLOO baseline with the same staleness (``StaleRLOOTrainer``, a subclass of trl's ``RLOOTrainer``).

This ``__init__`` imports nothing optional; the trainers live in :mod:`.async_online_dpo` and
:mod:`.stale_rloo` and need the ``rlhf`` extra (trl, datasets).
"""

from __future__ import annotations

from asyncgen.catalogue.frame import ExperimentInfo, Float, Floats, Int, Ints

EXPERIMENTS = [
    ExperimentInfo(
        name="async-online-dpo",
        paper_ids=('arXiv:2410.18252',),
        size_cut=('the paper tunes Pythia policies (410M-2.8B) on TL;DR summarisation, LLaMA 3.1 8B and Rho 1B, 200+ '
                  'updates; the default run tunes a tiny GPT-2 (64-dimensional embeddings) on an 8-digit sorting task '
                  'for 200 updates x 16 prompts, 3 seeds'),
        family="rlhf",
        paper="Noukhovitch, Huang, Xhonneux, Hosseini, Agarwal, Courville, ICLR 2025",
        claim="train on samples an older policy generated; online DPO loses least as off-policyness N grows, "
              "and asynchronous generation is faster",
        entry="asyncgen.catalogue.rlhf.experiments:run_async_online_dpo",
        tune_entry="asyncgen.catalogue.rlhf.experiments:tune_async_online_dpo",
        processes_key="processes",
        defaults={"off_policy_steps": [1, 4, 16], "updates": 200, "prompts_per_update": 16,
                  # each arm's lr and beta: the grid's best on the tuning seeds ('asyncgen catalogue tune
                  # async-online-dpo', committed in docs/catalogue/async-online-dpo/tuning.json)
                  "lr_online_dpo": 3e-4, "beta_online_dpo": 0.2, "lr_rloo": 3e-4, "beta_rloo": 0.2,
                  "temperature": 0.9, "n_embd": 64, "size_embds": [], "sft_steps": 300, "sft_lr": 3e-3,
                  "reward_pairs": 8000, "reward_epochs": 3, "reward_lr": 1e-3, "accuracy_prompts": 512,
                  "eval_prompts": 256, "lr_grid": [3e-5, 1e-4, 3e-4], "beta_grid": [0.05, 0.1, 0.2],
                  "kl_budget": 5.0, "tune_seeds": [100, 101], "processes": 2},
        quick={"off_policy_steps": [1, 4], "updates": 4, "prompts_per_update": 4, "size_embds": [], "sft_steps": 20,
               "reward_pairs": 200, "reward_epochs": 1, "accuracy_prompts": 64, "eval_prompts": 32,
               "lr_grid": [1e-4], "beta_grid": [0.1], "tune_seeds": [100], "processes": 1},
        default_seeds=3,
        quick_seeds=1,
        keys={"off_policy_steps": Ints(1, 256, "off-policyness N values compared", items=8, cost=1.0),
              "updates": Int(1, 2400, "policy updates per run", cost=1.0),
              "prompts_per_update": Int(1, 256, "prompts per update"),
              "lr_online_dpo": Float(1e-7, 1.0, "online DPO's learning rate (tuned)"),
              "beta_online_dpo": Float(1e-4, 100.0, "online DPO's β (tuned)"),
              "lr_rloo": Float(1e-7, 1.0, "RLOO's learning rate (tuned)"),
              "beta_rloo": Float(1e-4, 100.0, "RLOO's KL-penalty β (tuned)"),
              "temperature": Float(0.01, 10.0, "sampling temperature"),
              "n_embd": Int(8, 512, "policy width (GPT-2, 2 heads)", multiple_of=2, cost=1.5),
              "size_embds": Ints(8, 512, "other policy widths reported at the largest N", items=8, min_items=0,
                                 multiple_of=2),
              "sft_steps": Int(1, 30000, "supervised steps of the SFT policy", cost=0.3),
              "sft_lr": Float(1e-7, 1.0, "SFT learning rate"),
              "reward_pairs": Int(10, 200000, "prompts whose two SFT samples (ties dropped) train the proxy reward"),
              "reward_epochs": Int(1, 100, "proxy reward epochs"),
              "reward_lr": Float(1e-7, 1.0, "proxy reward learning rate"),
              "accuracy_prompts": Int(2, 25600, "prompts whose sample pairs measure the proxy's pair accuracy"),
              "eval_prompts": Int(1, 25600, "evaluation prompts"),
              "lr_grid": Floats(1e-7, 1.0, "tuning: learning rates tried per arm", items=16),
              "beta_grid": Floats(1e-4, 100.0, "tuning: β values tried per arm", items=16),
              "kl_budget": Float(0.0, 1000.0, "tuning: a run with KL(pi || pi_SFT) above this (nats) ranks below "
                                              "every run within it"),
              "tune_seeds": Ints(100, 10**6, "tuning seeds (>= 100: never an evaluation seed)", items=16),
              "processes": Int(1, 64, "processes the seeds' SFT/proxy preparation and the training runs are spread "
                                      "over (the sync/async timing pairs then run alone in the main process)")},
        packages=("trl", "transformers", "datasets"),
        plot_caption="gold win-rate against SFT samples and KL to the SFT policy, against off-policyness N",
    ),
]
