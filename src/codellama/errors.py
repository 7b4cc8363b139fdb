"""The one exception type users see for bad input: the CLI prints it as ``error: ...`` and exits 2."""


class CodeLlamaError(Exception):
    """A user-facing problem (bad path, bad shape, bad argument) with a one-line message."""


def error_line(error: BaseException, limit: int = 200) -> str:
    """A library's exception as one short printable line for a ``CodeLlamaError`` message: its whitespace
    (torch's messages run over many lines) folded to single spaces, cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."
