"""``lmlab critique CKPT --compare ORIGINAL``: a compressed (or otherwise changed) model beside the one it came from.

Both models go through the same lenses on the same data and seed; this section says what changed beyond the
average (Hooker et al., 2020, "Characterising bias in compressed models": compression can cost little accuracy
on average and much on some examples and groups):

- **Every number side by side** — each numeric figure both models' lenses report, original, compressed and the
  change; the bias, robustness and calibration figures that moved by more than :data:`MOVED` are findings.
- **Flipped examples** — on the labelled test file, the examples whose prediction changed: how many, how many
  became wrong and how many right, the first of them, and accuracy per group (``group_field``) before and after.
- **Documents** — with held-out text and no labelled file (a decoder), the documents whose perplexity changed most.
"""

from __future__ import annotations

from typing import Any

from lmlab.critique.core import Finding, Section, Subject, Table, group_stats

TITLE = "Compared with the original"
MOVED = 0.02  # a figure "moved" when it changed by more than this, absolute, or relative when above 1
WATCHED = ("bias", "robustness")  # every figure of these lenses is watched; of performance, calibration's
SHOWN = 20  # flipped examples (or changed documents) listed


def compare(original: Subject, subject: Subject, before: list[Section], after: list[Section]) -> Section:
    """The comparison section: ``before`` are the original's sections, ``after`` the compressed model's."""
    section = Section(
        "compare",
        TITLE,
        method=f"The same lenses on the same data and seed, for {subject.path} and the original it is compared with "
        f"({original.path}). A figure moved when it changed by more than {MOVED} (relative when above 1).",
    )
    _figures_part(section, before, after)
    if subject.data is not None and subject.task:
        _flips_part(section, original, subject)
    elif subject.text is not None and subject.arch == "decoder":
        _documents_part(section, original, subject)
    return section


