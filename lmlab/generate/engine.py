"""Continuous batching: one loop owns a decoder and runs every request in flight, one token per step.

Iteration-level scheduling, as Orca (Yu et al., OSDI 2022) and vLLM schedule: a request joins the running
batch at the next decode step (its prompt is prefilled into a free row of the KV cache) and leaves it as soon
as it is done, so a long generation never holds up a short one. Every row keeps its own position, its own
decoding rules (:mod:`lmlab.generate.processors`), its own random generator and its own stop conditions.

Requests that arrive together are prefilled together: the waiting prompts that fit the free rows are sorted
by length and split into runs of similar length (:func:`prefill_groups`), each run one forward pass with its
prompts right-padded to the longest, so a burst of clients costs a few passes instead of one per prompt.
A row's pads sit after its last real token, where causal attention keeps its real tokens from seeing them
and its decode steps overwrite or mask them; its first logits are the LM head's on its own last real token.

The cache is one :class:`~lmlab.model.blocks.KVCache` of ``max_batch_size`` rows. The rows in flight are
always the first ``n``: a finished row's slot is filled by moving the last row into it, so a decode step
reads ``cache[:n]`` without copying. Each row writes its new key and value at its own slot, and attends over
its own slots only, through an explicit mask (:class:`RaggedCache`).

The engine knows token ids, not text: :mod:`lmlab.serve` turns requests into :class:`Request` objects and
their :class:`Event` stream back into text.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.generate.loop import Step, compiled_step
from lmlab.generate.processors import LogitsProcessorList
from lmlab.model import Seq2SeqLM
from lmlab.model.blocks import KVCache

logger = logging.getLogger(__name__)


@dataclass
class Event:
    """What a request hears after each step: a new token (None when it ended without one) and, at the end,
    why (``stop``: a stop id or rule; ``length``: max_new_tokens or the context window; ``timeout``;
    ``cancelled``; ``error``, with ``error`` saying what went wrong)."""

    token: int | None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # the most likely tokens and their log-probabilities
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation: ``prompt`` ids, at most ``max_new_tokens`` new ones, decoded with ``processors``
    (greedy unless ``sample``; ``generator`` seeds the draws). It finishes at a token in ``stop_ids`` (not
    emitted) or when a rule of ``stop_rules`` says so about the generated ids. ``logprobs``: each chosen
    token's log-probability under the model and the ``logprobs`` most likely alternatives. ``emit`` is
    called on the engine's thread with every :class:`Event`; ``deadline`` (``time.monotonic()``) ends it
    with ``timeout``. Set ``cancelled`` (any thread) to free its row at the next step."""

    prompt: Sequence[int]
    max_new_tokens: int
    emit: Callable[[Event], None]
    processors: LogitsProcessorList | None = None
    sample: bool = False
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_rules: Sequence[Callable[[Sequence[int]], bool]] = ()
    logprobs: int | None = None
    deadline: float | None = None
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)

    def deliver(self, event: Event) -> bool:
        """Hand the request ``event`` for its next token: a stop id ends it unemitted as ``stop``, any other token
        joins ``generated`` and may end it (:meth:`finish_reason`). Whether the request is done."""
        if event.token in self.stop_ids:
            event.token, event.finish_reason = None, "stop"
        else:
            self.generated.append(event.token)
            event.finish_reason = self.finish_reason()
        self.emit(event)
        return event.finish_reason is not None

    def finish_reason(self) -> str | None:
        """Why the request ends after its latest token (``stop``, ``length``, ``timeout``), or None."""
        if any(rule(self.generated) for rule in self.stop_rules):
            return "stop"
        if len(self.generated) >= self.max_new_tokens:
            return "length"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "timeout"
        return None


class QueueFull(LmlabError):
    """The engine's queue holds ``max_queue`` requests already: try again later."""


class RaggedCache(KVCache):
    """The engine's cache during a decode step: rows ``0..n-1`` each write their one new key and value at
    their own slot ``write_pos[row]`` and read slots ``0..length-1`` (the mask hides what is not theirs)."""

    def __init__(self, cache: KVCache, n: int, write_pos: Tensor, length: int) -> None:
        self.k, self.v, self.max_len, self.static = cache.k, cache.v, cache.max_len, False
        self.n, self.write_pos, self.length = n, write_pos, length
        self.rows = torch.arange(n, device=write_pos.device)

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, length: int | None) -> tuple[Tensor, Tensor]:
        n, pos = self.n, self.write_pos
        self.k[layer][self.rows, :, pos] = k[:, :, 0].to(self.k[layer].dtype)
        self.v[layer][self.rows, :, pos] = v[:, :, 0].to(self.v[layer].dtype)
        return self.k[layer][:n, :, : self.length], self.v[layer][:n, :, : self.length]


