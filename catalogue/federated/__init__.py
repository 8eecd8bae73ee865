"""Asynchronous federated learning: FedBuff/Papaya, FAVANO, FedFix, FedCompass and FedAST, with
FedAvg and FedAsync baselines.

Strategies (:mod:`.strategy`) are engine-free server objects over flat float32 vectors; the
simpy engine (:mod:`.engine`) runs them in simulated time on one machine and the Flower adapter
(:mod:`.flower`) runs the same objects across a real fleet. This ``__init__`` imports nothing
optional: it only describes the experiments for ``asyncgen catalogue``.
"""

from __future__ import annotations

from ..frame import Choice, ExperimentInfo, Float, Floats, Int, Ints

# Each key's range keeps a run, with the other keys at their defaults, within a few hours on 2 cores:
# the keys with a cost (rounds, local steps, batch) may grow about 100x over the committed default.

PACKAGES = ("simpy", "scikit-learn", "flwr")
_SHARED = {"lr": 0.05, "B": 8}
# η_g per arm (eta_g_ARM) comes from `asyncgen catalogue tune NAME` (committed in docs/catalogue/NAME/tuning.json);
# every arm applies client i's update with a weight proportional to p_i (see experiments.py); tuning runs on
# tune_seeds (>= 100) over tune_points values of η_g per arm
_TUNING = {"tune_seeds": [100, 101], "tune_points": 5}
_QUICK_TUNING = {"tune_seeds": [100], "tune_points": 3}
PROFILES = ("lognormal", "two-class", "linear", "exponential", "shifted-exp")
ETA = Float(1e-4, 1e4, "server step size η_g of this arm (from `asyncgen catalogue tune`)")
_SHARED_KEYS = {"lr": Float(1e-5, 10.0, "client learning rate"),
                "B": Int(1, 512, "client mini-batch size", cost=1.0)}
_TUNING_KEYS = {"tune_seeds": Ints(100, 10**6, "tuning seeds (>= 100: never an evaluation seed)", items=16),
                "tune_points": Int(1, 25, "grid values of η_g tried per arm when tuning")}
ALPHA = Float(0.01, 100.0, "Dirichlet concentration of the clients' label split (smaller: less alike)")
STALENESS = Float(0.0, 5.0, "staleness exponent a of s(τ) = (1 + τ)^-a")


def _rounds(high: int) -> Int:
    return Int(1, high, "server rounds (or the synchronous baseline's, which sets the time budget); work grows "
                        "with it", cost=1.0)


def _local_steps(high: int = 500) -> Int:
    return Int(1, high, "local SGD steps per client update", cost=1.0)

