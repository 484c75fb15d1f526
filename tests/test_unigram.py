"""The unigram baseline: a hand-computed perplexity, the counts of a real data folder, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmlab.data import PackedTokens
from lmlab.data.unigram import token_counts, unigram_perplexity, unigram_perplexity_of_counts
from lmlab.errors import LmlabError


def test_perplexity_matches_a_hand_computation():
    # train: id 0 three times, id 1 once, id 2 never; add-one smoothing over 3 ids: p = 4/7, 2/7, 1/7
    # valid: 0, 1, 2, 0 → perplexity = (7/4 · 7/2 · 7/1 · 7/4)^(1/4) = (2401/32)^(1/4)
    ppl = unigram_perplexity_of_counts(np.array([3, 1, 0]), np.array([2, 1, 1]), alpha=1.0)
    assert ppl == pytest.approx((2401 / 32) ** 0.25, rel=1e-12)
    assert ppl == pytest.approx(2.94314, abs=1e-5)
    # α = 0.5: p = 3.5/5.5, 1.5/5.5, 0.5/5.5 on the same valid tokens
    half = unigram_perplexity_of_counts(np.array([3, 1, 0]), np.array([2, 1, 1]), alpha=0.5)
    assert half == pytest.approx((5.5**4 / (3.5 * 3.5 * 1.5 * 0.5)) ** 0.25, rel=1e-12)


def test_a_valid_split_like_the_train_split_scores_its_entropy():
    # with no smoothing to speak of, the perplexity on text of the train split's frequencies is exp(entropy)
    counts = np.array([500_000, 250_000, 125_000, 125_000])
    p = counts / counts.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    assert unigram_perplexity_of_counts(counts, counts, alpha=1e-9) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(2**1.75)


def test_a_data_folder_counts_every_token_of_each_split(data_dir):
    train, valid = PackedTokens(data_dir, "train"), PackedTokens(data_dir, "valid")
    train_ids, valid_ids = train.window(0, len(train)), valid.window(0, len(valid))
    counts = token_counts(train)
    assert counts.shape == (train.vocab_size,) and counts.sum() == len(train)
    eos = counts[train.eos_id] + np.count_nonzero(valid_ids == train.eos_id)
    assert eos == train.documents  # one EOS after each document, in whichever split its end went to
    assert np.array_equal(counts, np.bincount(train_ids, minlength=train.vocab_size))
    # the folder-level figure: estimated on train, scored on valid, token by token
    p = (counts + 1.0) / (len(train) + train.vocab_size)
    expected = math.exp(-np.log(p[valid_ids]).mean())
    assert unigram_perplexity(data_dir) == pytest.approx(expected, rel=1e-9)
    # far below a uniform guess over the vocabulary, and not the train split scored on itself
    assert 10 < unigram_perplexity(data_dir) < train.vocab_size / 2
    assert unigram_perplexity(data_dir) != pytest.approx(unigram_perplexity_of_counts(counts, counts))


def test_bad_input_is_a_one_line_error(tmp_path):
    with pytest.raises(LmlabError, match="alpha is 0: expected a positive number"):
        unigram_perplexity_of_counts(np.array([1, 2]), np.array([1, 1]), alpha=0)
    with pytest.raises(LmlabError, match="expected one vocabulary"):
        unigram_perplexity_of_counts(np.array([1, 2]), np.array([1, 1, 1]))
    with pytest.raises(LmlabError, match="no validation tokens"):
        unigram_perplexity_of_counts(np.array([1, 2]), np.array([0, 0]))
    with pytest.raises(LmlabError, match="manifest"):
        unigram_perplexity(tmp_path)
