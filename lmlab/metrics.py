"""Task metrics for ``lmlab evaluate`` and ``lmlab critique``: pure functions over lists, arrays and tensors.

Each score comes from the library the field trusts for it: torchmetrics (classification, regression),
seqeval (entity F1), sacrebleu (BLEU, chrF), rouge_score (ROUGE). SQuAD EM/F1 and calibration follow
their reference definitions (the official SQuAD v2.0 script; Guo et al., 2017), checked against
torchmetrics in the tests.

Scores keep the scale of their reference: fractions in [0, 1] for classification, tagging, ROUGE and
calibration; 0–100 for SQuAD EM/F1, BLEU and chrF, as the official SQuAD scripts and sacrebleu print them.

Bad input raises :class:`~lmlab.errors.LmlabError` with one line that names the argument and what was
expected.
"""

from __future__ import annotations

import collections
import math
import os
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional import (
    mean_absolute_error,
    mean_squared_error,
    pearson_corrcoef,
    spearman_corrcoef,
)
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_recall,
)

from lmlab.errors import LmlabError

__all__ = [
    "classification_metrics",
    "multilabel_metrics",
    "regression_metrics",
    "tagging_metrics",
    "squad_metrics",
    "seq2seq_metrics",
    "perplexity",
    "bootstrap_ci",
    "with_cis",
    "HEADLINES",
    "calibration",
    "reliability_diagram",
]


# ---------------------------------------------------------------------------------------------------------
# Input checks shared by every metric


def _array(values: Any, name: str) -> np.ndarray:
    """``values`` (list, numpy array or tensor) as a numpy array."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    try:
        return np.asarray(values)
    except ValueError:
        raise LmlabError(f"{name}: expected a rectangular array of numbers, got ragged rows") from None


def _check_same_length(name_a: str, len_a: int, name_b: str, len_b: int) -> None:
    if len_a != len_b:
        raise LmlabError(f"{name_b}: expected {len_a} examples to match {name_a}, got {len_b}")


def _class_ids(values: Any, name: str) -> np.ndarray:
    array = _array(values, name)
    if array.ndim != 1 or array.size == 0:
        raise LmlabError(f"{name}: expected a non-empty 1-D sequence of class ids, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise LmlabError(f"{name}: expected integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def _numbers(values: Any, name: str, *, ndim: int = 1, min_size: int = 1) -> np.ndarray:
    array = _array(values, name)
    if array.ndim != ndim or len(array) < min_size:
        raise LmlabError(f"{name}: expected a {ndim}-D array of at least {min_size} examples, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise LmlabError(f"{name}: expected numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise LmlabError(f"{name}: expected finite numbers, found NaN or inf")
    return array


def _zeros_and_ones(values: Any, name: str, *, ndim: int) -> np.ndarray:
    array = _numbers(values, name, ndim=ndim)
    if not np.isin(array, (0, 1)).all():
        raise LmlabError(f"{name}: expected only 0/1 (or False/True) values")
    return array.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Classification, multi-label classification, regression (torchmetrics)

_PRF = (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score))


def classification_metrics(
    preds: Any, labels: Any, *, num_classes: int | None = None, label_names: Sequence[str] | None = None
) -> dict:
    """Accuracy, precision/recall/F1 (macro, micro, weighted), per-class scores and the confusion matrix.

    ``preds`` and ``labels`` are class ids. ``num_classes`` defaults to ``len(label_names)``, else to the
    largest id seen plus one. ``per_class`` is keyed by label name (or the id as a string), and
    ``confusion_matrix[true][predicted]`` counts examples. Scores come from
    ``torchmetrics.functional.classification``: its macro average skips classes found in neither ``preds``
    nor ``labels`` (scikit-learn would average them in as 0), and a class never predicted has precision 0.
    """
    p, y = _class_ids(preds, "preds"), _class_ids(labels, "labels")
    _check_same_length("preds", len(p), "labels", len(y))
    num_classes = _resolve_num_classes(num_classes, label_names, p, y)
    names = [str(name) for name in label_names] if label_names is not None else [str(i) for i in range(num_classes)]
    pt, yt = torch.from_numpy(p), torch.from_numpy(y)

    result: dict[str, Any] = {
        "num_examples": len(y),
        "accuracy": _f32(multiclass_accuracy(pt, yt, num_classes=num_classes, average="micro")),
    }
    for average in ("macro", "micro", "weighted"):
        for key, fn in _PRF:
            result[f"{key}_{average}"] = _f32(fn(pt, yt, num_classes=num_classes, average=average))
    per_class = {key: _f32(fn(pt, yt, num_classes=num_classes, average="none")) for key, fn in _PRF}
    support = np.bincount(y, minlength=num_classes)
    result["per_class"] = {
        name: {key: per_class[key][i] for key, _ in _PRF} | {"support": int(support[i])} for i, name in enumerate(names)
    }
    result["confusion_matrix"] = multiclass_confusion_matrix(pt, yt, num_classes=num_classes).tolist()
    result["labels"] = names
    return result


def _f32(scores: torch.Tensor) -> Any:
    """torchmetrics computes in float32: give each value's shortest decimal (0.8, not 0.800000011920929)."""
    values = [float(str(value)) for value in scores.numpy().reshape(-1)]
    return values if scores.ndim else values[0]


