"""``asyncgen eval`` and ``asyncgen bench``: every output checked before the work, written whole after it, and
the limits they know checked before a worker is spawned (issue 30, classes 2 and 6, and the prompt options)."""

import json
import os

import pytest
from PIL import Image

from asyncgen.cli.main import main


@pytest.fixture
def folder(tmp_path):
    """Two small images and their prompt file (the prompt file begins with a UTF-8 byte-order mark)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (100 * i, 20, 20)).save(images / f"img-{i:04d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa red square\na black square\n".encode())
    return images, prompts


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_out_md_keeps_its_json(folder, tmp_path, capsys):
    images, prompts = folder
    code, out, err = run(capsys, "eval", images, "--prompts", prompts, "--clip", "none", "--reference", images,
                         "--out", tmp_path / "r.md")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())  # the JSON is JSON, not the table
    assert [r["prompt"] for r in result["rows"]] == ["a red square", "a black square"]  # no byte-order mark
    assert (tmp_path / "r.md").read_text().startswith("| image | prompt |")
    assert "results written to" in out


def test_eval_out_folder_gets_results_files(folder, tmp_path, capsys):
    images, prompts = folder
    for out in (tmp_path / "existing", f"{tmp_path}/new/"):
        os.makedirs(tmp_path / "existing", exist_ok=True)
        code, _, err = run(capsys, "eval", images, "--prompts", prompts, "--clip", "none", "--out", out)
        assert code == 0, err
        assert json.loads((tmp_path / os.path.basename(str(out).rstrip("/")) / "results.json").read_text())["rows"]


@pytest.mark.parametrize("out, message", [
    ("{tmp}/file/r.json", "--out {tmp}/file/r.json: {tmp}/file is a file, not a directory"),
    ("/proc/r.json", "--out /proc/r.json: directory /proc is not writable"),
    ("-", "--out -: give a file or folder name"),
])
def test_eval_refuses_an_unwritable_out_before_scoring(folder, tmp_path, capsys, monkeypatch, out, message):
    images, prompts = folder
    (tmp_path / "file").write_text("")

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before --out was checked")

    monkeypatch.setattr("asyncgen.evaluation.evaluate_folder.evaluate_folder", no_scoring)
    code, _, err = run(capsys, "eval", images, "--prompts", prompts, "--out", out.replace("{tmp}", str(tmp_path)))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"asyncgen eval: error: {message.replace('{tmp}', str(tmp_path))}")


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if bench gets as far as spawning workers."""
    def spawned(*args, **kwargs):
        raise AssertionError("workers were spawned before the input was checked")

    monkeypatch.setattr("asyncgen.evaluation.bench_asyncdiff.launch", spawned)


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/file"], "--out {tmp}/file/results.json: {tmp}/file is a file, not a directory"),
    (["--out", "{tmp}/taken"], "--out {tmp}/taken/results.json is a directory"),
    (["--out", "/proc/bench"], "--out /proc/bench/results.json: directory /proc is not writable"),
    (["--prompt", "a cat", "--prompts", "{tmp}/p.txt"], "--prompt and --prompts: give one of --prompt TEXT, "
                                                         "--prompts FILE or --num-prompts N"),
    (["--prompt", "a cat", "--num-prompts", "3"], "--prompt and --num-prompts: give one of"),
    (["--num-prompts", "500"], "--num-prompts 500: the built-in prompt set has 180 captions; give at most 180"),
    (["--configs", "n23s1", "--oversubscribe"], "--configs n23s1: 23 stages, but this UNet2DConditionModel splits "
                                                "into at most 22 stages"),
    (["--height", "65536"], "--height 65536: image sides go up to 8192 pixels"),
    (["--height", "36"], "--height 36 is not a multiple of 8"),
])
def test_bench_checks_before_spawning(tmp_path, capsys, no_workers, args, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "taken" / "results.json").mkdir(parents=True)
    (tmp_path / "p.txt").write_text("a dog\n")
    code, out, err = run(capsys, "bench", "--quick", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"asyncgen bench: error: {message.replace('{tmp}', str(tmp_path))}")
    assert "note:" not in out  # nothing said about a run that does not happen


# --- the python -m entry points: one error handler (asyncgen.cli.errors.run_module_command) for both -------------

@pytest.mark.parametrize("module, args, message", [
    ("evaluate_folder", ["{images}", "--prompts", "{prompts}", "--clip", "none", "--out", "-"],
     "--out -: give a file or folder name (the table is printed on standard output anyway)"),
    ("bench_asyncdiff", ["--quick", "--prompt", "a cat", "--num-prompts", "3"],
     "--prompt and --num-prompts: give one of --prompt TEXT, --prompts FILE or --num-prompts N (built-in captions), "
     "not several"),
])
def test_python_m_reports_bad_input_as_argparse_does(folder, capsys, no_workers, module, args, message):
    import importlib

    images, prompts = folder
    main_of = importlib.import_module(f"asyncgen.evaluation.{module}").main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main_of([a.format(images=images, prompts=prompts) for a in args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(f"usage: python -m asyncgen.evaluation.{module}")
    assert lines[-1] == f"python -m asyncgen.evaluation.{module}: error: {message}"


def test_python_m_reports_a_failed_write_after_the_work_in_one_line(folder, tmp_path, capsys, monkeypatch):
    import errno

    from asyncgen.cli.errors import OutputError
    from asyncgen.evaluation import evaluate_folder

    def full_disk(files):
        path = next(iter(files))
        raise OutputError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr("asyncgen.cli.files.write_all", full_disk)
    images, prompts = folder
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        evaluate_folder.main([str(images), "--prompts", str(prompts), "--clip", "none", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (f"python -m asyncgen.evaluation.evaluate_folder: error: {tmp_path / 'r'}: "
                                       "could not write it: No space left on device (ENOSPC)\n")


def test_run_module_command_returns_the_code_and_lets_other_errors_through():
    import argparse

    from asyncgen.cli.errors import run_module_command

    parser = argparse.ArgumentParser(prog="python -m example")
    parser.add_argument("--n", type=int, default=3)
    assert run_module_command(parser, lambda args: args.n, ["--n", "7"]) == 7

    def broken(args):
        raise RuntimeError("not an input error")

    with pytest.raises(RuntimeError, match="not an input error"):
        run_module_command(parser, broken, [])
