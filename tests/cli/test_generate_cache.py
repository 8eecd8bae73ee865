"""asyncgen generate --cache: a diffusers step cache under the stages, from the command line."""

import numpy as np
import pytest

from asyncgen.cli.main import main

from .test_main import PROMPT, assert_picture, asyncgen, in_process, pixels


def test_generate_with_a_cache_on_one_process_and_two_devices(tmp_path, capsys):
    stock = in_process(capsys, "generate", PROMPT, "--model", "miniature-dit", "-o", tmp_path / "stock.png",
                       "--steps", "12")
    assert "stock pipeline" in stock
    one = in_process(capsys, "generate", PROMPT, "--model", "miniature-dit", "--cache", "taylorseer", "-o",
                     tmp_path / "one.png", "--steps", "12")
    assert "+ taylorseer cache" in one
    assert_picture(tmp_path / "one.png")
    assert not np.array_equal(pixels(tmp_path / "one.png"), pixels(tmp_path / "stock.png"))  # steps were predicted
    serial = in_process(capsys, "generate", PROMPT, "--model", "miniature-dit", "--cache", "taylorseer", "-o",
                        tmp_path / "serial.png", "--steps", "12", "--stages", "2", "--warmup", "1")
    two = asyncgen("generate", PROMPT, "--model", "miniature-dit", "--cache", "taylorseer", "-o", tmp_path / "two.png",
                   "--steps", "12", "--devices", "2", "--warmup", "1")
    assert two.returncode == 0, two.stderr
    assert "AsyncDiff stages=2" in two.stdout and "+ taylorseer cache" in two.stdout
    # the distributed run reproduces the serial simulator to <= 1e-5 in float; as 8-bit pixels one level at most
    assert np.abs(pixels(tmp_path / "two.png") - pixels(tmp_path / "serial.png")).max() <= 1
    assert "serial simulator" in serial


@pytest.mark.parametrize("args, message", [
    (["--cache", "fbcache"], "--cache fbcache: the step caches run on transformer denoisers; this model's is a "
                             "UNet2DConditionModel"),
    (["--model", "miniature-dit", "--cache", "taylorseer", "--highres"], "--highres (ASG) takes none"),
])
def test_a_cache_where_none_runs_is_one_line(tmp_path, capsys, args, message):
    code = main(["generate", PROMPT, "-o", str(tmp_path / "x.png"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_help_names_the_caches_and_their_settings(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--cache {fbcache,taylorseer}" in text
    assert "threshold 0.05" in text and "every 5th step computed after 3 full ones" in text
