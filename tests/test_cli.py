"""The ``asyncgen`` command end to end, through subprocesses, on the built-in miniature model."""

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


def test_generate_one_process_and_two_devices(tmp_path):
    one = asyncgen("generate", PROMPT, "-o", tmp_path / "one.png", "--steps", STEPS)
    assert one.returncode == 0, one.stderr
    assert_picture(tmp_path / "one.png")
    assert "1 cpu device" in one.stdout and "stock pipeline" in one.stdout and "steps/s" in one.stdout

    two = asyncgen("generate", PROMPT, "-o", tmp_path / "two.png", "--steps", STEPS, "--devices", "2", "--warmup", "2")
    assert two.returncode == 0, two.stderr
    assert_picture(tmp_path / "two.png")
    assert "2 cpu devices" in two.stdout and "AsyncDiff stages=2" in two.stdout

    serial = asyncgen("generate", PROMPT, "-o", tmp_path / "serial.png", "--steps", STEPS, "--stages", "2",
                      "--warmup", "2")
    assert serial.returncode == 0, serial.stderr
    assert "serial simulator" in serial.stdout
    # the distributed run reproduces the serial simulator to <= 1e-5 in float; written as
    # 8-bit pixels, a value that close to a rounding boundary can land one level apart
    assert np.abs(pixels(tmp_path / "two.png") - pixels(tmp_path / "serial.png")).max() <= 1
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_generate_many_prompts_writes_numbered_files(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\na small yellow triangle on a black background\n")
    out = asyncgen("generate", "--prompts", prompts, "-o", tmp_path / "pics" / "img.png", "--steps", STEPS)
    assert out.returncode == 0, out.stderr
    written = sorted((tmp_path / "pics").iterdir())
    assert [p.name for p in written] == ["img-0000.png", "img-0001.png"]
    for path in written:
        assert_picture(path)
    assert np.abs(pixels(written[0]) - pixels(written[1])).mean() > 10  # different prompts, different pictures

    evaluated = asyncgen("eval", tmp_path / "pics", "--prompts", prompts, "--reference", tmp_path / "pics",
                         "--out", tmp_path / "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [r["image"] for r in result["rows"]] == ["img-0000.png", "img-0001.png"]
    assert all(0 < r["clip_score"] <= 100 for r in result["rows"])
    assert all(r["psnr_db"] == "inf" and r["ssim"] == pytest.approx(1.0) for r in result["rows"])
    assert (tmp_path / "eval.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "--model /no/such/model: no such folder"),
    (["--stages", "40"], "stages=40 is more than the 22 units"),
    (["--height", "30"], "--height 30 is not divisible by this model's VAE factor 4"),
    (["--devices", "2", "--stages", "3"], "--devices 2 does not match --stages 3 --stride 1"),
    (["--highres", "--height", "40"], "height=40 is not a whole multiple of the native height 32"),
    (["--highres", "--stages", "2"], "--highres spreads patches over the devices and does not split the denoiser"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    # in this process (no interpreter start-up per case); the subprocess path is tested below
    code = main(["generate", PROMPT, "-o", str(tmp_path / "x.png"), "--steps", "2", *args])
    assert code == 2
    assert f"asyncgen generate: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_failing_worker_ends_the_run_with_its_message(tmp_path):
    # both ranks load the model, then refuse the size: the first error is forwarded
    out = asyncgen("generate", PROMPT, "-o", tmp_path / "x.png", "--devices", "2", "--width", "34")
    assert out.returncode == 2
    assert "asyncgen generate: error: --width 34 is not divisible" in out.stderr


def test_ctrl_c_stops_every_worker(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "asyncgen.cli", "generate", PROMPT, "-o", str(tmp_path / "x.png"),
                             "--devices", "2", "--steps", "100000"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers = []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.5)
        # the spawn context adds a resource tracker child; workers are the others
        workers = [p for p in _children(proc.pid) if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) >= 2, "workers did not start"
    time.sleep(3)  # let them get into the denoising loop
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    time.sleep(0.5)
    alive = [p for p in workers if _stat(p) is not None]
    assert not alive, f"workers {alive} outlived the command"


@pytest.mark.distributed
def test_two_nodes_with_torchrun(tmp_path):
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
    local = asyncgen("generate", PROMPT, "-o", tmp_path / "local.png", "--steps", STEPS, "--devices", "2",
                     "--warmup", "2")
    assert local.returncode == 0, local.stderr
    assert np.abs(pixels(tmp_path / "nodes.png") - pixels(tmp_path / "local.png")).max() <= 1


def test_bench_two_configurations_writes_json_markdown_and_plot(tmp_path):
    out = asyncgen("bench", "--quick", "--configs", "n1s1,n2s1", "--warmups", "1", "--num-prompts", "1",
                   "--out", tmp_path / "bench", timeout=400)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["config"] for r in result["rows"]] == ["one stage", "AsyncDiff N=2 S=1 W=1"]
    for row in result["rows"]:
        assert row["speedup"] > 0 and row["async_s"] > 0 and 0 < row["clip_score"] <= 100
        assert len(row["resident_parameter_mb"]) == row["devices"]
    # one stage reproduces the stock pipeline exactly; two stages hold the weights between them
    assert result["rows"][0]["psnr_db"] == "inf"
    two = result["rows"][1]["resident_parameter_mb"]
    assert max(two) < result["rows"][1]["full_copy_mb"]
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| stock pipeline |" in table and "AsyncDiff N=2 S=1 W=1" in table
    with Image.open(tmp_path / "bench" / "results.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 400


def test_generate_highres_on_two_devices_matches_one(tmp_path):
    two = asyncgen("generate", PROMPT, "--highres", "-o", tmp_path / "two.png", "--steps", STEPS, "--devices", "2")
    assert two.returncode == 0, two.stderr
    assert "ASG high resolution" in two.stdout and "2 cpu devices" in two.stdout
    assert_picture(tmp_path / "two.png", size=(64, 64))  # twice the native 32x32 per side by default
    one = asyncgen("generate", PROMPT, "--highres", "-o", tmp_path / "one.png", "--steps", STEPS)
    assert one.returncode == 0, one.stderr
    # patches spread over two ranks reproduce the one-process run to <= 1e-5; 8-bit rounding as above
    assert np.abs(pixels(tmp_path / "two.png") - pixels(tmp_path / "one.png")).max() <= 1
