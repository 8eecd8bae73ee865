"""GNN inference that survives asynchrony: the energy GNN of Solodova, Richardson, Oktay &
Adams (ICLR 2025), with GCN, GIN and IGNN baselines and a hogwild (asynchronous,
bounded-delay) inference runner.

- :class:`~asyncgen.catalogue.gnn.energy.EnergyGNN` and
  :class:`~asyncgen.catalogue.gnn.energy.EnergyConv` (a torch-geometric ``MessagePassing``).
- :class:`~asyncgen.catalogue.gnn.baselines.ExplicitGNN` (GCN, GIN) and
  :class:`~asyncgen.catalogue.gnn.baselines.IGNN`.
- :func:`~asyncgen.catalogue.gnn.hogwild.hogwild_inference`,
  :func:`~asyncgen.catalogue.gnn.hogwild.synchronous_inference`.
- :func:`~asyncgen.catalogue.gnn.agents.agent_inference`: one process per agent over
  ``torch.distributed`` (gloo).

This module imports nothing optional (``pip install 'asyncgen[gnn]'`` for the rest).
"""

from asyncgen.catalogue.frame import Choices, ExperimentInfo, Float, Floats, Int, Ints

EXPERIMENTS = [
    ExperimentInfo(
        name="energy-gnn-hogwild",
        paper_ids=('arXiv:2407.00494',),
        size_cut=('the paper trains on several synthetic multi-agent tasks and real graph data sets; the default run '
                  'trains on two generated tasks (64 training graphs each) for 6 epochs and runs 10 hogwild schedules '
                  'on 4 test graphs, 3 seeds'),
        family="gnn",
        paper="Solodova, Richardson, Oktay, Adams, ICLR 2025 (Graph neural networks for asynchronous, "
              "decentralized multi-agent inference)",
        claim="explicit GNNs give wrong outputs under asynchronous node updates; implicit (energy) GNNs converge "
              "to the synchronous answer",
        entry="asyncgen.catalogue.gnn.experiments:run_energy_gnn_hogwild",
        tune_entry="asyncgen.catalogue.gnn.experiments:tune_energy_gnn_hogwild",
        defaults={
            "arms": ["gcn", "gin", "ignn", "energy-gnn"],
            "train_graphs": 64,
            "test_graphs": 32,
            "epochs": 6,
            "batch_graphs": 32,
            # each model's Adam learning rate, the grid's best on the tuning seeds ('asyncgen catalogue tune
            # energy-gnn-hogwild', committed in docs/catalogue/energy-gnn-hogwild/tuning.json)
            "lr_gcn": 0.003,
            "lr_gin": 0.01,
            "lr_ignn": 0.01,
            "lr_energy_gnn": 0.01,
            "hidden": 64,
            "state_dim": 16,
            "width": 32,
            "beta": 1.0,
            "step": 0.1,
            "tol": 1e-6,
            "p": 0.3,
            "max_delay": 5,
            "schedules": 10,
            "hogwild_graphs": 4,
            "lr_grid": [0.003, 0.01, 0.03],
            "tune_seeds": [100, 101],
        },
        quick={"train_graphs": 8, "test_graphs": 4, "epochs": 1, "batch_graphs": 8, "schedules": 2,
               "hogwild_graphs": 1, "tune_seeds": [100]},
        default_seeds=3,
        quick_seeds=1,
        keys={
            "arms": Choices(("gcn", "gin", "ignn", "energy-gnn"), "models compared", cost=1.0),
            "train_graphs": Int(1, 1600, "training graphs per task", cost=1.0),
            "test_graphs": Int(1, 1600, "test graphs per task"),
            "epochs": Int(1, 150, "training epochs", cost=1.0),
            "batch_graphs": Int(1, 1024, "graphs per mini-batch"),
            "lr_gcn": Float(1e-6, 1.0, "GCN's learning rate (Adam; tuned)"),
            "lr_gin": Float(1e-6, 1.0, "GIN's learning rate (Adam; tuned)"),
            "lr_ignn": Float(1e-6, 1.0, "IGNN's learning rate (Adam; tuned)"),
            "lr_energy_gnn": Float(1e-6, 1.0, "the energy GNN's learning rate (Adam; tuned)"),
            "hidden": Int(1, 256, "hidden width of GCN and GIN", cost=0.5),
            "state_dim": Int(1, 128, "node state dimension of IGNN and the energy GNN"),
            "width": Int(1, 256, "width of the energy GNN's convex network", cost=0.5),
            "beta": Float(1e-6, 1e3, "energy GNN's β"),
            "step": Float(1e-6, 10.0, "energy GNN's gradient step"),
            "tol": Float(1e-12, 1e-1, "fixed-point tolerance"),
            "p": Float(0.01, 1.0, "probability a node updates in a hogwild step"),
            "max_delay": Int(0, 1000, "largest delay (steps) of a neighbour's state in hogwild inference"),
            "schedules": Int(1, 250, "random hogwild schedules per graph", cost=1.0),
            "hogwild_graphs": Int(1, 64, "test graphs run under hogwild inference (<= test_graphs)", cost=1.0),
            "lr_grid": Floats(1e-6, 1.0, "tuning: learning rates tried per model", items=16),
            "tune_seeds": Ints(100, 10**6, "tuning seeds (>= 100: never an evaluation seed)", items=16),
        },
        packages=("torch-geometric", "scikit-learn"),
        plot_caption="relative error of hogwild outputs per graph (quantiles) and task metrics sync vs hogwild",
    )
]
