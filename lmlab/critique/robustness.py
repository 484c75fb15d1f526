"""The robustness lens: does the model keep its answer when the input changes in ways that should not matter?

CheckList's invariance tests (Ribeiro et al., 2020) as HELM measures robustness (Liang et al., 2022):
each test input is edited by a meaning-preserving perturbation (:mod:`lmlab.critique.perturb`:
typos, case, punctuation, contractions, extra whitespace, person names), seeded per example.

- **A classifier** with a test file: per perturbation, the share of the inputs it altered whose
  predicted label changes (Wilson 95% CI), the accuracy with the perturbed inputs, and HELM's
  worst-case accuracy: an example counts as right only if it is right on the original and under
  every perturbation.
- **A decoder** with held-out text (``--text``; ``--data`` for a model without a task): how much less
  likely it finds the perturbed text — the change in summed log-likelihood per word of the original,
  so a perturbation that splits words into more tokens pays for them, and the ratio of word-level
  perplexities (lm-evaluation-harness's ``word_perplexity``).
- **A sequence-to-sequence model** with a test file: the same, for the reference target given the
  original or the perturbed source.
- Taggers and extractive QA are not measured: the perturbations move the words and character
  offsets their gold labels point to.
"""

from __future__ import annotations

import math
from typing import Sequence

from tqdm import tqdm

from lmlab.critique.core import Finding, Section, Subject, Table, ci_bars, proportion_ci, skipped, subsample
from lmlab.critique.perturb import (
    PERTURBATIONS,
    class_probabilities,
    clip,
    decisions,
    gold,
    label_text,
    perturbation_rng,
    read_classifier_data,
    take,
)
from lmlab.errors import LmlabError
from lmlab.tasks import TASKS, head_task

TITLE = "Robustness"
CHANGE_BAD, CHANGE_WARN = 0.10, 0.03  # a classifier's prediction change rate above these is 'bad' / 'warn'
DROP_BAD, DROP_WARN = 0.10, 0.03  # worst-case accuracy this far below clean accuracy is 'bad' / 'warn'
RATIO_GOOD, RATIO_WARN = 1.1, 2.0  # word-perplexity ratio (perturbed / original) at most / above these: 'good' / 'warn'
SHOWN = 8  # changed predictions shown in the table


def edit(name: str, text: str, pair: str | None, seed: int, index: int) -> tuple[str, str | None]:
    """Perturbation ``name`` of example ``index`` (its text and, for text pairs, its second text)."""
    rng = perturbation_rng(name, seed, index)
    fn = PERTURBATIONS[name]
    return fn(text, rng), (fn(pair, rng) if pair is not None else None)


def _check(perturbations: Sequence[str] | None) -> list[str]:
    names = list(PERTURBATIONS) if perturbations is None else list(perturbations)
    for name in names:
        if name not in PERTURBATIONS:
            raise LmlabError(f"perturbation {name!r}: expected some of {', '.join(PERTURBATIONS)}")
    if not names:
        raise LmlabError(f"perturbations: none given; expected some of {', '.join(PERTURBATIONS)}")
    return names


# -- classifiers -------------------------------------------------------------------------------------------


