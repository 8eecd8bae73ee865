"""``asyncgen catalogue``: everything a run writes or needs is checked before it starts, the three result files
are written together (whole, or none changed), every ``--set`` key has a range, and a long run says so and
shows progress that can never fail it (issue 30, the catalogue command).

What only a whole process shows (a file-size limit, a closed standard error) runs the command as users do;
the rest calls ``main`` here. The experiments run are the two cheapest (``idhb``, ``mdi-qkd-memory``)."""

import io
import json
import os
import resource
import subprocess
import sys
import threading

import pytest
import tqdm

from asyncgen.catalogue import experiments, get_experiment
from asyncgen.catalogue.frame import (CatalogueError, ExperimentInfo, Key, Progress, expected_seconds, plan_run,
                                      resolve_config)
from asyncgen.cli.main import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
RESULTS = ("results.json", "results.md", "results.png")


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the experiment is even imported: the refusal must come before any work."""
    def load(self):
        raise AssertionError(f"{self.name} was loaded: the check came after the work started")

    monkeypatch.setattr(ExperimentInfo, "load", load)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_a_file_parented_out_is_refused_before_the_run(tmp_path, capsys, no_run):
    (tmp_path / "afile").write_text("keep")
    for out in ("afile", "afile/sub", "afile/sub/deeper"):
        assert main(["catalogue", "run", "mdi-qkd-memory", "--quick", "--out", str(tmp_path / out)]) == 2
        line = one_error_line(capsys)
        assert line.startswith("asyncgen catalogue: error: --out ") and "afile is a file, not a directory" in line
    assert sorted(os.listdir(tmp_path)) == ["afile"] and (tmp_path / "afile").read_text() == "keep"


def test_an_unwritable_out_is_refused_before_the_run(tmp_path, capsys, no_run):
    assert main(["catalogue", "run", "idhb", "--out", "/proc/asyncgen-no-such-dir/out"]) == 2
    assert "--out /proc/asyncgen-no-such-dir/out/results.json: directory /proc is not writable" in \
        one_error_line(capsys)
    if os.geteuid() != 0:  # root writes into a folder without write bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(["catalogue", "run", "idhb", "--out", str(locked / "out")]) == 2
        assert "is not writable" in one_error_line(capsys)
        assert not (locked / "out").exists()


def test_a_result_name_that_is_a_folder_is_refused_before_the_run(tmp_path, capsys, no_run):
    (tmp_path / "out" / "results.md").mkdir(parents=True)
    assert main(["catalogue", "run", "idhb", "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "--out " in line and "results.md is a directory" in line
    assert os.listdir(tmp_path / "out") == ["results.md"]


@pytest.mark.parametrize("setting, message", [
    ("mc_cycles=1e13", "--set mc_cycles=1e13: not accepted; mc_cycles takes an int in 1..1e9 (default 1000000)"),
    ("mc_cycles=10000000000000", "mc_cycles takes an int in 1..1e9"),
    ("mc_cycles=0", "mc_cycles takes an int in 1..1e9"),
    ("mc_cycles=2.5", "mc_cycles takes an int in 1..1e9"),
    ("mc_cycles=many", "mc_cycles takes an int in 1..1e9"),
    ("mc_loss_db=40,500", "mc_loss_db takes a list of 1-16 values, each float in 0..200 (default 40,50,60)"),
    ("base_error=inf", "base_error takes a float in 0..0.5"),
    ("cycles=5", "--set cycles: unknown key for mdi-qkd-memory; valid keys: base_error, bb84_error,"),
])
def test_an_out_of_range_set_is_one_line_before_the_run(tmp_path, capsys, no_run, setting, message):
    out = tmp_path / "out"
    assert main(["catalogue", "run", "mdi-qkd-memory", "--set", setting, "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("asyncgen catalogue: error: --set ") and message in line
    assert not out.exists()


@pytest.mark.parametrize("args, message", [(["--seeds", "0"], "--seeds 0: takes 1..1000"),
                                           (["--seeds", "100000"], "--seeds 100000: takes 1..1000"),
                                           (["--seed", "-1"], "--seed -1: takes 0..1000000000")])
def test_seeds_out_of_range(capsys, no_run, args, message):
    assert main(["catalogue", "run", "idhb", *args]) == 2
    assert message in one_error_line(capsys)


def test_every_key_of_every_experiment_has_a_range_that_holds_its_defaults():
    for name, info in experiments().items():
        assert set(info.keys) == set(info.defaults), name
        for key, spec in info.keys.items():
            assert isinstance(spec, Key) and spec.meaning, (name, key)
            for source in (info.defaults, info.quick):
                if key in source:
                    spec.check(key, source[key])
            if spec.type in ("int", "float"):
                assert spec.low is not None and spec.high is not None, (name, key)  # every number has a ceiling
                above = spec.high * 10 + 1
                with pytest.raises(CatalogueError, match=rf"^--set {key}=.*: .*{key} takes "):
                    resolve_config(info, quick=False, overrides=[f"{key}={[above] if spec.items else above}"
                                                                 .replace("[", "").replace("]", "")])


def test_ranges_keep_each_key_within_a_few_hours():
    """The estimate (the committed run's CPU seconds scaled by each key's cost) at any one key's ceiling, the
    others at their defaults, stays under 4 hours of wall time on 2 cores."""
    for name, info in experiments().items():
        for key, spec in info.keys.items():
            if not spec.cost:
                continue
            top = spec.high if not spec.items else None
            value = [info.defaults[key][0]] * spec.items if spec.items and info.defaults[key] else top
            if value is None:
                continue
            config = {**info.defaults, key: value}
            expected = expected_seconds(info, config, info.default_seeds)
            if expected is not None:
                assert expected[0] < 4 * 3600, (name, key, expected)


def test_a_file_size_limit_after_the_run_is_one_line_and_changes_no_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("the previous run")
    limit = 8192  # results.png is larger; the check's 512-byte probe fits

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    done = subprocess.run([sys.executable, "-m", "asyncgen.cli", "catalogue", "run", "idhb", "--quick", "--out",
                           str(out)], preexec_fn=limited, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"asyncgen catalogue: error: {out}/results.") and "(EFBIG)" in lines[0]
    assert os.listdir(out) == ["results.json"] and (out / "results.json").read_text() == "the previous run"


def test_a_standard_error_whose_reader_has_gone_does_not_fail_the_run(tmp_path):
    read, write = os.pipe()
    os.close(read)  # every write to standard error fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "asyncgen.cli", "catalogue", "run", "idhb", "--quick", "--out",
                               str(tmp_path)], stderr=write, env=ENV, stdout=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 0
    assert "goals passed" in done.stdout
    assert sorted(os.listdir(tmp_path)) == sorted(RESULTS)


def test_a_closed_standard_error_does_not_fail_a_long_run(tmp_path, monkeypatch):
    """Closed in this process (a ValueError on every write): the announcement and the progress lines of a long
    run are lost, the run is not."""
    import asyncgen.catalogue.frame as frame

    monkeypatch.setattr(frame, "LONG_SECONDS", 0.0)
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    assert main(["catalogue", "run", "idhb", "--quick", "--out", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(RESULTS)


def test_a_long_run_says_so_and_shows_progress_lines(tmp_path, capsys, monkeypatch):
    import asyncgen.catalogue.frame as frame

    monkeypatch.setattr(frame, "LONG_SECONDS", 0.0)  # idhb --quick takes a fraction of a second
    assert main(["catalogue", "run", "idhb", "--quick", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("idhb: this run is expected to take about ") and "progress follows" in err[0]
    assert err[-1].startswith("idhb: 2/2 (100 %) done after ")
    assert sorted(os.listdir(tmp_path)) == sorted(RESULTS)
    assert main(["catalogue", "run", "idhb", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if "done after" in line] == []


def test_the_estimate_scales_the_committed_run():
    info = get_experiment("mdi-qkd-memory")
    base = expected_seconds(info, resolve_config(info, quick=False), info.default_seeds)
    assert base is not None and base[1] > 0
    bigger = expected_seconds(info, resolve_config(info, quick=False, overrides=["mc_cycles=1000000000"]), 6)
    assert bigger[1] == pytest.approx(base[1] * 1000 * 2)
    assert plan_run(info, overrides=["mc_cycles=1000000000"]).long and not plan_run(info).long


@pytest.mark.parametrize("mode", ["bar", "lines"])
def test_progress_never_raises_on_a_failing_stream(monkeypatch, mode):
    class Failing(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    for stream in (Failing(), io.StringIO(), None):
        if stream is not None and not isinstance(stream, Failing):
            stream.close()  # closed: ValueError on write
        monkeypatch.setattr(sys, "stderr", stream)
        bar = Progress(total=3, desc="x", enabled=mode, interval=0.0)
        bar.set_total(3)
        for _ in range(3):
            bar.update()
        bar.close()
        assert bar.done == 3
        # tqdm's process-wide lock is free again: another thread's progress bar would not wait for it forever
        took = []

        def take():
            with tqdm.tqdm.get_lock():
                took.append(True)

        other = threading.Thread(target=take, daemon=True)  # a daemon: if it waits forever, the test fails
        other.start()
        other.join(timeout=10)
        assert took == [True], stream


def test_show_lists_every_key_with_its_range_and_default(capsys):
    assert main(["catalogue", "show", "mdi-qkd-memory"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mdi-qkd-memory (quantum)\npaper: Bhaskar")
    assert "\nids: DOI:10.1038/s41586-020-2103-5\n" in out and "\ncut from the paper's size: nothing: " in out
    assert "  mc_cycles = 1000000  (--quick: 200000)\n      int in 1..1e9; Monte Carlo cycles" in out
    assert "goals of the committed run (" in out
    for name, info in experiments().items():
        assert main(["catalogue", "show", name]) == 0
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= 100, name
        # where to read the paper, and what the default run cut from its size (issue 24, §5)
        assert info.paper_ids and all(i.startswith(("arXiv:", "DOI:")) for i in info.paper_ids), name
        assert info.size_cut and "\ncut from the paper's size: " in out, name
        for key in info.defaults:
            assert f"\n  {key} = " in out, (name, key)
    assert main(["catalogue", "show", "nope"]) == 2
    assert "unknown experiment 'nope'" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        main(["catalogue", "run", "--help"])
    assert "asyncgen catalogue show NAME" in capsys.readouterr().out


def test_tune_and_render_check_their_outputs_first(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")

    def tuner(self):
        raise AssertionError("the tuning ran")

    monkeypatch.setattr(ExperimentInfo, "load_tuner", lambda self: tuner)
    assert main(["catalogue", "tune", "fedfix", "--quick", "--out", str(tmp_path / "afile")]) == 2
    assert "--out " in one_error_line(capsys)
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({}))
    (folder / "results.md").mkdir()
    assert main(["catalogue", "render", str(folder)]) == 2
    assert "results.md is a directory" in one_error_line(capsys)


def test_list_json_has_every_key_range_and_the_committed_goals(capsys):
    assert main(["catalogue", "list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == list(experiments())
    quantum = next(e for e in entries if e["name"] == "mdi-qkd-memory")
    assert quantum["keys"]["mc_cycles"] == {
        "type": "int", "low": 1, "high": 10**9, "choices": None, "min_items": None, "max_items": None,
        "multiple_of": None, "accepted": "int in 1..1e9", "default": 1000000, "quick": 200000,
        "meaning": "Monte Carlo cycles per (seed, loss)"}
    assert quantum["keys"]["mc_loss_db"]["type"] == "list of float" and quantum["keys"]["mc_loss_db"]["max_items"] == 16
    for entry in entries:
        info = get_experiment(entry["name"])
        assert set(entry["keys"]) == set(info.defaults) and entry["paper"] == info.paper
        assert entry["paper_ids"] == list(info.paper_ids) and entry["size_cut"] == info.size_cut
        run = entry["committed"]
        assert run["goals_total"] == len(run["goals"]) and 0 <= run["goals_met"] <= run["goals_total"]


def test_compare_refuses_in_one_line(tmp_path, capsys):
    for name, experiment in (("a", "idhb"), ("b", "aegis")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"experiment": experiment, "config": {}, "goals": {}, "metrics": {}}))
    (tmp_path / "afile").write_text("")
    cases = [([str(tmp_path / "a")], "compare needs at least two folders"),
             ([str(tmp_path / "a"), str(tmp_path / "nothing")], "nothing: no results.json there"),
             ([str(tmp_path / "a"), str(tmp_path / "b")],
              "compare takes runs of one experiment; these are of aegis, idhb"),
             ([str(tmp_path / "a"), str(tmp_path / "a")], "the same folder is given twice"),
             ([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "afile" / "x")],
              f"--out {tmp_path}/afile/x/compare.json: {tmp_path}/afile is a file")]
    for args, message in cases:
        assert main(["catalogue", "compare", *args]) == 2
        assert message in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["a", "afile", "b"]
