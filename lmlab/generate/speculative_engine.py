"""Speculative decoding inside continuous batching: every row drafts, one forward pass checks every row's draft.

:class:`~lmlab.generate.engine.SpeculativeEngine` runs requests one at a time, so under concurrent clients
its throughput falls to one sequence's and a request waits for every one before it. This engine keeps the
plain :class:`~lmlab.generate.engine.Engine`'s rows, ragged KV cache and batched prefill, and replaces its
one-token decode step with a speculative round:

1. every row proposes up to k tokens by prompt lookup (:class:`~lmlab.generate.speculative.PromptLookup`:
   n-gram matches in its own prompt and output); a row may propose fewer, or none (a plain decode step);
2. the model runs ONCE over every row's ``[last token, draft…]``, right-padded to the longest draft: row r's
   query j sits at position ``pos[r] + j``, writes its key and value at its own slot ``pos[r] + j`` and
   attends over its own slots ``≤ pos[r] + j`` (a per-row causal mask over the shared cache);
3. each row keeps the drafted tokens the model agrees with (:func:`~lmlab.generate.speculative.accept`,
   greedy or the sampling rule, after the row's own logits processors at each position) and one of the
   model's own, delivered one by one: the first that ends the request (a stop id or rule, max_new_tokens, the
   deadline) ends it there, so nothing past a stop or a limit reaches the client;
4. its position advances by the tokens kept. The rejected drafts' slots lie past the new position: the mask
   hides them and the next round overwrites them, so nothing is copied.

Greedy rows get exactly the model's greedy tokens, sampled rows the model's distribution (the draws differ
from plain decoding's: the acceptance rule consumes the generator differently). Pads (rows with shorter
drafts) write at slots past their row's draft, or at the last slot of the context window, which no real token
of a request that fits the window ever occupies. Eager only (no ``compile``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.generate.engine import Engine, Event, RaggedCache, Request, token_event
from lmlab.generate.speculative import PromptLookup, SpeculationStats, _verify_scores, accept


class RaggedSpanCache(RaggedCache):
    """The cache during a verifying pass: row r writes its T new keys and values at its own slots
    ``write_pos[r]`` (T,) and reads slots ``0..length-1`` (the mask hides what is not its own)."""

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, length: int | None) -> tuple[Tensor, Tensor]:
        rows, slots = self.rows[:, None], self.write_pos  # (n, 1), (n, T): index (n, T, heads, head_dim)
        self.k[layer][rows, :, slots] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, slots] = v.transpose(1, 2).to(self.v[layer].dtype)
        return self.k[layer][: self.n, :, : self.length], self.v[layer][: self.n, :, : self.length]


class BatchedSpeculativeEngine(Engine):
    """Continuous batching with speculative decoding by prompt lookup (see the module docstring): the
    :class:`~lmlab.generate.engine.Engine` interface, events and stop conditions, each round one forward pass
    for every row and 1 to ``num_draft_tokens + 1`` tokens per row. ``stats`` counts the verifying passes
    (``rounds``), and the tokens drafted and accepted over all rows.

    Args:
        model: a decoder-only model.
        num_draft_tokens: the most tokens a row drafts per round (k).
        max_ngram: the longest n-gram prompt lookup matches.
        max_batch_size: rows decoded together.
        max_queue: requests that may wait for a row.
        on_step: called with (running, waiting) after every step.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_draft_tokens: int = 5,
        max_ngram: int = 3,
        max_batch_size: int = 16,
        max_queue: int = 256,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise LmlabError(
                f"num_draft_tokens is {num_draft_tokens!r}: expected a positive integer", params="num_draft_tokens"
            )
        super().__init__(model, max_batch_size=max_batch_size, max_queue=max_queue, on_step=on_step)
        self.num_draft_tokens, self.lookup, self.stats = num_draft_tokens, PromptLookup(max_ngram), SpeculationStats()

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

    def _draft(self, request: Request) -> list[int]:
        """Up to k tokens prompt lookup proposes to follow ``request``'s text, never more than its
        max_new_tokens leaves room for after the token the model adds."""
        k = min(self.num_draft_tokens, request.max_new_tokens - len(request.generated) - 1)
        if k < 1:
            return []
        text = torch.tensor([*request.prompt, *request.generated], dtype=torch.long)
        return self.lookup.propose(text, len(text), k, None, False, None)[0].tolist()

    def _verify(self) -> list[bool]:
        """One forward pass over every row's last token and draft; each row keeps its accepted tokens.
        Whether each row's request is done."""
        n, drafts = len(self.rows), [self._draft(request) for request in self.rows]
        width = 1 + max(len(draft) for draft in drafts)
        tokens = torch.zeros(n, width, dtype=torch.long)
        for row, (request, draft) in enumerate(zip(self.rows, drafts)):
            tokens[row, : 1 + len(draft)] = torch.tensor([request.generated[-1], *draft])
        offsets = torch.arange(width, device=self.device)
        slots = (self.pos[:n, None] + offsets).clamp(max=self.block_size - 1)  # (n, width): pads may clamp
        length = int(slots.max()) + 1
        visible = torch.arange(length, device=self.device)[None, None, :] <= slots[:, :, None]  # (n, width, length)
        cache = RaggedSpanCache(self.cache, n, slots, length)
        logits = self.model(tokens.to(self.device), kv_cache=cache, position_ids=slots, attn_mask=visible[:, None])
        self.stats.rounds += 1
        return [
            self._keep(row, request, draft, logits[row]) for row, (request, draft) in enumerate(zip(self.rows, drafts))
        ]

    def _keep(self, row: int, request: Request, draft: list[int], logits: Tensor) -> bool:
        """Row ``row``'s accepted draft tokens and the model's next one, delivered one by one up to the first
        that ends the request; its position advances past the kept tokens. Whether the request is done."""
        k, length = len(draft), len(request.prompt) + len(request.generated)
        logits = logits[: k + 1].float()
        context = torch.tensor([*request.prompt, *request.generated, *draft], dtype=torch.long, device=self.device)
        scores = _verify_scores(logits, context, length, request.processors or ())
        proposed = context[length:]
        n, following = accept(scores, proposed, None, request.sample, request.generator)
        self.stats.drafted, self.stats.accepted = self.stats.drafted + k, self.stats.accepted + n
        for j, token in enumerate([*draft[:n], int(following)]):
            self.stats.emitted += 1
            if request.deliver(token_event(request, token, logits[j : j + 1])):
                return True
        self.pos[row] += n + 1  # the last token and the n accepted drafts are in the cache now
        return False
