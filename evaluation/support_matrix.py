"""The support matrix: which denoiser classes asyncgen splits, and what was checked, from real runs.

The tests are the checks (``tests/test_transformer_matrix.py``, the DiT and video test
files): each asserts a property and, when it holds, calls :func:`record` with the class
and the column it proves. With ``ASYNCGEN_SUPPORT_MATRIX`` naming a file, records go
there as JSON lines; otherwise nothing is written. This script runs those tests with the
variable set and renders what they recorded as a table, into ``docs/support_matrix.md``
and between the README's ``<!-- support-matrix -->`` markers. A cell is only filled by a
test that passed in that run; nothing is typed in by hand.

    python -m asyncgen.evaluation.support_matrix            # run the tests, write both files
    python -m asyncgen.evaluation.support_matrix --render   # re-render the last records only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ENV = "ASYNCGEN_SUPPORT_MATRIX"
ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "support_matrix.jsonl"
TEST_FILES = ("tests/split/test_transformer.py", "tests/pipelines/test_transformer_pipelines.py",
              "tests/pipelines/test_dit.py", "tests/distributed/test_dit_cfg.py", "tests/pipelines/test_video.py",
              "tests/split/test_unseen_configs.py")
MARK_BEGIN, MARK_END = "<!-- support-matrix -->", "<!-- /support-matrix -->"

# column -> header; a record sets one column of one class
COLUMNS = {
    "kind": "images / video",
    "pipeline": "pipeline",
    "split": "split path",
    "composition": "stages == full forward",
    "one_stage": "`stages=1` == stock",
    "distributed": "2 ranks == serial",
    "cfg_parallel": "CFG parallel",
}


def record(class_name: str, **columns: Any) -> None:
    """Note that a check passed for ``class_name`` (only when ``ASYNCGEN_SUPPORT_MATRIX`` is set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown support-matrix columns {sorted(unknown)}; known: {list(COLUMNS)}")
    with open(path, "a", encoding="utf-8") as f:  # one short line per write: appends from workers do not interleave
        f.write(json.dumps({"class": class_name, **{k: str(v) for k, v in columns.items()}}) + "\n")


def denoise_steps(model, split, stages: int, inputs: dict, steps: int = 3, ctx=None, warmup: int = 1):
    """``steps`` Euler-like steps ``x <- x - 0.1 * eps`` through the asynchronous schedule.

    Serial simulator without ``ctx``, the distributed runtime with it: the same code path
    the pipelines' proxy drives, without a pipeline around it, so every class can be checked.
    """
    import torch

    from asyncgen.cost.cuts import choose_cuts
    from asyncgen.runtime.asyncdiff import DistributedRuntime
    from asyncgen.schedules.asyncdiff import AsyncSchedule, Topology
    from asyncgen.schedules.simulator import SerialSimulator, run_loop
    from asyncgen.split.units import make_stages

    all_stages = make_stages(split, choose_cuts(split, stages, "even"))
    topology = Topology(stages, 1)
    if ctx is None:
        executor = SerialSimulator(split, all_stages, topology)
    else:
        executor = DistributedRuntime(split, all_stages[topology.stage_of(ctx.rank)], topology, ctx)
    rest = dict(inputs)
    sample = rest.pop(split.sample_argument)
    timestep = rest.pop(split.timestep_argument)
    times = [timestep * (1.0 - 0.2 * m) for m in range(steps)]

    def update(step: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if eps.ndim > 1 and x.ndim > 1 and eps.shape[1] == 2 * x.shape[1]:
            eps = eps[:, : x.shape[1]]  # a learned-variance model (PixArt): noise first, as its pipeline takes it
        return x - 0.1 * eps

    with torch.no_grad():
        return run_loop(executor, AsyncSchedule(topology, warmup, False), steps, sample,
                        lambda m, x: split.conditioning(x, times[m], **rest), update)


# ------------------------------------------------------------------ rendering


def load_records(path: Path = RECORDS) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            row = rows.setdefault(item.pop("class"), {})
            pipelines = row.get("pipeline", "").split(", ") if row.get("pipeline") else []
            if item.get("pipeline"):  # a class may serve several pipelines: list each once
                item["pipeline"] = ", ".join(pipelines + [item["pipeline"]] * (item["pipeline"] not in pipelines))
            row.update(item)
    return rows


def render(rows: dict[str, dict[str, str]]) -> str:
    order = sorted(rows, key=lambda c: (rows[c].get("kind", "") == "video", c))
    lines = ["| class | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in order:
        row = rows[name]
        lines.append(f"| `{name}` | " + " | ".join(row.get(k, "—") for k in COLUMNS) + " |")
    video = sum(rows[c].get("kind") == "video" for c in rows)
    lines.append("")
    lines.append(f"{len(rows)} classes ({video} video). A cell is filled only by a test that passed in the run that "
                 "wrote this table (`python -m asyncgen.evaluation.support_matrix`); — means no test checks it.")
    return "\n".join(lines)


def write(rows: dict[str, dict[str, str]], readme: Path | None = ROOT / "README.md",
          doc: Path = ROOT / "docs" / "support_matrix.md") -> None:
    table = render(rows)
    doc.write_text("# Support matrix\n\nGenerated by `python -m asyncgen.evaluation.support_matrix` from the test "
                   "results (see the module docstring).\n\n" + table + "\n", encoding="utf-8")
    if readme is None:
        return
    text = readme.read_text(encoding="utf-8")
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        _, tail = rest.split(MARK_END, 1)
        readme.write_text(head + MARK_BEGIN + "\n" + table + "\n" + MARK_END + tail, encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only re-render docs/support_matrix.jsonl")
    parser.add_argument("--no-readme", action="store_true",
                        help="write docs/support_matrix.md only, leaving the README's copy of the table as it is")
    parser.add_argument("tests", nargs="*", help=f"test files to run (default: those of {TEST_FILES} that exist)")
    args = parser.parse_args(argv)
    if not args.render:
        files = args.tests or [f for f in TEST_FILES if (ROOT / f).exists()]
        RECORDS.unlink(missing_ok=True)
        env = {**os.environ, ENV: str(RECORDS)}
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", *files], cwd=ROOT, env=env)
        if code not in (0, 1):
            return code
    write(load_records(), readme=None if args.no_readme else ROOT / "README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
