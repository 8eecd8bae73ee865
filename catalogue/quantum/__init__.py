"""Memory-enhanced quantum key distribution (Bhaskar et al., Nature 2020), as analytic key
rates with a Monte Carlo check. Light: describes the experiment only (no optional imports)."""

from ..frame import ExperimentInfo, Float, Floats, Int, Ints

EXPERIMENTS = [
    ExperimentInfo(
        name="mdi-qkd-memory",
        paper_ids=('DOI:10.1038/s41586-020-2103-5',),
        size_cut=("nothing: the rate model is analytic, evaluated over the paper's loss range (40-100 dB) with its "
                  'cycle length (124 bins); the Monte Carlo check samples 1e6 cycles at 3 losses'),
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
        # mc_cycles up to 1e9: about 3.5e7 cycles per CPU second (measured), so the default 3 seeds x 3 losses
        # at the ceiling take about 5 min of CPU (10^13 cycles would take five weeks)
        keys={
            "loss_min_db": Float(0.0, 200.0, "smallest total channel loss on the curve, dB"),
            "loss_max_db": Float(0.0, 200.0, "largest total channel loss on the curve, dB"),
            "loss_points": Int(2, 10001, "points on the loss curve"),
            "report_loss_db": Float(0.0, 200.0, "loss at which the ratio to PLOB is reported, dB"),
            "cycle_bins": Int(1, 100000, "time bins per memory cycle"),
            "curve_cycle_bins": Ints(1, 100000, "cycle lengths drawn on the key-rate plot", items=16),
            "ratio_cycle_bins": Ints(1, 100000, "cycle lengths of the ratio-to-PLOB sweep", items=64),
            "t2_seconds": Float(1e-9, 10.0, "memory coherence time T2, s"),
            "ratio_t2_seconds": Floats(1e-9, 10.0, "T2 values of the ratio-to-PLOB sweep, s", items=64),
            "bin_seconds": Float(1e-12, 1e-3, "length of one time bin, s"),
            "base_error": Float(0.0, 0.5, "error probability before dephasing"),
            "memory_efficiency": Float(0.0, 1.0, "memory efficiency"),
            "bb84_error": Float(0.0, 0.5, "error of the BB84 comparison"),
            "mc_cycles": Int(1, 10**9, "Monte Carlo cycles per (seed, loss)", cost=1.0),
            "mc_loss_db": Floats(0.0, 200.0, "losses checked by Monte Carlo, dB", items=16, cost=1.0),
        },
        packages=("numpy", "scipy"),
        plot_caption="secret key per channel use against total loss; ratio to PLOB against cycle length and T2",
    ),
]
