"""Decoding rules as small composable callables ``(input_ids, scores) -> scores`` (docs/architecture.md, habit 5).

``input_ids`` is (B, L): every token so far, the prompt then what was generated, with ``-1`` where
a row has no token (the left padding of a shorter prompt in a batch). ``scores`` is (B, vocab_size):
next-token logits. A request builds its list once, in a stated order, and the decoding loop applies
it in that order at every step. A processor that needs to know where the prompt ends has a
``begin(prompt_len)`` method, which the loop calls once before the first step.

Two kinds, in the order Hugging Face applies them: *penalties* change the logits from what the
text so far contains (repetition, presence, frequency, no-repeat-n-gram, minimum length); *warpers*
reshape the distribution to sample from (temperature, top-k, top-p, min-p, typical-p). A removed
token gets ``-inf``; every warper keeps at least the most likely token.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch
from torch import Tensor

from lmlab.errors import LmlabError


class LogitsProcessor(Protocol):
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor: ...


class LogitsProcessorList(list):
    """Processors applied in order, as ``transformers.LogitsProcessorList``."""

    def begin(self, prompt_len: int) -> None:
        for processor in self:
            if hasattr(processor, "begin"):
                processor.begin(prompt_len)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def token_counts(input_ids: Tensor, vocab_size: int) -> Tensor:
    """(B, vocab_size) float: how often each token occurs in each row (``-1`` slots count for nothing)."""
    real = input_ids >= 0
    counts = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.float32, device=input_ids.device)
    return counts.scatter_add_(1, input_ids.clamp(min=0), real.float())


def _remove(scores: Tensor, drop: Tensor) -> Tensor:
    return scores.masked_fill(drop, float("-inf"))


# -- penalties: what the text so far contains ----------------------------------------------------


class RepetitionPenalty:
    """CTRL's penalty (Keskar et al., 2019): a token already in the text (prompt included) has its
    logit divided by θ when positive and multiplied by θ when negative; θ > 1 discourages repeats."""

    def __init__(self, penalty: float) -> None:
        if not penalty > 0:
            raise LmlabError(
                f"repetition_penalty is {penalty}: expected a positive number (1.0 = off, > 1 discourages repeats)",
                params="repetition_penalty",
            )
        self.penalty = penalty

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        seen = token_counts(input_ids, scores.shape[-1]) > 0
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(seen, penalised, scores)


class PresenceFrequencyPenalty:
    """OpenAI's additive penalties over the *generated* tokens: ``logit -= presence·[count > 0] +
    frequency·count``. Positive values discourage repeats; negative values encourage them."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0) -> None:
        for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if not -2.0 <= value <= 2.0:
                raise LmlabError(f"{name} is {value}: expected a number in [-2, 2]", params=name)
        self.presence, self.frequency = presence, frequency
        self.prompt_len = 0

    def begin(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        counts = token_counts(input_ids[:, self.prompt_len :], scores.shape[-1])
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts.to(scores.dtype)


class NoRepeatNGram:
    """Forbid any token that would repeat an n-gram already in the text (Paulus et al., 2017)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise LmlabError(
                f"no_repeat_ngram_size is {n}: expected a positive integer (0 = off)", params="no_repeat_ngram_size"
            )
        self.n = n

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        n, L = self.n, input_ids.shape[1]
        if L < n:
            return scores
        if n == 1:
            return _remove(scores, token_counts(input_ids, scores.shape[-1]) > 0)
        windows = input_ids.unfold(1, n, 1)  # (B, W, n): every n-gram so far
        suffix = input_ids[:, L - n + 1 :]  # (B, n-1): what the next token would extend
        match = (windows[:, :, :-1] == suffix[:, None, :]).all(-1) & (windows >= 0).all(-1)  # (B, W)
        banned = torch.zeros_like(scores).scatter_add_(1, windows[:, :, -1].clamp(min=0), match.to(scores.dtype))
        return _remove(scores, banned > 0)


class MinNewTokens:
    """Forbid the end-of-text tokens until ``min_new_tokens`` tokens have been generated."""

    def __init__(self, min_new_tokens: int, eos_ids: Sequence[int]) -> None:
        if min_new_tokens < 0:
            raise LmlabError(f"min_new_tokens is {min_new_tokens}: expected 0 or more", params="min_new_tokens")
        self.min_new_tokens, self.eos_ids = min_new_tokens, sorted(set(eos_ids))
        self.prompt_len = 0

    def begin(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[1] - self.prompt_len >= self.min_new_tokens or not self.eos_ids:
            return scores
        scores = scores.clone()
        scores[:, self.eos_ids] = float("-inf")
        return scores


class SuppressIdsFrom:
    """Never emit an id ≥ ``first``: the rows of a vocabulary padded past the tokenizer's
    (``lmlab pretrain --pad-vocab-multiple``) map to no text."""

    def __init__(self, first: int) -> None:
        self.first = first

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[-1] <= self.first:
            return scores
        scores = scores.clone()
        scores[:, self.first :] = float("-inf")
        return scores


# -- warpers: the distribution to sample from -----------------------------------------------------


class Temperature:
    """Divide logits by T: T < 1 sharpens the distribution, T > 1 flattens it (T → 0 is greedy)."""

    def __init__(self, temperature: float) -> None:
        if not temperature > 0:
            raise LmlabError(
                f"temperature is {temperature}: expected a positive number (0 means greedy)", params="temperature"
            )
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k most likely tokens (Fan et al., 2018); the rest get probability 0."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise LmlabError(f"top_k is {k}: expected a positive integer (0 = off)", params="top_k")
        self.k = k

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1): the k-th largest logit
        return _remove(scores, scores < kth)


class TopP:
    """Nucleus sampling (Holtzman et al., 2020): keep the smallest set of tokens whose probability reaches p.

    The reference rule sorts the vocabulary by score and keeps a token while the mass ranked before
    it is below p. The kept set is every token scoring at least the last kept one, so it suffices to
    find that threshold, and that needs no sort of the whole vocabulary (sorting 50k scores with
    their indices costs ~5 ms a row on a CPU, more than a small model's forward pass). Tokens go to
    ``BINS`` bins by how far their score lies below the best one; adding the bins' masses from the
    top finds the bin where the mass reaches p, and only that bin's tokens (tens to a few hundred on
    a 50k vocabulary) are ranked. The result is the reference's kept set, except that all tokens
    tied with the threshold stay (the sort would keep an arbitrary part of them), and where the
    running mass lands within float rounding of p: the two add up in different orders.
    """

    BINS = 1024
    SPAN = 64.0  # bins cover scores down to this far below the best (e^-64 relative); the last bin takes the rest

    def __init__(self, p: float) -> None:
        if not 0.0 < p <= 1.0:
            raise LmlabError(f"top_p is {p}: expected a number in (0, 1]", params="top_p")
        self.p = p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.p == 1.0:
            return scores  # every token: float rounding must not drop a tail that the exact sum would keep
        probs = scores.softmax(dim=-1)
        below = scores.amax(dim=-1, keepdim=True) - scores  # (B, V) ≥ 0; inf for removed tokens
        span = below.nan_to_num(posinf=0.0).amax(dim=-1, keepdim=True).clamp_(torch.finfo(scores.dtype).tiny, self.SPAN)
        scale = (self.BINS - 1) / span
        bins = (below * scale).clamp_(max=self.BINS - 1).long()  # (B, V): 0 holds the best token
        mass = probs.new_zeros(scores.shape[0], self.BINS).scatter_add_(-1, bins, probs)
        cum = mass.cumsum(dim=-1)
        edge = (cum < self.p).sum(dim=-1, keepdim=True).clamp_(max=self.BINS - 1)  # (B, 1): the bin reaching p
        in_edge = bins == edge
        count = in_edge.sum(dim=-1, keepdim=True)
        # the edge bin's tokens, best first (rows with fewer than the most pad with -inf and probability 0)
        ranked, index = torch.where(in_edge, scores, float("-inf")).topk(max(int(count.max()), 1), dim=-1)
        ranked_probs = probs.gather(-1, index) * in_edge.gather(-1, index)
        before = (cum - mass).gather(-1, edge) + ranked_probs.cumsum(dim=-1) - ranked_probs  # mass ranked before each
        kept = (before < self.p).sum(dim=-1, keepdim=True).clamp_(max=count).clamp_(min=1)
        return _remove(scores, scores < ranked.gather(-1, kept - 1))


class MinP:
    """Min-p sampling (Nguyen et al., 2024): keep tokens at least ``p`` times as likely as the most likely one."""

    def __init__(self, p: float) -> None:
        if not 0.0 < p <= 1.0:
            raise LmlabError(f"min_p is {p}: expected a number in (0, 1]", params="min_p")
        self.log_p = math.log(p)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logprobs = scores.log_softmax(dim=-1)
        return _remove(scores, logprobs < logprobs.max(dim=-1, keepdim=True).values + self.log_p)


class TypicalP:
    """Locally typical sampling (Meister et al., 2023): keep the tokens whose surprisal is closest to
    the distribution's entropy, until their probability reaches ``mass``."""

    def __init__(self, mass: float) -> None:
        if not 0.0 < mass <= 1.0:
            raise LmlabError(f"typical_p is {mass}: expected a number in (0, 1]", params="typical_p")
        self.mass = mass

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logprobs = scores.log_softmax(dim=-1)
        probs = logprobs.exp()
        entropy = -(probs * logprobs).nan_to_num().sum(-1, keepdim=True)
        distance = (-logprobs - entropy).abs()  # how far each token's surprisal is from typical
        sorted_distance, order = torch.sort(distance, dim=-1)
        sorted_probs = probs.gather(-1, order)
        # keep the typical set: tokens before the one where the running mass first reaches `mass`
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= self.mass
        return _remove(scores, drop_sorted.scatter(-1, order, drop_sorted))
