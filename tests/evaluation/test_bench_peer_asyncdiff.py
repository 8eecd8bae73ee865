"""The side-by-side benchmark against the original AsyncDiff code, in its quick form.

The original is not part of asyncgen and a clone has no copy of it, so the benchmark
runs here against a stand-in peer (``fixtures/stand_in_asyncdiff.py``) laid out as the
original's checkout: a folder holding ``asyncdiff/async_sd.py``. The stand-in keeps the
whole UNet on every rank and runs the pipeline unchanged, so what is tested is the
benchmark's plumbing (the peer imported from ``--peer`` in the workers, the launch, the
rows, ``results.json`` and ``results.md``), not the original's speed or fidelity.
"""

import json
import math
import shutil
from pathlib import Path

import pytest

from asyncgen.evaluation import bench_peer_asyncdiff

STAND_IN = Path(__file__).resolve().parents[1] / "fixtures" / "stand_in_asyncdiff.py"
PEER_LABEL = "original AsyncDiff (SD2.1 split table)"


@pytest.fixture
def stand_in_peer(tmp_path) -> Path:
    """A checkout-shaped folder whose ``asyncdiff`` package is the stand-in."""
    package = tmp_path / "peer" / "asyncdiff"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copyfile(STAND_IN, package / "async_sd.py")
    return package.parent


@pytest.mark.distributed
def test_quick_side_by_side_run(stand_in_peer, tmp_path, capsys):
    out = tmp_path / "out"
    assert bench_peer_asyncdiff.main(["--peer", str(stand_in_peer), "--quick", "--out", str(out)]) == 0

    record = json.loads((out / "results.json").read_text())
    assert record["peer"] == str(stand_in_peer.resolve())
    stock, peer, ours = record["rows"]
    assert [r["config"] for r in record["rows"]] == ["stock pipeline", PEER_LABEL, "asyncgen"]
    assert (stock["ranks"], peer["ranks"], ours["ranks"]) == (1, 2, 2)
    assert record["call"]["num_inference_steps"] == 4 and record["warmup"] == 1 and record["repeats"] == 1
    # the stand-in runs the stock pipeline step after step: the stock image exactly; asyncgen ran
    # asynchronous steps (stale inputs: not the stock image) and still made a picture of finite error
    assert float(peer["psnr_db"]) == math.inf  # results.json writes non-finite numbers as strings
    assert math.isfinite(ours["psnr_db"])
    assert all(r["latency_s"] > 0 and len(r["latencies"]) == 1 for r in record["rows"])
    full = stock["resident_mib"][0]
    # the stand-in (like the original) keeps the whole UNet on every rank; asyncgen one stage each,
    # plus the shared embeddings
    assert peer["resident_mib"] == [full, full]
    assert max(ours["resident_mib"]) < full <= sum(ours["resident_mib"])
    assert len(record["load_average"]["start"]) == len(record["load_average"]["end"]) == 3
    assert f"| {PEER_LABEL} | 2 |" in (out / "results.md").read_text()
    assert "| asyncgen | 2 |" in capsys.readouterr().out


def test_a_folder_without_the_peer_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_peer_asyncdiff.main(["--peer", str(tmp_path), "--quick", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"--peer {tmp_path}: {tmp_path / 'asyncdiff' / 'async_sd.py'} not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