def _resolve_num_classes(
    num_classes: int | None, label_names: Sequence[str] | None, p: np.ndarray, y: np.ndarray
) -> int:
    if label_names is not None:
        if num_classes is not None and len(label_names) != num_classes:
            raise LmlabError(f"label_names: expected {num_classes} names (num_classes), got {len(label_names)}")
        if len(set(label_names)) != len(label_names):
            raise LmlabError("label_names: expected distinct names, found duplicates")
        num_classes = len(label_names)
    if num_classes is None:
        num_classes = int(max(p.max(), y.max())) + 1
    if not isinstance(num_classes, int) or num_classes < 2:
        raise LmlabError(f"num_classes: expected an integer of at least 2, got {num_classes!r}")
    for name, ids in (("preds", p), ("labels", y)):
        if ids.min() < 0 or ids.max() >= num_classes:
            bad = ids[(ids < 0) | (ids >= num_classes)][0]
            raise LmlabError(f"{name}: expected class ids in [0, {num_classes - 1}], found {bad}")
    return num_classes


def multilabel_metrics(pred_matrix: Any, label_matrix: Any, label_names: Sequence[str] | None = None) -> dict:
    """Subset accuracy, micro/macro F1 and per-label scores for 0/1 matrices of shape (examples, labels).

    Scores come from ``torchmetrics.functional.classification.multilabel_*``. Unlike its multiclass macro
    average, the multilabel one keeps labels that never occur: each counts as F1 = 0.
    """
    p, y = _zeros_and_ones(pred_matrix, "pred_matrix", ndim=2), _zeros_and_ones(label_matrix, "label_matrix", ndim=2)
    if p.shape != y.shape:
        raise LmlabError(f"label_matrix: expected shape {p.shape} to match pred_matrix, got {y.shape}")
    num_labels = p.shape[1]
    if num_labels < 2:
        raise LmlabError(f"pred_matrix: expected at least 2 label columns, got {num_labels}")
    if label_names is not None and len(label_names) != num_labels:
        raise LmlabError(f"label_names: expected {num_labels} names (one per column), got {len(label_names)}")
    names = [str(name) for name in label_names] if label_names is not None else [str(i) for i in range(num_labels)]
    pt, yt = torch.from_numpy(p), torch.from_numpy(y)

    scores = (("precision", multilabel_precision), ("recall", multilabel_recall), ("f1", multilabel_f1_score))
    per_label = {key: _f32(fn(pt, yt, num_labels=num_labels, average="none")) for key, fn in scores}
    support = y.sum(axis=0)
    return {
        "num_examples": len(y),
        "subset_accuracy": _f32(multilabel_exact_match(pt, yt, num_labels=num_labels)),
        "f1_micro": _f32(multilabel_f1_score(pt, yt, num_labels=num_labels, average="micro")),
        "f1_macro": _f32(multilabel_f1_score(pt, yt, num_labels=num_labels, average="macro")),
        "per_label": {
            name: {key: per_label[key][i] for key, _ in scores} | {"support": int(support[i])}
            for i, name in enumerate(names)
        },
        "labels": names,
    }