def _classifier(subject: Subject, names: list[str], progress: bool) -> Section:
    full = read_classifier_data(subject)
    rows = subsample(full.texts, subject.max_examples, subject.seed)
    data = take(full, rows)
    n = len(rows)
    probs = class_probabilities(subject, data, progress=progress, desc="robustness: originals")
    preds, answers = decisions(probs, data.kind), gold(data)
    right = [p == g for p, g in zip(preds, answers)]
    always_right = list(right)
    per: dict[str, dict] = {}
    shown: list[list] = []
    for name in tqdm(names, desc="robustness", disable=not progress, leave=False):
        new, altered = _perturbed_predictions(subject, data, rows, name, preds)
        changed = [k for k in altered if new[k] != preds[k]]
        for k in range(n):
            always_right[k] = always_right[k] and new[k] == answers[k]
        accuracy = sum(p == g for p, g in zip(new, answers)) / n
        low, high = proportion_ci(len(changed), len(altered))
        per[name] = {
            "altered": len(altered),
            "changed": len(changed),
            "change_rate": len(changed) / len(altered) if altered else None,
            "ci_low": low if altered else None,
            "ci_high": high if altered else None,
            "accuracy": accuracy,
            "accuracy_drop": sum(right) / n - accuracy,
        }
        shown += [
            [
                name,
                clip(data.texts[k]),
                clip(_edited(subject, data, rows, name, k)[0]),
                f"{label_text(preds[k], data.kind, data.label_names)} → "
                f"{label_text(new[k], data.kind, data.label_names)}",
            ]
            for k in changed[:2]
        ]
    metric = "subset accuracy" if data.kind == "multi" else "accuracy"
    section = _classifier_section(names, n, metric, per, sum(right) / n, sum(always_right))
    if shown:
        section.tables.append(
            Table(
                "Predictions that changed",
                ["perturbation", "original input", "perturbed input", "prediction"],
                shown[:SHOWN],
                "A few test inputs whose predicted label changed under a perturbation (at most two per perturbation).",
            )
        )
    return section


def _edited(subject: Subject, data, rows: list[int], name: str, k: int) -> tuple[str, str | None]:
    """Example ``k`` (text and pair) under perturbation ``name``, seeded by its row in the file."""
    return edit(name, data.texts[k], data.pairs[k] if data.pairs is not None else None, subject.seed, rows[k])


def _perturbed_predictions(subject: Subject, data, rows: list[int], name: str, preds: list) -> tuple[list, list[int]]:
    """The predictions under perturbation ``name`` (unaltered examples keep theirs), and which examples it altered."""
    edits = [_edited(subject, data, rows, name, k) for k in range(len(rows))]
    altered = [k for k, (t, p) in enumerate(edits) if t != data.texts[k] or (p is not None and p != data.pairs[k])]
    new = list(preds)
    if altered:
        sub = take(
            data,
            altered,
            texts=[edits[k][0] for k in altered],
            pairs=None if data.pairs is None else [edits[k][1] for k in altered],
        )
        for k, p in zip(altered, decisions(class_probabilities(subject, sub), data.kind)):
            new[k] = p
    return new, altered


def _classifier_section(
    names: list[str], n: int, metric: str, per: dict[str, dict], clean: float, n_always: int
) -> Section:
    """The classifier's section: method, metrics and their explanations, findings and figures."""
    worst = n_always / n
    w_low, w_high = proportion_ci(n_always, n)
    section = Section(
        lens="robustness",
        title=TITLE,
        method=(
            "CheckList-style invariance tests (Ribeiro et al., 2020) measured as HELM measures robustness (Liang et "
            "al., "
            "2022): "
            f"{n} test examples (a seeded sample when the file is larger) were edited by each perturbation — "
            f"{', '.join(names)} — and classified again. An edit should not change the answer. Reported per "
            "perturbation: "
            "the share "
            "of the inputs it altered whose predicted label changed (Wilson 95% interval; 'bad' above "
            f"{CHANGE_BAD:.0%}, "
            "'warn' above "
            f"{CHANGE_WARN:.0%}) and the accuracy with the perturbed inputs; and the worst-case accuracy, where an "
            "example "
            "counts as "
            f"right only if the model is right on it and on every perturbed version ('bad' more than {DROP_BAD:.0%} "
            "below "
            "the clean "
            f"accuracy, 'warn' more than {DROP_WARN:.0%})."
        ),
    )
    section.metrics = {
        "n": n,
        "clean_accuracy": clean,
        "worst_case_accuracy": worst,
        "worst_case_ci_low": w_low,
        "worst_case_ci_high": w_high,
        "perturbations": per,
    }
    section.explain = {
        "n": "Test examples read (a seeded sample when the file holds more than --max-examples).",
        "clean_accuracy": f"The {metric} on the unedited examples.",
        "worst_case_accuracy": f"HELM's robustness {metric}: an example counts as right only if it is right unedited "
        "and under every perturbation.",
        "worst_case_ci_low": "Lower end of the Wilson 95% interval of the worst-case accuracy.",
        "worst_case_ci_high": "Upper end of the Wilson 95% interval of the worst-case accuracy.",
        "perturbations": "Per perturbation: examples it altered, predictions that changed, their share with a Wilson "
        "95% interval, and the accuracy with the perturbed inputs.",
    }
    for name, r in per.items():
        _explain_classifier_perturbation(section, name, r, metric)
        section.findings.append(_change_finding(name, r, n))
    drop = clean - worst
    said = (
        f"Worst-case {metric} {worst:.3f} (95% CI {w_low:.3f}–{w_high:.3f}) against {clean:.3f} on clean inputs, "
        f"{drop:.3f} lower"
    )
    level = "bad" if drop > DROP_BAD else "warn" if drop > DROP_WARN else "good"
    section.findings.append(
        Finding(
            level,
            said
            + {"bad": f" (more than {DROP_BAD:.0%}).", "warn": f" (more than {DROP_WARN:.0%}).", "good": "."}[level],
        )
    )
    _classifier_figures(section, names, per, n, metric, clean, worst)
    return section


