"""Metric layer of ``lmlab evaluate``: each score against its reference library or a value worked out by hand."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
from seqeval.metrics import f1_score as seqeval_f1
from seqeval.scheme import IOB2
from torchmetrics.functional.classification import binary_calibration_error
from torchmetrics.functional.text import squad as torchmetrics_squad

from lmlab.errors import LmlabError
from lmlab.evaluate import (
    HEADLINES,
    bootstrap_ci,
    calibration,
    classification_metrics,
    multilabel_metrics,
    perplexity,
    regression_metrics,
    reliability_diagram,
    seq2seq_metrics,
    squad_metrics,
    tagging_metrics,
    with_cis,
)

# ---------------------------------------------------------------------------------------------------------
# classification

# Confusion matrix (rows = true, columns = predicted), worked out by hand:
#   true 0: [2, 1, 0]   true 1: [0, 3, 0]   true 2: [2, 0, 2]
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
PREDS = [0, 0, 1, 1, 1, 1, 2, 2, 0, 0]
# precision = diagonal / column sum, recall = diagonal / row sum
P = [2 / 4, 3 / 4, 2 / 2]
R = [2 / 3, 3 / 3, 2 / 4]
F = [2 * p * r / (p + r) for p, r in zip(P, R)]  # 4/7, 6/7, 2/3
SUPPORT = [3, 3, 4]


def test_classification_matches_hand_computed_confusion_matrix_and_averages():
    out = classification_metrics(PREDS, LABELS, label_names=["neg", "neu", "pos"])
    assert out["confusion_matrix"] == [[2, 1, 0], [0, 3, 0], [2, 0, 2]]
    assert out["accuracy"] == pytest.approx(0.7, abs=1e-6)
    for key in ("precision_micro", "recall_micro", "f1_micro"):
        assert out[key] == pytest.approx(0.7, abs=1e-6)
    assert out["precision_macro"] == pytest.approx(np.mean(P), abs=1e-6)
    assert out["recall_macro"] == pytest.approx(np.mean(R), abs=1e-6)
    assert out["f1_macro"] == pytest.approx(44 / 63, abs=1e-6)
    assert out["precision_weighted"] == pytest.approx(np.dot(P, SUPPORT) / 10, abs=1e-6)
    assert out["f1_weighted"] == pytest.approx(146 / 210, abs=1e-6)
    assert list(out["per_class"]) == ["neg", "neu", "pos"]
    for i, name in enumerate(["neg", "neu", "pos"]):
        row = out["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((P[i], R[i], F[i]), abs=1e-6)
        assert row["support"] == SUPPORT[i]
    assert out["num_examples"] == 10


def test_classification_accepts_numpy_and_tensors_and_keys_classes_by_id_without_names():
    out = classification_metrics(np.array(PREDS), torch.tensor(LABELS))
    assert list(out["per_class"]) == ["0", "1", "2"]
    assert out["accuracy"] == pytest.approx(0.7, abs=1e-6)


def test_classification_reports_float32_scores_as_short_decimals():
    assert classification_metrics(PREDS, LABELS)["accuracy"] == 0.7


def test_classification_macro_average_skips_classes_absent_from_preds_and_labels():
    # torchmetrics' rule, documented in the docstring: class 3 never occurs, so macro F1 stays over 3 classes.
    with_absent = classification_metrics(PREDS, LABELS, num_classes=4)
    assert with_absent["f1_macro"] == pytest.approx(44 / 63, abs=1e-6)
    assert with_absent["per_class"]["3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert len(with_absent["confusion_matrix"]) == 4


@pytest.mark.parametrize(
    "preds, labels, kwargs, match",
    [
        ([0, 1], [0, 1, 1], {}, "labels: expected 2 examples"),
        ([], [], {}, "preds: expected a non-empty"),
        ([0, 3], [0, 1], {"num_classes": 3}, r"preds: expected class ids in \[0, 2\], found 3"),
        ([0, 1], [0, -1], {}, "labels: expected class ids"),
        ([0.0, 1.0], [0, 1], {}, "preds: expected integer class ids"),
        ([0, 1], [0, 1], {"label_names": ["a", "b", "c"], "num_classes": 2}, "label_names: expected 2 names"),
        ([0, 0], [0, 0], {}, "num_classes: expected an integer of at least 2"),
    ],
)
def test_classification_rejects_bad_input_with_one_line_naming_the_field(preds, labels, kwargs, match):
    with pytest.raises(LmlabError, match=match):
        classification_metrics(preds, labels, **kwargs)


def test_multilabel_matches_hand_computed_scores():
    preds = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    labels = [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    out = multilabel_metrics(preds, labels, label_names=["a", "b", "c"])
    assert out["subset_accuracy"] == pytest.approx(1 / 3, abs=1e-6)  # only row 1 is exactly right
    assert out["f1_micro"] == pytest.approx(0.75, abs=1e-6)  # tp=3, fp=2, fn=0
    # Label "c" never occurs and is predicted once: F1 0, and the multilabel macro average keeps it.
    assert out["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3, abs=1e-6)
    expected_b = {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    assert out["per_label"]["b"] == pytest.approx(expected_b, abs=1e-6)
    with pytest.raises(LmlabError, match="label_matrix: expected shape"):
        multilabel_metrics(preds, [[1, 0], [0, 1], [1, 0]])
    with pytest.raises(LmlabError, match="pred_matrix: expected only 0/1"):
        multilabel_metrics([[2, 0, 0]], [[1, 0, 0]])


def test_regression_matches_hand_computed_errors_and_correlations():
    out = regression_metrics([1, 2, 3, 4], [1.5, 2, 2.5, 5])
    assert out["mse"] == pytest.approx((0.25 + 0 + 0.25 + 1) / 4)
    assert out["mae"] == pytest.approx(0.5)
    assert out["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1.5, 2, 2.5, 5])[0, 1], abs=1e-9)
    # Spearman = 1 - 6 Σd² / (n(n² - 1)) with rank differences d = (0, 1, 1, 0): 1 - 12/60.
    assert regression_metrics([1, 2, 3, 4], [1, 3, 2, 4])["spearman"] == pytest.approx(0.8, abs=1e-5)
    with pytest.raises(LmlabError, match="preds: expected a 1-D array of at least 2"):
        regression_metrics([1.0], [1.0])
    with pytest.raises(LmlabError, match="targets: expected finite"):
        regression_metrics([1.0, 2.0], [1.0, float("nan")])


# ---------------------------------------------------------------------------------------------------------
# sequence labelling

GOLD_TAGS = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]]
PRED_TAGS = [["B-PER", "I-PER", "O", "I-LOC"], ["O", "B-ORG", "O", "O"]]


def test_tagging_default_mode_follows_conlleval_and_matches_hand_computed_entity_f1():
    # Gold: PER(0-1), LOC(3), ORG(1-2). Conlleval reads the stray I-LOC as an entity: predicted PER, LOC,
    # ORG(1-1); PER and LOC are right, so P = R = F1 = 2/3.
    out = tagging_metrics(PRED_TAGS, GOLD_TAGS)
    assert out["mode"] == "conlleval"
    assert (out["precision"], out["recall"], out["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert out["per_type"]["LOC"]["f1"] == 1.0
    assert out["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert out["token_accuracy"] == pytest.approx(6 / 8)


def test_tagging_strict_mode_drops_entities_that_break_the_scheme():
    # Strict IOB2: I-LOC without B-LOC is no entity, so predicted = {PER, ORG(1-1)}: P = 1/2, R = 1/3.
    out = tagging_metrics(PRED_TAGS, GOLD_TAGS, strict=True)
    assert out["mode"] == "strict"
    assert (out["precision"], out["recall"], out["f1"]) == pytest.approx((1 / 2, 1 / 3, 0.4))
    assert out["per_type"]["LOC"]["f1"] == 0.0


def test_tagging_iobes_is_strict_by_default_and_requires_the_closing_tag():
    gold, pred = [["S-PER", "O", "B-LOC", "E-LOC"]], [("S-PER", "O", "B-LOC", "I-LOC")]  # tuples work too
    assert tagging_metrics(pred, gold, scheme="IOBES")["f1"] == pytest.approx(2 / 3)  # LOC never closes
    assert tagging_metrics(pred, gold, scheme="IOBES", strict=False)["f1"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "pred, gold, kwargs, match",
    [
        ([["O"]], [["O", "O"]], {}, r"pred_tags\[0\]: expected 2 tags"),
        ([["O"], ["O"]], [["O"]], {}, "pred_tags: expected 1 examples"),
        ([["B-PER", "X-PER"]], [["B-PER", "O"]], {}, r"pred_tags\[0\]\[1\]: expected 'O' or a BIO tag"),
        ([["S-PER"]], [["B-PER"]], {}, r"pred_tags\[0\]\[0\]"),
        ([["O"]], [["O"]], {"scheme": "BILOU"}, "scheme: expected one of"),
        ([], [], {}, "pred_tags: expected a non-empty list"),
        (["B-PER O"], ["B-PER O"], {}, "pred_tags: expected a non-empty list|pred_tags\\[0\\]"),
    ],
)
def test_tagging_rejects_bad_input(pred, gold, kwargs, match):
    with pytest.raises(LmlabError, match=match):
        tagging_metrics(pred, gold, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# question answering

V1_REFERENCES = {
    "q1": ["Denver Broncos", "The Denver Broncos"],
    "q2": ["Santa Clara, California", "Levi's Stadium"],
    "q3": ["the 50th Super Bowl"],
    "q4": ["gold"],
    "q5": ["Peyton Manning"],
}
V1_PREDICTIONS = {
    "q1": "the Denver Broncos!",
    "q2": "Santa Clara",
    "q3": "Super Bowl 50",
    "q4": "silver",
    "q5": "Manning, Peyton",
}


def test_squad_v1_matches_torchmetrics():
    out = squad_metrics(V1_PREDICTIONS, V1_REFERENCES)
    reference = torchmetrics_squad(
        [{"id": qid, "prediction_text": text} for qid, text in V1_PREDICTIONS.items()],
        [
            {"id": qid, "answers": {"text": answers, "answer_start": [0] * len(answers)}}
            for qid, answers in V1_REFERENCES.items()
        ],
    )
    assert out["exact"] == pytest.approx(float(reference["exact_match"]), abs=1e-4)
    assert out["f1"] == pytest.approx(float(reference["f1"]), abs=1e-4)
    # By hand: EM only q1 and q5 ("manning peyton" ≠ "peyton manning") → q1 alone = 20%.
    assert out["exact"] == pytest.approx(20.0)
    assert out["total"] == 5 and "HasAns_exact" not in out


def test_squad_v2_scores_unanswerable_questions_and_splits_them():
    references = {
        "a": ["Denver Broncos", "the Broncos"],  # "Broncos" matches the second after normalisation: 1, 1
        "b": ["Santa Clara, California"],  # "Santa Clara": EM 0, F1 = 2·1·(2/3)/(1+2/3) = 0.8
        "c": [],  # unanswerable, answered "": 1, 1
        "d": [],  # unanswerable, answered anyway: 0, 0
    }
    predictions = {"a": "Broncos", "b": "Santa Clara", "c": "", "d": "Levi's Stadium"}
    out = squad_metrics(predictions, references)
    assert out["exact"] == pytest.approx(50.0) and out["f1"] == pytest.approx(70.0) and out["total"] == 4
    assert (out["HasAns_exact"], out["HasAns_f1"], out["HasAns_total"]) == pytest.approx((50.0, 90.0, 2))
    assert (out["NoAns_exact"], out["NoAns_f1"], out["NoAns_total"]) == pytest.approx((50.0, 50.0, 2))


def test_squad_v2_drops_gold_answers_that_normalise_to_nothing():
    # The v2.0 script drops gold answers like "The" (empty after normalisation): an empty prediction does
    # not match them when a real answer is left, and is the right answer when none is.
    assert squad_metrics({"x": ""}, {"x": ["Broncos", "The"]})["exact"] == 0.0
    assert squad_metrics({"x": ""}, {"x": ["The"]})["exact"] == 100.0


@pytest.mark.parametrize(
    "predictions, references, match",
    [
        ({"a": "x"}, {"a": ["x"], "b": ["y"]}, "predictions: expected the question ids of references, lacks 1"),
        ({"a": "x", "z": "y"}, {"a": ["x"]}, "has unknown 1"),
        ({"a": None}, {"a": ["x"]}, r"predictions\['a'\]: expected a string"),
        ({"a": "x"}, {"a": "x"}, r"references\['a'\]: expected a list of answer strings"),
        ({}, {}, "predictions: expected a non-empty dict"),
    ],
)
def test_squad_rejects_bad_input(predictions, references, match):
    with pytest.raises(LmlabError, match=match):
        squad_metrics(predictions, references)


# ---------------------------------------------------------------------------------------------------------
# generation against references


def _sentences(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    words = "the cat sat on a mat dog ran fast slow big small red blue green house tree".split()
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 20))) for _ in range(n)]


def test_seq2seq_bleu_and_chrf_equal_sacrebleu_corpus_scores():
    hyps, refs = _sentences(40, 1), _sentences(40, 2)
    out = seq2seq_metrics(hyps, refs)
    assert out["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert out["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert out["bleu_signature"] == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" + sacrebleu.__version__
    assert out["chrf_signature"].startswith("nrefs:1|")
    assert "tok:zh" in seq2seq_metrics(hyps, refs, tokenize="zh")["bleu_signature"]


def test_seq2seq_takes_a_varying_number_of_references_per_example():
    hyps = ["the cat sat on the mat", "a dog ran"]
    refs = [["the cat sat on a mat", "a cat was on the mat"], ["the dog ran fast"]]
    out = seq2seq_metrics(hyps, refs)
    streams = [["the cat sat on a mat", "the dog ran fast"], ["a cat was on the mat", None]]
    assert out["bleu"] == sacrebleu.corpus_bleu(hyps, streams).score
    assert out["bleu_signature"].startswith("nrefs:var|")


def test_seq2seq_rouge_matches_hand_computed_f_measures():
    # Unigrams overlap in 5 of 6 (the×2, cat, on, mat); bigrams in 3 of 5; LCS "the cat on the mat" = 5.
    out = seq2seq_metrics(["the cat sat on the mat"], ["the cat is on the mat"])
    assert (out["rouge1"], out["rouge2"], out["rougeL"]) == pytest.approx((5 / 6, 3 / 5, 5 / 6))
    two = seq2seq_metrics(["the cat sat on the mat", "a b c"], ["the cat is on the mat", "a b c"])
    assert two["rouge2"] == pytest.approx((3 / 5 + 1.0) / 2)  # averaged over examples
    # The Porter stemmer makes cats/cat and running/runs match: 3 of 3 unigrams instead of 1 of 3.
    assert seq2seq_metrics(["the cats running"], ["the cat runs"])["rouge1"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "hyps, refs, match",
    [
        ([], [], "hypotheses: expected a non-empty list"),
        (["a"], ["a", "b"], "references: expected 1 examples"),
        (["a", 3], ["a", "b"], r"hypotheses\[1\]: expected a string"),
        (["a"], [[]], r"references\[0\]: expected a reference string or a non-empty list"),
    ],
)
def test_seq2seq_rejects_bad_input(hyps, refs, match):
    with pytest.raises(LmlabError, match=match):
        seq2seq_metrics(hyps, refs)


# ---------------------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(20.0, 10) == pytest.approx(math.exp(2.0))
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(1e6, 1) == math.inf
    bad = [(1.0, 0, "num_tokens"), (1.0, True, "num_tokens"), (-1.0, 3, "total_nll"), (math.nan, 3, "total_nll")]
    for nll, tokens, match in bad:
        with pytest.raises(LmlabError, match=match):
            perplexity(nll, tokens)


# ---------------------------------------------------------------------------------------------------------
# bootstrap confidence intervals


def test_bootstrap_ci_contains_the_value_and_is_deterministic_with_the_seed():
    correct = np.random.default_rng(1).random(300) < 0.7
    ci = bootstrap_ci(np.mean, correct, n_resamples=500)
    assert ci["value"] == pytest.approx(correct.mean())
    assert ci["low"] < ci["value"] < ci["high"]
    assert (ci["n_resamples"], ci["confidence"]) == (500, 0.95)
    assert bootstrap_ci(np.mean, correct, n_resamples=500) == ci
    assert bootstrap_ci(np.mean, correct, n_resamples=500, seed=1) != ci


def test_bootstrap_ci_equals_a_hand_written_percentile_bootstrap():
    values = np.random.default_rng(2).normal(size=50)
    rng = np.random.default_rng(7)
    means = [values[rng.integers(0, 50, size=50)].mean() for _ in range(200)]
    ci = bootstrap_ci(np.mean, values, n_resamples=200, confidence=0.9, seed=7)
    assert (ci["low"], ci["high"]) == pytest.approx(tuple(np.percentile(means, [5, 95])))


def test_bootstrap_ci_narrows_with_more_data():
    rng = np.random.default_rng(3)
    small, large = rng.random(50) < 0.7, rng.random(5000) < 0.7
    cis = [bootstrap_ci(np.mean, x, n_resamples=300) for x in (small, large)]
    widths = [ci["high"] - ci["low"] for ci in cis]
    assert widths[1] < widths[0] / 3  # about sqrt(100) = 10 times narrower


def test_bootstrap_ci_keeps_columns_paired_across_lists_arrays_and_tensors():
    n = 40
    as_list, as_array, as_tensor = list(range(n)), np.arange(n) * 2, torch.arange(n) * 3

    def pairing_broken(a, b, c):
        return float(any(2 * x != y or 3 * x != int(z) for x, y, z in zip(a, b, c)))

    assert bootstrap_ci(pairing_broken, as_list, as_array, as_tensor, n_resamples=50)["high"] == 0.0


@pytest.mark.parametrize(
    "columns, kwargs, match",
    [
        (([1, 2, 3], [1, 2]), {}, r"columns\[1\]: expected 3 examples to match columns\[0\], got 2"),
        ((), {}, "columns: expected at least one"),
        (([],), {}, r"columns\[0\]: expected at least one example"),
        (([1, 2],), {"confidence": 1.5}, "confidence: expected a number strictly between 0 and 1"),
        (([1, 2],), {"n_resamples": 0}, "n_resamples: expected a positive integer"),
        (([1, 2],), {"n_resamples": 10**9}, "n_resamples: expected a positive integer up to 100,000.*got 1000000000"),
    ],
)
def test_bootstrap_ci_rejects_bad_input(columns, kwargs, match):
    with pytest.raises(LmlabError, match=match):
        bootstrap_ci(np.mean, *columns, **kwargs)


def test_evaluate_refuses_an_absurd_resample_count_before_loading_the_model(tmp_path):
    from lmlab.evaluate.runner import evaluate

    with pytest.raises(LmlabError, match=r"n_resamples: expected a positive integer up to 100,000"):
        evaluate(tmp_path / "no-such-checkpoint", tmp_path / "data.jsonl", n_resamples=10**9)


def _assert_cis_around_headlines(out: dict, task: str) -> None:
    assert set(out["ci"]) == set(HEADLINES[task])
    for name, ci in out["ci"].items():
        assert ci["value"] == pytest.approx(out[name], abs=1e-6)
        assert ci["low"] <= ci["value"] <= ci["high"]


def test_with_cis_classify_bounds_accuracy_and_macro_f1():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 200)
    preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, 200))
    out = with_cis("classify", preds, labels, label_names=["a", "b", "c"], n_resamples=200)
    assert out["per_class"].keys() == {"a", "b", "c"}
    _assert_cis_around_headlines(out, "classify")


@pytest.mark.parametrize("strict", [False, True])
def test_with_cis_tag_resamples_entity_counts_that_reproduce_seqeval(strict):
    rnd = random.Random(5)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    gold = [[rnd.choice(tags) for _ in range(12)] for _ in range(120)]
    pred = [[t if rnd.random() < 0.8 else rnd.choice(tags) for t in sentence] for sentence in gold]
    out = with_cis("tag", pred, gold, strict=strict, n_resamples=200)
    mode = {"mode": "strict", "scheme": IOB2} if strict else {}
    assert out["ci"]["f1"]["value"] == pytest.approx(seqeval_f1(gold, pred, **mode), abs=1e-12)
    _assert_cis_around_headlines(out, "tag")


def test_with_cis_qa_bounds_exact_match_and_f1():
    out = with_cis("qa", V1_PREDICTIONS, V1_REFERENCES, n_resamples=200)
    _assert_cis_around_headlines(out, "qa")
    assert out["ci"]["exact"]["low"] == 0.0 and out["ci"]["exact"]["high"] > 20.0


def test_with_cis_seq2seq_resamples_sacrebleu_statistics_quickly():
    hyps, refs = _sentences(200, 6), _sentences(200, 7)
    hyps = [h if i % 3 else r for i, (h, r) in enumerate(zip(hyps, refs))]  # some exact hits for a real BLEU
    start = time.perf_counter()
    out = with_cis("seq2seq", hyps, refs, n_resamples=1000)
    elapsed = time.perf_counter() - start
    assert out["ci"]["bleu"]["value"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert out["ci"]["chrf"]["value"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    _assert_cis_around_headlines(out, "seq2seq")
    assert elapsed < 10, f"1000 BLEU/chrF resamples of 200 sentences took {elapsed:.1f}s"


def test_with_cis_rejects_an_unknown_task():
    with pytest.raises(LmlabError, match="task: expected one of"):
        with_cis("summarize", ["a"], ["a"])


# ---------------------------------------------------------------------------------------------------------
# calibration


def test_calibration_matches_hand_computed_ece_for_both_strategies():
    conf, correct = [0.1, 0.4, 0.5, 0.9], [0, 1, 1, 1]
    # Uniform, 2 bins: [0, .5) holds .1 and .4 (conf .25, acc .5, gap .25); [.5, 1] holds .5 and .9
    # (conf .7, acc 1, gap .3): ECE = .5·.25 + .5·.3 = .275, MCE = .3.
    uniform = calibration(conf, correct, n_bins=2, strategy="uniform")
    assert (uniform["ece"], uniform["mce"]) == pytest.approx((0.275, 0.3))
    upper_bin = {"lower": 0.5, "upper": 1.0, "confidence": 0.7, "accuracy": 1.0, "count": 2}
    assert uniform["bins"][1] == pytest.approx(upper_bin)
    # Quantile, 4 bins of one example each: gaps .1, .6, .5, .1 → ECE .325, MCE .6.
    quantile = calibration(conf, correct, n_bins=4)
    assert (quantile["ece"], quantile["mce"]) == pytest.approx((0.325, 0.6))
    assert [b["count"] for b in quantile["bins"]] == [1, 1, 1, 1]


def test_calibration_quantile_bins_hold_equal_mass():
    conf = np.random.default_rng(8).beta(5, 1, size=1000)  # piled up near 1: uniform bins would be uneven
    out = calibration(conf, conf > 0.5, n_bins=10)
    assert [b["count"] for b in out["bins"]] == [100] * 10
    assert all(a["upper"] <= b["lower"] for a, b in zip(out["bins"], out["bins"][1:]))


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_calibration_uniform_ece_equals_torchmetrics(n_bins):
    rng = np.random.default_rng(n_bins)
    conf = rng.uniform(0.0, 0.999, size=500).astype(np.float32)
    correct = (rng.random(500) < conf**2).astype(np.int64)  # over-confident on purpose
    ours = calibration(conf, correct, n_bins=n_bins, strategy="uniform")["ece"]
    reference = binary_calibration_error(torch.from_numpy(conf), torch.from_numpy(correct), n_bins=n_bins, norm="l1")
    assert ours == pytest.approx(float(reference), abs=1e-5)
    assert ours > 0.05


def test_calibration_puts_confidence_one_in_the_last_uniform_bin():
    # torchmetrics would give 1.0 a bin of its own (ECE .525); here it joins [.9, 1]: conf .975, acc .5.
    out = calibration([1.0, 0.95], [0, 1], n_bins=10, strategy="uniform")
    assert len(out["bins"]) == 1 and out["ece"] == pytest.approx(0.475)


@pytest.mark.parametrize(
    "conf, correct, kwargs, match",
    [
        ([0.5, 1.2], [0, 1], {}, r"confidences: expected probabilities in \[0, 1\]"),
        ([0.5, 0.7], [0, 2], {}, "correct: expected only 0/1"),
        ([0.5, 0.7], [0], {}, "correct: expected 2 examples"),
        ([0.5], [1], {"strategy": "equal"}, "strategy: expected 'quantile' or 'uniform'"),
        ([0.5], [1], {"n_bins": 0}, "n_bins: expected a positive integer"),
        ([], [], {}, "confidences: expected a 1-D array of at least 1"),
    ],
)
def test_calibration_rejects_bad_input(conf, correct, kwargs, match):
    with pytest.raises(LmlabError, match=match):
        calibration(conf, correct, **kwargs)


def test_reliability_diagram_writes_a_png_atomically(tmp_path):
    rng = np.random.default_rng(9)
    conf = rng.random(200)
    calib = calibration(conf, rng.random(200) < conf, n_bins=8)
    path = reliability_diagram(calib, tmp_path / "plots" / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary file left behind
    with pytest.raises(LmlabError, match="calib: expected the dict returned by calibration"):
        reliability_diagram({"ece": 0.1}, tmp_path / "x.png")


def test_reliability_diagram_leaves_an_existing_file_intact_when_writing_fails(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise OSError("disk full")

    target = tmp_path / "reliability.png"
    target.write_bytes(b"old")
    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        reliability_diagram(calibration([0.2, 0.8], [0, 1], n_bins=2), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["reliability.png"]
