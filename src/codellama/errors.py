"""The one exception type users see for bad input: the CLI prints it as ``error: ...`` and exits 2."""


class CodeLlamaError(Exception):
    """A user-facing problem (bad path, bad shape, bad argument) with a one-line message."""