def prefill_groups(lengths: Sequence[int], max_tokens: int, padding: float, slack: int) -> list[tuple[int, int]]:
    """Split prompt ``lengths`` (ascending) into runs ``(start, stop)`` prefilled one forward pass each.

    A run pads its prompts to its longest, so it grows (greedily, shortest first) while its tokens, pads
    included, stay within ``max_tokens`` and its pads within ``padding`` of them or ``slack`` tokens,
    whichever is larger: short prompts, where a forward pass costs its fixed overhead more than its tokens,
    go together; a long prompt does not drag many short ones' padding with it. A prompt alone is one run.

    Args:
        lengths: prompt lengths, ascending.
        max_tokens: the most tokens, pads included, one run may hold.
        padding: the share of a run's tokens that may be pads.
        slack: pads a run may always hold, whatever their share.
    """
    runs: list[tuple[int, int]] = []
    start, real = 0, 0
    for i, n in enumerate(lengths):
        size = (i - start + 1) * n  # ascending: n is the run's longest
        pads = size - real - n
        if i > start and (size > max_tokens or pads > max(padding * size, slack)):
            runs.append((start, i))
            start, real = i, 0
        real += n
    if lengths:
        runs.append((start, len(lengths)))
    return runs


def token_event(request: Request, token: int, logits: Tensor) -> Event:
    """The Event of ``token`` for ``request``: with its log-probability under the model ``logits`` (1, vocab) and
    the most likely alternatives when the request asks for logprobs."""
    event = Event(token)
    if request.logprobs is not None:
        logprobs = logits.float().log_softmax(-1)[0]
        event.logprob = float(logprobs[token])
        if request.logprobs > 0:
            top = logprobs.topk(min(request.logprobs, logprobs.numel()))
            event.top = list(zip(top.indices.tolist(), top.values.tolist()))
    return event


def prefill_rows(
    model: nn.Module, cache: KVCache, first: int, prompts: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor]:
    """``prompts`` into the rows ``first…`` of ``cache`` in one forward pass, right-padded to the longest (row r
    writes slots ``0..P_r-1``, its pads after them): the final hidden states (rows, T, width) and each row's
    last real position (rows,)."""
    device = cache.k[0].device
    lengths = [len(prompt) for prompt in prompts]
    T = max(lengths)
    ids = torch.tensor([[*prompt, *[0] * (T - n)] for prompt, n in zip(prompts, lengths)], device=device)
    slots = torch.arange(T, device=device)
    rows = cache.row_span(first, first + len(prompts))
    hidden = model(ids, kv_cache=rows, input_pos=slots, cache_len=T, hidden_only=True)
    return hidden, torch.tensor(lengths, device=device) - 1


