"""``lmlab critique``: a report on a model along seven lenses — the seeds' "模型批评与反思".

    performance   task metrics with CIs, calibration, perplexity, per-slice metrics
    interpret     attention maps, integrated-gradients attributions, the logit lens
    bias          paired-sentence likelihood bias (CrowS-Pairs format), counterfactual fairness, group gaps
    safety        toxicity of generations (pluggable classifier), refusal of harmful requests
    privacy       canary exposure, verbatim extraction of training text, PII in the training corpus
    robustness    CheckList-style invariance: typos, case, punctuation, contractions, spaces, names
    efficiency    parameters, FLOPs, latency, throughput, memory, size; training energy and CO2

Each lens is a function ``lens(subject, **options) -> Section`` (:mod:`lmlab.critique.core`) that
can be called alone; :func:`critique` runs the chosen ones on one checkpoint and writes
``report.json`` and ``report.html`` (:mod:`lmlab.critique.report`). A lens without the data it needs
is skipped with a note saying what to provide; built-in probe sets (pair sets, word lists, prompts)
live in ``lmlab/critique/data/``, written for this project.

    import lmlab.critique as C
    report = C.critique("runs/cls", "critique/", data="test.jsonl", lenses=["performance", "bias"])
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from lmlab.config import check_seed
from lmlab.critique.core import Finding, Section, Subject, check_option, load_subject, skipped
from lmlab.errors import LmlabError
from lmlab.io.outputs import check_output, owned_as, write_marker
from lmlab.verb import make_callable
from lmlab.version import __version__

LENSES = ("performance", "interpret", "bias", "safety", "privacy", "robustness", "efficiency")
OWNED = owned_as("critique", ("report.json", "report.html"), "lmlab_version")  # a report folder lmlab wrote

logger = logging.getLogger(__name__)

__all__ = ["LENSES", "critique", "run_lens", "load_subject", "Subject", "Section", "Finding", "skipped"]


def lens_function(name: str):
    """The function of lens ``name`` (``lmlab.critique.<name>.<name>``)."""
    if name not in LENSES:
        raise LmlabError(f"unknown lens '{name}'; expected some of {', '.join(LENSES)}")
    return getattr(importlib.import_module(f"lmlab.critique.{name}"), name)


def run_lens(name: str, subject: Subject, **options: Any) -> Section:
    """Run one lens with the ``options`` its function takes (the others are for other lenses) and time it."""
    fn = lens_function(name)
    accepted = inspect.signature(fn).parameters
    start = time.perf_counter()
    section = fn(subject, **{k: v for k, v in options.items() if k in accepted and v is not None})
    section.seconds = time.perf_counter() - start
    return section


def _run_or_skip(name: str, subject: Subject, **options: Any) -> Section:
    """:func:`run_lens`, except that a lens raising LmlabError (a damaged classifier folder, a bad probe
    file or option) is skipped with the reason, so the other lenses still make the report."""
    try:
        return run_lens(name, subject, **options)
    except LmlabError as err:
        logger.warning("critique: the %s lens is skipped: %s", name, err)
        return skipped(
            name, importlib.import_module(f"lmlab.critique.{name}").TITLE, f"it stopped with an error: {err}"
        )


def parse_lenses(lenses: str | Sequence[str] | None) -> list[str]:
    """``"performance,bias"`` or a list → lens names in the report's order; None → all of them."""
    if lenses is None:
        return list(LENSES)
    names = [n.strip() for n in (lenses.split(",") if isinstance(lenses, str) else lenses) if n.strip()]
    unknown = [n for n in names if n not in LENSES]
    if unknown or not names:
        raise LmlabError(
            f"lenses {','.join(names) or '(none)'}: unknown lens {unknown[0]!r}; expected some of {', '.join(LENSES)}"
            if unknown
            else f"lenses: expected some of {', '.join(LENSES)}",
            params="lenses",
        )
    return [n for n in LENSES if n in names]


