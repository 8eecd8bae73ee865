"""Outputs that respect what is already there, checked before the work, and standard streams that are closed
or full (issue 30, classes 1 to 3).

Real things only: device nodes and FIFOs made in a temporary folder, symbolic links, pipes whose read end is
closed, ``/dev/full``, a pseudo-terminal, and ``RLIMIT_FSIZE`` in a subprocess. ``/dev/null`` itself is only
ever written through. Most cases call ``main`` in this process; what only a whole process shows (the exit-time
flush of a closed or full standard stream, a file-size limit) runs the command as users do.
"""

import contextlib
import io
import os
import stat
import subprocess
import sys
import textwrap
import threading

import pytest
from PIL import Image

from asyncgen.cli.errors import OutputError
from asyncgen.cli.files import (check_output_path, check_output_paths, write_all, write_atomic, write_image,
                                write_video)
from asyncgen.cli.main import EXIT_BROKEN_PIPE, main

PROMPT = "a large red circle on a blue background"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ASYNCGEN_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def generate(*args) -> list[str]:
    return ["generate", PROMPT, "--steps", "1", *map(str, args)]


def null_device(path) -> str:
    """A character device like /dev/null (1, 3), made in a temporary folder."""
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return str(path)


def full_device(path) -> str:
    """A character device like /dev/full (1, 7): every write fails with ENOSPC."""
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    return str(path)


def is_char_device(path) -> bool:
    return stat.S_ISCHR(os.lstat(path).st_mode)


def picture() -> Image.Image:
    return Image.new("RGB", (8, 8), (200, 30, 30))


