"""evaluation/validate_plan.py: measured step times read from bench records, without running a bench."""

import json

import pytest

from asyncgen.evaluation.validate_plan import measured_steps, results_from

ASYNCDIFF = dict(benchmark="asyncdiff", rows=[
    dict(stock_s=2.2, stock_denoiser_s=2.0, async_s=1.3, wrap=dict(stages=2, stride=1, cfg_parallel=False)),
    dict(stock_s=2.4, stock_denoiser_s=2.2, async_s=1.5, wrap=dict(stages=1, stride=1, cfg_parallel=True)),
])
PEER = dict(benchmark="peer_diffusers_cp", wrap=dict(stages=2, stride=1, cfg_parallel=False), rows=[
    dict(latency_s=9.0, ranks=1), dict(latency_s=7.0, ranks=2), dict(latency_s=5.0, ranks=2)])


def test_measured_steps_take_the_time_outside_the_denoiser_off_each_latency():
    got = measured_steps(ASYNCDIFF, PEER, steps=20, serial_here=1.0)
    # (latency - serial) / steps in ms; serial from the same bench row where it has a denoiser clock
    assert got[(1, 1, False, 1)]["ms"] == pytest.approx(1e3 * 2.0 / 20)  # the first row's stock
    assert got[(2, 1, False, 1)]["ms"] == pytest.approx(1e3 * (1.3 - 0.2) / 20)
    assert got[(1, 1, True, 1)]["ms"] == pytest.approx(1e3 * (1.5 - 0.2) / 20)
    # the peer bench has no denoiser clock: the serial part measured here
    assert got[(1, 1, False, 2)]["ms"] == pytest.approx(1e3 * (7.0 - 1.0) / 20)
    assert got[(1, 1, False, 2)]["source"] == "bench --peer"
    only_peer = measured_steps(None, PEER, steps=20, serial_here=1.0)
    assert only_peer[(1, 1, False, 1)]["ms"] == pytest.approx(1e3 * 8.0 / 20)
    assert only_peer[(2, 1, False, 1)]["ms"] == pytest.approx(1e3 * 4.0 / 20)


def test_results_are_found_by_what_they_hold(tmp_path):
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "results.json").write_text(json.dumps(PEER))
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "results.json").write_text(json.dumps(ASYNCDIFF))
    (tmp_path / "sd3-peer").mkdir()
    (tmp_path / "sd3-peer" / "results.json").write_text(json.dumps(PEER))
    assert results_from(tmp_path, "wan") == (None, PEER)
    assert results_from(tmp_path, "sd3") == (ASYNCDIFF, PEER)
    assert results_from(tmp_path, "unet") == (None, None)
