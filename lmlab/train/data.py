"""Batches for the training loop, drawn from packed token shards.

A training batch is a pure function of (seed, rank, step, micro-step): random windows as nanoGPT
draws them, but from a generator seeded by the position in the run. Resuming at step k therefore
reads exactly the batches the uninterrupted run would have read — the data position *is* the step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lmlab.errors import LmlabError


class RandomWindows:
    """Windows of ``seq_len + 1`` tokens at random offsets of a :class:`~lmlab.data.pack.PackedTokens`."""

    def __init__(
        self,
        tokens,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        source: str = "train split",
        vocab_size: int | None = None,
    ) -> None:
        if len(tokens) < seq_len + 1:
            raise LmlabError(
                f"{source} holds {len(tokens)} tokens, fewer than one context window ({seq_len + 1} = seq_len + 1); "
                "give more text or a smaller seq_len",
                params="seq_len",
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.source, self.vocab_size = seed, rank, source, vocab_size

    def __call__(self, step: int, micro_step: int) -> Tensor:
        g = torch.Generator().manual_seed(hash_position(self.seed, self.rank, step, micro_step))
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=g).tolist()
        return check_ids(
            torch.from_numpy(np.stack([self.tokens.window(s, self.seq_len + 1) for s in starts])),
            self.vocab_size,
            self.source,
        )


def check_ids(windows: Tensor, vocab_size: int | None, source: str) -> Tensor:
    """``windows``, once every id in them is known to be below the model's ``vocab_size`` (None: unchecked).
    One max over a CPU batch, so shards that do not fit the model are an error naming them, not an
    ``IndexError`` deep in the embedding."""
    if vocab_size is not None and windows.numel() and int(windows.max()) >= vocab_size:
        raise LmlabError(
            f"{source} holds token id {int(windows.max())}, past the model's vocabulary ({vocab_size} ids): "
            "its shards do not hold the ids of the model's tokenizer; re-run `lmlab prepare` with it"
        )
    return windows


def hash_position(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby positions get unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def fixed_windows(
    tokens, seq_len: int, batch_size: int, max_batches: int, vocab_size: int | None = None, source: str = "valid split"
) -> list[Tensor]:
    """Evenly spaced, non-overlapping validation windows: the same every evaluation, every run (ids checked
    against ``vocab_size`` as :func:`check_ids` does)."""
    n_windows = min(max_batches * batch_size, (len(tokens) - 1) // seq_len)
    if n_windows < 1:
        return []
    span = len(tokens) - (seq_len + 1)
    starts = np.linspace(0, span, n_windows).astype(np.int64) if n_windows > 1 else np.zeros(1, dtype=np.int64)
    windows = check_ids(
        torch.from_numpy(np.stack([tokens.window(int(s), seq_len + 1) for s in starts])), vocab_size, source
    )
    return list(windows.split(batch_size))
