"""Decoding rules as small composable callables ``(input_ids, scores) -> scores`` (STYLE habit 5).

``input_ids`` is (B, L): the tokens so far; ``scores`` is (B, vocab_size): next-token logits. A
processor list is built once per request, in a stated order, and applied in that order every
step. None of these keep state between steps.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from lmlab.errors import LmlabError


class LogitsProcessor(Protocol):
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor: ...


class Temperature:
    """Divide logits by T: T < 1 sharpens the distribution, T > 1 flattens it."""

    def __init__(self, temperature: float) -> None:
        if temperature <= 0:
            raise LmlabError(f"--temperature is {temperature}: expected a positive number (use --strategy greedy for T → 0)")
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k most likely tokens (Fan et al., 2018); the rest get probability 0."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise LmlabError(f"--top-k is {k}: expected a positive integer")
        self.k = k

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1): the k-th largest logit
        return scores.masked_fill(scores < kth, float("-inf"))


class TopP:
    """Nucleus sampling (Holtzman et al., 2020): keep the smallest set of tokens whose probability reaches p."""

    def __init__(self, p: float) -> None:
        if not 0.0 < p <= 1.0:
            raise LmlabError(f"--top-p is {p}: expected a number in (0, 1]")
        self.p = p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach p (the most likely token always stays)
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= self.p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, float("-inf"))
