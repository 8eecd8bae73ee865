"""Bring your own trace (issue 24, §5): ``load_trace_csv`` turns a measured CSV (time, capacity, delay; optional
loss, outage, handover marks) into the 1 ms LinkTrace the simulator runs, and refuses a bad file in one line."""

import numpy as np
import pytest

from asyncgen.catalogue.netsim.pacing import OracleQueueLimit
from asyncgen.catalogue.netsim.rtc import simulate_call
from asyncgen.catalogue.netsim.traces import load_trace_csv


def write(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_measured_trace_becomes_a_1_ms_link(tmp_path):
    rows = ["time_s,capacity_mbps,delay_ms,loss,comment"]
    for second in range(12):
        capacity = 0 if second == 5 else 3 + second % 3  # second 5: an outage (capacity 0)
        rows.append(f"{second},{capacity},{25 + second},{0.1 if second == 6 else 0},x")
    trace = load_trace_csv(write(tmp_path, "\n".join(rows)))
    assert trace.duration_ms == 12_000
    assert trace.capacity_bps[0] == 3e6 and trace.capacity_bps[1999] == 4e6 and trace.capacity_bps[2000] == 5e6
    assert trace.outage[5000:6000].all() and not trace.outage[:5000].any() and not trace.outage[6000:].any()
    assert trace.capacity_bps[5500] == trace.capacity_bps[4999]  # an outage keeps the nominal rate
    assert trace.delay_ms[11_999] == 36 and trace.loss[6000] == 0.1 and trace.loss[7000] == 0
    assert list(trace.handovers_ms) == [5000.0]  # no handover column: every outage start is one
    assert trace.resume_ms[5000] == 6000
    metrics, _ = simulate_call(trace, OracleQueueLimit(trace.handovers_ms), seed=0)
    assert np.isfinite(metrics.bitrate) and metrics.bitrate > 0


def test_handover_marks_milliseconds_and_a_late_start(tmp_path):
    text = "time_ms,capacity_kbps,delay_ms,handover\n" + "\n".join(
        f"{1000 + 500 * i},{2000 + i},{30},{1 if i in (4, 10) else 0}" for i in range(24))
    trace = load_trace_csv(write(tmp_path, text), end_s=13.5)
    assert trace.duration_ms == 12_500  # from the first row (1 s) to end_s
    assert list(trace.handovers_ms) == [2000.0, 5000.0] and trace.capacity_bps[0] == 2e6


@pytest.mark.parametrize("text, message", [
    ("time,capacity,delay\n0,1,1\n", "needs the columns time_s (or time_ms), capacity_mbps (or capacity_kbps, "
                                     "capacity_bps) and delay_ms; found time, capacity, delay"),
    ("time_s,capacity_mbps,delay_ms\n", "no rows under the header"),
    ("time_s,capacity_mbps,delay_ms\n0,3,20\n1,fast,20\n", "line 3: capacity_mbps='fast' is not a number"),
    ("time_s,capacity_mbps,delay_ms\n0,3,20\n0,3,20\n", "line 3: time_s: times must increase (after 0)"),
    ("time_s,capacity_mbps,delay_ms,loss\n0,3,20,1.5\n", "line 2: loss=1.5: expected a finite number in 0.0..1.0"),
    ("time_s,capacity_mbps,delay_ms\n0,3,-1\n", "line 2: delay_ms=-1: expected a finite number in 0.0..10000.0"),
    ("time_s,capacity_mbps,delay_ms\n0,0,20\n1,0,20\n", "every row has capacity 0"),
    ("time_s,capacity_mbps,delay_ms\n0,3,20\n1,3,20\n", "trace length 2000 ms: need a trace of at least 10 s"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as caught:
        load_trace_csv(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_run_trace_replaces_the_generated_dynamic_traces(tmp_path, capsys):
    """``asyncgen catalogue run leo-pacing --trace FILE``: the dynamic-trace calls of every evaluation seed run over
    the file's trace (the stable ones and the predictor's tuning traces stay generated); a bad file or an experiment
    without traces is refused in one line before any work."""
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.frame import CatalogueError, run_experiment
    from asyncgen.cli.main import main
    from asyncgen.catalogue.netsim import experiments as leo

    rows = ["time_s,capacity_mbps,delay_ms,handover"]
    for tenth in range(150):  # 15 s at 8 Mbit/s with a 300 ms outage from 7 s, marked as a handover
        rows.append(f"{tenth / 10:.1f},{0 if 70 <= tenth < 73 else 8},30,{1 if tenth == 70 else 0}")
    path = write(tmp_path, "\n".join(rows))
    small = ["workers=1"]  # --quick: generated dynamic traces of 20 s, stable ones of 15 s
    seen, real = [], leo._trace_and_schedule

    def recording(kind, seed, config):
        trace, schedule = real(kind, seed, config)
        seen.append((kind, seed, trace.duration_ms, list(trace.handovers_ms)))
        return trace, schedule

    leo._trace_and_schedule = recording
    try:
        report = run_experiment(get_experiment("leo-pacing"), quick=True, overrides=[*small, f"trace={path}"],
                                progress=False)
    finally:
        leo._trace_and_schedule = real
    assert {(d, tuple(h)) for kind, seed, d, h in seen if kind == "dynamic" and seed < 100} == {(15_000, (7000.0,))}
    assert {d for kind, seed, d, _ in seen if kind == "dynamic" and seed >= 100} == {20_000}  # tuning: generated
    assert {d for kind, seed, d, _ in seen if kind == "stable"} == {15_000}
    assert report["config"]["trace"] == str(path)
    assert any(f"the measured trace {path} (15 s, 1 handovers)" in note for note in report["notes"])

    with pytest.raises(CatalogueError, match=r"^--set trace=nothing.csv: not accepted; trace takes a path to an "
                                             r"existing file \(empty: none\) \(default \(none\)\)$"):
        run_experiment(get_experiment("leo-pacing"), quick=True, overrides=["trace=nothing.csv"], progress=False)
    short = write(tmp_path, "time_s,capacity_mbps,delay_ms\n0,8,30\n4,8,30\n", "short.csv")
    with pytest.raises(CatalogueError, match=r"^--trace: .*need a trace of at least 10 s"):
        run_experiment(get_experiment("leo-pacing"), quick=True, overrides=[f"trace={short}"], progress=False)
    assert main(["catalogue", "run", "idhb", "--quick", "--trace", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "--trace: idhb takes no trace file (experiments that do: leo-pacing)" in capsys.readouterr().err
