"""One HTTP request's sequences in the engine: prompts checked against the limits, one engine
:class:`~lmlab.generate.engine.Request` per sequence (``n`` per prompt), and their events back as text.

The engine calls each request's ``emit`` on its own thread; :class:`Job` hands the events to the HTTP
request's event loop through one asyncio queue, and turns tokens into text as ``lmlab generate`` does
(a character split across tokens, or a possible stop string, is held until known).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig
from lmlab.generate.engine import Engine, Event, Request
from lmlab.generate.stopping import TextStream
from lmlab.serve.metrics import ServeMetrics
from lmlab.serve.schema import Sampling

FINISH = {"stop": "stop", "length": "length", "timeout": "length"}  # the engine's reasons → OpenAI's


class BadRequest(LmlabError):
    """What the client asked cannot be served (400); ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Limits:
    """The server's limits (``lmlab serve`` flags): prompt tokens, new tokens per sequence, seconds per request."""

    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    timeout: float | None = None


@dataclass(eq=False)
class Sequence_:
    """One sequence being generated: its engine request, its text so far, its tokens and log-probabilities."""

    index: int
    prompt: list[int]
    text: TextStream
    request: Request | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    last_token_at: float | None = None


def check_prompt(ids: list[int], vocab_size: int, longest: int, limits: Limits, param: str) -> None:
    """A prompt the model can read: not empty, ids in the vocabulary, at most ``longest`` tokens (the model's
    limit: a decoder's context window less one, an encoder–decoder's whole window) and the server's."""
    if not ids:
        raise BadRequest("the prompt is empty (it encodes to no tokens)", param)
    if any(not 0 <= i < vocab_size for i in ids):
        raise BadRequest(f"the prompt holds token ids outside the vocabulary (0 to {vocab_size - 1})", param)
    limit = min(limits.max_prompt_tokens or longest, longest)
    if len(ids) > limit:
        raise BadRequest(f"the prompt is {len(ids)} tokens: this server takes prompts of at most {limit}", param)


def new_tokens(requested: int | None, prompt_len: int, block_size: int, limits: Limits, param: str, room: int) -> int:
    """How many tokens to generate after a ``prompt_len``-token prompt: as requested (default: the ``room``
    the context window leaves), within the server's limit; a request past the context window is refused."""
    wanted = requested if requested is not None else room
    if limits.max_new_tokens is not None:
        wanted = min(wanted, limits.max_new_tokens)
    if wanted > room:
        raise BadRequest(
            f"this model's maximum context length is {block_size} tokens; you requested {prompt_len + wanted} "
            f"({prompt_len} in the prompt, {wanted} for the completion): reduce the prompt or {param}",
            param,
        )
    return wanted


def generation_config(body: Sampling, max_new: int, seed: int | None, stop: list[str]) -> GenerationConfig:
    """The :class:`GenerationConfig` of one sequence: temperature 0 is greedy (the sampling fields then
    change nothing, as with OpenAI); ``top_k`` -1 or 0 is off."""
    greedy = body.temperature == 0
    try:
        return GenerationConfig(
            max_new_tokens=max_new,
            strategy="greedy" if greedy else "sample",
            temperature=1.0 if greedy else body.temperature,
            top_p=1.0 if greedy else body.top_p,
            top_k=0 if greedy or body.top_k < 0 else body.top_k,
            min_p=0.0 if greedy else body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop=stop,
            ignore_eos=body.ignore_eos,
            seed=seed,
        )
    except LmlabError as e:
        raise BadRequest(str(e), e.params[0] if e.params else None) from None


class Job:
    """The sequences of one HTTP request: ``n`` per prompt, each from ``configs[i]`` (index = prompt × n + j)."""

    def __init__(self, lm, engine: Engine, metrics: ServeMetrics, limits: Limits, logprobs: int | None) -> None:
        self.lm, self.engine, self.metrics, self.limits, self.logprobs = lm, engine, metrics, limits, logprobs
        self.sequences: list[Sequence_] = []
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.arrived = time.monotonic()

    def add(self, prompt: list[int], config: GenerationConfig) -> Sequence_:
        seq = Sequence_(len(self.sequences), prompt, TextStream(self.lm.tokenizer.decode, config.stop))
        deadline = self.arrived + self.limits.timeout if self.limits.timeout else None
        emit = self._emitter(seq.index)
        seq.request = Request(
            prompt,
            config.max_new_tokens,
            emit,
            logprobs=self.logprobs,
            deadline=deadline,
            **self.lm.decoding_rules(config),
        )
        self.sequences.append(seq)
        return seq

    def _emitter(self, index: int):
        def emit(event: Event) -> None:  # on the engine's thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

        return emit

    def submit(self) -> None:
        """Queue every sequence (all or none: a full queue cancels those already queued)."""
        try:
            for seq in self.sequences:
                self.engine.submit(seq.request)
        except LmlabError:
            self.cancel()
            raise
        self.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in self.sequences))

    def cancel(self) -> None:
        """Free the engine's rows of every sequence still running (a client went away)."""
        for seq in self.sequences:
            if seq.finish_reason is None and seq.request is not None:
                seq.request.cancelled = True

    async def pieces(self) -> AsyncIterator[tuple[Sequence_, str]]:
        """Each sequence's new text as its tokens come, ``(sequence, piece)``; a sequence's last piece comes
        with its ``finish_reason`` set. Ends when every sequence has finished."""
        remaining = len(self.sequences)
        while remaining:
            index, event = await self.queue.get()
            seq = self.sequences[index]
            piece = self._take(seq, event)
            if event.finish_reason is not None:
                if event.finish_reason in ("cancelled", "error"):
                    raise LmlabError(event.error or "the server is shutting down: the request was cancelled")
                seq.finish_reason = "stop" if seq.text.hit else FINISH[event.finish_reason]
                piece += "" if seq.text.hit else seq.text.flush()
                remaining -= 1
            yield seq, piece

    def _take(self, seq: Sequence_, event: Event) -> str:
        """Record ``event``'s token in ``seq`` (and the metrics); the text it adds."""
        if event.token is None:
            return ""
        now = time.monotonic()
        if seq.last_token_at is None:
            self.metrics.ttft.observe(now - self.arrived)
        else:
            self.metrics.tpot.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generation_tokens.inc()
        seq.tokens.append(event.token)
        if event.logprob is not None:
            seq.logprobs.append(event.logprob)
            seq.tops.append(event.top or [])
        return seq.text.push(seq.tokens)

    async def run(self) -> list[Sequence_]:
        """Every sequence, finished (the non-streaming answer)."""
        async for _ in self.pieces():
            pass
        return self.sequences