class Engine:
    """The loop that owns ``model`` (a decoder-only :class:`~lmlab.model.DecoderLM`): :meth:`submit` queues
    a :class:`Request`, :meth:`start` runs the loop on a thread of its own (or call :meth:`step` yourself).

    ``max_batch_size`` rows decode together; ``max_queue`` requests may wait for a row (:meth:`submit`
    raises :class:`QueueFull` past that). ``on_step(running, waiting)`` is called after every step (metrics).
    ``compile=True`` runs the decode step through :func:`~lmlab.generate.loop.compiled_step` (a CUDA graph
    on GPU) with the rows and the attended length rounded up to powers of two, so that a few graphs serve
    every batch: the first step of each (rows, length) bucket compiles. ``max_len`` caps a row's KV slots
    (prompt + new tokens) below the model's context window, when the caller knows its requests' lengths.

    Waiting requests are admitted together (:meth:`_admit`): prompts of similar length share one prefill
    forward pass, right-padded, with at most ``prefill_tokens`` tokens (pads included) in a pass and the
    padding within ``prefill_padding`` of them or ``prefill_slack`` tokens (see :func:`prefill_groups`).
    """

    prefill_tokens = 4096  # the most tokens, pads included, one prefill pass runs (bounds its activations)
    prefill_padding = 0.25  # a run of prompts splits when pads would pass this share of its tokens ...
    prefill_slack = 32  # ... and this many tokens (a few pads cost less than another forward pass)

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        on_step: Callable[[int, int], None] | None = None,
        compile: bool = False,
        max_len: int | None = None,
    ) -> None:
        if getattr(model.config, "arch", None) != "decoder":
            raise LmlabError("continuous batching runs decoder-only models (GPT-2 or LLaMA style)")
        self.model, self.max_batch_size, self.max_queue = model.eval(), max_batch_size, max_queue
        self.device = next(model.parameters()).device
        self.block_size = min(model.config.block_size, max_len or model.config.block_size)  # a row's KV slots
        self.cache = model.new_kv_cache(max_batch_size, self.block_size, static=compile)
        self.step_fn = compiled_step(self.device) if compile else None
        self.rows: list[Request] = []  # the requests in flight, row i of the cache is rows[i]'s
        self.pos = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # each row's next slot
        self.logits: Tensor | None = None  # (n, vocab): each row's next-token logits
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.on_step = on_step
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- the public side ---------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue ``request`` (checked: it fits the model, and the queue has room)."""
        self._check_fits(request)
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting): try again later")
        self.waiting.put(request)

    def _check_fits(self, request: Request) -> None:
        """A prompt, and room for it and its new tokens in the context window."""
        if not request.prompt:
            raise LmlabError("a request needs at least one prompt token")
        if request.max_new_tokens < 1:
            raise LmlabError(f"max_new_tokens is {request.max_new_tokens}: expected a positive integer")
        if len(request.prompt) + request.max_new_tokens > self.block_size:
            raise LmlabError(
                f"the prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds "
                f"the model's context window of {self.block_size} tokens"
            )

    @property
    def running(self) -> int:
        return len(self.rows)

    def start(self) -> None:
        """Run the loop on a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="lmlab-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """End the loop (after the step in progress); requests still in flight or waiting end ``cancelled``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for request in [*self.rows, *self._drain()]:
            request.emit(Event(None, finish_reason="cancelled"))
        self.rows = []

    def idle(self) -> bool:
        return not self.rows and self.waiting.empty()

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.idle():
                try:
                    request = self.waiting.get(timeout=0.05)
                except queue.Empty:
                    continue
                self.waiting.put(request)  # back in line: step() admits it
            try:
                self.step()
            except Exception as e:  # a bug: end what is in flight with the reason, keep serving
                logger.exception("the engine's step failed")
                for request in self.rows:
                    request.emit(Event(None, finish_reason="error", error=f"{type(e).__name__}: {e}"))
                self.rows, self.logits = [], None

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: admit waiting requests into free rows, choose one token for every row, retire
        the rows that are done, and run one decode step for the rest."""
        self._admit()
        if not self.rows:
            return
        done = [self._advance(i, request) for i, request in enumerate(self.rows)]
        self._retire(done)
        if self.rows:
            self._decode()
        if self.on_step is not None:
            self.on_step(len(self.rows), self.waiting.qsize())

    def _drain(self) -> list[Request]:
        drained = []
        while True:
            try:
                drained.append(self.waiting.get_nowait())
            except queue.Empty:
                return drained

    def _admit(self) -> None:
        """Prefill the waiting requests that fit the free rows, several prompts per forward pass.

        Every waiting request that fits is taken (a cancelled one ends with its event, unprefilled), sorted
        by prompt length, and split by :func:`prefill_groups` into runs of similar length; each run is one
        forward pass (:meth:`_prefill`). A burst of clients thus costs a few passes, not one per prompt."""
        taken = self._take_waiting()
        taken.sort(key=lambda request: len(request.prompt))
        lengths = [len(request.prompt) for request in taken]
        for start, stop in prefill_groups(lengths, self.prefill_tokens, self.prefill_padding, self.prefill_slack):
            self._prefill(taken[start:stop])

    def _take_waiting(self) -> list[Request]:
        """The waiting requests that fit the free rows, in arrival order, their processors begun."""
        taken: list[Request] = []
        while len(self.rows) + len(taken) < self.max_batch_size:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled:
                request.emit(Event(None, finish_reason="cancelled"))
                continue
            if request.processors:
                request.processors.begin(len(request.prompt))
            taken.append(request)
        return taken

    def _prefill(self, group: list[Request]) -> None:
        """One forward pass for ``group``'s prompts into the next free rows, right-padded to the longest.

        Row r writes its prompt at slots ``0..P_r-1`` and its pads after them. Causal attention keeps every
        real token from seeing the pads behind it, and the pads' slots lie at or past the row's position,
        which a decode step overwrites (slot ``P_r``) or masks (:meth:`_decode` reads slots ``≤ pos``). Each
        row's logits are the LM head's on its own last real token (the hidden states are gathered first)."""
        first = len(self.rows)
        hidden, last = prefill_rows(self.model, self.cache, first, [request.prompt for request in group])
        logits = self.model.lm_logits(hidden[torch.arange(len(group), device=self.device), last])  # (rows, V)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.pos[first : first + len(group)] = last + 1
        self.rows.extend(group)

    def _advance(self, row: int, request: Request) -> bool:
        """Choose row ``row``'s next token and tell its request; whether the request is done."""
        if request.cancelled:
            request.emit(Event(None, finish_reason="cancelled"))
            return True
        return request.deliver(self._choose(request, self.logits[row : row + 1]))

    def _choose(self, request: Request, logits: Tensor) -> Event:
        """The Event of ``request``'s next token, chosen from its model ``logits`` (1, vocab) under its rules."""
        logits = logits.float()
        scores = logits
        if request.processors:
            context = torch.tensor([[*request.prompt, *request.generated]], dtype=torch.long, device=self.device)
            scores = request.processors(context, logits)
        if request.sample:
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=request.generator))
        else:
            token = int(scores.argmax(-1))
        return token_event(request, token, logits)

    def _retire(self, done: list[bool]) -> None:
        """Drop the finished rows: each hole among the first ``n`` left is filled by a running row from
        behind it (its cache slots, position and logits move with it)."""
        if not any(done):
            return
        keep = [i for i, d in enumerate(done) if not d]
        n = len(keep)
        holes = [i for i in range(n) if done[i]]
        movers = [i for i in keep if i >= n]
        if holes:
            self._move_rows(
                torch.tensor(movers, device=self.device), torch.tensor(holes, device=self.device), len(done)
            )
        order = [*range(n)]
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if self.logits is not None:
            self.logits = self.logits[torch.tensor(order, dtype=torch.long, device=self.device)] if n else None
        rows = list(self.rows)
        self.rows = [rows[i] for i in order]

    def _move_rows(self, src: Tensor, dst: Tensor, n: int) -> None:
        """Move rows ``src`` of the first ``n`` into rows ``dst``: their cache slots and positions."""
        length = int(self.pos[:n].max())
        for buffer in (*self.cache.k, *self.cache.v):
            buffer[dst, :, :length] = buffer[src, :, :length]
        self.pos[dst] = self.pos[src]

    def _decode(self) -> None:
        """One token for every row: each writes at its own slot and attends over its own slots."""
        n = len(self.rows)
        rows, length = n, int(self.pos[:n].max()) + 1
        if self.step_fn is not None:  # static shapes: a few compiled graphs serve every batch
            rows = min(self.max_batch_size, 1 << (n - 1).bit_length())
            length = min(self.block_size, 1 << (length - 1).bit_length())
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        tokens[:n, 0] = torch.tensor([r.generated[-1] for r in self.rows], dtype=torch.long, device=self.device)
        pos = self.pos[:rows]  # rows past n are free: what they write stays in their own unused row
        visible = torch.arange(length, device=self.device)[None, :] <= pos[:, None]  # (rows, length)
        cache, mask = RaggedCache(self.cache, rows, pos, length), visible[:, None, None, :]
        if self.step_fn is not None:
            self.logits = self.step_fn(self.model, tokens, None, pos[:, None], None, cache, mask)[:n]
        else:
            self.logits = self.model(
                tokens, kv_cache=cache, position_ids=pos[:, None], attn_mask=mask, logits_to_keep=1
            )[:, -1]
        self.pos[:n] += 1


