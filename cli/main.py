"""The ``asyncgen`` command: ``generate``, ``bench`` and ``eval``.

Each subcommand's options and work live in one module with ``add_arguments(parser)``
and ``run(args)``; this file only dispatches and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import UsageError
from .launcher import WorkerFailed

COMMANDS = {
    "generate": ("asyncgen.cli.generate", "generate images from prompts, on one device or several (AsyncDiff)"),
    "bench": ("asyncgen.evaluation.bench_asyncdiff",
              "time and grade the stock pipeline against AsyncDiff configurations; JSON, Markdown and a plot"),
    "eval": ("asyncgen.evaluation.evaluate_folder",
             "CLIP score of a folder of images against a prompt file, and fidelity to a reference folder"),
    "catalogue": ("asyncgen.cli.catalogue",
                  "the asynchronous-learning catalogue: list the methods, run a miniature experiment"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="asyncgen",
        description="Generate with diffusers pipelines on several devices at once (AsyncDiff), benchmark it, "
        "and evaluate images. Runs offline on the built-in miniature model when no --model is given.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import importlib

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"asyncgen {args.command}"
    try:
        return importlib.import_module(args.module).run(args) or 0
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:
        last = str(exc).strip().splitlines()[-1]
        if last.startswith(f"{UsageError.__module__}.{UsageError.__name__}: "):
            # bad input found by a worker (e.g. after loading the model): the message is enough
            print(f"{prog}: error: {last.split(': ', 1)[1]}", file=sys.stderr)
            return 2
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the launcher has already stopped every worker
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
