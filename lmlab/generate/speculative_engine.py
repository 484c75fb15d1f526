"""Speculative decoding inside continuous batching: every row drafts, one forward pass checks every row's draft.

:class:`~lmlab.generate.engine.SpeculativeEngine` runs requests one at a time, so under concurrent clients
its throughput falls to one sequence's and a request waits for every one before it. This engine keeps the
plain :class:`~lmlab.generate.engine.Engine`'s rows, ragged KV cache and batched prefill, and replaces its
one-token decode step with a speculative round:

1. every row proposes up to k tokens, by prompt lookup (:class:`~lmlab.generate.speculative.PromptLookup`:
   n-gram matches in its own prompt and output; a row may propose fewer, or none: a plain decode step) or
   with a draft model (:class:`DraftRows`: k batched steps of a small decoder over a ragged cache of its own,
   each row at its own positions, drawn under the row's own rules); a row never drafts past what its
   max_new_tokens leaves;
2. the model runs ONCE over every row's ``[last token, draft…]``, right-padded to the longest draft: row r's
   query j sits at position ``pos[r] + j``, writes its key and value at its own slot ``pos[r] + j`` and
   attends over its own slots ``≤ pos[r] + j`` (a per-row causal mask over the shared cache);
3. each row keeps the drafted tokens the model agrees with (:func:`~lmlab.generate.speculative.accept`,
   greedy or the sampling rule, after the row's own logits processors at each position) and one of the
   model's own, delivered one by one: the first that ends the request (a stop id or rule, max_new_tokens, the
   deadline) ends it there, so nothing past a stop or a limit reaches the client;
4. its position advances by the tokens kept, in the model's cache and the draft's. The rejected drafts' slots
   lie past the new position: the mask hides them and the next round overwrites them, so nothing is copied.

Greedy rows get exactly the model's greedy tokens, sampled rows the model's distribution (the draws differ
from plain decoding's: the acceptance rule consumes the generator differently). Pads (rows with shorter
drafts) write at slots past their row's draft, or at the last slot of the context window, which no real token
of a request that fits the window ever occupies. Eager only (no ``compile``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.generate.engine import Engine, Event, RaggedCache, Request, prefill_rows, token_event
from lmlab.generate.speculative import PromptLookup, SpeculationStats, _verify_scores, accept


class RaggedSpanCache(RaggedCache):
    """The cache during a verifying pass: row r writes its T new keys and values at its own slots
    ``write_pos[r]`` (T,) and reads slots ``0..length-1`` (the mask hides what is not its own)."""

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, length: int | None) -> tuple[Tensor, Tensor]:
        rows, slots = self.rows[:, None], self.write_pos  # (n, 1), (n, T): index (n, T, heads, head_dim)
        self.k[layer][rows, :, slots] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, slots] = v.transpose(1, 2).to(self.v[layer].dtype)
        return self.k[layer][: self.n, :, : self.length], self.v[layer][: self.n, :, : self.length]


def ragged_pass(model: nn.Module, cache, pos: Tensor, tokens: list[list[int]], max_len: int, **kw) -> Tensor:
    """Run ``model`` once over every row r's ``tokens[r]`` (right-padded to the longest) at its own slots
    ``pos[r]`` onwards (clamped to ``max_len - 1``, where only pads land), each query attending over its own row's
    slots up to its own: the final hidden states or logits (n, width, …), as ``kw`` asks."""
    n, width = len(tokens), max(len(row) for row in tokens)
    ids = torch.zeros(n, width, dtype=torch.long)
    for row, row_tokens in enumerate(tokens):
        ids[row, : len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
    slots = (pos[:n, None] + torch.arange(width, device=pos.device)).clamp(max=max_len - 1)  # (n, width)
    length = int(slots.max()) + 1
    visible = torch.arange(length, device=pos.device)[None, None, :] <= slots[:, :, None]  # (n, width, length)
    span = RaggedSpanCache(cache, n, slots, length)
    return model(ids.to(pos.device), kv_cache=span, position_ids=slots, attn_mask=visible[:, None], **kw)


class DraftRows:
    """A draft model drafting for the engine's rows with a ragged KV cache of its own: row r holds the first
    ``pos[r]`` tokens of its text. Each round it catches up on the tokens kept since its last (one or two per
    row, more after a round without drafts), then drafts k tokens, one batched forward pass each; :meth:`keep`
    rolls a row back to its kept tokens by lowering its position (the next pass overwrites the rest).

    Args:
        model: the draft, a decoder-only model with the target's tokenizer.
        rows: the engine's rows.
        max_len: the longest text a row holds (the smaller context window of the two models).
        vocab_size: the ids both models score.
    """

    def __init__(self, model: nn.Module, rows: int, max_len: int, vocab_size: int) -> None:
        if getattr(model.config, "arch", None) != "decoder":
            raise LmlabError("the draft model must be decoder-only (GPT-2 or LLaMA style)", params="draft")
        self.model, self.max_len, self.vocab_size = model.eval(), max_len, vocab_size
        self.device = next(model.parameters()).device
        self.cache = model.new_kv_cache(rows, max_len)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)

    def prefill(self, first: int, prompts: list[Sequence[int]]) -> None:
        """Prompts into rows ``first…``, right-padded to the longest, in one forward pass."""
        _, last = prefill_rows(self.model, self.cache, first, prompts)
        self.pos[first : first + len(prompts)] = last + 1

    def feed(self, tokens: list[list[int]]) -> Tensor:
        """Every row r's ``tokens[r]`` (at least one) at its next slots; the logits (n, vocab) after each row's last."""
        n = len(tokens)
        hidden = ragged_pass(self.model, self.cache, self.pos, tokens, self.max_len, hidden_only=True)
        counts = torch.tensor([len(row) for row in tokens], device=self.device)
        self.pos[:n] += counts
        return self.model.lm_logits(hidden[torch.arange(n, device=self.device), counts - 1])[:, : self.vocab_size]

    def propose(self, requests: list[Request], k: int) -> tuple[list[list[int]], list[Tensor | None]]:
        """``k`` tokens for every row, each chosen under its request's rules, and for sampled rows the
        distributions (k, vocab) they were drawn from."""
        texts = [[*request.prompt, *request.generated] for request in requests]
        feeds = [text[int(self.pos[row]) :] for row, text in enumerate(texts)]
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[Tensor]] = [[] for _ in requests]
        for _ in range(k):
            logits = self.feed(feeds)
            for row, request in enumerate(requests):
                token, p = self._choose(request, texts[row], drafts[row], logits[row : row + 1].float())
                drafts[row].append(token)
                probs[row].extend([p] if p is not None else [])
            feeds = [[draft[-1]] for draft in drafts]  # the last draft is never fed: the target checks it
        return drafts, [torch.cat(p) if p else None for p in probs]

    def _choose(self, request: Request, text: list[int], draft: list[int], scores: Tensor) -> tuple[int, Tensor | None]:
        if request.processors:  # they read the text so far: built only for them (a list per draft step and row)
            context = torch.tensor([[*text, *draft]], dtype=torch.long, device=self.device)
            scores = request.processors(context, scores)
        if not request.sample:
            return int(scores.argmax(-1)), None
        p = scores.softmax(-1)
        return int(torch.multinomial(p, 1, generator=request.generator)), p

    def keep(self, row: int, length: int) -> None:
        """Row ``row``'s first ``length`` tokens are final: forget what it holds past them."""
        self.pos[row] = min(int(self.pos[row]), length)

    def move(self, src: Tensor, dst: Tensor, n: int) -> None:
        """Rows ``src`` of the first ``n`` into rows ``dst``, as the engine moves its own."""
        length = int(self.pos[:n].max())
        for buffer in (*self.cache.k, *self.cache.v):
            buffer[dst, :, :length] = buffer[src, :, :length]
        self.pos[dst] = self.pos[src]