def regression_metrics(preds: Any, targets: Any) -> dict:
    """MSE, MAE, Pearson and Spearman correlation (torchmetrics).

    A correlation is NaN when one side is constant. torchmetrics adds 1e-6 to Spearman's denominator, so a
    perfect rank agreement on a handful of examples reads 0.999999 rather than 1.
    """
    p, y = _numbers(preds, "preds", min_size=2), _numbers(targets, "targets", min_size=2)
    _check_same_length("preds", len(p), "targets", len(y))
    pt, yt = torch.from_numpy(p), torch.from_numpy(y)
    return {
        "num_examples": len(y),
        "mse": float(mean_squared_error(pt, yt)),
        "mae": float(mean_absolute_error(pt, yt)),
        "pearson": float(pearson_corrcoef(pt, yt)),
        "spearman": float(spearman_corrcoef(pt, yt)),
    }


# ---------------------------------------------------------------------------------------------------------
# Sequence labelling (seqeval)

# Tag prefixes each scheme allows, and the seqeval class that reads it in strict mode.
_SCHEMES = {"BIO": ("BI", "IOB2"), "IOBES": ("BIES", "IOBES")}


def tagging_metrics(pred_tags: Any, gold_tags: Any, *, scheme: str = "BIO", strict: bool | None = None) -> dict:
    """Entity-level micro precision/recall/F1 and per-type scores (seqeval), plus token accuracy.

    Each sentence is a list of tags such as ``"B-PER"``, ``"I-PER"``, ``"O"``. ``strict=None`` picks the
    scheme's usual rule: for ``"BIO"`` seqeval's default, conlleval-compatible mode, where an ``I-`` tag
    with no ``B-`` before it still opens an entity; for ``"IOBES"`` seqeval's strict mode (its default
    mode would accept ``B-X I-X`` as ending without ``E-X``). ``strict=True`` counts an entity only when
    its tags follow the scheme exactly (seqeval ``mode="strict"`` with ``IOB2`` or ``IOBES``).
    ``token_accuracy`` is the fraction of tokens whose tag is right, ``O`` included.
    """
    from seqeval.metrics import accuracy_score, classification_report

    pred, gold, scheme_class, strict = _check_tags(pred_tags, gold_tags, scheme, strict)
    mode = {"mode": "strict", "scheme": scheme_class} if strict else {}
    report = classification_report(gold, pred, output_dict=True, zero_division=0, **mode)
    micro = report["micro avg"]
    return {
        "num_sentences": len(gold),
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "token_accuracy": float(accuracy_score(gold, pred)),
        "per_type": {
            entity_type: {
                "precision": float(row["precision"]),
                "recall": float(row["recall"]),
                "f1": float(row["f1-score"]),
                "support": int(row["support"]),
            }
            for entity_type, row in report.items()
            if not entity_type.endswith(" avg")
        },
        "scheme": scheme,
        "mode": "strict" if strict else "conlleval",
    }


