"""Memory-enhanced quantum key distribution (Bhaskar et al., Nature 2020), as analytic key
rates with a Monte Carlo check. Light: describes the experiment only (no optional imports)."""

from ..frame import ExperimentInfo

EXPERIMENTS = [
    ExperimentInfo(
        name="mdi-qkd-memory",
        family="quantum",
        paper="Bhaskar, Riedinger, Machielse et al., Nature 2020",
        claim="a quantum memory in the middle of an MDI-QKD link beats the repeaterless PLOB bound (about 4x at 88 dB)",
        entry="asyncgen.catalogue.quantum.experiments:run_mdi_qkd_memory",
        defaults={
            "loss_min_db": 40.0, "loss_max_db": 100.0, "loss_points": 61, "report_loss_db": 88.0,
            "cycle_bins": 124, "curve_cycle_bins": [1, 16, 124], "ratio_cycle_bins": [1, 2, 4, 8, 16, 32, 64, 124, 256],
            "t2_seconds": 1e-3, "ratio_t2_seconds": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
            "bin_seconds": 1e-6, "base_error": 0.08, "memory_efficiency": 1.0, "bb84_error": 0.01,
            "mc_cycles": 1_000_000, "mc_loss_db": [40.0, 50.0, 60.0],
        },
        quick={"loss_points": 13, "mc_cycles": 200_000, "mc_loss_db": [40.0, 50.0]},
        default_seeds=3,
        quick_seeds=1,
        packages=("numpy", "scipy"),
        plot_caption="secret key per channel use against total loss; ratio to PLOB against cycle length and T2",
    ),
]