class SerialEngine(Engine):
    """An encoder–decoder's requests, one at a time: each source is encoded, then its target decoded with
    the KV cache (:func:`~lmlab.generate.seq2seq.generate_seq2seq`). The same interface, events and stop
    conditions as :class:`Engine`, without batching across requests (each row would carry its own encoded
    source for cross-attention)."""

    def __init__(
        self, model: nn.Module, *, max_queue: int = 256, on_step: Callable[[int, int], None] | None = None
    ) -> None:
        if not isinstance(model, Seq2SeqLM):
            raise LmlabError("SerialEngine runs encoder–decoder models; a decoder takes Engine")
        self._setup(model, max_queue, on_step)

    def _setup(self, model: nn.Module, max_queue: int, on_step: Callable[[int, int], None] | None) -> None:
        self.model, self.max_batch_size, self.max_queue = model.eval(), 1, max_queue
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        self.rows, self.logits = [], None
        self.waiting = queue.Queue()
        self.on_step = on_step
        self._thread, self._stop = None, threading.Event()

    def _check_fits(self, request: Request) -> None:
        """A source of at most ``block_size`` tokens, a target of at most ``block_size - 1``."""
        if not request.prompt:
            raise LmlabError("a request needs at least one source token")
        if len(request.prompt) > self.block_size or request.max_new_tokens > self.block_size - 1:
            raise LmlabError(
                f"the source ({len(request.prompt)} tokens) and max_new_tokens ({request.max_new_tokens}) must each "
                f"fit the model's context window of {self.block_size} tokens (the target's start token included)"
            )

    @torch.inference_mode()
    def step(self) -> None:
        """Run the next waiting request to its end."""
        try:
            request = self.waiting.get_nowait()
        except queue.Empty:
            return
        self.rows = [request]
        if self.on_step is not None:
            self.on_step(1, self.waiting.qsize())
        self._run_one(request)
        self.rows = []
        if self.on_step is not None:
            self.on_step(0, self.waiting.qsize())

    def _steps(self, request: Request) -> Iterator[Step]:
        from lmlab.generate.seq2seq import generate_seq2seq

        return generate_seq2seq(
            self.model,
            [list(request.prompt)],
            max_new_tokens=request.max_new_tokens,
            processors=request.processors or (),
            sample=request.sample,
            generator=request.generator,
            logprobs=request.logprobs,
        )

    def _run_one(self, request: Request) -> None:
        for step in self._steps(request):
            if request.cancelled:
                request.emit(Event(None, finish_reason="cancelled"))
                return
            event = Event(int(step.tokens[0]))
            if step.logprobs is not None:
                event.logprob = float(step.logprobs[0])
                if step.top_ids is not None and request.logprobs:
                    event.top = list(zip(step.top_ids[0].tolist(), step.top_logprobs[0].tolist()))
            if request.deliver(event):
                return