def _check_tags(pred_tags: Any, gold_tags: Any, scheme: str, strict: bool | None) -> tuple[list, list, type, bool]:
    """Validated tag lists (as lists of lists, which seqeval needs), the seqeval scheme class and the mode."""
    from seqeval import scheme as seqeval_schemes

    if scheme not in _SCHEMES:
        raise LmlabError(f"scheme: expected one of {sorted(_SCHEMES)}, got {scheme!r}")
    prefixes, class_name = _SCHEMES[scheme]
    if strict is None:
        strict = scheme == "IOBES"
    sentences = {}
    for name, tags in (("pred_tags", pred_tags), ("gold_tags", gold_tags)):
        if isinstance(tags, str) or not isinstance(tags, Sequence) or len(tags) == 0:
            raise LmlabError(f"{name}: expected a non-empty list of sentences, each a list of tags")
        sentences[name] = [list(sentence) if not isinstance(sentence, str) else None for sentence in tags]
    pred, gold = sentences["pred_tags"], sentences["gold_tags"]
    _check_same_length("gold_tags", len(gold), "pred_tags", len(pred))
    for i, (p, g) in enumerate(zip(pred, gold)):
        if p is None or g is None:
            raise LmlabError(f"{'pred_tags' if p is None else 'gold_tags'}[{i}]: expected a list of tags, got a string")
        if len(p) != len(g):
            raise LmlabError(f"pred_tags[{i}]: expected {len(g)} tags to match gold_tags[{i}], got {len(p)}")
        for name, sentence in (("pred_tags", p), ("gold_tags", g)):
            for j, tag in enumerate(sentence):
                if tag != "O" and not (isinstance(tag, str) and len(tag) > 2 and tag[0] in prefixes and tag[1] == "-"):
                    raise LmlabError(
                        f"{name}[{i}][{j}]: expected 'O' or a {scheme} tag like '{prefixes[0]}-PER', got {tag!r}"
                    )
    if sum(len(g) for g in gold) == 0:
        raise LmlabError("gold_tags: expected at least one token, got only empty sentences")
    return pred, gold, getattr(seqeval_schemes, class_name), strict


def _entity_counts(pred: list, gold: list, scheme_class: type, strict: bool) -> np.ndarray:
    """Per sentence (correct, predicted, gold) entity counts: sums of rows give seqeval's micro scores."""
    if strict:
        from seqeval.scheme import Entities

        pred_entities = [set(s) for s in Entities(pred, scheme_class).entities]
        gold_entities = [set(s) for s in Entities(gold, scheme_class).entities]
    else:
        from seqeval.metrics.sequence_labeling import get_entities

        pred_entities = [set(get_entities(s)) for s in pred]
        gold_entities = [set(get_entities(s)) for s in gold]
    return np.array([(len(p & g), len(p), len(g)) for p, g in zip(pred_entities, gold_entities)], dtype=np.int64)


def _entity_f1(counts: np.ndarray) -> float:
    """Micro F1 = 2·correct / (predicted + gold), from summed :func:`_entity_counts` rows."""
    correct, predicted, gold = counts.sum(axis=0)
    return 2 * correct / (predicted + gold) if predicted + gold else 0.0


# ---------------------------------------------------------------------------------------------------------
# Extractive question answering (SQuAD v1.1 / v2.0)


def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """Exact match and token F1 (0–100) as the official SQuAD v2.0 script computes them.

    ``references[id]`` lists the gold answers; an empty list marks an unanswerable question, whose only
    correct prediction is ``""``. When any question is unanswerable, ``HasAns_*`` and ``NoAns_*`` report
    each group apart (the script's no-answer-probability threshold is not applied). On SQuAD v1.1 data
    the numbers equal the v1.1 script's (and torchmetrics') unless an answer normalises to nothing, such
    as "the". Tokens are split on whitespace, so for Chinese text F1 is close to exact match.
    """
    ids, has_answer, exact, f1 = _squad_scores(predictions, references)
    result = {"exact": float(100 * exact.mean()), "f1": float(100 * f1.mean()), "total": len(ids)}
    if not has_answer.all():
        for prefix, group in (("HasAns", has_answer), ("NoAns", ~has_answer)):
            if group.any():
                result |= {
                    f"{prefix}_exact": float(100 * exact[group].mean()),
                    f"{prefix}_f1": float(100 * f1[group].mean()),
                    f"{prefix}_total": int(group.sum()),
                }
    return result


