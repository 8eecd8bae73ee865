"""Asynchronous hyperparameter optimisation: AEGiS (asynchronous epsilon-greedy Bayesian
optimisation, an optuna sampler) and Iterative Deepening Hyperband (an ask/tell scheduler
with an optuna-storage adapter). Light: describes the experiments only (no optional imports)."""

from ..frame import Bool, Choices, ExperimentInfo, Float, Int

EXPERIMENTS = [
    ExperimentInfo(
        name="aegis",
        paper_ids=('arXiv:2010.07615',),
        size_cut=("issue 24's size is 10 seeds x 60 evaluations with a 10 restarts / 1024 raw samples acquisition "
                  "budget; the default run cuts it to 3 seeds, 40 (Branin) and 50 (Hartmann6) evaluations and 4 "
                  "restarts / 256 raw samples (docs/catalogue/aegis/full-size/: the issue's size, 10 seeds x 60 "
                  "evaluations at 10/1024)"),
        family="hpo",
        paper="De Ath, Everson, Fieldsend, UAI 2021",
        claim="asynchronous epsilon-greedy BO (exploit / Thompson / Pareto moves, running points ignored) beats "
              "Kriging believer, local penalisation and Thompson sampling with 4 asynchronous workers",
        entry="asyncgen.catalogue.hpo.experiments:run_aegis",
        defaults={"arms": ["aegis", "random", "kb-ei", "local-penalisation", "thompson", "gp-sampler"],
                  "workers": 4, "evaluations_branin": 40, "evaluations_hartmann6": 50, "refit_every": 5,
                  "num_restarts": 4, "raw_samples": 256, "one_worker_check": True, "processes": 2},
        quick={"arms": ["aegis", "random", "kb-ei"], "evaluations_branin": 8, "evaluations_hartmann6": 15,
               "num_restarts": 2, "raw_samples": 64, "one_worker_check": False},
        # the run, committed in docs/catalogue/aegis/full-size/ (744 s of CPU, 510 s on 2 processes):
        # --seeds 10 --set evaluations_branin=60 --set evaluations_hartmann6=60 --set num_restarts=10
        # --set raw_samples=1024
        default_seeds=3,
        quick_seeds=1,
        processes_key="processes",
        keys={"arms": Choices(("aegis", "random", "kb-ei", "local-penalisation", "thompson", "gp-sampler"),
                              "methods compared", cost=1.0),
              "workers": Int(1, 64, "asynchronous workers (points evaluated at once)"),
              "evaluations_branin": Int(5, 300, "evaluations per run on Branin", cost=2.0),
              "evaluations_hartmann6": Int(13, 300, "evaluations per run on Hartmann6", cost=2.0),
              "refit_every": Int(1, 100, "evaluations between GP hyperparameter refits"),
              # the GP fits, not the acquisition optimiser, take the time: 10 seeds x 60 evaluations cost 846 s of CPU
              # at 4 restarts / 256 raw samples and 744 s at 10/1024 (2.5x and 4x; the loads differed). Small costs
              # keep the estimate of a large budget honest without the 10x overshoot the old 1.0 / 0.5 gave
              "num_restarts": Int(1, 64, "acquisition optimiser restarts", cost=0.1),
              "raw_samples": Int(16, 8192, "raw samples seeding the acquisition optimiser", cost=0.1),
              "one_worker_check": Bool("also run AEGiS with one worker (the sequential check)"),
              "processes": Int(1, 64, "processes the runs are spread over")},
        packages=("optuna", "botorch", "gpytorch", "torch"),
        plot_caption="median log10 simple regret against completed evaluations",
    ),
    ExperimentInfo(
        name="idhb",
        paper_ids=('arXiv:2302.00511',),
        size_cut=('the paper tunes real learners on HPO benchmarks; the default run searches synthetic learning curves '
                  '(first max budget 27, extended to 81), 20 seeds'),
        family="hpo",
        paper="Brandt, Wever, Iliadis, Bengs, Hüllermeier, IJCAI 2023",
        claim="extending Hyperband's max budget reuses every earlier result: ID-HB costs what HB(eta R) costs, "
              "finds as good a configuration, and saves the rerun",
        entry="asyncgen.catalogue.hpo.experiments:run_idhb",
        defaults={"eta": 3, "r_min": 1.0, "first_max_budget": 27.0, "noise": 0.002},
        quick={},
        default_seeds=20,
        quick_seeds=2,
        keys={"eta": Int(2, 9, "Hyperband's reduction factor η"),
              "r_min": Float(0.01, 100.0, "smallest budget"),
              "first_max_budget": Float(1.0, 6561.0, "max budget of the first run (the second is η times it)",
                                        cost=1.0),
              "noise": Float(0.0, 1.0, "observation noise of the learning curves")},
        packages=("numpy",),
        plot_caption="true final loss of the incumbent against cumulative budget",
    ),
]
