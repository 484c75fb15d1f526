"""``lmlab evaluate``: a checkpoint on a labelled test file → metrics with 95% CIs, and per-example predictions.

    metrics.json       every metric of the task, ``ci`` (bootstrap intervals on the headline numbers),
                       and for single-label classification the calibration (ECE, 10 equal-mass bins)
    predictions.jsonl  one line per example: the input, the gold answer, the prediction (and its
                       confidence) — what the critique reads

``--task seq2seq`` generates each source's output (greedy, or beam search with ``num_beams``) and
scores it against the target: BLEU and chrF (sacrebleu) and ROUGE. ``--task lm`` reports the
perplexity of a decoder on a text file instead.

``harness`` runs lm-evaluation-harness tasks instead of a test file (:mod:`lmlab.evaluate.harness`):

    metrics.json           each task's metrics (``task/metric``) with a 95% interval from lm-eval's standard error
    harness.json           lm-eval's results JSON (``results``, ``configs``, ``versions``, ``n-shot``, …)
    harness_samples.jsonl  lm-eval's per-example records (the prompt, each request's answer, the metrics)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.config import write_json_atomic, write_jsonl_atomic
from lmlab.device import resolve_device
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import load_model, load_tokenizer, read_meta, resolve_checkpoint
from lmlab.io.outputs import check_output, owned_as, write_marker
from lmlab.tasks import TaskFields, default_task, get_task, task_names

OWNED = owned_as("evaluation", ("metrics.json", "predictions.jsonl"), "checkpoint")  # an evaluation folder lmlab wrote


def evaluate(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    task: str | None = None,
    out: str | Path | None = None,
    harness: str | None = None,
    harness_include: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    n_resamples: int = 1000,
    device: str = "cpu",
    text_field: str = "text",
    pair_field: str | None = None,
    label_field: str = "label",
    source_field: str = "source",
    target_field: str = "target",
    max_target_length: int = 128,
    num_beams: int = 1,
    verify: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Metrics of ``checkpoint`` on ``data`` (the checkpoint's own task unless ``task`` says otherwise:
    a task head's task, seq2seq for an encoder–decoder or a decoder fine-tuned on it, else lm).

    ``out`` (metrics.json, predictions.jsonl) is checked before any work: new, empty or an earlier
    evaluation's folder (``overwrite``: any folder; only those two files are replaced). ``harness``: see the module.

    Args:
        checkpoint: checkpoint folder (or run folder: its best checkpoint)
        data: the test file (as for finetune; text files for --task lm)
        task: classify, tag, qa, seq2seq or lm (default: the checkpoint's task; seq2seq for an encoder–decoder; lm
            for a plain decoder)
        out: folder for metrics.json and predictions.jsonl (harness: metrics.json, harness.json and
            harness_samples.jsonl)
        harness: lm-evaluation-harness tasks to run instead of a task on data, comma-separated (needs
            `pip install 'lmlab[harness]'`; tasks are read from local files, never from a hub)
        harness_include: harness: a folder of lm-eval task files (YAML) besides lm-eval's own, such as
            examples/harness
        num_fewshot: harness: few-shot examples in each prompt (default: each task's own)
        limit: harness: at most this many examples per task (default: all)
        max_length: tokens per example; seq2seq: per source or prompt
        batch_size: examples per forward pass
        n_resamples: bootstrap resamples for the confidence intervals
        device: auto, cpu, cuda, cuda:1, …
        text_field: the field (column) holding the text
        pair_field: classify: the second text of a pair
        label_field: classify: the label field/column
        source_field: seq2seq: the source field
        target_field: seq2seq: the target field
        max_target_length: seq2seq: tokens to generate at most
        num_beams: seq2seq: beam search with this many beams (1: greedy)
        verify: check the checkpoint's tokenizer (and a Hugging Face folder against transformers)
        overwrite: write into any folder (only metrics.json and predictions.jsonl are replaced)
    """
    from lmlab.metrics import check_n_resamples

    check_n_resamples(n_resamples)  # before the model loads
    _check_inputs(data, harness, num_fewshot, limit)
    device = resolve_device(device)
    path = resolve_checkpoint(checkpoint)
    if out is not None:
        out = check_output(out, "evaluation folder", OWNED, overwrite=overwrite, sources=(checkpoint, path))
    if harness is not None:
        options = dict(include=harness_include, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size)
        return evaluate_harness(path, harness, out, device=device, verify=verify, **options)
    tokenizer = load_tokenizer(path, verify=verify)
    model = load_model(path, device=device, merge_lora=True, verify=verify).eval()
    fields = TaskFields(text_field, pair_field, label_field, source_field, target_field, max_length, max_target_length)
    meta, options = read_meta(path), dict(batch_size=batch_size, n_resamples=n_resamples, num_beams=num_beams)
    result, rows = evaluate_model(model, tokenizer, data, task=task, meta=meta, fields=fields, **options)
    result.update(checkpoint=str(path))
    if out is not None:
        write_json_atomic(out / "metrics.json", result)
        write_jsonl_atomic(out / "predictions.jsonl", rows)
        write_marker(out, "evaluation")
    return result


