"""``asyncgen generate`` with video pipelines: .mp4/.gif chosen by -o, --frames, --fps, and bad input."""

import numpy as np
import pytest
from PIL import Image

import tiny_models
from asyncgen.cli.files import write_video
from asyncgen.cli.main import main

PROMPT = "a red ball bouncing"


def _generate(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["generate", PROMPT, *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gif_and_mp4_from_a_video_pipeline(family_path, tmp_path, capsys, one_thread):
    model = family_path("animatediff")
    code, out, err = _generate(capsys, "--model", model, "-o", tmp_path / "clip.gif", "--frames", 4, "--fps", 5,
                               "--steps", 2, "--height", 16, "--width", 16)
    assert code == 0, err
    assert "1 video (4 frames of 16x16)" in out and str(tmp_path / "clip.gif") in out
    gif = Image.open(tmp_path / "clip.gif")
    assert gif.n_frames == 4 and gif.size == (16, 16) and gif.info["duration"] == 200  # 5 fps
    code, out, err = _generate(capsys, "--model", model, "-o", tmp_path / "clip.mp4", "--frames", 3, "--steps", 2,
                               "--height", 16, "--width", 16, "--stages", 2)
    assert code == 0, err
    import imageio.v3 as iio

    video = iio.imread(tmp_path / "clip.mp4")
    assert video.shape == (3, 16, 16, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4"]  # no temporary files left


def test_write_video_matches_the_frames(tmp_path):
    frames = [np.full((16, 16, 3), v, dtype=np.float32) for v in (0.0, 0.5, 1.0)]
    write_video(tmp_path / "grey.gif", frames, fps=10)
    gif = Image.open(tmp_path / "grey.gif")
    values = []
    for i in range(gif.n_frames):
        gif.seek(i)
        values.append(int(np.asarray(gif.convert("RGB"))[0, 0, 0]))
    assert values == [0, 128, 255]


@pytest.mark.parametrize("family, args, message", [
    ("animatediff", ["-o", "{tmp}/clip.avi"], "-o {tmp}/clip.avi: unknown video extension '.avi'; use one of .mp4, .gif"),
    ("animatediff", ["-o", "{tmp}/clip.png"], "-o {tmp}/clip.png: unknown video extension '.png'; use one of .mp4, .gif"),
    ("wan", ["-o", "{tmp}/clip.mp4", "--frames", "8"],
     "--frames 8: this model's VAE compresses time by 4, so frames must be 4k + 1 (1, 5, 9, ...); nearest valid: 5 or 9"),
    (None, ["-o", "{tmp}/x.png", "--frames", "8"], "--frames: StableDiffusionPipeline makes images, not videos"),
])
def test_bad_video_input_is_a_one_line_error(family_path, tmp_path, capsys, family, args, message):
    model = ["--model", family_path(family)] if family else []
    code, _, err = _generate(capsys, *model, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, err
    assert f"asyncgen generate: error: {message.replace('{tmp}', str(tmp_path))}" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())
