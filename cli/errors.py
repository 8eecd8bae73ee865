"""The errors a command reports in one line (bad input, an output that could not be written), and how a
``python -m`` entry point reports them as ``asyncgen`` does."""


class UsageError(ValueError):
    """A bad option value: reported as ``asyncgen <command>: error: ...`` (exit code 2), no traceback."""


class OutputError(OSError):
    """An output that could not be written once the work was done (disk full, file-size limit, permissions
    changed meanwhile): reported as ``asyncgen <command>: error: PATH: REASON (ERRNO)`` (exit code 1), one line
    naming the path and the errno; nothing half-written is left at the path."""

    def __init__(self, path, exc: OSError):
        import errno as _errno

        super().__init__(exc.errno, exc.strerror, str(path))
        code = _errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else None
        reason = exc.strerror or str(exc) or type(exc).__name__
        self.message = f"{path}: could not write it: {reason}" + (f" ({code})" if code else "")

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # raised in a worker, re-raised nowhere: the launcher sends type and message
        return (OutputError, (self.filename, OSError(self.errno, self.strerror)))


def run_module_command(parser, run, argv=None) -> int:
    """``run(parser.parse_args(argv))`` for a ``python -m`` entry point, its errors reported as ``asyncgen`` would.

    A :class:`UsageError` is ``parser.error``: the usage and ``PROG: error: MESSAGE`` on standard error, exit
    code 2; an :class:`OutputError` (the work is done, a file could not be written) is one line,
    ``PROG: error: PATH: REASON (ERRNO)``, exit code 1. Anything else propagates.
    """
    try:
        return run(parser.parse_args(argv))
    except UsageError as exc:
        parser.error(str(exc))
    except OutputError as exc:  # after the work: one line naming the file and the errno
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
