"""The ``asyncgen`` command: ``generate``, ``bench``, ``eval``, ``catalogue`` and ``plan``.

Each subcommand's options and work live in one module with ``SUMMARY``,
``add_arguments(parser)`` and ``run(args)``, registered as an entry point of the
``asyncgen.commands`` group (``pyproject.toml``); this file finds them there, dispatches
and turns errors into exit codes. It names no module of the layers above it, and only
the chosen subcommand's module is imported, so ``asyncgen generate`` never loads the
evaluation harness.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import UsageError
from .launcher import Interrupted, WorkerFailed

# the subcommands are the entry points of this group (pyproject.toml): the CLI names no module of the layers
# above it, and a plugin package can add a command the same way
ENTRY_POINT_GROUP = "asyncgen.commands"
# the order ``asyncgen --help`` lists them in; commands not named here follow in name order
ORDER = ("generate", "bench", "eval", "plan", "catalogue")


def commands() -> dict[str, str]:
    """``{command: module}`` from the installed entry points, in :data:`ORDER` (nothing is imported)."""
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if not found:
        raise UsageError(f"no asyncgen commands are registered (entry points {ENTRY_POINT_GROUP!r}): "
                         "install the package (pip install -e .) before running it")
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in commands().items():
        # only the chosen command's module is imported (``asyncgen generate`` never loads the evaluation
        # harness); the others' one-line summaries are needed only when no command is chosen (``--help``)
        loaded = importlib.import_module(module) if command in (None, name) else None
        summary = getattr(loaded, "SUMMARY", None)
        sub = subparsers.add_parser(name, help=summary, description=summary)
        sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="on a failure, show the full traceback of the worker that failed first (default: one line)")
        if loaded is not None:
            loaded.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    names = commands()
    return next((a for a in argv if a in names), None)


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
    try:
        parser = build_parser(_chosen_command(argv))
    except UsageError as exc:
        print(f"asyncgen: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
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
