"""Continual learning without forgetting: HyperInterval (interval arithmetic in a hypernetwork's
task-embedding space) and its baselines HNET, EWC, fine-tuning and joint training.

This ``__init__`` only describes the experiment; the methods live in
:mod:`.hyperinterval`, :mod:`.hnet`, :mod:`.ewc` and :mod:`.baselines` and need the
``continual`` extra (scikit-learn, for the digits data) only for the experiment.
"""

from __future__ import annotations

from asyncgen.catalogue.frame import Choices, ExperimentInfo, Float, Int

EXPERIMENTS = [
    ExperimentInfo(
        name="hyperinterval",
        paper_ids=('arXiv:2405.15444',),
        size_cut=('the paper runs Permuted/Split MNIST, Split CIFAR-100 and TinyImageNet; the default run splits '
                  "scikit-learn's digits into 5 tasks of 30 epochs each, 1 seed"),
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
        keys={
            "tasks": Int(1, 5, "tasks learnt one after another (split digits has 5)", cost=1.0),
            "epochs": Int(1, 1000, "epochs per task on split digits", cost=1.0),
            "permuted_epochs": Int(1, 1000, "epochs per task on permuted digits"),
            "batch_size": Int(1, 1024, "mini-batch size"),
            "lr": Float(1e-6, 1.0, "learning rate (Adam)"),
            "embedding_dim": Int(1, 1024, "task-embedding dimension"),
            "gamma": Float(0.0, 100.0, "HyperInterval's interval radius γ"),
            "kappa_min": Float(0.0, 1.0, "HyperInterval's smallest weight κ of the worst-case loss"),
            "beta_reg": Float(0.0, 100.0, "hypernetwork output regulariser β"),
            "ewc_lambda": Float(0.0, 1e7, "EWC's penalty λ"),
            "hyper_input_scale": Float(1e-6, 10.0, "scale of the embeddings fed to the hypernetwork"),
            "test_fraction": Float(0.05, 0.9, "share of each task held out for testing"),
            "benchmarks": Choices(("split", "permuted"), "benchmarks run", cost=1.0),
        },
        packages=("scikit-learn",),
        plot_caption="accuracy on each task's test set after the last task",
    ),
]
