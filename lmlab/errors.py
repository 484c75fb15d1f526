"""The one exception type lmlab raises for bad input.

Library code raises :class:`LmlabError` with a message that names the file, field or flag and what
was expected; the CLI prints it as one line and exits with a non-zero code. Any other exception is a
bug and keeps its traceback. Library warnings go through :mod:`logging`; :func:`log_warnings_as_one_line`
shows them as the CLI shows errors.
"""

import logging
import sys


class LmlabError(Exception):
    """Bad input or a state the user can fix: the message says what and where."""


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"lmlab: {record.levelname.lower()}: {record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a redirected or captured one included), not to
    the stream that was current when the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def log_warnings_as_one_line() -> None:
    """Library warnings (``logging``) reach the terminal as ``lmlab: warning: …``."""
    root = logging.getLogger("lmlab")
    if not any(getattr(h, "_lmlab", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(_OneLine())
        handler._lmlab = True
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        root.propagate = False
