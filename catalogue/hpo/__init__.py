"""Asynchronous hyperparameter optimisation: AEGiS (asynchronous epsilon-greedy Bayesian
optimisation, an optuna sampler) and Iterative Deepening Hyperband (an ask/tell scheduler
with an optuna-storage adapter). Light: describes the experiments only (no optional imports)."""

from ..frame import ExperimentInfo

EXPERIMENTS = [
    ExperimentInfo(
        name="idhb",
        family="hpo",
        paper="Brandt, Wever, Iliadis, Bengs, Hüllermeier, IJCAI 2023",
        claim="extending Hyperband's max budget reuses every earlier result: ID-HB costs what HB(eta R) costs, "
              "finds as good a configuration, and saves the rerun",
        entry="asyncgen.catalogue.hpo.experiments:run_idhb",
        defaults={"eta": 3, "r_min": 1.0, "first_max_budget": 27.0, "noise": 0.002},
        quick={},
        default_seeds=20,
        quick_seeds=2,
        default_seconds=16.0,
        packages=("numpy",),
        plot_caption="true final loss of the incumbent against cumulative budget",
    ),
]
