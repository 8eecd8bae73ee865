"""The ``asyncgen`` command: ``generate``, ``bench``, ``eval``, ``catalogue`` and ``plan``.

Each subcommand's options and work live in one module with ``add_arguments(parser)``
and ``run(args)``; this file only dispatches and turns errors into exit codes. Only the
chosen subcommand's module is imported, so ``asyncgen generate`` never loads the
evaluation harness.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import UsageError
from .launcher import Interrupted, WorkerFailed

COMMANDS = {
    "generate": ("asyncgen.cli.generate", "generate images from prompts, on one device or several (AsyncDiff)"),
    "bench": ("asyncgen.evaluation.bench_asyncdiff",
              "time and grade the stock pipeline against AsyncDiff configurations; JSON, Markdown and a plot"),
    "eval": ("asyncgen.evaluation.evaluate_folder",
             "CLIP score of a folder of images against a prompt file, and fidelity to a reference folder"),
    "catalogue": ("asyncgen.catalogue.command",
                  "the asynchronous-learning catalogue: list the methods, run a miniature experiment"),
    "plan": ("asyncgen.cli.plan", "what each rank would hold (stages, text encoders, VAE, bytes), from a model's "
             "configs alone: no weights needed"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s options are added (every subcommand's when ``command`` is None)."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="asyncgen",
        description="Generate with diffusers pipelines on several devices at once (AsyncDiff), benchmark it, "
        "evaluate images, and run the asynchronous-learning catalogue. Runs offline on the built-in miniature "
        "model when no --model is given.",
    )
    parser.add_argument("--verbose", action="store_true", help="on a failure, show the full traceback of the worker "
                        "that failed first (default: one line)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="on a failure, show the full traceback of the worker that failed first (default: one line)")
        if command in (None, name):
            importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def _quiet_third_party() -> None:
    """Warnings users cannot act on (e.g. transformers on image processors the model does not use) stay hidden."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", module=r"torchvision(\.|$)")
    warnings.filterwarnings("ignore", module=r"huggingface_hub(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    args = build_parser(_chosen_command(argv)).parse_args(argv)
    prog = f"asyncgen {args.command}"
    try:
        return importlib.import_module(args.module).run(args) or 0
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:
        if exc.exc_type == f"{UsageError.__module__}.{UsageError.__name__}":
            # bad input found by a worker (e.g. after loading the model): the message is enough
            print(f"{prog}: error: {exc.message}", file=sys.stderr)
            return 2
        print(f"{prog}: {exc.details if args.verbose else exc.summary}", file=sys.stderr)
        if not args.verbose:
            print(f"{prog}: (run with --verbose for the worker's traceback)", file=sys.stderr)
        return 1
    except Interrupted as exc:  # the launcher has stopped every worker before raising
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
