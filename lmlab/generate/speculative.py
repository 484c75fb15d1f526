"""Speculative decoding: a cheap drafter proposes k tokens, the model checks them all in one forward pass.

Each round the drafter — a small decoder with its own KV cache (:class:`DraftModel`), or n-gram matches
in the text so far (:class:`PromptLookup`) — proposes up to k tokens x₁…x_k. The target runs once over
[last token, x₁…x_k] (k + 1 positions) through its KV cache, which gives its next-token distribution p
at every position. The acceptance rule of Leviathan et al. (2023) and Chen et al. (2023) keeps x_i with
probability min(1, p(x_i)/q(x_i)), q being the drafter's distribution; at the first rejection it draws
the replacement from norm(max(0, p − q)), and when all k are kept it draws one more token from p. Every
token then has exactly the target's distribution; greedy decoding keeps x_i while it is the target's
argmax, so the output is the target's greedy output token for token. Both distributions are taken after
the same logits processors (penalties, temperature, top-k/p …), so the output is that of plain decoding
with those processors. A drafter without a distribution (prompt lookup) proposes with q one-hot.

Rolling back a cache is forgetting: the caches are static buffers addressed by slot, and
:class:`CachedRun` counts how many slots hold the sequence's tokens. A rejected draft leaves stale keys in
the slots past that count; the next forward writes its tokens into those slots before attention reads
them (reads stop at ``cache_len``), so nothing is copied.

One sequence at a time (batch 1): rows of a batch keep different numbers of tokens each round, which
:class:`~lmlab.generate.speculative_engine.BatchedSpeculativeEngine` handles (a ragged cache, a position per row);
:class:`~lmlab.api.LM` runs one row here and several through that engine.
The loop yields one :class:`~lmlab.generate.loop.Step` per token, so ``generate``, ``stream`` and chat
wrap it as they wrap :func:`~lmlab.generate.loop.decode`; stop ids, stop rules and ``max_new_tokens``
end it at the same token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.generate.loop import Step, StopRule, _argmax, _sample
from lmlab.generate.processors import LogitsProcessorList

PROMPT_LOOKUP = "prompt-lookup"


@dataclass
class SpeculationStats:
    """What a speculative generation did: ``accepted`` of ``drafted`` tokens kept over ``rounds`` target passes."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    emitted: int = 0  # tokens yielded

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class CachedRun:
    """One model decoding one sequence through its own static KV cache; ``length`` slots hold its first tokens.

    :meth:`rollback` forgets slots (see the module docstring: the next :meth:`feed` overwrites them)."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        self.model = model
        self.cache = model.new_kv_cache(1, max_len)
        self.slots = torch.arange(max_len, device=next(model.parameters()).device)
        self.length = 0

    def feed(self, tokens: Tensor, logits_to_keep: int = 1) -> Tensor:
        """Run ``tokens`` (T,) at the next T slots; the logits (logits_to_keep, V) of the last positions."""
        start, end = self.length, self.length + tokens.shape[0]
        logits = self.model(
            tokens[None],
            kv_cache=self.cache,
            input_pos=self.slots[start:end],
            cache_len=end,
            logits_to_keep=logits_to_keep,
        )[0]
        self.length = end
        return logits

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` tokens (a no-op when fewer are held)."""
        self.length = min(self.length, length)


class Drafter(Protocol):
    def propose(
        self, tokens: Tensor, length: int, k: int, processors: LogitsProcessorList, sample: bool, generator
    ) -> tuple[Tensor, Tensor | None]:
        """Up to ``k`` tokens to follow ``tokens[:length]`` and their distributions (k, V) (None: deterministic)."""
        ...

    def keep(self, length: int) -> None:
        """The sequence's first ``length`` tokens are final: forget anything cached past them."""
        ...