class SpeculativeEngine(SerialEngine):
    """A decoder's requests one at a time through speculative decoding
    (:func:`~lmlab.generate.speculative.speculative_decode`): ``make_drafter(max_len)`` gives each request its
    drafter, which proposes ``num_draft_tokens`` tokens a round. The same interface, events and stop conditions
    as :class:`Engine`, and the same tokens (greedy) or distribution (sampling); no batching across requests.
    ``lmlab serve --draft`` runs :class:`~lmlab.generate.speculative_engine.BatchedSpeculativeEngine` instead,
    which drafts and verifies every row of a continuous batch together; this one stays as the one-at-a-time
    reference (``bench/speculative_serve.py`` compares them)."""

    def __init__(
        self,
        model: nn.Module,
        make_drafter: Callable[[int], object],
        *,
        num_draft_tokens: int = 5,
        vocab_size: int | None = None,
        max_queue: int = 256,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        if not hasattr(model, "lm_logits"):
            raise LmlabError("speculative decoding (draft) needs a decoder-only model", params="draft")
        self._setup(model, max_queue, on_step)
        self.make_drafter, self.num_draft_tokens, self.vocab_size = make_drafter, num_draft_tokens, vocab_size

    def _check_fits(self, request: Request) -> None:
        if not request.prompt:
            raise LmlabError("a request needs at least one prompt token")
        if len(request.prompt) + request.max_new_tokens > self.block_size:
            raise LmlabError(
                f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                f"model's context window of {self.block_size} tokens"
            )

    def _steps(self, request: Request) -> Iterator[Step]:
        from lmlab.generate.speculative import speculative_decode

        return speculative_decode(
            self.model,
            self.make_drafter(len(request.prompt) + request.max_new_tokens),
            [list(request.prompt)],
            num_draft_tokens=self.num_draft_tokens,
            max_new_tokens=request.max_new_tokens,
            processors=request.processors or (),
            sample=request.sample,
            generator=request.generator,
            vocab_size=self.vocab_size,
            logprobs=request.logprobs,
        )