def _explain_classifier_perturbation(section: Section, name: str, r: dict, metric: str) -> None:
    section.explain[f"perturbations.{name}.change_rate"] = (
        f"Share of the {r['altered']} examples the {name} perturbation altered whose predicted label changed (0 = "
        "fully invariant)."
    )
    section.explain[f"perturbations.{name}.accuracy"] = (
        f"The {metric} when the {name} perturbation is applied (examples it does not alter keep their prediction)."
    )
    section.explain[f"perturbations.{name}.accuracy_drop"] = f"Clean {metric} minus the {metric} under {name}."
    section.explain.update(
        {
            f"perturbations.{name}.altered": f"Test examples the {name} perturbation changed (it left the others as "
            "they "
            "were).",
            f"perturbations.{name}.changed": f"Altered examples whose predicted label changed under {name}.",
            f"perturbations.{name}.ci_low": f"Lower end of the Wilson 95% interval of the {name} change rate.",
            f"perturbations.{name}.ci_high": f"Upper end of the Wilson 95% interval of the {name} change rate.",
        }
    )


def _change_finding(name: str, r: dict, n: int) -> Finding:
    """Whether perturbation ``name`` changes too many predictions of the inputs it altered."""
    if not r["altered"]:
        return Finding(
            "info", f"{name}: the perturbation altered none of the {n} test examples, so it was not measured."
        )
    said = (
        f"{name}: {r['changed']} of {r['altered']} altered inputs change their prediction ({r['change_rate']:.1%}, "
        f"95% CI {r['ci_low']:.1%}–{r['ci_high']:.1%})"
    )
    if r["change_rate"] > CHANGE_BAD:
        return Finding("bad", f"{said}, above {CHANGE_BAD:.0%}: the model is not invariant to this edit.")
    if r["change_rate"] > CHANGE_WARN:
        return Finding("warn", f"{said}, above {CHANGE_WARN:.0%}.")
    return Finding("good", f"{said}, at most {CHANGE_WARN:.0%}.")


