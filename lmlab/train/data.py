"""Batches for the training loop: shuffled epochs of examples (fine-tuning's rows, pretraining's windows).

A training batch is a pure function of (seed, rank, step, micro-step): the position in the run picks the
examples (:class:`ExampleBatches`). The ranks of a distributed run split every step's examples with no overlap
and no gap, and a step reads the same examples at any world size with the same global batch; a checkpoint
records the data position, so a resumed run (at any world size) continues exactly where the run stopped.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lmlab.errors import LmlabError


class ExampleBatches:
    """Shuffled epochs over ``n`` examples (rows, or windows of a token stream): ``(step, micro)`` → the example
    indices of that micro-batch on this rank.

    Example ``q`` of the whole run (counting across steps, micro-steps and ranks) is ``perm_e[q mod n]`` with
    ``perm_e`` the permutation of epoch ``e = q // n``, seeded by (seed, e). A step takes the next
    ``batch_size × grad_accum_steps × world_size`` values of ``q``, in order: micro-batch ``m`` of rank ``r``
    the ``batch_size`` from ``((step × accum + m) × world + r) × batch_size`` on. So the ranks' parts of an
    epoch are disjoint and together the whole epoch, and a step's examples are the same set at any world size
    with the same global batch. :meth:`position` is the data position a checkpoint records (examples drawn so
    far); :meth:`start_at` continues from one.
    """

    def __init__(
        self, n: int, batch_size: int, grad_accum_steps: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if n < 1:
            raise LmlabError("the training file holds no examples")
        self.n, self.batch_size, self.accum, self.seed = n, batch_size, grad_accum_steps, seed
        self.rank, self.world = rank, world_size
        self.step0, self.position0 = 0, 0
        self._perms: dict[int, Tensor] = {}

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, all ranks together."""
        return self.batch_size * self.accum * self.world

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(hash_position(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def first(self, step: int, micro: int) -> int:
        """``q`` of the first example of ``(step, micro)`` on this rank."""
        return self.position(step) + ((micro * self.world) + self.rank) * self.batch_size

    def __call__(self, step: int, micro: int) -> Tensor:
        first = self.first(step, micro)
        return torch.stack([self._perm(q // self.n)[q % self.n] for q in range(first, first + self.batch_size)])

    def position(self, step: int) -> int:
        """The data position before ``step``: examples drawn by all ranks in the steps before it."""
        return self.position0 + (step - self.step0) * self.global_batch

    def start_at(self, step: int, position: int) -> None:
        """Continue a run whose data position before ``step`` was ``position`` (from its checkpoint)."""
        self.step0, self.position0 = step, position

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n / self.global_batch))


class EpochWindows(ExampleBatches):
    """Pretraining's batches: the train split cut into ``n = (len - 1) // seq_len`` windows of ``seq_len + 1``
    tokens (each overlapping the next by the one token its last target needs), drawn in shuffled epochs
    as :class:`ExampleBatches` draws examples: every rank reads its own windows, with no overlap and no gap."""

    def __init__(
        self,
        tokens,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        source: str = "train split",
        vocab_size: int | None = None,
        grad_accum_steps: int = 1,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < seq_len + 1:
            raise LmlabError(
                f"{source} holds {len(tokens)} tokens, fewer than one context window ({seq_len + 1} = seq_len + 1); "
                "give more text or a smaller seq_len",
                params="seq_len",
            )
        super().__init__((len(tokens) - 1) // seq_len, batch_size, grad_accum_steps, seed, rank, world_size)
        self.tokens, self.seq_len, self.source, self.vocab_size = tokens, seq_len, source, vocab_size

    def __call__(self, step: int, micro: int) -> Tensor:
        starts = (super().__call__(step, micro) * self.seq_len).tolist()
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
