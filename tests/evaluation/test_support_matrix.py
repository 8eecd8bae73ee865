"""The support matrix is regenerated from the test files that record into it: the list must name them all."""

from pathlib import Path

from asyncgen.evaluation import support_matrix

ROOT = Path(__file__).resolve().parents[2]


def test_the_matrix_runs_exactly_the_test_files_that_record_into_it():
    marker = "support_matrix." + "record("  # spelled in two pieces so that this file does not match itself
    recording = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if marker in p.read_text())
    assert sorted(support_matrix.TEST_FILES) == recording
    assert all((ROOT / f).is_file() for f in support_matrix.TEST_FILES)
