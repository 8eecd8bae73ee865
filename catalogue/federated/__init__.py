"""Asynchronous federated learning: FedBuff/Papaya, FAVANO, FedFix, FedCompass and FedAST, with
FedAvg and FedAsync baselines.

Strategies (:mod:`.strategy`) are engine-free server objects over flat float32 vectors; the
simpy engine (:mod:`.engine`) runs them in simulated time on one machine and the Flower adapter
(:mod:`.flower`) runs the same objects across a real fleet. This ``__init__`` imports nothing
optional: it only describes the experiments for ``asyncgen catalogue``.
"""

from __future__ import annotations

from ..frame import ExperimentInfo

PACKAGES = ("simpy", "scikit-learn", "flwr")
_SHARED = {"lr": 0.05, "B": 8}
# η_g per arm (eta_g_ARM) comes from `asyncgen catalogue tune NAME` (committed in docs/catalogue/NAME/tuning.json);
# every arm applies client i's update with a weight proportional to p_i (see experiments.py); tuning runs on
# tune_seeds (>= 100) over tune_points values of η_g per arm
_TUNING = {"tune_seeds": [100, 101], "tune_points": 5}
_QUICK_TUNING = {"tune_seeds": [100], "tune_points": 3}

EXPERIMENTS = [
    ExperimentInfo(
        name="fedbuff",
        family="federated",
        paper="Nguyen et al., AISTATS 2022 (FedBuff); Huba et al., MLSys 2022 (Papaya)",
        claim="buffered asynchronous aggregation reaches a target accuracy several times faster than "
              "synchronous FedAvg with over-selection, with fewer transfers, and gains more at higher concurrency",
        entry="asyncgen.catalogue.federated.experiments:run_fedbuff",
        defaults={"N": 200, "concurrencies": [10, 100], "K": 10, "Q": 5, "alpha": 1.0, "profile": "lognormal",
                  "rounds": 40, "o": 1.3, "a": 0.5, "server_momentum": 0.0, **_SHARED,
                  # [at the small C, at the large C]
                  "eta_g_fedavg": [3.0, 3.0], "eta_g_fedbuff": [60.0, 60.0], "eta_g_fedasync": [120.0, 120.0],
                  **_TUNING},
        quick={"rounds": 4, **_QUICK_TUNING},
        tune_entry="asyncgen.catalogue.federated.experiments:tune_fedbuff",
        packages=PACKAGES,
        plot_caption="test accuracy against simulated time, C=100 and C=10",
    ),
    ExperimentInfo(
        name="favano",
        family="federated",
        paper="Leconte, Jonckheere, Samsonov, Moulines, 2023 (FAVAS/FAVANO, arXiv:2305.16099)",
        claim="a server that never waits, with partial client updates reweighted by the inverse of each client's "
              "expected progress, trains faster than FedAvg without the bias toward fast clients",
        entry="asyncgen.catalogue.federated.experiments:run_favano",
        defaults={"N": 50, "s": 10, "K": 10, "period": 2.0, "alpha": 0.3, "slow_fraction": 0.8, "rounds": 60,
                  "fedbuff_K": 5, "a": 0.5, **_SHARED,
                  "eta_g_fedavg": 3.0, "eta_g_fedbuff": 30.0, "eta_g_favano": 0.3333, "eta_g_favano_noreweight": 3.0,
                  "tune_seeds": [100], "tune_points": 5},
        quick={"rounds": 6, **_QUICK_TUNING},
        tune_entry="asyncgen.catalogue.federated.experiments:tune_favano",
        packages=PACKAGES,
        plot_caption="test accuracy against simulated time",
    ),
    ExperimentInfo(
        name="fedfix",
        family="federated",
        paper="Fraboni, Vidal, Kameni, Lorenzi, JMLR 2023",
        claim="aggregating on a fixed clock with weights ceil(τ_i/Δt)·p_i converges faster than FedAvg and "
              "more stably than per-arrival asynchronous updates",
        entry="asyncgen.catalogue.federated.experiments:run_fedfix",
        defaults={"M": 20, "Q": 10, "dt": 0.5, "other_dts": [0.2, 0.8], "alpha": 0.1, "rounds": 60,
                  "fedbuff_K": 5, **_SHARED,
                  # eta_g_fedfix: one value per Δt, [dt, *other_dts]
                  "eta_g_fedavg": 3.0, "eta_g_fedfix": [3.0, 1.0, 3.0], "eta_g_async": 3.0, "eta_g_fedbuff": 4.0,
                  **_TUNING},
        quick={"rounds": 6, **_QUICK_TUNING},
        tune_entry="asyncgen.catalogue.federated.experiments:tune_fedfix",
        packages=PACKAGES,
        plot_caption="test accuracy against simulated time",
    ),
    ExperimentInfo(
        name="fedcompass",
        family="federated",
        paper="Li, Chard, Foster, Kinnison, ICLR 2024 (FedCompass)",
        claim="assigning each client a number of local steps from its estimated speed, so that groups of clients "
              "arrive together, reaches a target faster than FedAvg, FedAsync and FedBuff with no accuracy loss",
        entry="asyncgen.catalogue.federated.experiments:run_fedcompass",
        defaults={"N": 16, "Qmax": 50, "Qmin_fraction": 0.2, "lambda": 1.5, "alpha": 0.1, "rounds": 30,
                  "fedbuff_K": 3, "a": 0.5, **_SHARED,
                  "eta_g_fedavg": 1.0, "eta_g_fedasync": 9.6, "eta_g_fedbuff": 5.333, "eta_g_fedcompass": 9.0,
                  "tune_seeds": [100], "tune_points": 5},
        quick={"rounds": 3, **_QUICK_TUNING},
        tune_entry="asyncgen.catalogue.federated.experiments:tune_fedcompass",
        packages=PACKAGES,
        plot_caption="test accuracy against simulated time",
    ),
    ExperimentInfo(
        name="fedast",
        family="federated",
        paper="Askin, Sharma, Joe-Wong, Joshi, UAI 2024 (FedAST)",
        claim="training several models at once with buffered asynchronous updates and client quotas moved toward "
              "the noisiest task finishes all tasks sooner than concurrent synchronous FedAvg (up to 46% less time)",
        entry="asyncgen.catalogue.federated.experiments:run_fedast",
        # Q, alpha and rounds (sync-st's budget) are left open by the issue: our choices, see
        # docs/catalogue/federated.md
        defaults={"M": 3, "N": 300, "R": 48, "g": 4, "Q": 5, "alpha": 1.0, "rounds": 30, "lr": 0.1, "B": 8,
                  "eta_g": 0.5, "near_target": 0.98},
        quick={"rounds": 3},
        packages=PACKAGES,
        plot_caption="test accuracy of each task against simulated time",
    ),
]
