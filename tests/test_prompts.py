import pytest

from asyncgen.evaluation import prompts, shapes


def test_builtin_set_is_every_caption():
    builtin = prompts.miniature_prompts()
    assert builtin == shapes.all_captions() and len(builtin) >= 100
    subset = prompts.miniature_prompts(24, seed=1)
    assert len(set(subset)) == 24 and set(subset) <= set(builtin)
    assert subset == prompts.miniature_prompts(24, seed=1) != prompts.miniature_prompts(24, seed=2)
    with pytest.raises(ValueError, match="count=0"):
        prompts.miniature_prompts(0)


def test_text_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog on a sofa  \n")
    assert prompts.load_prompts(path) == ["a cat", "a dog on a sofa"]


def test_csv_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,Caption\n1,"a cat, sitting"\n2,\n3,a dog\n')
    assert prompts.load_prompts(path) == ["a cat, sitting", "a dog"]
    assert prompts.load_prompts(path, column="id") == ["1", "2", "3"]
    with pytest.raises(ValueError, match="column='nope'"):
        prompts.load_prompts(path, column="nope")
    other = tmp_path / "q.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no column named"):
        prompts.load_prompts(other)


def test_empty_missing_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt holds no prompts"):
        prompts.load_prompts(empty)
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("prompt\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        prompts.load_prompts(empty_csv)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prompts.load_prompts(tmp_path / "missing.txt")
    json_file = tmp_path / "p.json"
    json_file.write_text("[]")
    with pytest.raises(ValueError, match=r"\.txt .* or \.csv"):
        prompts.load_prompts(json_file)
