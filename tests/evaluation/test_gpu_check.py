"""The GPU check's CPU fallback, end to end, and the model configs it builds."""

import json

import pytest
import torch

from asyncgen.evaluation import gpu_check, gpu_diagnostics, unet_configs


def test_public_configs_have_the_published_sizes():
    """The inline configs are the real ones: their parameter counts are SD2.1's and SDXL's."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only, no memory
        sd21 = UNet2DConditionModel(**unet_configs.SD21_UNET)
        sdxl = UNet2DConditionModel(**unet_configs.SDXL_UNET)
    assert sum(p.numel() for p in sd21.parameters()) == 865_910_724
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684


def test_tiny_configs_keep_the_architecture():
    for config in (unet_configs.SD21_UNET, unet_configs.SDXL_UNET):
        tiny = unet_configs.tiny_config(config)
        for key in ("down_block_types", "up_block_types", "use_linear_projection", "addition_embed_type", "layers_per_block"):
            assert tiny.get(key) == config.get(key)
        assert len(tiny["block_out_channels"]) == len(config["block_out_channels"])
    assert unet_configs.tiny_config(unet_configs.SDXL_UNET)["transformer_layers_per_block"] == [1, 2, 2]


def test_cpu_tiny_run_writes_the_report(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--stages", "2,3", "--steps", "2", "--repeats", "1",
                           "--out", str(out)])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert code == 0 and f"report written to {out}" in printed
    assert report["tiny"] and report["skipped"] == [] and report["errors"] == []
    assert "two ranks on one device" in out.with_suffix(".md").read_text()  # the tables, beside the JSON
    assert report["tests"]["status"] == "skipped"  # CPU runs leave the CUDA tests out unless asked

    models = {"SD2.1 UNet (tiny)", "SDXL UNet (tiny)"}
    composition = report["composition"]
    assert {(r["model"], r["dtype"], r["stages"]) for r in composition} == {
        (m, d, n) for m in models for d in ("float32", "bfloat16") for n in (2, 3)}
    assert all(r["passed"] for r in composition)
    assert all(r["error"] <= 1e-5 for r in composition if r["dtype"] == "float32")
    assert all(r["boundary_dtype"] == "bfloat16" for r in composition if r["dtype"] == "bfloat16")

    overhead = report["overhead"]
    assert {r["model"] for r in overhead} == models
    for row in overhead:
        assert row["identical"]  # the stages=1 wrapper computes the stock loop bit for bit
        assert row["stock_step_ms"] > 0 and row["wrapped_step_ms"] > 0 and row["steps"] == 2
        assert row["overhead"] == pytest.approx(row["wrapped_step_ms"] / row["stock_step_ms"] - 1)
        assert row["stock_host_step_ms"] > 0 and row["wrapped_host_step_ms"] > 0
    # CPU timings are not judged
    assert report["passed"] == {"tests": True, "composition": True, "overhead": None, "two_ranks": True}

    # two processes running the distributed runtime reproduce the serial simulator
    assert [(r["stages"], r["stride"], r["device"]) for r in report["two_ranks"]] == [(2, 1, "cpu"), (1, 2, "cpu")]
    assert all(r["error"] <= 1e-5 for r in report["two_ranks"])

    stages = report["stages"]
    assert {(r["model"], r["stages"], r["split"]) for r in stages} == {
        (m, n, s) for m in models for n in (2, 3) for s in ("flops", "time")}
    for row in stages:
        assert len(row["stage_ms"]) == row["stages"] == len(row["cuts"]) - 1
        assert row["projected_speedup"] == gpu_diagnostics.projected_speedup(row["stage_ms"])


@pytest.mark.parametrize("stage_ms, expected", [
    ([5.0], 1.0),  # one stage: nothing to overlap
    ([2.0, 2.0], 2.0),  # balanced: N stages, N times faster
    ([3.0, 1.0], 4.0 / 3.0),  # one device: 3 + 1 ms per step; two: the 3 ms stage sets the pace
    ([1.0, 2.0, 1.0], 2.0),  # 4 ms serial, 2 ms in parallel
])
def test_projected_speedup_by_hand(stage_ms, expected):
    assert gpu_diagnostics.projected_speedup(stage_ms) == pytest.approx(expected, rel=1e-12)


def test_a_failing_part_is_recorded_and_the_rest_runs(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("injected composition failure")

    monkeypatch.setattr(gpu_check, "check_composition", broken)
    monkeypatch.setattr(gpu_check, "check_two_ranks", lambda *a, **k: [])
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--models", "sd21", "--stages", "2", "--steps", "2",
                           "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and "FAILED: composition" in capsys.readouterr().out
    assert [e["part"] for e in report["errors"]] == ["composition SD2.1 UNet (tiny)"]
    assert "injected composition failure" in report["errors"][0]["traceback"]
    assert len(report["overhead"]) == 1 and report["stages"]  # the parts after it ran
    assert report["passed"]["composition"] is False


def test_without_diffusers_it_says_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "have_diffusers", lambda: False)
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and "pip install --no-deps diffusers" in capsys.readouterr().out
    assert len(report["skipped"]) == 5  # composition and timing of two models, two ranks
    assert all("needs diffusers" in line for line in report["skipped"]) and report["errors"] == []
    assert report["composition"] == report["overhead"] == report["two_ranks"] == []


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--models", "sd15"], "--models 'sd15': ['sd15'] not among sd21, sdxl"),
    (["--device", "cpu", "--stages", "two"], "--stages 'two' is not a comma-separated list of integers"),
    (["--device", "cpu", "--stages", "0,2"], "stage counts must be >= 1"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main([])
    assert "use --device cpu --tiny" in capsys.readouterr().err
