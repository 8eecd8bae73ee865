"""Continual learning without forgetting: HyperInterval (interval arithmetic in a hypernetwork's
task-embedding space) and its baselines HNET, EWC, fine-tuning and joint training.

This ``__init__`` only describes the experiment; the methods live in
:mod:`.hyperinterval`, :mod:`.hnet`, :mod:`.ewc` and :mod:`.baselines` and need the
``continual`` extra (scikit-learn, for the digits data) only for the experiment.
"""

from __future__ import annotations

from asyncgen.catalogue.frame import ExperimentInfo

EXPERIMENTS = [
    ExperimentInfo(
        name="hyperinterval",
        family="continual",
        paper="Krukowski, Bielawska, Książek, Wawrzyński, Batorski, Spurek, arXiv 2024 (HyperInterval / HINT)",
        claim="interval task embeddings mapped by a hypernetwork to interval weights do not forget, and one "
              "universal embedding in the intersection of all task intervals serves every task",
        entry="asyncgen.catalogue.continual.experiments:run_hyperinterval",
        defaults={
            "tasks": 5,
            "epochs": 30,
            "permuted_epochs": 30,
            "batch_size": 64,
            "lr": 1e-3,
            "embedding_dim": 24,
            "gamma": 0.5,
            "kappa_min": 0.5,
            "beta_reg": 0.01,
            "ewc_lambda": 1000.0,
            "hyper_input_scale": 0.01,
            "test_fraction": 0.25,
            "benchmarks": ["split"],
        },
        quick={"epochs": 3, "permuted_epochs": 1, "tasks": 2},
        default_seeds=1,
        quick_seeds=1,
        packages=("scikit-learn",),
        plot_caption="accuracy on each task's test set after the last task",
    ),
]
