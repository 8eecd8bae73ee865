"""``asyncgen plan``: the table and JSON from configs alone, --max-memory, bad input."""

import json
import math

import pytest

import published_configs
from asyncgen.cli.main import main
from asyncgen.pipelines.from_configs import plan_from_configs


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["plan", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_and_json_agree_with_the_planner(sd_path, capsys):
    code, out, _ = _run(capsys, "--model", sd_path, "--devices", 2, "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan == json.loads(json.dumps(plan_from_configs(str(sd_path), 2).to_dict()))
    assert [r["rank"] for r in plan["ranks"]] == [0, 1] and plan["notes"]["cuts"][0] == 0

    code, out, _ = _run(capsys, "--model", sd_path, "--devices", 2)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["rank", "stage", "stage", "units"]
    for r in plan["ranks"]:
        row = next(line for line in lines if line.startswith(f"{r['rank']}  "))
        assert (", ".join(p["component"] for p in r["placements"]) or "-") in row
        assert f"{r['total_bytes'] / 1e6:.2f} MB" in row or f"{r['total_bytes'] / 1e3:.2f} kB" in row
    assert "full copy per rank" in out
    assert f"{100 * plan['largest_parameter_fraction']:.1f} % of the full pipeline's" in out


def test_a_published_config_folder_without_weights(tmp_path, capsys):
    folder = published_configs.write_pipeline("sd2.1", tmp_path)
    assert not list(folder.rglob("*.safetensors"))
    code, out, _ = _run(capsys, "--model", folder, "--devices", 1, "--dtype", "bf16", "--height", 512, "--width", 512,
                        "--json")
    assert code == 0
    plan = json.loads(out)
    counts = published_configs.PUBLISHED_PARAMETERS["sd2.1"]
    assert plan["ranks"][0]["parameter_bytes"] == {"denoiser": 2 * counts["unet"],
                                                   "text_encoder": 2 * counts["text_encoder"], "vae": 2 * counts["vae"]}
    assert plan["notes"]["latent_size"] == [64, 64] and plan["notes"]["dtype"] == "bfloat16"
    assert plan["ranks"][0]["activation_bytes"] > 0


def test_max_memory_that_the_plan_cannot_fit_says_by_how_much(sd_path, capsys):
    code, out, _ = _run(capsys, "--model", sd_path, "--devices", 2, "--json")
    largest = json.loads(out)["largest_total_bytes"]
    code, _, _ = _run(capsys, "--model", sd_path, "--devices", 2, "--max-memory", largest)
    assert code == 0
    code, out, err = _run(capsys, "--model", sd_path, "--devices", 2, "--max-memory", largest - 1234)
    assert code == 2
    assert "rank" in out  # the table still shows where the bytes are
    assert "does not fit --max-memory" in err and "(1234 bytes) more than allowed" in err


@pytest.mark.parametrize("argv, message", [
    (["--max-memory", "lots"], "lots: need a positive size like 24GB"),
    (["--dtype", "int8"], "int8: need one of"),
])
def test_bad_values_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--devices", "3", "--cfg-parallel"], "--cfg-parallel needs an even number of devices"),
    (["--devices", "2", "--stages", "3"], "--devices 2 does not match --stages 3"),
])
def test_devices_that_cannot_hold_the_options_are_refused(argv, message, capsys):
    code, _, err = _run(capsys, "--model", "unused", *argv)
    assert code == 2 and message in err


def test_cfg_parallel_on_a_guidance_distilled_model_is_refused_as_the_wrapper_refuses_it(tmp_path, capsys):
    folder = published_configs.write_pipeline("flux.1-dev", tmp_path)
    code, _, err = _run(capsys, "--model", folder, "--devices", 4, "--cfg-parallel")
    assert code == 2 and "guidance-distilled" in err


def test_a_size_the_model_cannot_take_names_it(sd_path, capsys):
    code, _, err = _run(capsys, "--model", sd_path, "--height", 20)
    assert code == 2 and "height=20" in err and "multiple of" in err