EXPERIMENTS = [
    ExperimentInfo(
        name="fedbuff",
        paper_ids=('arXiv:2106.06639', 'arXiv:2111.04877'),
        size_cut=('the paper trains CelebA, Sent140 and CIFAR-10 models with up to 1000 clients training at once; the '
                  "default run trains a 64-32-10 MLP on scikit-learn's digits (about 1440 training images) over N=200 "
                  'clients at concurrency 10 and 100, with a budget of 40 FedAvg rounds and 3 seeds'),
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
        keys={"N": Int(1, 1000, "clients"),
              "concurrencies": Ints(1, 1000, "the two concurrencies C compared, small then large (<= N)", items=2,
                                    min_items=2),
              "K": Int(1, 1000, "FedBuff's buffer size (updates per server step)", cost=1.0),
              "Q": _local_steps(), "alpha": ALPHA, "profile": Choice(PROFILES, "client speed profile"),
              "rounds": _rounds(4000), "o": Float(1.0, 10.0, "FedAvg's over-selection factor"),
              "a": STALENESS, "server_momentum": Float(0.0, 0.999, "FedBuff's server momentum"), **_SHARED_KEYS,
              "eta_g_fedavg": Floats(1e-4, 1e4, "FedAvg's η_g at the small and the large C", items=2, min_items=2),
              "eta_g_fedbuff": Floats(1e-4, 1e4, "FedBuff's η_g at the small and the large C", items=2, min_items=2),
              "eta_g_fedasync": Floats(1e-4, 1e4, "FedAsync's η_g at the small and the large C", items=2,
                                       min_items=2),
              **_TUNING_KEYS},
        packages=PACKAGES,
        plot_caption="test accuracy against simulated time, C=100 and C=10",
    ),
    ExperimentInfo(
        name="favano",
        paper_ids=('arXiv:2305.16099',),
        size_cut=('the paper trains deep image classifiers; the default run trains a 64-32-10 MLP on digits over N=50 '
                  'clients (80% slow) with a budget of 60 rounds and 3 seeds'),
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
        keys={"N": Int(1, 1000, "clients"), "s": Int(1, 1000, "clients sampled per server period (<= N)"),
              "K": _local_steps(), "period": Float(0.01, 100.0, "FAVANO's server period in simulated time"),
              "alpha": ALPHA, "slow_fraction": Float(0.0, 1.0, "share of the late classes held by slow clients"),
              "rounds": _rounds(6000), "fedbuff_K": Int(1, 1000, "FedBuff's buffer size"), "a": STALENESS,
              **_SHARED_KEYS, "eta_g_fedavg": ETA, "eta_g_fedbuff": ETA, "eta_g_favano": ETA,
              "eta_g_favano_noreweight": ETA, **_TUNING_KEYS},
        packages=PACKAGES,
        plot_caption="test accuracy against simulated time",
    ),
    ExperimentInfo(
        name="fedfix",
        paper_ids=('arXiv:2206.10189',),
        size_cut=('the paper trains image classifiers on federated benchmarks; the default run trains a 64-32-10 MLP on'
                  ' digits over M=20 clients with a budget of 60 rounds and 3 seeds'),
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
        keys={"M": Int(1, 1000, "clients"), "Q": _local_steps(), "dt": Float(0.01, 100.0, "FedFix's clock period Δt"),
              "other_dts": Floats(0.01, 100.0, "more periods Δt run as extra FedFix arms", items=4, min_items=0,
                                  cost=0.25),
              "alpha": ALPHA, "rounds": _rounds(6000), "fedbuff_K": Int(1, 1000, "FedBuff's buffer size"),
              **_SHARED_KEYS, "eta_g_fedavg": ETA,
              "eta_g_fedfix": Floats(1e-4, 1e4, "FedFix's η_g, one per Δt in [dt, *other_dts]", items=5),
              "eta_g_async": ETA, "eta_g_fedbuff": ETA, **_TUNING_KEYS},
        packages=PACKAGES,
        plot_caption="test accuracy against simulated time",
    ),
    ExperimentInfo(
        name="fedcompass",
        paper_ids=('arXiv:2309.14675',),
        size_cut=('the paper trains on MNIST, CIFAR-10 and FLamby data sets with 5-20 cross-silo clients; the default '
                  'run trains a 64-32-10 MLP on digits over N=16 clients with a budget of 30 rounds and 3 seeds'),
        family="federated",
        paper="Li, Chaturvedi, He, Chen, Singh, Kindratenko, Huerta, Kim, Madduri, ICLR 2024 (FedCompass)",
        claim="assigning each client a number of local steps from its estimated speed, so that groups of clients "
              "arrive together, reaches a target faster than FedAvg, FedAsync and FedBuff with no accuracy loss",
        entry="asyncgen.catalogue.federated.experiments:run_fedcompass",
        defaults={"N": 16, "Qmax": 50, "Qmin_fraction": 0.2, "lambda": 1.5, "alpha": 0.1, "rounds": 30,
                  "fedbuff_K": 3, "a": 0.5, **_SHARED,
                  "eta_g_fedavg": 1.0, "eta_g_fedasync": 9.6, "eta_g_fedbuff": 5.333, "eta_g_fedcompass": 9.0,
                  "tune_seeds": [100], "tune_points": 5},
        quick={"rounds": 3, **_QUICK_TUNING},
        tune_entry="asyncgen.catalogue.federated.experiments:tune_fedcompass",
        keys={"N": Int(1, 1000, "clients"), "Qmax": Int(1, 1000, "most local steps a client is given", cost=1.0),
              "Qmin_fraction": Float(0.01, 1.0, "fewest local steps, as a share of Qmax"),
              "lambda": Float(1.0, 10.0, "FedCompass's latest-arrival factor λ"), "alpha": ALPHA,
              "rounds": _rounds(3000), "fedbuff_K": Int(1, 1000, "FedBuff's buffer size"), "a": STALENESS,
              **_SHARED_KEYS, "eta_g_fedavg": ETA, "eta_g_fedasync": ETA, "eta_g_fedbuff": ETA,
              "eta_g_fedcompass": ETA, **_TUNING_KEYS},
        packages=PACKAGES,
        plot_caption="test accuracy against simulated time",
    ),
    ExperimentInfo(
        name="fedast",
        paper_ids=('arXiv:2406.00302',),
        size_cut=('the paper trains tasks such as MNIST, Fashion-MNIST, CIFAR-10/100 and Shakespeare models at once; '
                  'the default run trains 3 MLP tasks on digits (digit and parity labels) over N=300 clients, R=48 in '
                  'flight, 30 sync-st rounds per task, 3 seeds'),
        family="federated",
        paper="Askin, Sharma, Joe-Wong, Joshi, UAI 2024 (FedAST)",
        claim="training several models at once with buffered asynchronous updates and client quotas moved toward "
              "the noisiest task finishes all tasks sooner than concurrent synchronous FedAvg (up to 46% less time)",
        entry="asyncgen.catalogue.federated.experiments:run_fedast",
        # Q, alpha and rounds (sync-st's budget) are left open by the issue: our choices, see
        # docs/catalogue/federated.md
        defaults={"M": 3, "N": 300, "R": 48, "g": 4, "Q": 5, "alpha": 1.0, "rounds": 30, "lr": 0.1, "B": 8,
                  "near_target": 0.98,
                  "eta_g_sync_st": 3.0, "eta_g_async_st": 0.25, "eta_g_fedast_static": 1.0, "eta_g_fedast": 0.3333,
                  **_TUNING},
        quick={"rounds": 3, **_QUICK_TUNING},
        tune_entry="asyncgen.catalogue.federated.experiments:tune_fedast",
        keys={"M": Int(1, 3, "tasks trained at once (of the experiment's 3)"), "N": Int(1, 1000, "clients"),
              "R": Int(1, 1000, "client updates in flight (>= g·M)"),
              "g": Int(1, 1000, "FedAST's buffer granularity (updates per server step per task)"),
              "Q": _local_steps(), "alpha": ALPHA, "rounds": _rounds(3000),
              "lr": Float(1e-5, 10.0, "client learning rate"),
              "B": Int(1, 512, "client mini-batch size", cost=1.0),
              "near_target": Float(0.5, 1.0, "the near-converged target, as a share of sync-st's final accuracy"),
              "eta_g_sync_st": ETA, "eta_g_async_st": ETA, "eta_g_fedast_static": ETA, "eta_g_fedast": ETA,
              **_TUNING_KEYS},
        packages=PACKAGES,
        plot_caption="test accuracy of each task against simulated time",
    ),
]