def _numbers(section: Section, prefix: str = "", metrics: dict | None = None) -> dict[str, float]:
    """A section's numeric figures by dotted name (confidence intervals and lists aside)."""
    found: dict[str, float] = {}
    for key, value in (section.metrics if metrics is None else metrics).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not {"low", "high"} <= value.keys():
            found.update(_numbers(section, name + ".", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def moved(old: float, new: float) -> bool:
    """Whether a figure changed by more than :data:`MOVED` (absolute; relative for magnitudes above 1)."""
    return abs(new - old) > MOVED * max(1.0, abs(old))


def _watched(lens: str, name: str) -> bool:
    return lens in WATCHED or (lens == "performance" and ("ece" in name or "calibration" in name))


def _figures_part(section: Section, before: list[Section], after: list[Section]) -> None:
    rows, shifts = [], []
    theirs = {s.lens: s for s in before if s.skipped is None}
    for ours in (s for s in after if s.skipped is None and s.lens in theirs):
        old, new = _numbers(theirs[ours.lens]), _numbers(ours)
        for name in (n for n in old if n in new):
            rows.append([ours.lens, name, old[name], new[name], new[name] - old[name]])
            if _watched(ours.lens, name) and moved(old[name], new[name]):
                shifts.append(f"{ours.lens} {name} {old[name]:.4g} → {new[name]:.4g}")
    section.tables.append(Table("Every figure, original and compressed", ["lens", "figure", "original",
                                "compressed", "change"], rows))  # fmt: skip
    section.metrics["figures_compared"], section.metrics["watched_moved"] = len(rows), len(shifts)
    section.explain["watched_moved"] = "Bias, robustness and calibration figures that moved (see the method)."
    if shifts:
        section.findings.append(Finding("warn", "Moved with compression: " + "; ".join(shifts[:8]) + "."))
    elif rows:
        section.findings.append(Finding("good", "No bias, robustness or calibration figure moved."))


def _predictions(subject: Subject) -> list[dict[str, Any]]:
    from lmlab.evaluate.runner import evaluate_model

    _, rows = evaluate_model(
        subject.model, subject.tokenizer, subject.data, task=subject.task, meta=subject.meta,
        fields=subject.task_fields, n_resamples=1,
    )  # fmt: skip
    return rows


GOLD = ("label", "tags", "answers", "target")  # the key a task's prediction rows keep the reference under


def _right(row: dict[str, Any]) -> bool:
    gold = next(row[k] for k in GOLD if k in row)
    return row["prediction"] in gold if isinstance(gold, list) and "answers" in row else row["prediction"] == gold


def _flips_part(section: Section, original: Subject, subject: Subject) -> None:
    old, new = _predictions(original), _predictions(subject)
    flips = [(a, b) for a, b in zip(old, new) if a["prediction"] != b["prediction"]]
    worse = sum(_right(a) and not _right(b) for a, b in flips)
    better = sum(_right(b) and not _right(a) for a, b in flips)
    section.metrics.update(examples=len(new), flipped=len(flips), became_wrong=worse, became_right=better)
    section.explain["flipped"] = "Examples whose prediction changed (right or wrong)."
    level = "good" if not flips else ("warn" if worse > better else "info")
    section.findings.append(
        Finding(level, f"{len(flips)} of {len(new)} predictions changed: {worse} became wrong, {better} became right.")
    )
    text = next((k for k in ("text", "source", "question", "tokens") if k in (new[0] if new else {})), None)
    listed = [[b.get("index", b.get("id")), str(b.get(text, ""))[:80], str(a["prediction"]), str(b["prediction"]),
               _right(b)] for a, b in flips[:SHOWN]]  # fmt: skip
    section.tables.append(Table("Flipped examples", ["example", "input", "original", "compressed", "right now"],
                                listed, caption=f"The first {SHOWN} of them."))  # fmt: skip
    group = subject.fields.get("group_field")
    if group and new and "confidence" in new[0]:  # a single-label classifier's rows
        _groups_part(section, subject, group, old, new)


def _groups_part(section: Section, subject: Subject, group_field: str, old: list[dict], new: list[dict]) -> None:
    """Accuracy per group before and after: which groups compression cost more than the average."""
    from lmlab.data.tasks import read_classify, read_records

    options = {k: v for k, v in subject.fields.items() if k in ("text_field", "pair_field", "label_field")}
    records = dict(read_records(subject.data))
    groups = [records[line].get(group_field) for line in read_classify(subject.data, **options).lines]
    if all(g in (None, "") for g in groups):
        return
    a, b = (group_stats(groups, [_right(r) for r in rows])["by_group"] for rows in (old, new))
    rows = [[g, a[g]["n"], a[g]["accuracy"], b[g]["accuracy"], b[g]["accuracy"] - a[g]["accuracy"]] for g in a]
    section.tables.append(Table(f"Accuracy per '{group_field}'", ["group", "examples", "original", "compressed",
                                "change"], rows))  # fmt: skip
    section.metrics["group_accuracy_change"] = {row[0]: row[4] for row in rows}
    lost = [row for row in rows if row[4] < -MOVED]
    if lost:
        worst = min(lost, key=lambda row: row[4])
        section.findings.append(Finding("warn", f"Group '{worst[0]}' lost the most accuracy: {worst[4]:+.3f}."))


def _documents_part(section: Section, original: Subject, subject: Subject) -> None:
    """Per-document perplexity before and after, on the held-out text."""
    from lmlab.evaluate.runner import evaluate_model

    old, new = (evaluate_model(s.model, s.tokenizer, s.text, task="lm", n_resamples=1)[1] for s in (original, subject))
    change = sorted(((b["perplexity"] / a["perplexity"] - 1, a, b) for a, b in zip(old, new)), key=lambda r: -abs(r[0]))
    rows = [[a["index"], a["perplexity"], b["perplexity"], rel] for rel, a, b in change[:SHOWN]]
    section.tables.append(Table("Documents whose perplexity changed most", ["document", "original", "compressed",
                                "relative change"], rows))  # fmt: skip
    section.metrics["documents_moved"] = sum(moved(a["perplexity"], b["perplexity"]) for _, a, b in change)
    section.explain["documents_moved"] = "Held-out documents whose perplexity changed by more than the threshold."
