"""Network simulation: real-time video over sparse LEO constellations with an adaptive pacer
queue limit around handovers (simpy). Light: describes the experiment only (no optional imports)."""

from ..frame import ExperimentInfo, FilePath, Float, Int

EXPERIMENTS = [
    ExperimentInfo(
        name="leo-pacing",
        paper_ids=('arXiv:2507.09798',),
        size_cut=('the paper measures emulated and real Starlink calls; the default run simulates 120 s dynamic, 60 s '
                  'stable and 60 s Starlink-grid traces with a packet-level model, 10 seeds'),
        family="netsim",
        paper="Gottipati, Qiu, 2025",
        claim="raising WebRTC's pacer queue limit only around predicted LEO handovers gives up to 3x bitrate and "
              "62% fewer freezes than the fixed 2000 ms limit",
        entry="asyncgen.catalogue.netsim.experiments:run_leo_pacing",
        defaults={"dynamic_seconds": 120.0, "stable_seconds": 60.0, "starlink_seconds": 60.0, "tune_seeds": 10, "stable_limit_ms": 200.0,
                  "handover_limit_ms": 3000.0, "lead_s": 2.0, "schedule_jitter_s": 1.0, "schedule_miss": 0.10,
                  "workers": 2, "trace": ""},
        quick={"dynamic_seconds": 20.0, "stable_seconds": 15.0, "starlink_seconds": 15.0, "tune_seeds": 3},
        default_seeds=10,
        quick_seeds=1,
        processes_key="workers",
        keys={"dynamic_seconds": Float(10.0, 7200.0, "length of each dynamic (handover-heavy) trace, s", cost=1.0),
              "stable_seconds": Float(10.0, 7200.0, "length of each stable trace, s", cost=1.0),
              "starlink_seconds": Float(10.0, 7200.0, "length of each trace on Starlink's 15 s reconfiguration grid, s",
                                        cost=1.0),
              "tune_seeds": Int(1, 200, "traces (seeds 100..) the handover predictor is trained on", cost=0.5),
              "stable_limit_ms": Float(10.0, 10000.0, "adaptive pacer's queue limit away from handovers, ms"),
              "handover_limit_ms": Float(10.0, 60000.0, "adaptive pacer's queue limit around handovers, ms"),
              "lead_s": Float(0.0, 30.0, "how long before a predicted handover the limit is raised, s"),
              "schedule_jitter_s": Float(0.0, 30.0, "jitter of the published handover schedule, s"),
              "schedule_miss": Float(0.0, 1.0, "share of handovers missing from the schedule"),
              "workers": Int(1, 64, "worker processes"),
              "trace": FilePath("a measured link trace (CSV: time, capacity, delay; see docs/catalogue/netsim.md) "
                                "the dynamic-trace calls run over instead of generated traces ('run --trace FILE')")},
        packages=("simpy", "scikit-learn", "numpy"),
        plot_caption="GCC target bitrate against time on dynamic and stable traces",
    ),
]
