"""asyncgen generate --sp: the hybrid from the command line; and its refusals, each one line before any worker."""

import numpy as np
import pytest
from PIL import Image

from asyncgen._compat import context_parallel_refusal_for_hybrid
from asyncgen.cli.main import main

from ..cli.test_main import PROMPT, asyncgen, in_process

pytestmark = pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None,
                                reason=f"{context_parallel_refusal_for_hybrid()}")

VIDEO = ["--frames", "9", "--height", "64", "--width", "64", "--steps", "2"]


def _frames(path) -> np.ndarray:
    with Image.open(path) as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")).astype(np.int16))
    return np.stack(frames)


@pytest.mark.distributed
def test_generate_with_sp_on_two_devices(family_path, tmp_path, capsys):
    path = family_path("wan")
    stock = in_process(capsys, "generate", PROMPT, "--model", path, "-o", tmp_path / "stock.gif", *VIDEO)
    assert "stock pipeline" in stock
    run = asyncgen("generate", PROMPT, "--model", path, "-o", tmp_path / "sp.gif", "--devices", "2", "--sp", "2",
                   "--oversubscribe", *VIDEO)
    assert run.returncode == 0, run.stderr
    assert "x Ulysses 2 per stage" in run.stdout and "2 cpu devices" in run.stdout
    # one stage with Ulysses attention is the stock forward up to float32 rounding (~1e-7): 8-bit frames equal,
    # but for a value that lands on a rounding boundary
    assert np.abs(_frames(tmp_path / "sp.gif") - _frames(tmp_path / "stock.gif")).max() <= 1


@pytest.mark.parametrize("args, message", [
    (["--sp", "2"], "--sp 2: context parallelism needs several devices"),
    (["--sp", "3", "--devices", "4", "--oversubscribe"], "--sp 3 does not divide --devices 4"),
    (["--sp", "2", "--devices", "2", "--oversubscribe", "--parallel", "auto"], "--sp 2 with --parallel auto"),
    (["--sp", "2", "--devices", "2", "--oversubscribe", "--model", "miniature-dit", "--cache", "taylorseer"],
     "--sp 2 with --cache taylorseer"),
    (["--sp", "2", "--highres"], "--highres (ASG) splits no denoiser: leave out --sp"),
])
def test_sp_where_it_cannot_run_is_one_line(tmp_path, capsys, args, message):
    code = main(["generate", PROMPT, "-o", str(tmp_path / "x.png"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_help_names_sp(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sp SP" in text and "diffusers' own context parallelism" in text