def test_bench_memory_helpers_measure_host_peaks_and_resident_parameters(sd_path):
    import mmap

    import torch

    import tiny_models
    from asyncgen.evaluation.bench_asyncdiff import HostMemory, resident_parameter_bytes

    host = HostMemory()
    host.start()
    # 64 MiB of fresh anonymous pages, written so they are resident. Not a torch tensor:
    # after earlier tests in this worker, malloc may serve 64 MiB from a freed chunk whose
    # pages are still resident, and the process would not grow at all (seen in CI).
    block = mmap.mmap(-1, 64 * 2**20)
    torch.frombuffer(block, dtype=torch.uint8).fill_(1)
    grown = host.peak_growth()
    block.close()
    assert host.reset and 64 * 2**20 <= grown < 96 * 2**20
    pipe = tiny_models.load(sd_path)
    full = sum(p.numel() * 4 for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters())
    assert resident_parameter_bytes(pipe) == full
    pipe.vae.to("meta")  # released weights (another rank's) do not count
    assert resident_parameter_bytes(pipe) == full - sum(p.numel() * 4 for p in pipe.vae.parameters())


# ------------------------------------------------------------------------------------------ --parallel auto

def _probe_cache(tmp_path, devices: int, link=(2e-4, 1e9, 1.2)) -> str:
    """A probe cache with made-up numbers for this host, so the command spawns no probe (and the test is fast)."""
    from asyncgen.cli.plan import PROBE_CACHE_VERSION, probe_key

    entry = dict(link=dict(latency_s=link[0], bandwidth_bytes_per_s=link[1], parallel_slowdown=link[2],
                           all_to_all_latency_s=3e-4, all_to_all_bytes_per_s=5e8, world_size=devices, backend="gloo", device="cpu", sizes=[4, 65536], repeats=5),
                 rate=dict(flops_per_s=5e10, bytes_per_s=5e9, device="cpu", dtype="float32", threads=1),
                 measured_at="2026-01-01T00:00:00+00:00")
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"version": PROBE_CACHE_VERSION,
                                "entries": {probe_key("cpu", devices, "float32"): entry}}))
    return str(path)


def test_parallel_auto_lists_every_candidate_and_chooses_the_fastest_allowed(sd_path, tmp_path, capsys):
    from asyncgen.cost.device_rate import DeviceRate
    from asyncgen.cost.layout import Link, choose
    from asyncgen.pipelines.layout_costs import costs_from_configs

    cache = _probe_cache(tmp_path, 2)
    code, out, _ = _run(capsys, "--model", sd_path, "--devices", 2, "--parallel", "auto", "--steps", 20, "--device",
                        "cpu", "--probe-cache", cache, "--json")
    assert code == 0
    record = json.loads(out)
    assert not record["probe"]["measured_now"] and record["probe"]["link"]["latency_s"] == 2e-4
    # a UNet: stages, CFG parallel, no context parallelism (diffusers has no plan for it)
    assert [c["name"] for c in record["candidates"]] == ["one device", "stages 2, stride 1, warm-up 1", "CFG parallel"]
    assert "no context-parallel plan" in record["context_parallel"]
    allowed = [c for c in record["candidates"] if c["allowed"]]
    assert record["chosen"]["predicted_step_ms"] == min(c["predicted_step_ms"] for c in allowed)
    # the engine's own answer on the same numbers
    costs = costs_from_configs(str(sd_path), compute="flops", rate=DeviceRate(5e10, 5e9, "cpu", "float32", 1))
    expected = choose(costs, Link(2e-4, 1e9, 1.2, 3e-4, 5e8, 2), 2, 20)
    assert record["chosen"]["name"] == expected.chosen.layout.name
    assert [c["predicted_step_ms"] for c in record["candidates"]] == [1e3 * p.step_s for p in expected.candidates]

    code, out, _ = _run(capsys, "--model", sd_path, "--devices", 2, "--parallel", "auto", "--steps", 20, "--device",
                        "cpu", "--probe-cache", cache)
    assert code == 0
    for c in record["candidates"]:
        assert f"{c['predicted_step_ms']:.1f}" in out
    assert f"chosen: {record['reason']}" in out and "run it: asyncgen generate" in out


def test_parallel_auto_exact_allows_only_exact_layouts(sd_path, tmp_path, capsys):
    code, out, _ = _run(capsys, "--model", sd_path, "--devices", 2, "--parallel", "auto", "--steps", 20, "--exact",
                        "--device", "cpu", "--probe-cache", _probe_cache(tmp_path, 2), "--json")
    assert code == 0
    record = json.loads(out)
    assert record["exact_only"] and record["chosen"]["exact"]
    assert all(c["exact"] for c in record["candidates"])
    staged = [c for c in record["candidates"] if c["stages"] > 1]
    assert staged and all(c["warmup"] == 20 and c["exact_steps"] == 20 for c in staged)