def critique(
    checkpoint: str | Path,
    out: str | Path,
    *,
    lenses: str | Sequence[str] | None = None,
    data: str | Path | None = None,
    text: str | Path | None = None,
    train_data: str | Path | None = None,
    task: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    max_examples: int = 500,
    compare: str | Path | None = None,
    fields: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    verify: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Critique ``checkpoint`` through ``lenses``; write ``out``/report.json and report.html and return the report's
    dict. ``out`` is checked before any work: new, empty or an earlier report's folder.

    Args:
        checkpoint: checkpoint folder (or run folder: its best checkpoint)
        out: folder for report.html and report.json
        lenses: the lenses to run, comma-separated or a list (default: all)
        data: a labelled test file of the checkpoint's task (metrics, slices, counterfactuals, robustness)
        text: held-out plain text (a decoder's perplexity and robustness)
        train_data: the training corpus (verbatim extraction, PII scan)
        task: what --data is scored as (default: the checkpoint's task)
        device: auto, cpu, cuda, cuda:1, …
        seed: seed of every sample and perturbation
        max_examples: examples each lens reads at most (a seeded sample)
        compare: the checkpoint this one was compressed (or fine-tuned) from: both go through the same lenses on
            the same data, and a first section says what changed — every figure side by side, the examples whose
            prediction flipped, accuracy per group, the bias, robustness and calibration figures that moved
        fields: the data's field names (``text_field``, ``label_field``, ``group_field`` …)
        options: lens options (``pairs``, ``prompts``, ``canaries``, ``samples`` …), each passed to the lenses
            that take it
        progress: print each lens's name as it starts
        verify: check the checkpoint's tokenizer (and a Hugging Face folder against transformers)
        overwrite: write into any folder (only report.json and report.html are replaced)
    """
    from lmlab.critique.report import write_report

    names = parse_lenses(lenses)
    check_option("max_examples", max_examples)
    check_seed(seed)
    out = check_output(out, "critique report folder", OWNED, overwrite=overwrite, sources=(checkpoint,))
    inputs = dict(data=data, text=text, train_data=train_data, task=task, device=device, seed=seed)
    inputs.update(max_examples=max_examples, verify=verify, **(fields or {}))
    subject = load_subject(checkpoint, **inputs)
    sections = _sections(names, subject, progress, options)
    if compare is not None:
        from lmlab.critique.compare import compare as compared

        original = load_subject(compare, **{**inputs, "task": subject.task or None})
        before = _sections(names, original, progress, options, " (original)")
        sections.insert(0, compared(original, subject, before, sections))
    report = _report(subject, sections, data=data, text=text, train_data=train_data)
    if compare is not None:
        report["compared_with"] = {"checkpoint": str(original.path), "lenses": {s.lens: s.to_json() for s in before}}
    json_path, html_path = write_report(out, report, sections)
    write_marker(out, "critique")
    report["_paths"] = {"json": str(json_path), "html": str(html_path)}
    return report


def _sections(
    names: list[str], subject: Subject, progress: bool, options: dict[str, Any] | None, which: str = ""
) -> list[Section]:
    """Each lens's section for ``subject``, in order."""
    sections = []
    for name in names:
        if progress:
            print(f"lmlab: critique: {name}{which} …", file=sys.stderr, flush=True)
        sections.append(_run_or_skip(name, subject, progress=progress, **(options or {})))
    return sections


def _report(subject: Subject, sections: list[Section], *, data, text, train_data) -> dict[str, Any]:
    """The report's dict: the checkpoint, when and by which lmlab, the model, the inputs and each lens's section."""
    config = subject.config
    return {
        "checkpoint": str(subject.path),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "lmlab_version": __version__,
        "model": {
            "name": subject.name,
            "arch": config.arch,
            "task": config.task,
            "parameters": subject.model.num_params(),
            "vocab_size": config.vocab_size,
            "block_size": config.block_size,
        },
        "data": {
            "data": str(data) if data else None,
            "text": str(text) if text else None,
            "train_data": str(train_data) if train_data else None,
            "task": subject.task or None,
        },
        "lenses": {s.lens: s.to_json() for s in sections},
    }


make_callable(__name__, __name__, "critique")  # lmlab.critique(checkpoint, out, …) is the verb
