"""Sizes with a ceiling (issue 30, class 6): what a command knows is checked before it spawns or allocates, and
``plan`` never allocates what it plans."""

import resource

import pytest

from asyncgen.cli.main import main
from asyncgen.cli.options import MAX_IMAGE_SIDE


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def nothing_runs(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the work started before the sizes were checked")

    monkeypatch.setattr("asyncgen.cli.generate.run_on_devices", started)


@pytest.mark.parametrize("command", [["generate", "a red circle"], ["plan"]])
@pytest.mark.parametrize("option", ["--height", "--width"])
def test_a_side_above_the_ceiling_is_one_line(capsys, nothing_runs, command, option):
    code, _, err = run(capsys, *command, option, 65536)
    assert code == 2
    assert err.strip() == (f"asyncgen {command[0]}: error: {option} 65536: image sides go up to {MAX_IMAGE_SIDE} "
                           f"pixels (67 megapixels at 8192x8192); give at most {MAX_IMAGE_SIDE}")


def test_plan_at_the_ceiling_estimates_without_allocating(capsys):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    code, out, err = run(capsys, "plan", "--height", MAX_IMAGE_SIDE, "--width", MAX_IMAGE_SIDE, "--json")
    assert code == 0, err
    import json

    plan = json.loads(out)
    planned = max(rank["activation_bytes"] for rank in plan["ranks"])
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert planned > 10 * 2**30  # the miniature model at 8192 x 8192: tens of GB of activations, estimated
    assert grown < planned / 10, f"plan allocated {grown / 2**30:.1f} GiB for a {planned / 2**30:.1f} GiB plan"


def test_a_size_far_above_the_native_one_says_so_before_the_run(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("asyncgen.cli.generate.run_on_devices", interrupted)
    code, _, err = run(capsys, "generate", "a red circle", "--height", 256, "--width", 256)
    assert code == 130
    assert ("asyncgen generate: note: 256x256 is 64 times the pixels of this model's native 32x32; each step takes "
            "far longer") in err


@pytest.mark.parametrize("steps, message", [
    (10**9, "--steps 1000000000: at most 10000 (models are trained on 1000 timesteps"),
    (1001, "--steps 1001: this model's DDIMScheduler takes at most 1000 steps (its num_train_timesteps)"),
])
def test_steps_beyond_what_the_model_takes_are_refused_before_the_work(capsys, nothing_runs, steps, message):
    code, _, err = run(capsys, "generate", "a red circle", "--steps", steps)
    assert code == 2 and err.strip().startswith(f"asyncgen generate: error: {message}")


def test_bench_refuses_steps_before_spawning(capsys, monkeypatch):
    def spawned(*args, **kwargs):
        raise AssertionError("workers were spawned before --steps was checked")

    monkeypatch.setattr("asyncgen.evaluation.bench_asyncdiff.launch", spawned)
    code, _, err = run(capsys, "bench", "--steps", 1001, "--num-prompts", 1)
    assert code == 2 and err.strip() == ("asyncgen bench: error: --steps 1001: this model's DDIMScheduler takes at "
                                         "most 1000 steps (its num_train_timesteps)")


def test_plan_names_the_option_that_asks_for_too_many_stages(capsys):
    code, _, err = run(capsys, "plan", "--devices", 1000000)
    assert code == 2 and err.strip() == ("asyncgen plan: error: --devices 1000000 (1000000 stages): this "
                                         "UNet2DConditionModel splits into at most 22 stages")


def test_frames_above_the_ceiling_are_one_line(capsys, nothing_runs):
    code, _, err = run(capsys, "generate", "a red circle", "--frames", 100000)
    assert code == 2 and err.strip() == ("asyncgen generate: error: --frames 100000: at most 1024 (the longest clips "
                                         "video pipelines make are 81 to 257 frames)")


def test_a_size_whose_estimate_exceeds_the_memory_is_refused_before_the_work(capsys, nothing_runs, monkeypatch):
    monkeypatch.setattr("asyncgen.cli.generate.available_memory", lambda device, devices: 2**30)
    code, _, err = run(capsys, "generate", "a red circle", "--height", MAX_IMAGE_SIDE, "--width", MAX_IMAGE_SIDE)
    assert code == 2
    assert err.strip().startswith("asyncgen generate: error: --height 8192 --width 8192: the estimated peak memory at "
                                  "that size is 35.59 GB (parameters and the denoiser's activations; asyncgen plan "
                                  "shows it), more than the 1.07 GB available on this host; choose a smaller size")
