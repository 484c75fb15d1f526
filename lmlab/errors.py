"""The one exception type lmlab raises for bad input.

Library code raises :class:`LmlabError` with a message that names the file, field or parameter and what
was expected; the CLI prints it as one line and exits with a non-zero code, naming the flag where the library
names a parameter (``lr is 0: …`` from Python, ``--lr is 0: …`` from ``lmlab pretrain``). Any other exception is a
bug and keeps its traceback. Library warnings go through :mod:`logging`; :func:`log_warnings_as_one_line`
shows them as the CLI shows errors.
"""

import logging
import re
import sys
from collections.abc import Callable


class LmlabError(Exception):
    """Bad input or a state the user can fix: the message says what and where.

    ``params``: the parameters the message names by their Python names (``"max_length"``, several separated
    by spaces); the CLI shows each as its flag (``--max-length``), see :meth:`naming`. A message names a
    parameter only where it means the parameter, so that the CLI can swap every whole-word occurrence.
    """

    def __init__(self, message: str, *, params: str = "") -> None:
        super().__init__(message)
        self.params = tuple(params.split())

    def __reduce__(self):  # across processes (prepare's workers) with its parameters
        return _rebuilt, (str(self), " ".join(self.params))

    def naming(self, flag_of: Callable[[str], str | None]) -> str:
        """The message with each of its parameters shown as ``flag_of(parameter)`` (kept where that is None)."""
        message = str(self)
        for param in self.params:
            flag = flag_of(param)
            if flag:
                message = re.sub(rf"(?<![\w\-.'/\\]){re.escape(param)}(?![\w\-'/\\]|\.\w)", flag, message)
        return message


def _rebuilt(message: str, params: str) -> LmlabError:
    return LmlabError(message, params=params)


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
