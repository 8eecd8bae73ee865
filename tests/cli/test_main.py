"""The ``asyncgen`` command end to end on the built-in miniature model.

What only a separate interpreter shows (signals, a killed worker, torchrun, spawned workers,
a clean stderr) runs the command in a subprocess; the rest calls ``main`` in this process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asyncgen.cli.launcher import free_port
from asyncgen.cli.main import main

PROMPT = "a large red circle on a blue background"
STEPS = "8"  # enough for a picture that is clearly not blank; keeps each run to seconds
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ASYNCGEN_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


def asyncgen(*args, cwd=None, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "asyncgen.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env or ENV)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def assert_picture(path, size=(32, 32)):
    image = pixels(path)
    assert image.shape == (*size, 3)
    assert image.std() > 20, "the image is blank"


def _stat(pid: int) -> list[str] | None:
    """State, parent pid, ... of a process from /proc (no psutil needed); None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields


def _children(pid: int) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and (_stat(int(e.name)) or [0, -1])[1] == str(pid)]


def test_help_names_every_command_and_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    top_help = capsys.readouterr().out
    assert all(command in top_help for command in ("generate", "bench", "eval"))
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    generate_help = capsys.readouterr().out
    for option in ("--devices", "--stages", "--stride", "--warmup", "--time-shift", "--steps", "--guidance", "--seed",
                   "--height", "--width", "--negative-prompt", "--dtype", "--prompts", "--device", "--model"):
        assert option in generate_help
    assert "default: 1" in generate_help  # defaults are spelled out


