"""The side-by-side benchmark against the original AsyncDiff code, in its quick form."""

import json
import math
from pathlib import Path

import pytest

from asyncgen.evaluation import bench_peer_asyncdiff

# CI clones the repository with shared/ beside it, as the developers' machines have it
PEER = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "asyncdiff"


@pytest.mark.distributed
def test_quick_side_by_side_run(tmp_path, capsys):
    assert (PEER / "asyncdiff" / "async_sd.py").is_file(), (
        f"the original AsyncDiff checkout is expected at {PEER} (../shared/peers/asyncdiff beside the repository); "
        "without it the side-by-side benchmark cannot be tested")
    assert bench_peer_asyncdiff.main(["--peer", str(PEER), "--quick", "--out", str(tmp_path)]) == 0

    record = json.loads((tmp_path / "results.json").read_text())
    stock, peer, ours = record["rows"]
    assert [r["config"] for r in record["rows"]] == ["stock pipeline", "original AsyncDiff (SD2.1 split table)",
                                                     "asyncgen"]
    assert (stock["ranks"], peer["ranks"], ours["ranks"]) == (1, 2, 2)
    assert record["call"]["num_inference_steps"] == 4 and record["warmup"] == 1 and record["repeats"] == 1
    # both ran asynchronous steps (stale inputs: not the stock image) and still made a picture of finite error
    assert math.isfinite(peer["psnr_db"]) and math.isfinite(ours["psnr_db"])
    assert all(r["latency_s"] > 0 for r in record["rows"])
    full = stock["resident_mib"][0]
    # the original keeps the whole UNet on every rank; asyncgen one stage each, plus the shared embeddings
    assert peer["resident_mib"] == [full, full]
    assert max(ours["resident_mib"]) < full <= sum(ours["resident_mib"])
    assert len(record["load_average"]["start"]) == len(record["load_average"]["end"]) == 3
    assert "| original AsyncDiff (SD2.1 split table) | 2 |" in (tmp_path / "results.md").read_text()
    assert "| asyncgen | 2 |" in capsys.readouterr().out


def test_a_folder_without_the_peer_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_peer_asyncdiff.main(["--peer", str(tmp_path), "--quick", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"--peer {tmp_path}: {tmp_path / 'asyncdiff' / 'async_sd.py'} not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