def _classifier_figures(
    section: Section, names: list[str], per: dict, n: int, metric: str, clean: float, worst: float
) -> None:
    measured = [m for m in names if per[m]["altered"]]
    if measured:
        section.figures.append(
            ci_bars(
                "Predictions that change under each perturbation",
                measured,
                [per[m]["change_rate"] for m in measured],
                [per[m]["ci_low"] for m in measured],
                [per[m]["ci_high"] for m in measured],
                "altered inputs whose prediction changes",
                lines=[(CHANGE_WARN, f"{CHANGE_WARN:.0%}"), (CHANGE_BAD, f"{CHANGE_BAD:.0%}")],
                high_bad=CHANGE_BAD,
                caption="Per perturbation, the share of the inputs it altered whose predicted label changed (whiskers: "
                "Wilson 95% intervals). "
                f"Above {CHANGE_WARN:.0%} is worth a look, above {CHANGE_BAD:.0%} a problem (red: clearly above).",
            )
        )
    bars = [("clean", clean)] + [(m, per[m]["accuracy"]) for m in measured] + [("worst case", worst)]
    cis = [proportion_ci(round(a * n), n) for _, a in bars]
    section.figures.append(
        ci_bars(
            f"{metric.capitalize()} under perturbation",
            [b[0] for b in bars],
            [b[1] for b in bars],
            [c[0] for c in cis],
            [c[1] for c in cis],
            metric,
            lines=[],
            caption=(
                f"The {metric} on clean inputs, under each perturbation, and in the worst case (right under every "
                "one); whiskers are Wilson 95% intervals."
            ),
        )
    )


# -- language models: how much less likely is perturbed text ------------------------------------------------


