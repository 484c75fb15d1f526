"""When a sequence is finished: stop token ids and stop strings, as small objects the loops share.

A stopping rule looks at one sequence's *generated* token ids and says whether it is done; the
decoding loops ask it about every row after every step (and beam search about every candidate).
Stop strings are matched on decoded text, so a string split across several tokens is still found;
:func:`cut_at_stop` then cuts the text exactly where the first stop string begins.
"""

from __future__ import annotations

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


class TextStream:
    """The text of a growing sequence of generated ids, released piece by piece: a character split across
    byte-level tokens is held until whole, and text that may be the start of a stop string until it is known
    not to be. After a stop string, ``hit`` is True and nothing more is released; the pieces and
    :meth:`flush` join to the whole text cut at the first stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, list(stop)
        self.text, self.shown, self.hit = "", 0, False

    def push(self, tokens: Sequence[int]) -> str:
        """The new piece of text once ``tokens`` (every generated id so far) are decoded ('' while held)."""
        if self.hit:
            return ""
        self.text, self.hit = cut_at_stop(self.decode(list(tokens)), self.stop)
        if self.hit:
            limit = len(self.text)
        elif self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        else:
            limit = len(self.text) - held_back(self.text, self.stop)
        piece = self.text[self.shown : limit] if limit > self.shown else ""
        self.shown = max(self.shown, limit)
        return piece

    def flush(self) -> str:
        """What was held back, now final (the sequence ended)."""
        piece, self.shown = self.text[self.shown :], len(self.text)
        return piece