def _squad_scores(predictions: dict, references: dict) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """Question ids, whether each has an answer, and its exact-match and F1 scores (0–1)."""
    for name, table in (("predictions", predictions), ("references", references)):
        if not isinstance(table, dict) or not table:
            raise LmlabError(f"{name}: expected a non-empty dict keyed by question id")
    missing = [qid for qid in references if qid not in predictions]
    extra = [qid for qid in predictions if qid not in references]
    if missing or extra:
        which, qid = ("lacks", missing[0]) if missing else ("has unknown", extra[0])
        count = len(missing or extra)
        raise LmlabError(f"predictions: expected the question ids of references, {which} {count} (e.g. {qid!r})")
    ids = list(references)
    has_answer, exact, f1 = [], [], []
    for qid in ids:
        prediction, answers = predictions[qid], references[qid]
        if not isinstance(prediction, str):
            kind = type(prediction).__name__
            raise LmlabError(f'predictions[{qid!r}]: expected a string ("" for no answer), got {kind}')
        is_list = isinstance(answers, Sequence) and not isinstance(answers, str)
        if not is_list or not all(isinstance(a, str) for a in answers):
            raise LmlabError(f"references[{qid!r}]: expected a list of answer strings ([] if unanswerable)")
        # As in the v2.0 script: answers that normalise to nothing are dropped; none left means "no answer".
        golds = [a for a in answers if _normalize_answer(a)] or [""]
        has_answer.append(bool(answers))
        exact.append(max(_normalize_answer(a) == _normalize_answer(prediction) for a in golds))
        f1.append(max(_squad_f1(a, prediction) for a in golds))
    return ids, np.array(has_answer), np.array(exact, dtype=np.float64), np.array(f1, dtype=np.float64)


_PUNCTUATION = frozenset(string.punctuation)


def _normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation and the articles a/an/the, collapse whitespace (SQuAD scripts)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _squad_f1(gold: str, prediction: str) -> float:
    """Bag-of-tokens F1 of the SQuAD v2.0 script; when either side is empty, 1 if both are, else 0."""
    gold_tokens, pred_tokens = _normalize_answer(gold).split(), _normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------------------
# Generation against references (sacrebleu, rouge_score)


def seq2seq_metrics(
    hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *, tokenize: str = "13a"
) -> dict:
    """Corpus BLEU and chrF (sacrebleu, 0–100, with their signatures) and mean ROUGE-1/2/L F1 (0–1).

    ``references[i]`` is one reference string or a list of them (the count may vary per example).
    ``tokenize`` is sacrebleu's BLEU tokenizer (``"13a"``; ``"zh"`` for Chinese). ROUGE uses rouge_score
    with the Porter stemmer and takes the best reference per example; its tokenizer keeps only ASCII
    letters and digits, so it scores 0 on Chinese or other non-Latin text (use chrF there).
    """
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    hyps, streams, ref_lists = _check_seq2seq(hypotheses, references)
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    result: dict[str, Any] = {
        "num_examples": len(hyps),
        "bleu": bleu.corpus_score(hyps, streams).score,
        "chrf": chrf.corpus_score(hyps, streams).score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score_multi(refs, hyp) for hyp, refs in zip(hyps, ref_lists)]
    for key in ("rouge1", "rouge2", "rougeL"):
        result[key] = float(np.mean([s[key].fmeasure for s in scores]))
    return result