def test_parallel_auto_probes_once_and_keeps_the_numbers(sd_path, tmp_path, capsys):
    cache = tmp_path / "sub" / "probe.json"
    argv = ["--model", sd_path, "--devices", 1, "--parallel", "auto", "--steps", 4, "--device", "cpu",
            "--probe-cache", cache, "--json"]
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and json.loads(out)["probe"]["measured_now"]
    kept = json.loads(cache.read_text())
    rate = next(iter(kept["entries"].values()))["rate"]
    assert rate["flops_per_s"] > 0 and rate["bytes_per_s"] > 0
    code, out, _ = _run(capsys, *argv)
    record = json.loads(out)
    assert code == 0 and not record["probe"]["measured_now"] and record["probe"]["rate"] == rate
    assert [c["name"] for c in record["candidates"]] == ["one device"]


def test_parallel_auto_with_unit_times_measured_on_random_weights(sd_path, tmp_path, capsys):
    code, out, _ = _run(capsys, "--model", sd_path, "--devices", 2, "--parallel", "auto", "--steps", 20, "--compute",
                        "time", "--device", "cpu", "--probe-cache", _probe_cache(tmp_path, 2), "--json")
    assert code == 0
    record = json.loads(out)
    assert record["compute"] == "time"
    assert [c["name"] for c in record["candidates"]] == ["one device", "stages 2, stride 1, warm-up 1", "CFG parallel"]
    assert all(c["predicted_step_ms"] > 0 and math.isfinite(c["predicted_step_ms"]) for c in record["candidates"])


@pytest.mark.parametrize("argv, message", [
    (["--exact"], "--exact: only with --parallel auto"),
    (["--steps", "20", "--reprobe"], "--steps, --reprobe: only with --parallel auto"),
    (["--parallel", "auto", "--stages", "2"], "--stages: --parallel auto chooses the layout itself"),
    (["--parallel", "auto", "--exact", "--warmup", "3"], "--warmup 3 with --exact"),
])
def test_parallel_auto_options_that_do_not_go_together_are_refused(sd_path, argv, message, capsys):
    code, _, err = _run(capsys, "--model", sd_path, "--devices", 2, *argv)
    assert code == 2 and message in err


def test_a_probe_cache_that_is_not_one_is_refused(sd_path, tmp_path, capsys):
    bad = tmp_path / "probe.json"
    bad.write_text("[1, 2]")
    code, _, err = _run(capsys, "--model", sd_path, "--devices", 2, "--parallel", "auto", "--device", "cpu",
                        "--probe-cache", bad)
    assert code == 2 and f"--probe-cache {bad}: cannot read it" in err


def test_a_cached_probe_written_before_a_field_existed_is_measured_again(tmp_path, monkeypatch):
    from asyncgen.cli import plan

    fresh = {"link": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 1e9, "world_size": 2, "parallel_slowdown": 1.1,
                      "all_to_all_latency_s": 2e-4, "all_to_all_bytes_per_s": 5e8, "backend": "gloo",
                      "device": "cpu", "sizes": [4, 65536], "repeats": 2},
             "rate": {"flops_per_s": 1e10, "bytes_per_s": 1e9, "device": "cpu", "dtype": "float32", "threads": 1}}
    calls = []
    monkeypatch.setattr(plan, "probe", lambda *args: calls.append(args) or fresh)
    key = plan.probe_key("cpu", 2, "float32")
    old_link = {k: v for k, v in fresh["link"].items() if not k.startswith("all_to_all")}  # the first cache's form
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"version": plan.PROBE_CACHE_VERSION,
                                "entries": {key: {"link": old_link, "rate": fresh["rate"]}}}))
    entry, measured = plan.cached_probe(path, 2, "cpu", "float32", reprobe=False)
    assert measured and calls == [(2, "cpu", "float32")] and entry["link"] == fresh["link"]
    assert json.loads(path.read_text())["entries"][key]["link"] == fresh["link"]  # replaced in the file
    entry, measured = plan.cached_probe(path, 2, "cpu", "float32", reprobe=False)  # now complete: read back
    assert not measured and len(calls) == 1
