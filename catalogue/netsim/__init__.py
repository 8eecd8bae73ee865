"""Network simulation: real-time video over sparse LEO constellations with an adaptive pacer
queue limit around handovers (simpy). Light: describes the experiment only (no optional imports)."""

from ..frame import ExperimentInfo

EXPERIMENTS = [
    ExperimentInfo(
        name="leo-pacing",
        family="netsim",
        paper="Gottipati, Qiu, 2025",
        claim="raising WebRTC's pacer queue limit only around predicted LEO handovers gives up to 3x bitrate and "
              "62% fewer freezes than the fixed 2000 ms limit",
        entry="asyncgen.catalogue.netsim.experiments:run_leo_pacing",
        defaults={"dynamic_seconds": 120.0, "stable_seconds": 60.0, "tune_seeds": 10, "stable_limit_ms": 200.0,
                  "handover_limit_ms": 3000.0, "lead_s": 2.0, "schedule_jitter_s": 1.0, "schedule_miss": 0.10,
                  "workers": 2},
        quick={"dynamic_seconds": 20.0, "stable_seconds": 15.0, "tune_seeds": 3},
        default_seeds=10,
        quick_seeds=1,
        processes_key="workers",
        packages=("simpy", "scikit-learn", "numpy"),
        plot_caption="GCC target bitrate against time on dynamic and stable traces",
    ),
]
