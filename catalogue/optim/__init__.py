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

from asyncgen.catalogue.frame import Choice, ExperimentInfo, Float, Floats, Int, Ints

EXPERIMENTS = [
    ExperimentInfo(
        name="adaptive-braking",
        paper_ids=('arXiv:2007.01397',),
        size_cut=('the paper trains ResNets on CIFAR-10 and ImageNet-1k; the default run trains a 64-256-256-10 MLP on '
                  "digits for 40 epochs and a 50-dimensional quadratic for 2000 steps, at the paper's delays (up to "
                  '32), 3 seeds'),
        family="optim",
        paper="Venigalla, Kosson, Chiley, Köster, arXiv 2020 (Adaptive Braking for Mitigating Gradient Delay)",
        claim="SGDM + Adaptive Braking keeps its accuracy with gradient delays of 32+ steps where plain SGDM "
              "degrades or diverges",
        entry="asyncgen.catalogue.optim.experiments:run_adaptive_braking",
        tune_entry="asyncgen.catalogue.optim.experiments:tune_adaptive_braking",
        defaults={
            "momentum": 0.9,
            # digits: each arm's lr and momentum, the grid's best on the tuning seeds ('asyncgen catalogue tune
            # adaptive-braking', committed in docs/catalogue/adaptive-braking/tuning.json)
            "lr_sgdm": 0.005,
            "momentum_sgdm": 0.9,
            "lr_sgdm_lwp": 0.005,
            "momentum_sgdm_lwp": 0.9,
            "lr_sgdm_ab": 0.02,
            "momentum_sgdm_ab": 0.9,
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
            # down to 0.005: with momentum fixed at 0.9 every arm chose 0.02, the lower edge of {0.02, 0.05, 0.1}
            "lr_grid": [0.005, 0.01, 0.02, 0.05, 0.1],
            # every arm is a momentum method (SGDM, SGDM+LWP, SGDM+AB): momentum is part of what each arm is, kept
            # at the paper's 0.9, and the step size is what each arm's authors tune (a grid with momentum 0 let
            # the "SGDM" arm become plain SGD, a method the comparison is not about)
            "momentum_grid": [0.9],
            "tune_seeds": [100],
        },
        quick={"quad_steps": 600, "quad_delays": [0, 32], "digits_epochs": 3, "digits_delays": [0, 32],
               "rhos": [2.0], "quad_probe_lr": 0.0,
               "lr_grid": [0.02, 0.1], "momentum_grid": [0.9], "tune_seeds": [100]},
        default_seeds=3,
        quick_seeds=1,
        keys={
            "momentum": Float(0.0, 0.999, "SGD momentum on the quadratic (every arm; the quadratic goals fix "
                                          "lr and momentum, see the notes)"),
            "lr_sgdm": Float(1e-6, 10.0, "digits: SGDM's learning rate (tuned)"),
            "momentum_sgdm": Float(0.0, 0.999, "digits: SGDM's momentum (tuned)"),
            "lr_sgdm_lwp": Float(1e-6, 10.0, "digits: SGDM+LWP's learning rate (tuned)"),
            "momentum_sgdm_lwp": Float(0.0, 0.999, "digits: SGDM+LWP's momentum (tuned)"),
            "lr_sgdm_ab": Float(1e-6, 10.0, "digits: SGDM+AB's learning rate (tuned at rho=2, used for every rho)"),
            "momentum_sgdm_ab": Float(0.0, 0.999, "digits: SGDM+AB's momentum (tuned at rho=2, used for every rho)"),
            "rhos": Floats(0.01, 100.0, "Adaptive Braking's ρ values compared (must include 2)", items=8, cost=0.5),
            "granularity": Choice(("tensor", "global"), "one braking cosine per tensor or one for the model"),
            "quad_dims": Int(2, 10000, "dimension of the quadratic"),
            "quad_steps": Int(10, 200000, "steps on the quadratic", cost=0.2),
            "quad_lr": Float(1e-6, 10.0, "learning rate on the quadratic"),
            "quad_noise": Float(0.0, 10.0, "gradient noise on the quadratic"),
            "quad_delays": Ints(0, 1024, "gradient delays D on the quadratic (must include 0)", items=16),
            "quad_probe_lr": Float(0.0, 10.0, "a second quadratic learning rate reported at the largest D (0: none)"),
            "digits_epochs": Int(1, 2000, "epochs of the digits MLP", cost=0.8),
            "digits_batch": Int(1, 1024, "digits mini-batch size"),
            "digits_hidden": Int(1, 2048, "digits MLP hidden width", cost=1.0),
            "digits_delays": Ints(0, 1024, "gradient delays D on digits (must include 0)", items=16, cost=1.0),
            "lr_grid": Floats(1e-6, 10.0, "tuning: learning rates tried per arm (digits)", items=16),
            "momentum_grid": Floats(0.0, 0.999, "tuning: momenta tried per arm (digits)", items=8),
            "tune_seeds": Ints(100, 10**6, "tuning seeds (>= 100: never an evaluation seed)", items=16),
        },
        packages=("scikit-learn",),
        plot_caption="test accuracy vs gradient delay (digits MLP) and f/f0 vs step on the quadratic at D=32",
    )
]
