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
ORDER = ("generate", "serve", "bench", "eval", "plan", "catalogue")


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


# a closed pipe ends a command quietly with the status of a process killed by SIGPIPE (128 + 13), what
# ``yes | head -1`` reports for ``yes`` under ``set -o pipefail``
EXIT_BROKEN_PIPE = 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (argparse's ``--help`` and option errors raise SystemExit as usual).

    Standard output and error are guarded (:class:`~asyncgen.cli.files.StandardStreams`): a closed pipe
    (``| head``, ``| true``) ends the command quietly with :data:`EXIT_BROKEN_PIPE` once its files are written;
    a full or failing standard output is one line on standard error and exit code 1; standard error that
    cannot be written (``2>/dev/full``) changes nothing: progress and messages never decide the outcome."""
    from .files import StandardStreams

    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    exit_request = None
    with StandardStreams() as streams:
        prog = "asyncgen"
        try:
            prog, code = _run(argv)
        except SystemExit as exc:  # argparse: --help, --version, a bad option
            exit_request = exc
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        code = _standard_output_outcome(streams, prog, code)
    if exit_request is not None:
        raise SystemExit(code)
    return code


def _standard_output_outcome(streams, prog: str, code: int) -> int:
    from .files import say

    error = streams.stdout_error
    if error is None:
        return code
    if isinstance(error, BrokenPipeError):
        return code or EXIT_BROKEN_PIPE
    from .errors import OutputError

    say(f"{prog}: error: {OutputError('standard output', error) if isinstance(error, OSError) else error}")
    return code or 1


def _run(argv: list[str]) -> tuple[str, int]:
    import importlib

    from .errors import OutputError
    from .files import say

    try:
        parser = build_parser(_chosen_command(argv))
    except UsageError as exc:
        say(f"asyncgen: error: {exc}")
        return "asyncgen", 2
    args = parser.parse_args(argv)
    prog = f"asyncgen {args.command}"
    try:
        return prog, importlib.import_module(args.module).run(args) or 0
    except UsageError as exc:
        say(f"{prog}: error: {exc}")
        return prog, 2
    except OutputError as exc:  # the work is done, an output could not be written: nothing half-written is left
        say(f"{prog}: error: {exc}")
        return prog, 1
    except BrokenPipeError:  # the image went to standard output (-o -) and its reader has gone
        return prog, EXIT_BROKEN_PIPE
    except WorkerFailed as exc:
        if exc.exc_type == f"{UsageError.__module__}.{UsageError.__name__}":
            # bad input found by a worker (e.g. after loading the model): the message is enough
            say(f"{prog}: error: {exc.message}")
            return prog, 2
        if exc.exc_type == f"{OutputError.__module__}.{OutputError.__name__}":
            say(f"{prog}: error: {exc.message}")
            return prog, 1
        if exc.exc_type == "BrokenPipeError":
            return prog, EXIT_BROKEN_PIPE
        say(f"{prog}: {exc.details if args.verbose else exc.summary}")
        if not args.verbose:
            say(f"{prog}: (run with --verbose for the worker's traceback)")
        return prog, 1
    except Interrupted as exc:  # the launcher has stopped every worker before raising
        say(f"{prog}: {exc}")
        return prog, exc.exit_code
    except KeyboardInterrupt:
        say(f"{prog}: interrupted")
        return prog, 130


if __name__ == "__main__":
    sys.exit(main())