def _check_inputs(data, harness, num_fewshot, limit) -> None:
    if (data is None) == (harness is None):
        raise LmlabError(
            "expected either data (a test file) or harness (lm-evaluation-harness task names), not both or neither",
            params="data harness",
        )
    for name, value in (("num_fewshot", num_fewshot), ("limit", limit)):
        if value is not None and harness is None:
            raise LmlabError(f"{name} applies to harness tasks only", params=name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (name == "limit")):
            raise LmlabError(
                f"{name} {value!r}: expected a whole number of at least {int(name == 'limit')}", params=name
            )


def evaluate_harness(
    path: Path,
    tasks: str,
    out: Path | None,
    *,
    device: str = "cpu",
    verify: bool = True,
    include: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """:func:`evaluate` with ``harness``: lm-eval's ``tasks`` on the checkpoint at ``path``, written to ``out``."""
    from lmlab.api import load
    from lmlab.evaluate.harness import figures, run_harness

    lm = load(path, device=str(device), verify=verify)
    results = run_harness(lm, tasks, include=include, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size)
    samples = results.pop("samples", {})
    values, cis = figures(results)
    result = dict(task="harness", harness=tasks, checkpoint=str(path), **values, ci=cis)
    result["ci_method"] = "normal approximation: the metric ± 1.96 × lm-eval's standard error"
    if out is not None:
        write_json_atomic(out / "harness.json", results)
        write_jsonl_atomic(
            out / "harness_samples.jsonl", [dict(task=t, **s) for t, rows in samples.items() for s in rows]
        )
        write_json_atomic(out / "metrics.json", result)
        write_marker(out, "evaluation")
    return result


def evaluate_model(
    model,
    tokenizer,
    data: str | Path,
    *,
    task: str | None = None,
    meta: dict[str, Any] | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    n_resamples: int = 1000,
    text_field: str = "text",
    pair_field: str | None = None,
    label_field: str = "label",
    source_field: str = "source",
    target_field: str = "target",
    max_target_length: int = 128,
    num_beams: int = 1,
    fields: TaskFields | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """:func:`evaluate` for a model already loaded (``meta``: its checkpoint's config.json, which says
    what a decoder was fine-tuned for): the metrics and the per-example prediction rows. ``fields``
    (:class:`~lmlab.tasks.TaskFields`) replaces the field and length arguments when given."""
    from lmlab.metrics import check_n_resamples

    check_n_resamples(n_resamples)  # before the predictions are made
    config = model.config
    device = next(model.parameters()).device
    task = task or default_task(config, meta)
    if task not in task_names("evaluate"):
        raise LmlabError(
            f"task '{task}': expected one of {', '.join(task_names('evaluate'))} (this checkpoint was not "
            "fine-tuned for one: name one)",
            params="task",
        )
    kind = get_task(task, "evaluate")
    kind.check_model(config)
    if fields is None:
        fields = TaskFields(
            text_field=text_field,
            pair_field=pair_field,
            label_field=label_field,
            source_field=source_field,
            target_field=target_field,
            max_length=max_length,
            max_target_length=max_target_length,
        )
    fields = fields.replace(max_length=min(fields.max_length, config.block_size))
    test = kind.read(data, tokenizer, fields, arch=config.arch, labels=config.labels, problem_type=config.problem_type)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    predictions = kind.predict(
        model,
        tokenizer,
        test,
        batch_size=batch_size,
        device=device,
        pad_id=pad,
        max_new_tokens=fields.max_target_length,
        num_beams=num_beams,
    )
    result, rows = kind.evaluate(test, predictions, n_resamples)
    result.update(task=task, data=str(data))
    return result, rows


NOT_FIGURES = {
    "task",
    "harness",
    "checkpoint",
    "data",
    "ci",
    "per_class",
    "confusion_matrix",
    "calibration",
    "labels",
    "per_type",
    "num_examples",
}  # the keys of evaluate()'s result that are not a headline metric


def summary(result: dict[str, Any]) -> str:
    """:func:`evaluate`'s headline metrics, a line each with its 95% confidence interval, and the ECE of a
    calibrated classifier: what ``lmlab evaluate`` prints."""
    lines = []
    for name, value in result.items():
        if name in NOT_FIGURES or not isinstance(value, (int, float)):
            continue
        ci = result.get("ci", {}).get(name)
        lines.append(f"{name:>16}: {value:.4f}" + (f"  (95% CI {ci['low']:.4f} – {ci['high']:.4f})" if ci else ""))
    if "calibration" in result:
        ece = result["calibration"]["ece"]
        lines.append(f"{'ECE':>16}: {ece:.4f}  (expected calibration error, 10 equal-mass bins)")
    return "\n".join(lines)