class DraftModel:
    """A small decoder drafting with its own KV cache: k tokens, one forward each (greedy or sampled, after the
    target's processors)."""

    def __init__(self, model: nn.Module, max_len: int, vocab_size: int) -> None:
        self.run = CachedRun(model, max_len)
        self.vocab_size = vocab_size

    @torch.inference_mode()
    def propose(
        self, tokens: Tensor, length: int, k: int, processors: LogitsProcessorList, sample: bool, generator
    ) -> tuple[Tensor, Tensor | None]:
        run, probs = self.run, []
        logits = run.feed(tokens[run.length : length])[-1]  # catch up: the tokens accepted since last round
        for i in range(k):
            scores = logits[: self.vocab_size].float()[None]
            if processors:
                scores = processors(tokens[None, : length + i], scores)
            if sample:
                probs.append(scores.softmax(dim=-1))
                tokens[length + i] = _sample(probs[-1], generator)[0]
            else:
                tokens[length + i] = _argmax(scores)[0]
            if i < k - 1:
                logits = run.feed(tokens[length + i : length + i + 1])[-1]
        return tokens[length : length + k], (torch.cat(probs) if sample else None)

    def keep(self, length: int) -> None:
        self.run.rollback(length)


class PromptLookup:
    """Prompt-lookup decoding (Saxena, 2023; transformers' ``prompt_lookup_num_tokens``): the tokens that followed
    the latest earlier occurrence of the text's last n-gram (n from ``max_ngram`` down to 1). No model runs."""

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram

    def propose(
        self, tokens: Tensor, length: int, k: int, processors: LogitsProcessorList, sample: bool, generator
    ) -> tuple[Tensor, Tensor | None]:
        seq = tokens[:length]
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            windows = seq.unfold(0, n, 1)[:-1]  # every earlier n-gram (not the suffix itself)
            hits = (windows == seq[length - n :]).all(dim=-1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n
                return seq[start : start + k], None
        return seq[:0], None

    def keep(self, length: int) -> None:
        pass


def accept(
    scores: Tensor, draft: Tensor, q: Tensor | None, sample: bool, generator: torch.Generator | None
) -> tuple[int, Tensor]:
    """How many of the ``draft`` tokens (k,) the target keeps, and the token that follows them.

    ``scores`` (k + 1, V) are the target's processed logits at each draft position and one past the last;
    ``q`` (k, V) the drafter's probabilities (None: it proposed deterministically, q one-hot). Greedy keeps a
    draft token while it is the target's argmax. Sampling keeps x_i with probability min(1, p(x_i)/q(x_i)); the
    first rejected one is replaced by a draw from norm(max(0, p − q)); after k kept, one more comes from p."""
    k = draft.shape[0]
    if not sample:
        choice = _argmax(scores)
        n = int((choice[:k] == draft).long().cumprod(0).sum())
        return n, choice[n]
    p = scores.softmax(dim=-1)
    rows = torch.arange(k, device=p.device)
    px = p[rows, draft]
    qx = q[rows, draft] if q is not None else torch.ones_like(px)
    u = torch.rand(k, generator=generator, device=p.device, dtype=p.dtype)
    n = int((u * qx < px).long().cumprod(0).sum())
    if n == k:
        return n, _sample(p[k : k + 1], generator)[0]
    residual = p[n].clone()
    if q is not None:
        residual = (residual - q[n]).clamp_(min=0)
    else:
        residual[draft[n]] = 0.0
    if not residual.sum() > 0:  # p == q up to rounding: rejection had probability ~0, p is the answer
        residual = p[n]
    return n, _sample(residual[None], generator)[0]


def _check(model: nn.Module, prompts: Sequence[Sequence[int]], k: int, total: int, drafter) -> None:
    """One-line errors for what speculative decoding cannot do."""
    B = len(prompts)
    if B != 1:
        raise LmlabError(
            f"speculative_decode decodes one sequence; got a batch of {B}: run several through "
            "lmlab.generate.speculative_engine.BatchedSpeculativeEngine (as LM.generate does)",
            params="draft",
        )
    if not prompts[0]:
        raise LmlabError("generation needs at least one token of prompt (an empty prompt encodes to nothing)")
    if k < 1:
        raise LmlabError(f"num_draft_tokens is {k}: expected a positive integer", params="num_draft_tokens")
    if not hasattr(model, "lm_logits"):
        raise LmlabError("speculative decoding needs a decoder-only model", params="draft")
    if total > model.config.block_size:
        raise LmlabError(
            f"prompt + max_new_tokens = {total} tokens exceeds the model's block_size {model.config.block_size}",
            params="max_new_tokens",
        )
    if isinstance(drafter, DraftModel) and total > drafter.run.model.config.block_size:
        raise LmlabError(
            f"prompt + max_new_tokens = {total} tokens exceeds the draft model's block_size "
            f"{drafter.run.model.config.block_size}",
            params="draft max_new_tokens",
        )


def _verify_scores(logits: Tensor, tokens: Tensor, length: int, processors: LogitsProcessorList) -> Tensor:
    """The target's processed scores (k + 1, V) at positions ``length`` … ``length + k`` (one call per position:
    a processor reads the tokens before its position)."""
    scores = logits.float()
    if not processors:
        return scores
    rows = [processors(tokens[None, : length + i], scores[i : i + 1]) for i in range(scores.shape[0])]
    return torch.cat(rows)


@torch.inference_mode()
def speculative_decode(
    model: nn.Module,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    processors: Sequence = (),
    sample: bool = False,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    stop_rules: Sequence[StopRule] = (),
    vocab_size: int | None = None,
    logprobs: int | None = None,
    stats: SpeculationStats | None = None,
) -> Iterator[Step]:
    """Speculative greedy or sampled decoding of one prompt (``prompts`` holds one); yield one :class:`Step`
    (batch 1) per new token.

    The arguments are :func:`~lmlab.generate.loop.decode`'s, plus ``drafter`` (a :class:`DraftModel` or
    :class:`PromptLookup`, made for this prompt), ``num_draft_tokens`` (k, proposed per round) and
    ``vocab_size`` (the ids both models score, when their vocabularies differ in padding). ``stats`` is
    filled in as decoding goes."""
    prompt = list(prompts[0]) if len(prompts) == 1 else []
    total = len(prompt) + max_new_tokens
    _check(model, prompts, num_draft_tokens, total, drafter)
    device = next(model.parameters()).device
    processors = LogitsProcessorList(processors)
    processors.begin(len(prompt))
    stats = stats if stats is not None else SpeculationStats()
    tokens = torch.zeros(total, dtype=torch.long, device=device)  # prompt, then generated (and drafts past them)
    tokens[: len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    target, length, stop = CachedRun(model, total), len(prompt), set(stop_ids)
    if length > 1:
        target.feed(tokens[: length - 1])  # the last prompt token goes in with the first draft
    while length < total:
        k = min(num_draft_tokens, total - length - 1)
        draft, q = drafter.propose(tokens, length, k, processors, sample, generator) if k else (tokens[:0], None)
        k = draft.shape[0]
        tokens[length : length + k] = draft
        raw = target.feed(tokens[length - 1 : length + k], logits_to_keep=k + 1)
        logits = raw[:, :vocab_size]
        n, following = accept(_verify_scores(logits, tokens, length, processors), draft, q, sample, generator)
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + k, stats.accepted + n
        tokens[length + n] = following
        target.rollback(length + n)  # its cache holds every kept token but the last, which the next round feeds
        drafter.keep(length + n)
        for i in range(n + 1):
            step = _step(tokens, length + i, len(prompt), raw[i], logprobs, stop, stop_rules)
            stats.emitted += 1
            yield step
            if bool(step.finished[0]):
                return
        length += n + 1


def _step(
    tokens: Tensor, at: int, prompt_len: int, logits: Tensor, logprobs: int | None, stop: set, stop_rules
) -> Step:
    """The Step of the token at ``tokens[at]``, finished on a stop id or a stop rule."""
    token = tokens[at : at + 1].clone()
    finished = int(token) in stop or any(rule(tokens[prompt_len : at + 1].tolist()) for rule in stop_rules)
    step = Step(token, torch.ones(1, dtype=torch.bool), torch.tensor([finished]))
    if logprobs is not None:
        model_logprobs = logits.float().log_softmax(dim=-1)[None]
        step.logprobs = model_logprobs[:, token[0]]
        if logprobs > 0:
            step.top_logprobs, step.top_ids = model_logprobs.topk(min(logprobs, model_logprobs.shape[-1]), dim=-1)
    return step