def hidden(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def text_stream(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(os.fdopen(fd, "wb"), write_through=False)


@contextlib.contextmanager
def standard_output_on(monkeypatch, fd: int, other_end: int):
    """``sys.stdout`` is a text stream over ``fd`` inside the block; after it, the stream (and ``fd``) and
    ``other_end`` (the pipe's read end, the terminal's master) are closed."""
    stream = text_stream(fd)
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        yield stream
    finally:
        stream.close()
        os.close(other_end)


@pytest.fixture
def quiet_pipe():
    """A pipe whose read end is closed: every write to the other end fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    yield write


# --- class 1: what is already at the path -------------------------------------------------------------------

def test_a_device_node_is_written_through_never_replaced(tmp_path):
    node = null_device(tmp_path / "null")
    write_image(node, picture())
    assert is_char_device(node)
    full = full_device(tmp_path / "full")
    with pytest.raises(OutputError, match=r"full: could not write it: No space left on device \(ENOSPC\)"):
        write_atomic(full, b"data")
    assert is_char_device(full) and not hidden(tmp_path)


def test_dev_null_itself_is_written_through(tmp_path, capsys):
    before = os.stat("/dev/null")
    assert main(generate("-o", "/dev/null")) == 0, capsys.readouterr().err
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino


def test_a_fifo_is_written_through_to_its_reader(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []

    def read():
        with open(fifo, "rb") as f:
            received.append(f.read())

    reader = threading.Thread(target=read)
    reader.start()
    assert main(generate("-o", fifo)) == 0, capsys.readouterr().err
    reader.join(30)
    assert received and received[0].startswith(PNG)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_fifo_without_a_reader_yet_is_waited_for_and_said(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    timer = threading.Timer(0.5, lambda: received.append(open(fifo, "rb").read()))
    timer.start()
    write_atomic(fifo, b"late reader")
    timer.join(30)
    assert received == [b"late reader"]
    assert "waiting for a reader of FIFO" in capsys.readouterr().err


def test_symbolic_links_stay_links(tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    write_image(link, picture())
    assert link.is_symlink() and target.read_bytes().startswith(PNG)
    # a link to a device: written through, the device stays
    device_link = tmp_path / "device.png"
    device_link.symlink_to(null_device(tmp_path / "null"))
    write_image(device_link, picture())
    assert device_link.is_symlink() and is_char_device(tmp_path / "null")
    # a dangling link: the file it names is created, the link kept
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "made.png")
    write_image(dangling, picture())
    assert dangling.is_symlink() and (tmp_path / "made.png").read_bytes().startswith(PNG)
    assert not hidden(tmp_path)


def test_a_link_to_this_process_standard_output_writes_into_it(tmp_path):
    read, write = os.pipe()
    try:
        link = tmp_path / "out.png"
        link.symlink_to(f"/proc/self/fd/{write}")  # what a link to /proc/self/fd/1 is when 1 is a pipe
        write_image(link, picture())
        assert os.read(read, 1 << 16).startswith(PNG)
        assert link.is_symlink()
    finally:
        os.close(read)
        os.close(write)


def test_dash_writes_the_image_to_standard_output(monkeypatch, capsys):
    read, write = os.pipe()
    with standard_output_on(monkeypatch, write, read) as stream:
        assert main(generate("-o", "-")) == 0
        stream.flush()
        data = os.read(read, 1 << 20)
    assert data.startswith(PNG) and b"asyncgen:" not in data  # the image alone: the summary went to stderr
    assert "-> standard output" in capsys.readouterr().err
    assert not os.path.exists("-")


def test_dash_refuses_a_terminal_before_the_work(monkeypatch, capsys):
    master, slave = os.openpty()
    with standard_output_on(monkeypatch, slave, master):
        assert main(generate("-o", "-")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("asyncgen generate: error: -o -: standard output is a terminal; send the image to a file or a "
                   "pipe (asyncgen generate ... -o - > image.png)")


def test_dash_into_a_closed_pipe_ends_quietly(monkeypatch, capsys, quiet_pipe):
    stream = text_stream(quiet_pipe)
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(generate("-o", "-")) == EXIT_BROKEN_PIPE
    assert "Traceback" not in capsys.readouterr().err
    stream.close()


def test_a_trailing_slash_is_a_directory(tmp_path, capsys):
    assert main(generate("-o", f"{tmp_path}/made/")) == 0, capsys.readouterr().err
    assert (tmp_path / "made" / "asyncgen.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="names a directory"):
        check_output_path(f"{tmp_path}/x/")


# --- class 2: every output checked before the work; failures after it are one line -------------------------

def test_a_legal_254_character_name_works_and_256_is_refused_first(tmp_path, capsys):
    name = "x" * 250 + ".png"
    assert main(generate("-o", tmp_path / name)) == 0, capsys.readouterr().err
    assert (tmp_path / name).read_bytes().startswith(PNG) and not hidden(tmp_path)
    too_long = "y" * 252 + ".png"
    assert main(generate("-o", tmp_path / too_long)) == 2
    assert "is 256 bytes long; this file system allows at most 255" in capsys.readouterr().err


def test_every_numbered_output_is_checked_before_the_work(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "img-0001.png").mkdir()  # the second image's path is taken by a folder
    assert main(["generate", "--prompts", str(prompts), "--steps", "1", "-o", str(tmp_path / "out" / "img.png")]) == 2
    assert "img-0001.png is a directory" in capsys.readouterr().err
    assert not (tmp_path / "out" / "img-0000.png").exists()  # refused before the first image was made
    # a stem that fits alone but not with its number
    assert main(["generate", "--prompts", str(prompts), "--steps", "1", "-o", str(tmp_path / ("z" * 248 + ".png"))]) == 2
    assert "-0000.png: the name zzzz" in (err := capsys.readouterr().err) and "is 257 bytes long; this file" in err
    assert main(["generate", "--prompts", str(prompts), "--steps", "1", "-o", "-"]) == 2
    assert "standard output takes one image" in capsys.readouterr().err


def test_output_checks_name_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file is a file, not a directory"):
        check_output_paths([tmp_path / "ok.png", tmp_path / "file" / "x.png"])
    with pytest.raises(ValueError, match="directory /proc is not writable"):
        check_output_paths(["/proc/x.json"], kind="file")
    with pytest.raises(ValueError, match="same file"):
        check_output_paths([tmp_path / "a.png", tmp_path / "." / "a.png"])
    assert check_output_path(null_device(tmp_path / "null")) == tmp_path / "null"  # devices have no suffix


def test_several_outputs_are_written_together_or_not_at_all(tmp_path):
    first = tmp_path / "results.json"
    first.write_text("old")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match=r"taken: could not write it: Is a directory \(EISDIR\)"):
        write_all({first: "new", tmp_path / "taken": b"png"})
    assert first.read_text() == "old" and not hidden(tmp_path)


def test_a_video_to_a_device_is_written_through(tmp_path):
    import numpy as np

    node = tmp_path / "clip.gif"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    write_video(node, [np.full((8, 8, 3), 0.5)] * 2, fps=4)
    assert is_char_device(node)


def test_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    script = textwrap.dedent(f"""
        import os, resource, sys
        from asyncgen.cli.errors import OutputError
        from asyncgen.cli.files import write_all
        from asyncgen.cli.main import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
        try:
            write_all({{"small.md": "fits", "large.json": "x" * 4096}})
        except OutputError as exc:
            print("write_all:", exc, file=sys.stderr)
        sys.exit(main(["generate", {PROMPT!r}, "--steps", "1", "--height", "256", "--width", "256", "-o", "big.png"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    assert done.returncode == 1, done.stderr
    assert "write_all: large.json: could not write it: File too large (EFBIG)" in lines
    assert lines[-1] == "asyncgen generate: error: big.png: could not write it: File too large (EFBIG)"
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-written, no temporary file, not even small.md



def test_the_file_size_limit_is_lifted_only_while_the_libraries_load():
    """torch 2.6 writes a 3.4 kB module of its own when diffusers first imports torch._dynamo: the soft limit is
    raised to the hard one for the import only, and is back for the outputs."""
    import resource

    from asyncgen.cli.files import file_size_limit_lifted

    saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    hard = saved[1]
    soft = 1 << 30 if hard == resource.RLIM_INFINITY else hard // 2
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        with file_size_limit_lifted():
            assert resource.getrlimit(resource.RLIMIT_FSIZE) == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_FSIZE) == (soft, hard)
        with pytest.raises(RuntimeError), file_size_limit_lifted():
            raise RuntimeError("an import that fails")
        assert resource.getrlimit(resource.RLIMIT_FSIZE) == (soft, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved)

# --- class 3: closed and full standard streams ----------------------------------------------------------------

def test_progress_that_cannot_be_written_does_not_stop_the_work(tmp_path, monkeypatch):
    full = open("/dev/full", "w")  # 2>/dev/full
    monkeypatch.setattr(sys, "stderr", full)
    try:
        assert main(generate("-o", tmp_path / "a.png")) == 0
    finally:
        monkeypatch.undo()
        full.close() if not full.closed else None
    assert (tmp_path / "a.png").read_bytes().startswith(PNG)


def test_a_standard_stream_started_closed_takes_writes_quietly():
    """``2>&-``: Python gives None for the stream; progress and messages to it are dropped, nothing raises."""
    from asyncgen.cli.files import StandardStreams, TolerantStream

    stream = TolerantStream(None)
    assert stream.write("progress") == len("progress") and stream.flush() is None and stream.error is None
    saved = sys.stderr
    try:
        sys.stderr = None
        with StandardStreams():
            print("a message", file=sys.stderr)
    finally:
        sys.stderr = saved


def test_a_full_standard_output_is_one_line_and_the_image_is_kept(tmp_path, monkeypatch, capsys):
    full = open("/dev/full", "w")  # >/dev/full
    monkeypatch.setattr(sys, "stdout", full)
    assert main(generate("-o", tmp_path / "a.png")) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("asyncgen generate: error: standard output: could not write it: No space left on device "
                       "(ENOSPC)")
    assert (tmp_path / "a.png").read_bytes().startswith(PNG)


def test_a_closed_pipe_after_the_work_ends_quietly(tmp_path, monkeypatch, capsys, quiet_pipe):
    stream = text_stream(quiet_pipe)  # ... | true
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(generate("-o", tmp_path / "a.png")) == EXIT_BROKEN_PIPE
    monkeypatch.undo()
    assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("stdout, stderr, code, message", [
    ("closed", "pipe", EXIT_BROKEN_PIPE, ""),  # ... | head -c0 (| true)
    ("closed", "full", EXIT_BROKEN_PIPE, None),  # ... 2>/dev/full | true
    ("full", "pipe", 1, "asyncgen generate: error: standard output: could not write it: No space left on device "
                        "(ENOSPC)"),  # >/dev/full
])
def test_the_command_as_a_process_with_closed_and_full_streams(tmp_path, stdout, stderr, code, message):
    """Only a whole process shows what the interpreter does at exit with a stream that failed."""
    read, write = os.pipe()
    os.close(read)
    out = write if stdout == "closed" else open("/dev/full", "wb")
    err = open("/dev/full", "wb") if stderr == "full" else subprocess.PIPE
    try:
        done = subprocess.run([sys.executable, "-m", "asyncgen.cli", *generate("-o", tmp_path / "a.png")],
                              stdout=out, stderr=err, env=ENV, timeout=300)
    finally:
        os.close(write)
        for stream in (out, err):
            if hasattr(stream, "close"):
                stream.close()
    assert done.returncode == code
    assert (tmp_path / "a.png").read_bytes().startswith(PNG)
    if message is not None:
        lines = [line for line in done.stderr.decode().splitlines()
                 if line.strip() and "it/s]" not in line and "s/it]" not in line]  # not the progress bar
        assert lines == ([message] if message else []), done.stderr.decode()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a real file system that fills up (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_refused_before_the_work(small_disk, capsys):
    filler = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill it to the last block
        while True:
            os.write(filler, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(filler)
    assert main(generate("-o", small_disk / "a.png")) == 2
    assert capsys.readouterr().err.strip() == (f"asyncgen generate: error: -o {small_disk}/a.png: directory {small_disk} "
                                               "has no room for a file (No space left on device, ENOSPC)")


def test_a_disk_that_fills_during_the_write_is_one_line_and_leaves_nothing(small_disk, capsys):
    # a 256 x 256 image of one step is noise: its PNG (about 190 KB) cannot fit in 64 KiB
    assert main(generate("--height", 256, "--width", 256, "-o", small_disk / "a.png")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"asyncgen generate: error: {small_disk}/a.png: could not write it: No space left on device "
                       "(ENOSPC)")
    assert os.listdir(small_disk) == []


def test_a_terminal_device_is_refused_before_the_work(capsys):
    master, slave = os.openpty()
    name = os.ttyname(slave)
    try:
        assert main(generate("-o", name)) == 2
    finally:
        os.close(master)
        os.close(slave)
    assert capsys.readouterr().err.strip() == (f"asyncgen generate: error: -o {name} is a terminal; send the image to "
                                               "a file or a pipe")


def test_a_write_that_fails_in_a_worker_is_the_same_one_line(tmp_path, capsys):
    device = full_device(tmp_path / "full.png")
    assert main(generate("--devices", 2, "--warmup", 1, "-o", device)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"asyncgen generate: error: {device}: could not write it: No space left on device (ENOSPC)"
    assert is_char_device(device)


def test_dev_stdout_gets_the_image_alone():
    """``-o /dev/stdout`` (a link to /proc/self/fd/1) into a pipe: written through, the summary on stderr."""
    done = subprocess.run([sys.executable, "-m", "asyncgen.cli", *generate("-o", "/dev/stdout")], capture_output=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith(PNG) and b"asyncgen:" not in done.stdout
    assert "-> /dev/stdout" in done.stderr.decode()
