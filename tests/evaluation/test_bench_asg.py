"""The ASG benchmark: its duplicate counter, its arguments, and a --quick run end to end."""

import json

import numpy as np
import pytest

from asyncgen.evaluation import bench_asg, shapes


def _disc(image, cy, cx, r, colour):
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = shapes.COLOURS[colour]


def test_duplicates_counts_separate_blobs_of_the_requested_colour():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:] = shapes.COLOURS["blue"]
    _disc(image, 20, 20, 9, "red")
    assert bench_asg.duplicates(image, "red", 32) == 1
    _disc(image, 48, 46, 6, "red")
    image[2:4, 60:62] = shapes.COLOURS["red"]  # a 2x2 speck is not an object
    _disc(image, 50, 10, 6, "yellow")  # another colour is not a duplicate
    assert bench_asg.duplicates(image, "red", 32) == 2
    assert bench_asg.duplicates(image, "green", 32) == 0


def test_scales_are_parsed_and_checked():
    assert bench_asg.parse_scales("2x2, 3x3,1x2") == [(2, 2), (3, 3), (1, 2)]
    with pytest.raises(ValueError, match="bad scale '2by2': expected HxW"):
        bench_asg.parse_scales("2by2")
    with pytest.raises(ValueError, match="bad scale '0x2'"):
        bench_asg.parse_scales("0x2")


@pytest.mark.distributed
def test_quick_benchmark_writes_every_file(tmp_path):
    assert bench_asg.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "asg.json").read_text())
    rows, summary = report["rows"], report["summary"]
    assert [r["method"] for r in rows] == list(bench_asg.METHODS)
    for row in rows:
        assert row["scale"] == "2x2" and row["latency_s"] > 0 and 0 <= row["attributes"] <= 1
        assert row["clip_score"] >= 0 and row["duplicates"] >= 0
    assert len(summary["loadavg_before"]) == 3 and summary["2x2 speedup 5 over 3 (median of alternating pairs)"] > 0
    by = {r["method"]: r for r in rows}
    # one process or two, the asynchronous schedule draws the same picture
    assert by["asg_async_1p"]["clip_score"] == pytest.approx(by["asg_async_2p"]["clip_score"], abs=1e-3)
    assert "| 2x2 | asg_async_2p |" in (tmp_path / "asg.md").read_text()
    assert (tmp_path / "asg_side_by_side_2x2.png").stat().st_size > 0