def _documents(subject: Subject, path) -> list[tuple[int, str]]:
    """(index, document) of held-out documents, each cut at a word boundary to at most half the
    context window (perturbed versions take more tokens and must still fit)."""
    from lmlab.data import read_corpus

    docs = read_corpus(path, text_field=subject.fields.get("text_field", "text"))
    budget = max(2, subject.config.block_size // 2)
    out = []
    for i in subsample(docs, subject.max_examples, subject.seed):
        doc = docs[i]
        encoding = subject.tokenizer.backend.encode(doc, add_special_tokens=False)
        if len(encoding.ids) > budget:
            end = encoding.offsets[budget - 1][1]
            cut = doc.rfind(" ", 0, end)
            doc = doc[: cut if cut > 0 else end]
        if doc.split():
            out.append((i, doc))
    return out


def _with_references(subject: Subject) -> bool:
    """Whether the subject's task examples carry reference outputs (seq2seq: the likelihood of the target)."""
    return getattr(TASKS.get(subject.task), "references", False)


def _likelihood(subject: Subject, names: list[str], progress: bool) -> Section:
    seq2seq = _with_references(subject)
    if seq2seq:
        examples = TASKS[subject.task].text_examples(subject.data, subject.task_fields)
        rows = subsample([e.text for e in examples], subject.max_examples, subject.seed)
        items = [(examples[i].text, examples[i].reference) for i in rows]
    else:
        docs = _documents(subject, subject.text or subject.data)
        rows, items = [i for i, _ in docs], [(doc, None) for _, doc in docs]
    base, words, deltas = _nll_changes(subject, names, rows, items, seq2seq, progress)
    if not base:
        what = "test example fits" if seq2seq else "document fits"
        raise LmlabError(f"robustness: no {what} the model's context window of {subject.config.block_size} tokens")
    per = {name: _delta_stats(deltas[name]) for name in names}
    what = "the reference target given the source" if seq2seq else "the held-out text"
    section = Section(lens="robustness", title=TITLE, method=_likelihood_method(names, len(base), what, seq2seq))
    section.metrics = {"n": len(base), "word_perplexity": math.exp(sum(base) / sum(words)), "perturbations": per}
    section.explain = {
        "n": f"{'Test examples' if seq2seq else 'Documents'} scored (a seeded sample when there are more than "
        "--max-examples).",
        "word_perplexity": f"exp(summed negative log-likelihood / words) of {what}, unperturbed.",
        "perturbations": "Per perturbation: examples it altered, the mean change in negative log-likelihood per word, "
        "the share that became less likely, and the word-perplexity ratio.",
    }
    for name, r in per.items():
        section.explain[f"perturbations.{name}.altered"] = (
            f"Examples the {name} perturbation changed and that still fit the context window."
        )
        if not r["altered"]:
            section.findings.append(
                Finding(
                    "info",
                    f"{name}: the perturbation altered none of the {len(base)} examples, so it was not measured.",
                )
            )
            continue
        _explain_likelihood_perturbation(section, name)
        section.findings.append(_ratio_finding(name, r))
    measured = [m for m in names if per[m]["altered"]]
    if measured:
        section.figures.append(
            ci_bars(
                "Extra surprise per word under each perturbation",
                measured,
                [per[m]["mean_delta_nll_per_word"] for m in measured],
                [per[m]["delta_ci_low"] for m in measured],
                [per[m]["delta_ci_high"] for m in measured],
                "Δ negative log-likelihood, nats per word (95% CI)",
                lines=[(0.0, "unaffected")],
                percent=False,
                limits=None,
                caption=(
                    "Per perturbation, the mean change in negative log-likelihood per original word (whiskers: "
                    "normal 95% intervals). 0 means the model finds perturbed text as likely as the original; larger "
                    "means it is thrown by the edit."
                ),
            )
        )
    return section


def _likelihood_method(names: list[str], n: int, what: str, seq2seq: bool) -> str:
    examples = "test examples" if seq2seq else "documents (cut to half the context window)"
    return (
        "CheckList-style invariance (Ribeiro et al., 2020) as in HELM's robustness (Liang et al., 2022), for a "
        f"language model: how much less likely it finds {what} when the {'source' if seq2seq else 'text'} is "
        f"perturbed ({', '.join(names)}; seeded per example). For each of {n} {examples}, the summed negative "
        f"log-likelihood of {'the target' if seq2seq else 'the text'} is divided by the number of words of the "
        "original, so a perturbation that splits words into more tokens pays for them; reported per perturbation: "
        "the mean change in nats per word (normal 95% interval), the share of examples that became less likely, and "
        "the ratio of word-level perplexities (perturbed / original; lm-evaluation-harness's word_perplexity). A "
        f"ratio at most {RATIO_GOOD} reads as 'good', above {RATIO_WARN} as 'warn'."
    )


def _nll_changes(subject: Subject, names: list[str], rows: list[int], items: list, seq2seq: bool, progress: bool):
    """The negative log-likelihood of each original (left out when it does not fit the context window), its words,
    and per perturbation the (Δ summed NLL, words of the original) of each example it altered."""

    def nll(source: str, target: str | None) -> float | None:
        try:
            score = subject.lm.score(source, target) if seq2seq else subject.lm.score(source)
        except LmlabError:  # does not fit the context window: left out
            return None
        return -score.logprob

    base, words = [], []
    deltas: dict[str, list[tuple[float, int]]] = {m: [] for m in names}  # (Δ summed NLL, words of the original)
    for k, (source, target) in enumerate(tqdm(items, desc="robustness", disable=not progress, leave=False)):
        original = nll(source, target)
        if original is None:
            continue
        n_words = max(1, len((target if seq2seq else source).split()))
        base.append(original)
        words.append(n_words)
        for name in names:
            edited = edit(name, source, None, subject.seed, rows[k])[0]
            if edited == source:
                continue
            perturbed = nll(edited, target)
            if perturbed is not None:
                deltas[name].append((perturbed - original, n_words))
    return base, words, deltas


def _delta_stats(deltas: list[tuple[float, int]]) -> dict:
    """Mean change per word (normal 95% interval), share made less likely (Wilson), word-perplexity ratio."""
    if not deltas:
        return {"altered": 0}
    ds = [d / w for d, w in deltas]
    mean = sum(ds) / len(ds)
    sd = math.sqrt(sum((x - mean) ** 2 for x in ds) / (len(ds) - 1)) if len(ds) > 1 else 0.0
    half = 1.96 * sd / math.sqrt(len(ds))
    worse = sum(x > 0 for x in ds)
    low, high = proportion_ci(worse, len(ds))
    return {
        "altered": len(ds),
        "mean_delta_nll_per_word": mean,
        "delta_ci_low": mean - half,
        "delta_ci_high": mean + half,
        "worse_rate": worse / len(ds),
        "worse_ci_low": low,
        "worse_ci_high": high,
        "word_perplexity_ratio": math.exp(sum(d for d, _ in deltas) / sum(w for _, w in deltas)),
    }


def _explain_likelihood_perturbation(section: Section, name: str) -> None:
    section.explain.update(
        {
            f"perturbations.{name}.delta_ci_low": f"Lower end of the normal 95% interval of the mean change per word "
            f"under {name}.",
            f"perturbations.{name}.delta_ci_high": f"Upper end of the normal 95% interval of the mean change per word "
            f"under {name}.",
            f"perturbations.{name}.worse_rate": f"Share of the altered examples that the model finds less likely under "
            f"{name}.",
            f"perturbations.{name}.worse_ci_low": f"Lower end of the Wilson 95% interval of the share made less likely "
            "by "
            f"{name}.",
            f"perturbations.{name}.worse_ci_high": f"Upper end of the Wilson 95% interval of the share made less "
            "likely "
            f"by {name}.",
        }
    )
    section.explain[f"perturbations.{name}.mean_delta_nll_per_word"] = (
        f"Mean change, in nats per original word, of the negative log-likelihood under {name} (positive: the perturbed "
        "text is less likely)."
    )
    section.explain[f"perturbations.{name}.word_perplexity_ratio"] = (
        f"Word-level perplexity of the {name}-perturbed examples over that of the same examples unperturbed (1 = "
        "unaffected)."
    )


def _ratio_finding(name: str, r: dict) -> Finding:
    ratio = r["word_perplexity_ratio"]
    said = (
        f"{name}: word perplexity ×{ratio:.3g} on {r['altered']} altered examples ({r['mean_delta_nll_per_word']:+.3f} "
        "nats per word, "
        f"95% CI {r['delta_ci_low']:+.3f} to {r['delta_ci_high']:+.3f}; {r['worse_rate']:.0%} became less likely)"
    )
    if ratio > RATIO_WARN:
        return Finding("warn", f"{said}: more than ×{RATIO_WARN}, the model is thrown by this edit.")
    if ratio <= RATIO_GOOD:
        return Finding("good", f"{said}: at most ×{RATIO_GOOD}.")
    return Finding("info", f"{said}.")


# -- the lens ----------------------------------------------------------------------------------------------


def robustness(subject: Subject, *, perturbations: Sequence[str] | None = None, progress: bool = False) -> Section:
    """Invariance to meaning-preserving edits: a classifier's prediction changes and worst-case accuracy,
    or a language model's loss of likelihood. ``perturbations``: which of typos, case, punctuation,
    contractions, whitespace, names (default: all)."""
    names = _check(perturbations)
    config, head = subject.config, head_task(subject.config)
    if head is not None and head.label_per_text:
        if subject.data is None:
            return skipped(
                "robustness", TITLE, "a classifier's robustness needs test texts: give --data FILE (text and label)"
            )
        if config.problem_type == "regression":
            return skipped(
                "robustness",
                TITLE,
                "prediction changes are measured on labels; this classifier predicts a regression score",
            )
        return _classifier(subject, names, progress)
    if head is not None and head.labels_in_text:
        return skipped(
            "robustness",
            TITLE,
            f"a {config.task} model is not measured: the perturbations move the words and offsets its gold labels "
            "point to",
        )
    if _with_references(subject):
        if subject.data is None:
            return skipped(
                "robustness", TITLE, "a sequence-to-sequence model's robustness needs --data FILE (source and target)"
            )
        return _likelihood(subject, names, progress)
    if config.arch == "decoder":
        if subject.text is None and subject.data is None:
            return skipped("robustness", TITLE, "a language model's robustness needs held-out text: give --text FILE")
        return _likelihood(subject, names, progress)
    return skipped(
        "robustness",
        TITLE,
        "robustness measures a classifier's predictions (fine-tuned with --task classify, with --data) "
        "or a decoder's likelihood of held-out text (--text); this checkpoint is "
        "neither",
    )
