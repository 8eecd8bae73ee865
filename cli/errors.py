"""The error type for bad command-line input."""


class UsageError(ValueError):
    """A bad option value: reported as ``asyncgen <command>: error: ...`` (exit code 2), no traceback."""