def in_process(capsys, *args) -> str:
    """Run the command in this process (no interpreter start-up: the suite stays fast); its stdout."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_generate_one_process_and_two_devices(tmp_path, capsys):
    one = in_process(capsys, "generate", PROMPT, "-o", tmp_path / "one.png", "--steps", STEPS)
    assert_picture(tmp_path / "one.png")
    assert "1 cpu device" in one and "stock pipeline" in one and "steps/s" in one

    # the command as users run it: its own interpreter, workers spawned afresh
    two = asyncgen("generate", PROMPT, "-o", tmp_path / "two.png", "--steps", STEPS, "--devices", "2", "--warmup", "2")
    assert two.returncode == 0, two.stderr
    assert_picture(tmp_path / "two.png")
    assert "2 cpu devices" in two.stdout and "AsyncDiff stages=2" in two.stdout

    serial = in_process(capsys, "generate", PROMPT, "-o", tmp_path / "serial.png", "--steps", STEPS, "--stages", "2",
                        "--warmup", "2")
    assert "serial simulator" in serial
    # the distributed run reproduces the serial simulator to <= 1e-5 in float; written as
    # 8-bit pixels, a value that close to a rounding boundary can land one level apart
    assert np.abs(pixels(tmp_path / "two.png") - pixels(tmp_path / "serial.png")).max() <= 1
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_generate_many_prompts_writes_numbered_files(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\na small yellow triangle on a black background\n")
    in_process(capsys, "generate", "--prompts", prompts, "-o", tmp_path / "pics" / "img.png", "--steps", STEPS)
    written = sorted((tmp_path / "pics").iterdir())
    assert [p.name for p in written] == ["img-0000.png", "img-0001.png"]
    for path in written:
        assert_picture(path)
    assert np.abs(pixels(written[0]) - pixels(written[1])).mean() > 10  # different prompts, different pictures

    in_process(capsys, "eval", tmp_path / "pics", "--prompts", prompts, "--reference", tmp_path / "pics",
               "--out", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [r["image"] for r in result["rows"]] == ["img-0000.png", "img-0001.png"]
    assert all(0 < r["clip_score"] <= 100 for r in result["rows"])
    assert all(r["psnr_db"] == "inf" and r["ssim"] == pytest.approx(1.0) for r in result["rows"])
    assert (tmp_path / "eval.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "--model /no/such/model: no such folder"),
    (["--model", "nobody/not-in-the-cache"], "--model nobody/not-in-the-cache: not in the local Hugging Face cache, "
                                             "and HF_HUB_OFFLINE=1 forbids downloading it"),
    (["--stages", "40"], "--stages 40: this UNet2DConditionModel splits into at most 22 stages"),
    (["--height", "31"], "--height 31 is not a multiple of 8, the size step of this model (VAE factor x patch size); "
                         "nearest valid: 24 or 32"),
    (["--width", "36"], "--width 36 is not a multiple of 8"),
    (["--devices", "2", "--stages", "3"], "--devices 2 does not match --stages 3 --stride 1"),
    (["--devices", "64"], "--devices 64 on CPU: this machine has"),
    (["--highres", "--height", "40"], "--height 40: --highres needs a multiple of the native 32 (e.g. 32 or 64)"),
    (["--highres", "--stages", "2"], "--highres spreads patches over the devices and does not split the denoiser"),
    (["-o", "{tmp}"], "-o {tmp} is a directory; give a file name such as"),
    (["-o", "{tmp}/x.xyz"], "-o {tmp}/x.xyz: unknown image extension '.xyz'; use one of .png, .jpg"),
    (["-o", "/proc/asyncgen.png"], "-o /proc/asyncgen.png: directory /proc is not writable"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    # in this process (no interpreter start-up per case), checked before any model loads
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["generate", PROMPT, "-o", str(tmp_path / "x.png"), "--steps", "2", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"asyncgen generate: error: {message.replace('{tmp}', str(tmp_path))}" in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "argument --devices: 0: need a whole number of at least 1"),
    (["--devices", "-1"], "argument --devices: -1: need a whole number of at least 1"),
    (["--steps", "0"], "argument --steps: 0: need a whole number of at least 1"),
    (["--guidance", "nan"], "argument --guidance: nan: need a finite number"),
    (["--guidance", "inf"], "argument --guidance: inf: need a finite number"),
    (["--structure-guidance=-inf"], "argument --structure-guidance: -inf: need a finite number"),
    (["--structure-fraction", "1.5"], "argument --structure-fraction: 1.5: need a number from 0 to 1"),
    (["--seed", "-1"], "argument --seed: -1: seeds run from 0 to 2**64 - 1"),
    (["--seed", str(2**64)], f"argument --seed: {2**64}: seeds run from 0 to 2**64 - 1"),
])
def test_bad_numbers_are_refused_by_the_parser(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", PROMPT, *args])
    assert exit_.value.code == 2
    assert f"asyncgen generate: error: {message}" in capsys.readouterr().err


def test_seeds_of_a_prompt_file_must_all_fit(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert main(["generate", "--prompts", str(prompts), "-o", str(tmp_path / "x.png"), "--seed", str(2**64 - 1)]) == 2
    assert ("--seed 18446744073709551615 with 2 prompts: image i uses seed + i, so the seed can be at most "
            "2**64 - 2 = 18446744073709551614") in capsys.readouterr().err
    assert main(["generate", "--prompts", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert f"--prompts {tmp_path}: prompt file {tmp_path} is a directory" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*.png"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.png"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available here; use --device cpu" in capsys.readouterr().err


def test_one_side_given_keeps_the_native_size_for_the_other(tmp_path):
    out = asyncgen("generate", PROMPT, "-o", tmp_path / "tall.png", "--steps", "2", "--height", "64")
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "tall.png") as image:
        assert image.size == (32, 64)  # (width, height): the width stays the native 32
    # nothing on stderr but the progress bar: no third-party warnings
    noise = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert not noise, noise


def test_a_long_prompt_warns_once_in_one_short_line(tmp_path, capsys):
    words = " ".join(["a large red circle on a blue background"] * 300)
    assert main(["generate", words, "-o", str(tmp_path / "x.png"), "--steps", "1", "--seed", str(2**63)]) == 0
    err = capsys.readouterr().err
    assert err.count("prompt truncated to") == 1
    assert max(len(line) for line in err.replace("\r", "\n").splitlines()) < 200, "a long line reached the user"


def test_devices_against_torchrun_world_size_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.png"), "--devices", "2"]) == 2
    err = capsys.readouterr().err
    assert "--devices 2 does not match the launcher's WORLD_SIZE=1" in err and len(err.strip().splitlines()) == 1


def test_bench_refuses_a_configuration_without_stages(capsys):
    assert main(["bench", "--configs", "n0s1"]) == 2
    assert "bad configuration 'n0s1': stages and stride must be at least 1" in capsys.readouterr().err


def test_pickle_weights_need_allow_pickle(tmp_path, sd_path, capsys):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(sd_path).save_pretrained(folder, safe_serialization=False)
    # (transformers saves its text encoder as safetensors regardless)
    assert not list((folder / "unet").glob("*.safetensors"))
    capsys.readouterr()
    args = ["generate", PROMPT, "--model", str(folder), "--steps", "1", "--height", "16", "--width", "16"]
    assert main([*args, "-o", str(tmp_path / "refused.png")]) == 2
    err = capsys.readouterr().err
    assert "no safetensors weights found" in err and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused.png").exists()
    assert main([*args, "-o", str(tmp_path / "allowed.png"), "--allow-pickle"]) == 0
    assert (tmp_path / "allowed.png").is_file()


def test_a_failing_worker_ends_the_run_with_its_message(tmp_path):
    # both ranks load the model, then refuse the attention kernels (xformers is not installed):
    # a bad value only a worker can find, forwarded as the same one-line error
    out = asyncgen("generate", PROMPT, "-o", tmp_path / "x.png", "--devices", "2", "--attention", "xformers")
    assert out.returncode == 2, out.stderr
    assert "asyncgen generate: error:" in out.stderr and "xformers" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "x.png").exists()


def _start_two_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "asyncgen.cli", "generate", PROMPT, "-o", str(tmp_path / "x.png"),
                             "--devices", "2", "--steps", "1000"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    workers = []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.5)
        # the spawn context adds a resource tracker child; workers are the others
        workers = [p for p in _children(proc.pid) if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) >= 2, "workers did not start"
    time.sleep(3)  # let them get into the denoising loop
    return proc, workers


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_every_worker_before_the_command_exits(tmp_path, signum, code):
    proc, workers = _start_two_workers(tmp_path)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "asyncgen generate: interrupted: stopped 2 workers" in stderr
    alive = [p for p in workers + _children(proc.pid) if _stat(p) is not None]
    assert not alive, f"processes {alive} outlived the command"
    time.sleep(2)
    assert not (tmp_path / "x.png").exists(), "something wrote the output after the command ended"


def test_a_killed_worker_is_named_in_one_line(tmp_path):
    proc, workers = _start_two_workers(tmp_path)
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("asyncgen generate:")]
    assert lines[0] == "asyncgen generate: worker 1 was killed by SIGKILL", stderr
    assert "Traceback" not in stderr
    assert not [p for p in workers if _stat(p) is not None]


@pytest.mark.distributed
def test_two_nodes_with_torchrun(tmp_path, capsys):
    """Two torchrun invocations, one per "node", meeting at a localhost rendezvous."""
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "asyncgen.cli", "generate", PROMPT, "-o", str(tmp_path / "nodes.png"), "--steps", STEPS,
             "--warmup", "2"],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr
    assert "2 cpu devices" in outputs[0][0] and "AsyncDiff stages=2" in outputs[0][0]
    assert "asyncgen:" not in outputs[1][0]  # only global rank 0 reports and writes
    assert_picture(tmp_path / "nodes.png")
    in_process(capsys, "generate", PROMPT, "-o", tmp_path / "local.png", "--steps", STEPS, "--devices", "2",
               "--warmup", "2")
    assert np.abs(pixels(tmp_path / "nodes.png") - pixels(tmp_path / "local.png")).max() <= 1


def test_bench_two_configurations_writes_json_markdown_and_plot(tmp_path, capsys):
    in_process(capsys, "bench", "--quick", "--configs", "n1s1,n2s1", "--warmups", "1", "--num-prompts", "1",
               "--out", tmp_path / "bench")
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["config"] for r in result["rows"]] == ["one stage", "AsyncDiff N=2 S=1 W=1"]
    for row in result["rows"]:
        assert row["speedup"] > 0 and row["async_s"] > 0 and 0 < row["clip_score"] <= 100
        # the stock call's denoiser time is part of it: text encoding and decoding are the rest
        assert 0 < row["stock_denoiser_s"] < row["stock_s"] and row["compute_bound_speedup"] > 0
        assert len(row["resident_parameter_mb"]) == row["devices"]
    # one stage reproduces the stock pipeline exactly; two stages hold the weights between them
    assert result["rows"][0]["psnr_db"] == "inf"
    two = result["rows"][1]["resident_parameter_mb"]
    assert max(two) < result["rows"][1]["full_copy_mb"]
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| stock pipeline |" in table and "AsyncDiff N=2 S=1 W=1" in table
    with Image.open(tmp_path / "bench" / "results.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 400


def test_bench_ceiling_keeps_the_work_outside_the_denoiser_serial():
    from asyncgen.evaluation.bench_asyncdiff import compute_bound_speedup

    # 10 s stock, 9 s of it in 10 denoising steps: 1 s serial + 2 exact steps (0.9 s each) + 8 steps at 0.45 s
    assert compute_bound_speedup(10.0, 9.0, 10, 2, 1, 0.45) == pytest.approx(10.0 / 6.4)
    # stride 2: the 8 asynchronous steps take 4 rounds
    assert compute_bound_speedup(10.0, 9.0, 10, 2, 2, 0.45) == pytest.approx(10.0 / 4.6)
    # nothing outside the denoiser, no warm-up, stages at half a step: 2x
    assert compute_bound_speedup(10.0, 10.0, 10, 0, 1, 0.5) == pytest.approx(2.0)


def test_generate_highres_on_two_devices_matches_one(tmp_path, capsys):
    two = in_process(capsys, "generate", PROMPT, "--highres", "-o", tmp_path / "two.png", "--steps", STEPS,
                     "--devices", "2")
    assert "ASG high resolution" in two and "2 cpu devices" in two
    assert_picture(tmp_path / "two.png", size=(64, 64))  # twice the native 32x32 per side by default
    in_process(capsys, "generate", PROMPT, "--highres", "-o", tmp_path / "one.png", "--steps", STEPS)
    # patches spread over two ranks reproduce the one-process run to <= 1e-5; 8-bit rounding as above
    assert np.abs(pixels(tmp_path / "two.png") - pixels(tmp_path / "one.png")).max() <= 1