class BatchedSpeculativeEngine(Engine):
    """Continuous batching with speculative decoding (see the module docstring): the
    :class:`~lmlab.generate.engine.Engine` interface, events and stop conditions, each round one forward pass of
    the model for every row and 1 to ``num_draft_tokens + 1`` tokens per row. Rows draft by prompt lookup, or
    with ``draft`` (a small decoder with the same tokenizer, its own ragged cache: :class:`DraftRows`).
    ``stats`` counts the verifying passes (``rounds``), and the tokens drafted and accepted over all rows.

    Args:
        model: a decoder-only model.
        num_draft_tokens: the most tokens a row drafts per round (k).
        draft: a draft model (None: prompt lookup).
        vocab_size: the ids both models score, when their vocabularies differ in padding (with draft).
        max_ngram: the longest n-gram prompt lookup matches.
        max_batch_size: rows decoded together.
        max_queue: requests that may wait for a row.
        on_step: called with (running, waiting) after every step.
        max_len: the longest text (prompt + new tokens) a row holds: its KV cache's slots (default and at most:
            the model's context window).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_draft_tokens: int = 5,
        draft: nn.Module | None = None,
        vocab_size: int | None = None,
        max_ngram: int = 3,
        max_batch_size: int = 16,
        max_queue: int = 256,
        on_step: Callable[[int, int], None] | None = None,
        max_len: int | None = None,
    ) -> None:
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise LmlabError(
                f"num_draft_tokens is {num_draft_tokens!r}: expected a positive integer", params="num_draft_tokens"
            )
        super().__init__(model, max_batch_size=max_batch_size, max_queue=max_queue, on_step=on_step, max_len=max_len)
        self.num_draft_tokens, self.lookup, self.stats = num_draft_tokens, PromptLookup(max_ngram), SpeculationStats()
        self.vocab_size = vocab_size or model.config.vocab_size
        self.draft = None
        if draft is not None:
            max_len = min(self.block_size, getattr(draft.config, "block_size", 0))
            self.draft = DraftRows(draft, max_batch_size, max_len, self.vocab_size)

    def _check_fits(self, request: Request) -> None:
        super()._check_fits(request)
        if self.draft is not None and len(request.prompt) + request.max_new_tokens > self.draft.max_len:
            raise LmlabError(
                f"the prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds "
                f"the draft model's context window of {self.draft.max_len} tokens",
                params="draft max_new_tokens",
            )

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: admit waiting requests (their first token from the prefill's logits), drop the
        cancelled rows, then one speculative round (:meth:`_verify`) for every row, retiring those done."""
        first = len(self.rows)
        self._admit()
        fresh, self.logits = self.logits, None
        done = [False] * first
        for i, request in enumerate(self.rows[first:]):
            done.append(self._deliver_first(request, fresh[i : i + 1]))
        done = [d or self._cancelled(request) for d, request in zip(done, self.rows)]
        self._retire(done)
        if self.rows:
            self._retire(self._verify())
        if self.on_step is not None:
            self.on_step(len(self.rows), self.waiting.qsize())

    def _prefill(self, group: list[Request]) -> None:
        first = len(self.rows)
        super()._prefill(group)
        if self.draft is not None:
            self.draft.prefill(first, [request.prompt for request in group])

    def _move_rows(self, src: Tensor, dst: Tensor, n: int) -> None:
        super()._move_rows(src, dst, n)
        if self.draft is not None:
            self.draft.move(src, dst, n)

    def _deliver_first(self, request: Request, logits: Tensor) -> bool:
        """A just-prefilled request's first token, chosen from its prompt's logits; whether it is done."""
        if request.cancelled:
            return False  # the check that follows ends it
        return request.deliver(self._choose(request, logits))

    @staticmethod
    def _cancelled(request: Request) -> bool:
        if request.cancelled:
            request.emit(Event(None, finish_reason="cancelled"))
        return request.cancelled

    def _drafts(self) -> tuple[list[list[int]], list[Tensor | None]]:
        """Every row's draft, at most k tokens and never more than its max_new_tokens leaves room for after the
        token the model adds, and the distributions sampled drafts were drawn from (None: deterministic)."""
        room = [min(self.num_draft_tokens, r.max_new_tokens - len(r.generated) - 1) for r in self.rows]
        if self.draft is None:
            return [self._lookup(request, k) for request, k in zip(self.rows, room)], [None] * len(room)
        if max(room) < 1:
            return [[] for _ in room], [None] * len(room)
        drafts, probs = self.draft.propose(self.rows, max(room))
        return [d[: max(k, 0)] for d, k in zip(drafts, room)], [
            p if p is None else p[: max(k, 0)] for p, k in zip(probs, room)
        ]

    def _lookup(self, request: Request, k: int) -> list[int]:
        """Up to ``k`` tokens prompt lookup proposes to follow ``request``'s text."""
        if k < 1:
            return []
        text = torch.tensor([*request.prompt, *request.generated], dtype=torch.long)
        return self.lookup.propose(text, len(text), k, None, False, None)[0].tolist()

    def _verify(self) -> list[bool]:
        """One forward pass over every row's last token and draft; each row keeps its accepted tokens.
        Whether each row's request is done."""
        drafts, probs = self._drafts()
        fed = [[request.generated[-1], *draft] for request, draft in zip(self.rows, drafts)]
        logits = ragged_pass(self.model, self.cache, self.pos, fed, self.block_size)
        self.stats.rounds += 1
        kept = zip(self.rows, drafts, probs)
        return [self._keep(row, request, draft, q, logits[row]) for row, (request, draft, q) in enumerate(kept)]

    def _keep(self, row: int, request: Request, draft: list[int], q: Tensor | None, logits: Tensor) -> bool:
        """Row ``row``'s accepted draft tokens and the model's next one, delivered one by one up to the first
        that ends the request; its position advances past the kept tokens. Whether the request is done."""
        k, length = len(draft), len(request.prompt) + len(request.generated)
        logits = logits[: k + 1].float()
        scores = logits[:, : self.vocab_size]
        if request.processors:  # they read the text before each position: the whole text, built only for them
            context = torch.tensor([*request.prompt, *request.generated, *draft], dtype=torch.long, device=self.device)
            scores = _verify_scores(scores, context, length, request.processors)
        drafted = torch.tensor(draft, dtype=torch.long, device=self.device)
        n, following = accept(scores, drafted, q, request.sample, request.generator)
        self.stats.drafted, self.stats.accepted = self.stats.drafted + k, self.stats.accepted + n
        if self.draft is not None:
            self.draft.keep(row, length + n)
        for j, token in enumerate([*draft[:n], int(following)]):
            self.stats.emitted += 1
            if request.deliver(token_event(request, token, logits[j : j + 1])):
                return True
        self.pos[row] += n + 1  # the last token and the n accepted drafts are in the cache now
        return False
