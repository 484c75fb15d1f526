"""When a sequence is finished: stop token ids and stop strings, as small objects the loops share.

A stopping rule looks at one sequence's *generated* token ids and says whether it is done; the
decoding loops ask it about every row after every step (and beam search about every candidate).
Stop strings are matched on decoded text, so a string split across several tokens is still found;
:func:`cut_at_stop` then cuts the text exactly where the first stop string begins.
"""

from __future__ import annotations

import bisect
from typing import Callable, Sequence

from lmlab.errors import LmlabError


class StopStrings:
    """Finish a sequence as soon as its generated text contains one of ``strings``."""

    def __init__(self, tokenizer, strings: Sequence[str]) -> None:
        strings = [s for s in strings]
        if any(not isinstance(s, str) or s == "" for s in strings):
            raise LmlabError(f"stop {strings!r}: expected non-empty strings", params="stop")
        self.tokenizer, self.strings = tokenizer, strings
        # enough trailing tokens to hold the longest stop string (each token is at least one byte),
        # plus a few for a character split across byte-level tokens
        self.window = max(len(s.encode("utf-8")) for s in strings) + 8

    def __call__(self, generated: Sequence[int]) -> bool:
        tail = self.tokenizer.decode(list(generated[-self.window :]))
        return any(s in tail for s in self.strings)


def cut_at_stop(text: str, strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (not including) the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in strings) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def held_back(text: str, strings: Sequence[str]) -> int:
    """How many trailing characters of ``text`` might be the start of a stop string (a stream holds them)."""
    longest = 0
    for s in strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


#: tokens of context decoded before the new ones (at least this many, at most twice), so that merges, leading
#: spaces and byte-level characters come out as they do in the whole text
CONTEXT = 4


class TextStream:
    """The text of a growing sequence of generated ids, released piece by piece: a character split across
    byte-level tokens is held until whole, and text that may be the start of a stop string until it is known
    not to be. After a stop string, ``hit`` is True and nothing more is released; the pieces and
    :meth:`flush` join to the whole text cut at the first stop string (``text``).

    Each push decodes a short window of the latest ids, as vLLM's incremental detokenizer does: the window
    from a few tokens back to the end, less the text of its tokens already read, is the new text (O(1) ids
    a step, not all of them); stop strings are looked for only where a new one can be. When new ids change
    the text before them (a decoder that cleans up across tokens) or do not extend the last push's, every id
    is decoded again, so the text is always what decoding them all gives.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, list(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.shown, self.hit = 0, False
        self._restart()

    def _restart(self) -> None:
        """Read from the first id again: no ids, no text (``shown`` stays: what was released was released)."""
        self._ids: list[int] = []
        self._marks = [0]  # ids[:m] decode to whole characters; prefix = marks[0], read = marks[-1]
        self._prefix = ""  # decode(ids[prefix:read])
        self._head: list[str] = []  # text[:base], in pieces
        self._base, self._stable, self._pending = 0, "", ""  # text[base:] is stable + pending

    @property
    def text(self) -> str:
        """The text so far (cut at the first stop string once ``hit``)."""
        return "".join(self._head) + self._stable + self._pending

    def push(self, tokens: Sequence[int]) -> str:
        """The new piece of text once ``tokens`` (every generated id so far) are decoded ('' while held)."""
        if self.hit:
            return ""
        if not self._extend(tokens):  # not the ids of the last push and more: start again
            self._restart()
            self._extend(tokens)
        window = self.decode(self._ids[self._marks[0] :])
        if not window.startswith(self._prefix):  # the new ids changed the text before them
            self._restart()
            self._extend(tokens)
            window = self.decode(list(self._ids))
        self._pending = window[len(self._prefix) :]
        tail = self._stable + self._pending
        cut = self._find_stop(tail)
        if cut >= 0:
            self.hit = True
            self._stable, self._pending = tail[:cut], ""
            return self._release(self._base + cut)
        if tail.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece = self._release(self._base + len(tail) - held_back(tail, self.stop))
        self._read(window)
        return piece

    def flush(self) -> str:
        """What was held back, now final (the sequence ended)."""
        tail = self._stable + self._pending
        piece, self.shown = tail[self.shown - self._base :], self._base + len(tail)
        return piece

    def _extend(self, tokens: Sequence[int]) -> bool:
        """Append the ids of ``tokens`` past those read; False when it does not extend them (in the window)."""
        start, n = self._marks[0], len(self._ids)
        if len(tokens) < n:
            return False
        ids = [int(t) for t in tokens[start:]]
        if ids[: n - start] != self._ids[start:]:
            return False
        self._ids += ids[n - start :]
        return True

    def _find_stop(self, tail: str) -> int:
        """Where in ``tail`` (text[base:]) the first stop string begins, or -1. Text that ended before this
        push's new text was looked at already, so the search starts ``longest - 1`` characters before it."""
        start = max(0, len(self._stable) - self.longest + 1)
        return min((i for i in (tail.find(s, start) for s in self.stop) if i >= 0), default=-1)

    def _release(self, limit: int) -> str:
        """text[shown:limit], and ``shown`` moves on to ``limit``."""
        tail = self._stable + self._pending
        piece = tail[self.shown - self._base : limit - self._base] if limit > self.shown else ""
        self.shown = max(self.shown, limit)
        return piece

    def _read(self, window: str) -> None:
        """The pending text is whole: it is read, and the window's start moves up to keep it short."""
        read = len(self._ids)
        self._stable, self._pending = self._stable + self._pending, ""
        if read > self._marks[-1]:
            self._marks.append(read)
        if read - self._marks[0] > 2 * CONTEXT:
            self._marks = self._marks[bisect.bisect_right(self._marks, read - CONTEXT) - 1 :]
            self._prefix = self.decode(self._ids[self._marks[0] : read])
        else:
            self._prefix = window
        # keep the longest stop string's length of stable text (held_back, the next search) and what is unshown
        base = max(self._base, min(self.shown, self._base + len(self._stable) - max(self.longest, 1)))
        if base > self._base:
            self._head.append(self._stable[: base - self._base])
            self._stable, self._base = self._stable[base - self._base :], base
