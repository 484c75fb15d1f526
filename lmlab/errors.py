"""The one exception type lmlab raises for bad input.

Library code raises :class:`LmlabError` with a message that names the file, field or flag and what
was expected; the CLI prints it as one line and exits with a non-zero code. Any other exception is a
bug and keeps its traceback.
"""


class LmlabError(Exception):
    """Bad input or a state the user can fix: the message says what and where."""
