"""Chat: talk to a model turn by turn (rendering is :mod:`lmlab.templates`).

**Sessions.** :class:`ChatSession` keeps a conversation with a decoder: each :meth:`ChatSession.send`
renders the whole conversation (system prompt, history, the new message) with the generation prompt
and streams the reply through :meth:`lmlab.api.LM.stream`. When it no longer fits the context window
with room for ``max_new_tokens``, the oldest turns are dropped — never the system prompt — with a
warning. :func:`repl` is the ``lmlab chat`` loop over a session.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Callable, TextIO

from lmlab.errors import LmlabError
from lmlab.templates import chat_template, end_of_turn, render

logger = logging.getLogger(__name__)

__all__ = ["mark_trained", "ChatSession", "repl"]


def mark_trained(tokenizer, ids: Sequence[int], labels: Sequence[int], color: bool = False) -> str:
    """The text of ``ids`` with each run of trained tokens (label ≠ ``IGNORE_INDEX``) in ``[[…]]``,
    or in green with ``color`` (for a terminal)."""
    from lmlab.objectives import IGNORE_INDEX

    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or (labels[k] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(ids[start:k])
            out.append(text if labels[start] == IGNORE_INDEX else open_ + text + close)
            start = k
    return "".join(out)


# -- a conversation with a model ---------------------------------------------------------------------


class ChatSession:
    """A conversation with a decoder (:class:`lmlab.api.LM`): :meth:`send` streams each reply and the
    history is kept.

    ``system`` is the system prompt (settable; None for none); ``config`` and ``options`` are the
    :class:`~lmlab.generate.GenerationConfig` of every reply, with the template's end-of-turn marker
    added to its stop tokens (a single token) or stop strings. ``messages`` holds the turns so far,
    without the system prompt; ``dropped`` counts the turns the last :meth:`send` dropped to fit.

    Args:
        lm: the model
        system: the system prompt (default: none)
        config: the decoding options of every reply
        template: a chat template (default: the tokenizer's, else lmlab's)
        **options: GenerationConfig fields that replace ``config``'s
    """

    def __init__(self, lm, *, system: str | None = None, config=None, template: str | None = None, **options) -> None:
        from lmlab.generate import GenerationConfig

        if lm.model.config.arch != "decoder":
            raise LmlabError(
                f"{lm.path or 'this model'} is a{'n encoder–decoder' if lm.is_seq2seq else 'n encoder'}; chat needs a "
                "decoder"
            )
        self.lm, self.system, self.messages, self.dropped = lm, system, [], 0
        self.template = template if template is not None else chat_template(lm.tokenizer)
        config = (config or GenerationConfig()).replace(**options)
        marker = end_of_turn(lm.tokenizer, self.template)
        marker_ids = lm.tokenizer.encode(marker)
        if len(marker_ids) == 1:
            config = config.replace(stop_token_ids=sorted({*config.stop_token_ids, marker_ids[0]}))
        else:
            config = config.replace(stop=[*config.stop, marker])
        self.config = config
        if lm.block_size - config.max_new_tokens < 1:
            raise LmlabError(
                f"max_new_tokens {config.max_new_tokens} leaves no room for the conversation in the "
                f"{lm.block_size}-token context window",
                params="max_new_tokens",
            )

    def reset(self) -> None:
        """Forget the history (the system prompt stays)."""
        self.messages = []

    def conversation(self, history: Sequence[Mapping[str, str]] | None = None) -> list[dict[str, str]]:
        """The messages the model sees: the system prompt, then ``history`` (default: :attr:`messages`)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in (self.messages if history is None else history)]

    def _prompt(self, user: dict[str, str]) -> str:
        """The rendered prompt for the next reply, dropping the oldest turns until it fits."""
        room = self.lm.block_size - self.config.max_new_tokens
        history = [*self.messages, user]
        while True:
            prompt = render(
                self.lm.tokenizer, self.conversation(history), add_generation_prompt=True, template=self.template
            )
            n = len(self.lm.tokenizer.encode(prompt))
            if n <= room:
                break
            if len(history) == 1:
                raise LmlabError(
                    f"the message does not fit: the prompt is {n} tokens and the {self.lm.block_size}-token context "
                    "window "
                    f"holds {room} with max_new_tokens {self.config.max_new_tokens}; send a shorter one",
                    params="max_new_tokens",
                )
            del history[0]  # the oldest turn: a user message and the replies up to the next one
            while history[0]["role"] != "user":
                del history[0]
        turns = sum(m["role"] == "user" for m in self.messages) - sum(m["role"] == "user" for m in history[:-1])
        self.dropped = turns
        if turns:
            logger.warning(
                "the conversation no longer fits the %d-token context window: dropped the oldest %d turn(s)",
                self.lm.block_size,
                turns,
            )
        self.messages = history[:-1]
        return prompt

    def send(self, text: str) -> Iterator[str]:
        """Add the user message ``text`` and yield the reply piece by piece; the reply joins the history
        when the stream ends (an interrupted reply is kept as far as it got)."""
        if not isinstance(text, str) or not text.strip():
            raise LmlabError("an empty message: type some text")
        user = {"role": "user", "content": text}
        prompt = self._prompt(user)
        reply, done = "", False
        try:
            for piece in self.lm.stream(prompt, self.config):
                reply += piece
                yield piece
            done = True
        finally:
            if done or reply:
                self.messages += [user, {"role": "assistant", "content": reply}]


def repl(
    session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``lmlab chat``: read a message, stream the reply, until ``/quit`` or end of input (Ctrl-D).
    ``/reset`` clears the history, ``/system TEXT`` sets the system prompt (``/system`` alone removes it)."""
    out, err = out or sys.stdout, err or sys.stderr
    print(
        f"lmlab: chatting with {session.lm!r}; {session.config.strategy} decoding, up to "
        f"{session.config.max_new_tokens} tokens a reply. "
        "/reset clears the history, /system TEXT sets the system prompt, /quit or Ctrl-D ends.",
        file=err,
    )
    while True:
        try:
            line = read("» ")
        except EOFError:
            print(file=err)
            return 0
        command, _, rest = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            session.reset()
            print("lmlab: history cleared", file=err)
        elif command == "/system":
            session.system = rest.strip() or None
            print(f"lmlab: system prompt {'set' if session.system else 'removed'}", file=err)
        elif command.startswith("/"):
            print(f"lmlab: unknown command {command}; expected /reset, /system TEXT or /quit", file=err)
        elif line.strip():
            try:
                for piece in session.send(line):
                    out.write(piece)
                    out.flush()
                out.write("\n")
            except LmlabError as e:  # a bad turn ends that turn, not the session
                print(f"\nlmlab: error: {e}", file=err)