def _check_seq2seq(hypotheses: Any, references: Any) -> tuple[list[str], list[list[str | None]], list[list[str]]]:
    """Hypotheses, sacrebleu's reference streams (padded with None) and each example's list of references."""
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence) or len(hypotheses) == 0:
        raise LmlabError("hypotheses: expected a non-empty list of strings")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise LmlabError("references: expected a list with one reference (or a list of references) per hypothesis")
    _check_same_length("hypotheses", len(hypotheses), "references", len(references))
    for i, hyp in enumerate(hypotheses):
        if not isinstance(hyp, str):
            raise LmlabError(f"hypotheses[{i}]: expected a string, got {type(hyp).__name__}")
    ref_lists = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, Sequence) or not refs or not all(isinstance(r, str) for r in refs):
            raise LmlabError(f"references[{i}]: expected a reference string or a non-empty list of them")
        ref_lists.append(list(refs))
    width = max(len(refs) for refs in ref_lists)
    streams = [[refs[k] if k < len(refs) else None for refs in ref_lists] for k in range(width)]
    return list(hypotheses), streams, ref_lists


# ---------------------------------------------------------------------------------------------------------
# Language modelling


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(total_nll / num_tokens): ``total_nll`` is the summed negative log-likelihood in nats."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens <= 0:
        raise LmlabError(f"num_tokens: expected a positive integer, got {num_tokens!r}")
    if not isinstance(total_nll, (int, float, np.number)) or not math.isfinite(total_nll) or total_nll < 0:
        raise LmlabError(f"total_nll: expected a finite, non-negative number of nats, got {total_nll!r}")
    try:
        return math.exp(total_nll / num_tokens)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------------------------------------
# Confidence intervals


# Percentile intervals need ~1000 resamples (Efron & Tibshirani, 1993); their Monte Carlo error falls as
# 1/√B, so past 1e5 more resamples only cost time (each reruns the metric): a larger count is a typo.
MAX_RESAMPLES = 100_000


def check_n_resamples(n_resamples: Any, name: str = "n_resamples") -> None:
    """A one-line error unless ``n_resamples`` is an integer in [1, :data:`MAX_RESAMPLES`]."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or not 1 <= n_resamples <= MAX_RESAMPLES:
        raise LmlabError(
            f"{name}: expected a positive integer up to {MAX_RESAMPLES:,} (1000 suits a 95% interval), got "
            f"{n_resamples!r}",
            params=name,
        )


def bootstrap_ci(
    metric_fn: Callable[..., float], *columns: Any, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Percentile-bootstrap confidence interval of ``metric_fn(*columns)``.

    ``columns`` are per-example sequences (lists, numpy arrays or tensors) of equal length. Each resample
    draws example indices with replacement from ``numpy.random.default_rng(seed)`` and applies the same
    indices to every column, so paired columns stay paired. ``low`` and ``high`` are the (1 ∓ confidence)/2
    percentiles of the resampled values; ``value`` is the metric on the full data.
    """
    if not columns:
        raise LmlabError("columns: expected at least one per-example sequence to resample")
    n = len(columns[0])
    if n == 0:
        raise LmlabError("columns[0]: expected at least one example, got none")
    for i, column in enumerate(columns[1:], start=1):
        _check_same_length("columns[0]", n, f"columns[{i}]", len(column))
    check_n_resamples(n_resamples)
    if not 0 < confidence < 1:
        raise LmlabError(f"confidence: expected a number strictly between 0 and 1, got {confidence!r}")

    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for r in range(n_resamples):
        indices = rng.integers(0, n, size=n)
        values[r] = metric_fn(*(_take(column, indices) for column in columns))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return {
        "value": float(metric_fn(*columns)),
        "low": float(low),
        "high": float(high),
        "n_resamples": n_resamples,
        "confidence": confidence,
    }


def _take(column: Any, indices: np.ndarray) -> Any:
    if isinstance(column, np.ndarray):
        return column[indices]
    if isinstance(column, torch.Tensor):
        return column[torch.from_numpy(indices)]
    return [column[i] for i in indices]


# The numbers :func:`with_cis` puts an interval on, per task.
HEADLINES = {"classify": ("accuracy", "f1_macro"), "tag": ("f1",), "qa": ("exact", "f1"), "seq2seq": ("bleu", "chrf")}


