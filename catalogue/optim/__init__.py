"""Delay-tolerant optimisers: Adaptive Braking (Venigalla, Kosson, Chiley & Köster, 2020).

- :class:`~asyncgen.catalogue.optim.adaptive_braking.AdaptiveBraking`: a ``torch.optim.Optimizer``
  (SGD with momentum that scales each gradient by ``1 - rho * cos(g, v)``).
- :func:`~asyncgen.catalogue.optim.adaptive_braking.braking`: the same scaling in front of
  any optimizer class (experimental).
- :class:`~asyncgen.catalogue.optim.delayed.DelayedGradientTrainer`: gradients computed on
  weights D steps old, optionally with linear weight prediction (Kosson et al., 2020).

This module imports nothing optional; the method modules need only torch, the
experiment needs scikit-learn (``pip install 'asyncgen[optim]'``).
"""

from asyncgen.catalogue.frame import ExperimentInfo

EXPERIMENTS = [
    ExperimentInfo(
        name="adaptive-braking",
        family="optim",
        paper="Venigalla, Kosson, Chiley, Köster, arXiv 2020 (Adaptive Braking for Mitigating Gradient Delay)",
        claim="SGDM + Adaptive Braking keeps its accuracy with gradient delays of 32+ steps where plain SGDM "
              "degrades or diverges",
        entry="asyncgen.catalogue.optim.experiments:run_adaptive_braking",
        defaults={
            "momentum": 0.9,
            "rhos": [1.0, 2.0],
            "granularity": "tensor",
            "quad_dims": 50,
            "quad_steps": 2000,
            "quad_lr": 0.05,
            "quad_noise": 1e-3,
            "quad_delays": [0, 8, 32],
            "quad_probe_lr": 0.1,
            "digits_epochs": 40,
            "digits_batch": 32,
            "digits_hidden": 256,
            "digits_delays": [0, 4, 16, 32],
            "lr_grid": [0.02, 0.05, 0.1],
            "tune_seed": 100,
            "tune_seeds": 1,
        },
        quick={"quad_steps": 600, "quad_delays": [0, 32], "digits_epochs": 3, "digits_delays": [0, 32],
               "lr_grid": [0.1], "rhos": [2.0], "quad_probe_lr": 0.0},
        default_seeds=3,
        quick_seeds=1,
        packages=("scikit-learn",),
        plot_caption="test accuracy vs gradient delay (digits MLP) and f/f0 vs step on the quadratic at D=32",
    )
]
