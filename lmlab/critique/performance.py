"""The performance lens: how well the model does its job, how sure it is when right and wrong, and for whom.

- **Task metrics** — :func:`lmlab.evaluate.runner.evaluate_model` on the user's labelled test file
  (``--data``): the headline metrics with bootstrap 95% confidence intervals (examples resampled).
- **Calibration** (single-label classifiers) — expected calibration error over 10 equal-mass bins
  (Guo et al., 2017): the confidence-weighted gap between how sure the model is and how often it is
  right; a reliability diagram shows it bin by bin.
- **Perplexity** on held-out text (``--text``, decoders): exp of the mean next-token cross-entropy,
  set beside the vocabulary size (the perplexity of guessing uniformly).
- **Slices** — when the test file has a group column (``--group-field``, default ``group``): the
  metric per slice with a Wilson 95% interval, and the gap between the best and the worst slice.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lmlab.critique.core import (
    Figure,
    Finding,
    Section,
    Subject,
    Table,
    ci_bars,
    figure_png,
    group_stats,
    new_figure,
    skipped,
)

TITLE = "Performance"
METHOD = (
    "The model's task metrics on the labelled test file, with bootstrap 95% confidence intervals (examples resampled "
    "1000 times, so the interval says how much the number would move on another test set of this size). For "
    "single-label classifiers, calibration: examples sorted by confidence into 10 equal-size bins, and the expected "
    "calibration error (Guo et al., 2017), the size-weighted mean gap between confidence and accuracy. For decoders "
    "given held-out text, perplexity. When the test file has a group column, accuracy per group with Wilson 95% "
    "intervals and the gap between the best and worst group."
)
# calibration: ECE below 0.05 reads as well calibrated, above 0.15 as badly (common practice after Guo et al.)
ECE_GOOD, ECE_BAD = 0.05, 0.15
SLICE_GAP_WARN = 0.10  # a best-minus-worst slice accuracy gap above this is worth a look


def performance(subject: Subject, *, n_resamples: int = 1000, batch_size: int = 32, progress: bool = False) -> Section:
    """Task metrics with CIs, calibration, perplexity and per-slice metrics — whichever the given data allows."""
    from lmlab.evaluate.runner import evaluate_model

    section = Section(lens="performance", title=TITLE, method=METHOD)
    has_task_data = subject.data is not None and bool(subject.task)
    # a plain decoder's --data is text to score, as `lmlab evaluate --task lm` reads it
    text = subject.text or (subject.data if not subject.task and subject.arch == "decoder" else None)
    has_text = text is not None and subject.arch == "decoder"
    if not has_task_data and not has_text:
        return skipped(
            "performance",
            TITLE,
            "no data to score on: give --data FILE (a labelled test file of the checkpoint's task: classify, tag, qa "
            "or "
            "seq2seq) and, for a decoder, --text FILE (held-out text) for its perplexity",
        )
    if has_task_data:
        result, rows = evaluate_model(
            subject.model,
            subject.tokenizer,
            subject.data,
            task=subject.task,
            meta=subject.meta,
            batch_size=batch_size,
            n_resamples=n_resamples,
            fields=subject.task_fields,
        )
        _task_part(section, subject, result, rows)
    if has_text:
        result, _ = evaluate_model(
            subject.model, subject.tokenizer, text, task="lm", batch_size=batch_size, fields=subject.task_fields
        )
        _perplexity_part(section, subject, result)
    return section


def _task_part(section: Section, subject: Subject, result: dict[str, Any], rows: list[dict]) -> None:
    from lmlab.metrics import HEADLINES
    from lmlab.tasks import TASKS

    task = result["task"]
    fractions = TASKS[task].fraction_metrics
    headline = {k: result[k] for k in HEADLINES.get(task, ()) if k in result}
    section.metrics["task"] = task
    section.metrics["num_examples"] = len(rows)
    section.metrics.update(headline)
    section.metrics["ci"] = result.get("ci", {})
    section.explain.update(
        {
            "task": "What the labelled test file was scored as.",
            "num_examples": "Examples in the test file.",
            "accuracy": "Share of examples whose predicted label is the gold label.",
            "f1_macro": "F1 (harmonic mean of precision and recall) per class, averaged with every class counting "
            "equally.",
            "f1": "Entity-level F1 (seqeval) for tagging, or token-overlap F1 against the best gold answer (SQuAD) "
            "for QA.",
            "exact": "Share of questions (0–100) whose predicted answer equals a gold answer after SQuAD "
            "normalisation.",
            "bleu": "Corpus BLEU (sacrebleu, 0–100): n-gram precision of the outputs against the targets, with a "
            "brevity penalty.",
            "chrf": "chrF (sacrebleu, 0–100): character n-gram F-score; steadier than BLEU on short or few sentences.",
            "ci": "Bootstrap 95% confidence interval (examples resampled 1000 times): where the metric would likely "
            "fall on another test set like this one.",
        }
    )
    for k, (name, value) in enumerate(headline.items()):
        ci = result.get("ci", {}).get(name)
        scale = "" if name in fractions else " (0–100)"
        text = (
            f"{name} {value:.4g}{scale}"
            + (f", 95% CI {ci['low']:.4g}–{ci['high']:.4g}" if ci else "")
            + f" on {len(rows):,} examples."
        )
        section.findings.append(Finding("info", text))
        if k == 0 and ci and ci["high"] - ci["low"] > (0.1 if not scale else 10):  # said once, for the first headline
            section.findings.append(
                Finding(
                    "warn",
                    f"The {name} interval is wide ({ci['low']:.3g}–{ci['high']:.3g}): the test set is too small to "
                    "pin it down; more test examples narrow it.",
                )
            )
    if "confusion_matrix" in result:
        section.figures.append(_confusion_figure(result["confusion_matrix"], result["labels"]))
    if "calibration" in result:
        _calibration_part(section, result["calibration"])
    group_field = subject.fields.get("group_field", "group")
    if "confidence" in (rows[0] if rows else {}):  # a single-label classifier's rows
        _slices_part(section, subject, rows, group_field)


def _calibration_part(section: Section, calib: dict[str, Any]) -> None:
    from lmlab.metrics import reliability_diagram

    ece = calib["ece"]
    section.metrics["ece"] = ece
    section.explain["ece"] = (
        "Expected calibration error: examples sorted by confidence into 10 equal-size bins; the mean over bins, "
        "weighted by "
        "size, of |accuracy − mean confidence|. 0 means the model is right exactly as often as it says."
    )
    if ece < ECE_GOOD:
        section.findings.append(
            Finding(
                "good",
                f"Well calibrated: ECE {ece:.3f} (< {ECE_GOOD}); its confidence can be read as a probability of being "
                "right.",
            )
        )
    elif ece < ECE_BAD:
        section.findings.append(
            Finding(
                "warn",
                f"Somewhat miscalibrated: ECE {ece:.3f} (between {ECE_GOOD} and {ECE_BAD}); see the reliability "
                "diagram for which way.",
            )
        )
    else:
        section.findings.append(
            Finding(
                "bad",
                f"Badly calibrated: ECE {ece:.3f} (≥ {ECE_BAD}); do not read its confidence as a probability "
                "(temperature scaling on held-out data fixes much of this).",
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        png = reliability_diagram(calib, Path(tmp) / "reliability.png").read_bytes()
    section.figures.append(
        Figure(
            "Reliability diagram",
            png,
            "Each bar is one bin of examples with similar confidence: its height is how often the model was right "
            "there. "
            "Bars under the diagonal mean over-confidence, above it under-confidence.",
        )
    )


def _slices_part(section: Section, subject: Subject, rows: list[dict], group_field: str) -> None:
    from lmlab.data.tasks import read_classify, read_records

    options = {k: v for k, v in subject.fields.items() if k in ("text_field", "pair_field", "label_field")}
    data = read_classify(subject.data, **options)
    records = dict(read_records(subject.data))
    groups = [records[line].get(group_field) for line in data.lines]
    if all(g is None or g == "" for g in groups):
        section.metrics["slices"] = None
        section.explain["slices"] = (
            f"No per-slice metrics: the test file has no '{group_field}' column (name it with --group-field)."
        )
        return
    stats = group_stats(groups, [row["label"] == row["prediction"] for row in rows])
    slices = stats["by_group"]
    section.metrics["slices"] = slices
    section.explain["slices"] = (
        f"Accuracy within each value of the '{group_field}' column, with a Wilson 95% interval and the slice's size."
    )
    if len(slices) < 2:
        return
    best, worst, gap, separated = stats["best"], stats["worst"], stats["gap"], stats["separated"]
    section.metrics["slice_gap"] = gap
    section.explain["slice_gap"] = "Accuracy of the best slice minus that of the worst."
    if gap > SLICE_GAP_WARN:
        level = "bad" if separated else "warn"
        how = "their intervals do not overlap" if separated else "their intervals overlap, so more data would tell"
        section.findings.append(
            Finding(
                level,
                f"Accuracy differs by slice: {best} {slices[best]['accuracy']:.3f} vs {worst} "
                f"{slices[worst]['accuracy']:.3f} (gap {gap:.3f} > {SLICE_GAP_WARN}); {how}.",
            )
        )
    else:
        section.findings.append(
            Finding(
                "good", f"Accuracy is even across the {len(slices)} slices (largest gap {gap:.3f} ≤ {SLICE_GAP_WARN})."
            )
        )
    section.tables.append(
        Table(
            f"Accuracy per '{group_field}'",
            ["slice", "examples", "accuracy", "95% CI low", "95% CI high"],
            [[g, v["n"], v["accuracy"], v["ci_low"], v["ci_high"]] for g, v in slices.items()],
        )
    )
    names = list(slices)
    section.figures.append(
        ci_bars(
            "Accuracy per slice",
            names,
            [slices[g]["accuracy"] for g in names],
            [slices[g]["ci_low"] for g in names],
            [slices[g]["ci_high"] for g in names],
            "accuracy (95% CI)",
            lines=[],
            percent=False,
            caption=(
                "One bar per slice; the whiskers are Wilson 95% intervals. Bars whose whiskers do not overlap differ "
                "beyond chance."
            ),
        )
    )


def _perplexity_part(section: Section, subject: Subject, result: dict[str, Any]) -> None:
    ppl, vocab = result["perplexity"], subject.config.vocab_size
    section.metrics.update(perplexity=ppl, nll_per_token=result["nll_per_token"], text_tokens=result["tokens"])
    section.explain.update(
        {
            "perplexity": (
                "exp(mean next-token cross-entropy) on the held-out text: the model is as unsure as a uniform choice "
                f"among this many tokens (guessing uniformly over the vocabulary gives {vocab:,})."
            ),
            "nll_per_token": "Mean negative log-likelihood per token, in nats (the log of the perplexity).",
            "text_tokens": "Tokens of held-out text scored.",
        }
    )
    if ppl >= vocab / 2:
        section.findings.append(
            Finding(
                "bad",
                f"Perplexity {ppl:.1f} on held-out text is near that of uniform guessing ({vocab:,}): the model has "
                "learnt little of this text.",
            )
        )
    else:
        section.findings.append(
            Finding(
                "info", f"Perplexity {ppl:.2f} on {result['tokens']:,} held-out tokens (uniform guessing: {vocab:,})."
            )
        )


def _confusion_figure(matrix: list[list[int]], labels: list[str]) -> Figure:
    import numpy as np

    m = np.asarray(matrix)
    size = min(9.0, 2.5 + 0.5 * len(labels))
    fig, ax = new_figure(size, size * 0.8)
    ax.imshow(m, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for (i, j), count in np.ndenumerate(m):
        ax.text(
            j, i, str(count), ha="center", va="center", color="white" if count > m.max() / 2 else "black", fontsize=9
        )
    return Figure(
        "Confusion matrix",
        figure_png(fig),
        "Rows are gold labels, columns predictions; the diagonal holds the correct ones.",
    )