def with_cis(
    task: str, *inputs: Any, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0, **options: Any
) -> dict:
    """The task's metrics on ``inputs``, plus ``result["ci"][name]`` (a :func:`bootstrap_ci` dict) per headline.

    ``task`` is one of :data:`HEADLINES`; ``inputs`` and ``options`` are those of the task's function
    (``classify``: :func:`classification_metrics`, ``tag``: :func:`tagging_metrics`, ``qa``:
    :func:`squad_metrics`, ``seq2seq``: :func:`seq2seq_metrics`). Examples (sentences, questions) are
    resampled; every headline uses the same resamples. To stay fast, tagging and seq2seq resample
    per-example statistics (entity counts; sacrebleu's n-gram counts, as sacrebleu's own bootstrap does)
    rather than rerunning the library: 1000 resamples of a few hundred sentences add under a second.
    """
    if task not in _CI_PLANS:
        raise LmlabError(f"task: expected one of {sorted(_CI_PLANS)}, got {task!r}")
    result, plan = _CI_PLANS[task](*inputs, **options)
    result["ci"] = {
        name: bootstrap_ci(fn, *columns, n_resamples=n_resamples, confidence=confidence, seed=seed)
        for name, (fn, columns) in plan.items()
    }
    return result


def _classify_plan(preds: Any, labels: Any, **options: Any) -> tuple[dict, dict]:
    result = classification_metrics(preds, labels, **options)
    k = len(result["labels"])
    p, y = torch.from_numpy(_class_ids(preds, "preds")), torch.from_numpy(_class_ids(labels, "labels"))

    def accuracy(p: torch.Tensor, y: torch.Tensor) -> float:
        return _f32(multiclass_accuracy(p, y, num_classes=k, average="micro", validate_args=False))

    def f1_macro(p: torch.Tensor, y: torch.Tensor) -> float:
        return _f32(multiclass_f1_score(p, y, num_classes=k, average="macro", validate_args=False))

    return result, {"accuracy": (accuracy, (p, y)), "f1_macro": (f1_macro, (p, y))}


def _tag_plan(pred_tags: Any, gold_tags: Any, *, scheme: str = "BIO", strict: bool | None = None) -> tuple[dict, dict]:
    result = tagging_metrics(pred_tags, gold_tags, scheme=scheme, strict=strict)
    pred, gold, scheme_class, strict = _check_tags(pred_tags, gold_tags, scheme, strict)
    return result, {"f1": (_entity_f1, (_entity_counts(pred, gold, scheme_class, strict),))}


def _qa_plan(predictions: dict, references: dict) -> tuple[dict, dict]:
    result = squad_metrics(predictions, references)
    _, _, exact, f1 = _squad_scores(predictions, references)

    def mean_percent(scores: np.ndarray) -> float:
        return float(100 * scores.mean())

    return result, {"exact": (mean_percent, (exact,)), "f1": (mean_percent, (f1,))}


def _seq2seq_plan(hypotheses: Any, references: Any, *, tokenize: str = "13a") -> tuple[dict, dict]:
    from sacrebleu.metrics import BLEU, CHRF

    result = seq2seq_metrics(hypotheses, references, tokenize=tokenize)
    hyps, streams, _ = _check_seq2seq(hypotheses, references)
    plan = {}
    for name, metric in (("bleu", BLEU(tokenize=tokenize)), ("chrf", CHRF())):
        # sacrebleu's per-sentence sufficient statistics (n-gram matches and lengths); its own bootstrap
        # (sacrebleu.significance) sums resampled rows and scores them the same way, without re-tokenizing.
        stats = np.array(metric._extract_corpus_statistics(hyps, streams))
        plan[name] = (_corpus_score_from_stats(metric), (stats,))
    return result, plan


def _corpus_score_from_stats(metric: Any) -> Callable[[np.ndarray], float]:
    def score(stats: np.ndarray) -> float:
        return metric._compute_score_from_stats(stats.sum(axis=0)).score

    return score


