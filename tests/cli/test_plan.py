"""``asyncgen plan``: the table and JSON from configs alone, --max-memory, bad input."""

import json

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
