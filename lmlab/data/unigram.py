"""The unigram baseline: what a model that ignores context scores on the validation split.

A language model's validation perplexity means little alone; beside the perplexity of the simplest model
that knows the data — each token's frequency in the train split, add-α smoothed over the vocabulary so that
a token the train split never saw keeps some probability — it says how much the model learned from context::

    p(w) = (count_train(w) + α) / (N_train + α·V)
    perplexity = exp(−(1/M) · Σ over the M valid tokens of log p(w))

The counts are those of a data folder made by :func:`lmlab.prepare`: the same tokenizer and the same token
stream the model trains and validates on (each document's EOS included).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmlab.data.pack import PackedTokens
from lmlab.errors import LmlabError

__all__ = ["token_counts", "unigram_perplexity", "unigram_perplexity_of_counts"]

_CHUNK = 1 << 22  # tokens read from the memmapped shards at a time


def token_counts(tokens: PackedTokens) -> np.ndarray:
    """How often each id of the vocabulary occurs in ``tokens`` (length: the folder's ``vocab_size``)."""
    counts = np.zeros(tokens.vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), _CHUNK):
        ids = tokens.window(start, min(_CHUNK, len(tokens) - start))
        counts += np.bincount(ids, minlength=tokens.vocab_size)[: tokens.vocab_size]
    return counts


def unigram_perplexity_of_counts(train_counts: np.ndarray, valid_counts: np.ndarray, alpha: float = 1.0) -> float:
    """Perplexity on the tokens counted in ``valid_counts`` of the add-``alpha`` unigram model estimated from
    ``train_counts`` (both indexed by token id over the same vocabulary)."""
    if not alpha > 0:
        raise LmlabError(f"alpha is {alpha}: expected a positive number (add-α smoothing)")
    train = np.asarray(train_counts, dtype=np.float64)
    valid = np.asarray(valid_counts, dtype=np.float64)
    if train.shape != valid.shape or train.ndim != 1:
        raise LmlabError(f"train and valid counts have shapes {train.shape} and {valid.shape}: expected one vocabulary")
    if valid.sum() <= 0:
        raise LmlabError("no validation tokens to score the unigram baseline on")
    log_p = np.log(train + alpha) - math.log(train.sum() + alpha * len(train))
    return math.exp(-float(valid @ log_p) / float(valid.sum()))


def unigram_perplexity(data_dir: str | Path, *, alpha: float = 1.0) -> float:
    """The unigram baseline of a prepared data folder: estimated on its train split, scored on its valid split."""
    train, valid = PackedTokens(data_dir, "train"), PackedTokens(data_dir, "valid")
    if len(valid) == 0:
        raise LmlabError(f"{data_dir}: the valid split has no tokens; prepare it with a valid fraction above 0")
    return unigram_perplexity_of_counts(token_counts(train), token_counts(valid), alpha)