_CI_PLANS = {"classify": _classify_plan, "tag": _tag_plan, "qa": _qa_plan, "seq2seq": _seq2seq_plan}


# ---------------------------------------------------------------------------------------------------------
# Calibration


def calibration(confidences: Any, correct: Any, *, n_bins: int = 10, strategy: str = "quantile") -> dict:
    """Expected and maximum calibration error, and per-bin numbers for a reliability diagram.

    ``confidences`` are the probabilities a model gave its predictions; ``correct`` says (0/1) whether each
    was right. ``strategy="quantile"`` sorts by confidence into ``n_bins`` bins of equal size (ties may
    straddle a boundary); ``"uniform"`` uses equal-width bins [i/n, (i+1)/n), the last one closed.
    ECE = Σ_b (n_b / N)·|accuracy_b − confidence_b| (Guo et al., 2017); MCE is the largest gap over
    non-empty bins. ``bins`` lists the non-empty bins with their bounds (the confidence range for quantile
    bins), mean confidence, accuracy and count. Uniform ECE equals torchmetrics' ``binary_calibration_error``
    except for confidences of exactly 1.0, which torchmetrics puts in an extra bin of their own.
    """
    conf = _numbers(confidences, "confidences")
    hit = _zeros_and_ones(correct, "correct", ndim=1).astype(np.float64)
    _check_same_length("confidences", len(conf), "correct", len(hit))
    if conf.min() < 0 or conf.max() > 1:
        raise LmlabError("confidences: expected probabilities in [0, 1]")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise LmlabError(f"n_bins: expected a positive integer, got {n_bins!r}")

    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        bin_of = np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)
        groups = [np.flatnonzero(bin_of == b) for b in range(n_bins)]
        bounds = [(edges[b], edges[b + 1]) for b in range(n_bins)]
    elif strategy == "quantile":
        groups = np.array_split(np.argsort(conf, kind="stable"), n_bins)
        bounds = [(conf[g].min(), conf[g].max()) if len(g) else (None, None) for g in groups]
    else:
        raise LmlabError(f"strategy: expected 'quantile' or 'uniform', got {strategy!r}")

    bins = [
        {
            "lower": float(lower),
            "upper": float(upper),
            "confidence": float(conf[g].mean()),
            "accuracy": float(hit[g].mean()),
            "count": len(g),
        }
        for g, (lower, upper) in zip(groups, bounds)
        if len(g)
    ]
    gaps = np.array([abs(b["accuracy"] - b["confidence"]) for b in bins])
    weights = np.array([b["count"] for b in bins]) / len(conf)
    return {
        "ece": float(weights @ gaps),
        "mce": float(gaps.max()),
        "strategy": strategy,
        "n_bins": n_bins,
        "num_examples": len(conf),
        "bins": bins,
    }


def reliability_diagram(calib: dict, path: str | Path) -> Path:
    """Write a reliability diagram (accuracy against confidence per bin) of a :func:`calibration` result as PNG.

    The figure is drawn on matplotlib's Agg canvas (no screen, no pyplot state) and written atomically: to a
    temporary file in the same folder, then moved into place.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(calib, dict) or not calib.get("bins"):
        raise LmlabError("calib: expected the dict returned by calibration(), with a non-empty 'bins' list")
    bins = calib["bins"]
    fig = Figure(figsize=(5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.bar(
        [b["lower"] for b in bins],
        [b["accuracy"] for b in bins],
        width=[max(b["upper"] - b["lower"], 0.005) for b in bins],
        align="edge",
        color="#1f77b4",
        alpha=0.6,
        edgecolor="#1f77b4",
        label="accuracy per bin",
    )
    ax.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        "o",
        color="#d62728",
        markersize=4,
        label="(mean confidence, accuracy)",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability ({calib.get('strategy', '?')} bins): ECE {calib.get('ece', float('nan')):.3f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
