"""The command's file I/O: prompt files in, whole files out (cli/files.py)."""

import os
import stat

import pytest
from PIL import Image

from asyncgen.cli.files import check_output_path, image_format, load_prompts, write_atomic, write_image


def test_text_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog on a sofa  \n")
    assert load_prompts(path) == ["a cat", "a dog on a sofa"]


def test_csv_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,Caption\n1,"a cat, sitting"\n2,\n3,a dog\n')
    assert load_prompts(path) == ["a cat, sitting", "a dog"]
    assert load_prompts(path, column="id") == ["1", "2", "3"]
    with pytest.raises(ValueError, match="column='nope'"):
        load_prompts(path, column="nope")
    other = tmp_path / "q.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no column named"):
        load_prompts(other)


def test_empty_missing_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt holds no prompts"):
        load_prompts(empty)
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("prompt\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(empty_csv)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(tmp_path / "missing.txt")
    json_file = tmp_path / "p.json"
    json_file.write_text("[]")
    with pytest.raises(ValueError, match=r"\.txt .* or \.csv"):
        load_prompts(json_file)


def test_prompt_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory; give a .txt file"):
        load_prompts(tmp_path)


def test_outputs_get_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "a.json", "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o002)
        path = write_image(tmp_path / "b.png", Image.new("RGB", (4, 4)))
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_image_formats_and_output_checks(tmp_path):
    assert image_format("x.png") == "PNG" and image_format("x.JPG") == "JPEG" and image_format("x") == "PNG"
    with pytest.raises(ValueError, match=r"unknown image extension '.xyz'; use one of .png, .jpg"):
        image_format("out.xyz")
    with pytest.raises(ValueError, match="is a directory; give a file name"):
        check_output_path(tmp_path)
    assert check_output_path(tmp_path / "new" / "deeper" / "x.png") == tmp_path / "new" / "deeper" / "x.png"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_output_path(tmp_path / "file" / "x.png")
    with pytest.raises(ValueError, match="directory /proc is not writable"):  # not even root creates files there
        check_output_path("/proc/x.png")


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    text = tmp_path / "p.txt"
    text.write_bytes("\ufeffa cat\na dog\n".encode())
    assert load_prompts(text) == ["a cat", "a dog"]
    table = tmp_path / "p.csv"
    table.write_bytes("\ufeffprompt,id\na cat,1\n".encode())  # Excel's "CSV UTF-8"
    assert load_prompts(table) == ["a cat"]


def test_prompt_file_errors_speak_the_command_line(tmp_path):
    other = tmp_path / "q.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError) as error:
        load_prompts(other)
    assert "column=" not in str(error.value)  # the command has no such option
    assert str(error.value).endswith("has no column named prompt, caption or text (headers: a, b); name the column "
                                     "of prompts 'prompt'")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(byte 0xe9 at offset 6\); save it as UTF-8"):
        load_prompts(latin)


def test_a_fifo_of_prompts_is_read_as_text(tmp_path):
    import threading

    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a cat\na dog\n"))
    writer.start()
    assert load_prompts(fifo) == ["a cat", "a dog"]
    writer.join(10)
