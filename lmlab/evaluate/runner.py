"""``lmlab evaluate``: a checkpoint on a labelled test file → metrics with 95% CIs, and per-example predictions.

    metrics.json       every metric of the task, ``ci`` (bootstrap intervals on the headline numbers),
                       and for single-label classification the calibration (ECE, 10 equal-mass bins)
    predictions.jsonl  one line per example: the input, the gold answer, the prediction (and its
                       confidence) — what the critique reads

``--task seq2seq`` generates each source's output (greedy, or beam search with ``num_beams``) and
scores it against the target: BLEU and chrF (sacrebleu) and ROUGE. ``--task lm`` reports the
perplexity of a decoder on a text file instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lmlab.config import write_json_atomic, write_jsonl_atomic
from lmlab.device import resolve_device
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import load_model, load_tokenizer, read_meta, resolve_checkpoint
from lmlab.io.outputs import check_output, owned_as, write_marker

TASKS = ("classify", "tag", "qa", "seq2seq", "lm")
OWNED = owned_as("evaluation", ("metrics.json", "predictions.jsonl"), "checkpoint")  # an evaluation folder lmlab wrote


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    task: str | None = None,
    out: str | Path | None = None,
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
    evaluation's folder (``overwrite``: any folder; only those two files are replaced)."""
    from lmlab.evaluate.metrics import check_n_resamples

    check_n_resamples(n_resamples, "--n-resamples")  # before the model loads
    device = resolve_device(device)
    path = resolve_checkpoint(checkpoint)
    if out is not None:
        out = check_output(out, "evaluation folder", OWNED, overwrite=overwrite, sources=(checkpoint, path))
    tokenizer = load_tokenizer(path, verify=verify)
    model = load_model(path, device=device, merge_lora=True, verify=verify).eval()
    result, rows = evaluate_model(
        model, tokenizer, data, task=task, meta=read_meta(path), max_length=max_length, batch_size=batch_size,
        n_resamples=n_resamples, text_field=text_field, pair_field=pair_field, label_field=label_field,
        source_field=source_field, target_field=target_field, max_target_length=max_target_length, num_beams=num_beams,
    )
    result.update(checkpoint=str(path))
    if out is not None:
        write_json_atomic(out / "metrics.json", result)
        write_jsonl_atomic(out / "predictions.jsonl", rows)
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
) -> tuple[dict[str, Any], list[dict]]:
    """:func:`evaluate` for a model already loaded (``meta``: its checkpoint's config.json, which says
    what a decoder was fine-tuned for): the metrics and the per-example prediction rows."""
    from lmlab.evaluate import metrics as M
    from lmlab.train.finetune import TaskObjective, generate_outputs, load_task_data, predict_logits

    M.check_n_resamples(n_resamples, "--n-resamples")  # before the predictions are made
    config = model.config
    device = next(model.parameters()).device
    task = task or trained_task(config, meta) or ("lm" if config.arch == "decoder" else "")
    if task not in TASKS:
        raise LmlabError(f"--task '{task}': expected one of {', '.join(TASKS)} (the checkpoint has no task head; name one)")
    if task == "lm":
        result, rows = _perplexity(model, tokenizer, data, batch_size, text_field)
    elif task == "seq2seq":
        if config.arch == "encoder":
            raise LmlabError("this checkpoint is an encoder (BERT style): --task seq2seq needs a model that generates (encoder–decoder or decoder)")
        max_length = min(max_length, config.block_size)
        test = load_task_data("seq2seq", data, tokenizer, max_length=max_length, source_field=source_field, target_field=target_field,
                              max_target_length=max_target_length, decoder_only=config.arch == "decoder")
        outputs = generate_outputs(model, tokenizer, test, max_new_tokens=max_target_length, batch_size=batch_size, num_beams=num_beams)
        references = [t.strip() for t in test.raw.targets]
        result = M.with_cis("seq2seq", outputs, references, n_resamples=n_resamples)
        rows = [
            {"index": i, "source": src, "target": ref, "prediction": out}
            for i, (src, ref, out) in enumerate(zip(test.raw.sources, references, outputs))
        ]
    else:
        if config.task != task:
            raise LmlabError(f"the checkpoint was fine-tuned for {config.task or 'no task'!r}; it cannot be evaluated on --task {task}")
        max_length = min(max_length, config.block_size)
        labels = config.labels if task != "qa" else None
        kind = config.problem_type if task == "classify" else None
        test = load_task_data(task, data, tokenizer, max_length=max_length, labels=labels, problem_type=kind,
                              text_field=text_field, pair_field=pair_field, label_field=label_field)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        logits = predict_logits(model, TaskObjective(task, test.features, pad, test.problem_type), len(test), batch_size, device)
        result, rows = _score(task, test, logits, n_resamples)
    result.update(task=task, data=str(data))
    return result, rows


def trained_task(config, meta: dict[str, Any] | None) -> str:
    """What a checkpoint was fine-tuned for: its task head's task, seq2seq for an encoder–decoder or a
    decoder fine-tuned on it (its config.json's ``objective``), else ""."""
    seq2seq = config.arch == "seq2seq" or (meta or {}).get("objective") == "seq2seq"
    return config.task or ("seq2seq" if seq2seq else "")


def _score(task: str, test, logits: list[torch.Tensor], n_resamples: int) -> tuple[dict, list[dict]]:
    from lmlab.data import tasks as T
    from lmlab.evaluate import metrics as M

    raw = test.raw
    if task == "classify":
        stacked = torch.stack(logits)
        gold = test.features["labels"]
        if test.problem_type == "regression":
            preds = stacked.squeeze(-1).tolist()
            rows = [{"index": i, "text": raw.texts[i], "label": g, "prediction": p} for i, (g, p) in enumerate(zip(gold, preds))]
            return M.regression_metrics(preds, gold), rows
        if test.problem_type == "multi":
            probs = stacked.sigmoid()
            preds = (probs > 0.5).int().tolist()
            rows = [
                {"index": i, "text": raw.texts[i], "labels": raw.labels[i],
                 "prediction": [n for n, on in zip(test.labels, p) if on], "probabilities": dict(zip(test.labels, pr))}
                for i, (p, pr) in enumerate(zip(preds, probs.tolist()))
            ]
            return M.multilabel_metrics(preds, [[int(v) for v in row] for row in gold], label_names=test.labels), rows
        probs = stacked.softmax(-1)
        confidence, preds = probs.max(-1)
        result = M.with_cis("classify", preds.tolist(), gold, n_resamples=n_resamples, num_classes=test.num_labels, label_names=test.labels)
        correct = (preds == torch.tensor(gold)).int().tolist()
        result["calibration"] = M.calibration(confidence.tolist(), correct, n_bins=min(10, len(gold)))
        rows = []
        for i, (p, c) in enumerate(zip(preds.tolist(), confidence.tolist())):
            row = {"index": i, "text": raw.texts[i], "label": test.labels[gold[i]], "prediction": test.labels[p], "confidence": c}
            if raw.pairs is not None:
                row["pair"] = raw.pairs[i]
            row["probabilities"] = dict(zip(test.labels, probs[i].tolist()))
            rows.append(row)
        return result, rows
    if task == "tag":
        pred_tags = [
            T.tags_from_predictions(row.argmax(-1).tolist(), word_ids, test.labels, n_words=len(words))
            for row, word_ids, words in zip(logits, test.features["word_ids"], raw.words)
        ]
        result = M.with_cis("tag", pred_tags, raw.tags, n_resamples=n_resamples)
        rows = [{"index": i, "tokens": w, "tags": g, "prediction": p} for i, (w, g, p) in enumerate(zip(raw.words, raw.tags, pred_tags))]
        return result, rows
    starts = [row[:, 0].tolist() for row in logits]
    ends = [row[:, 1].tolist() for row in logits]
    predictions = T.qa_postprocess(raw, test.qa_features, starts, ends, version_2=getattr(raw, "version_2", False))
    references = {ex.id: list(ex.answer_texts) for ex in raw}
    result = M.with_cis("qa", predictions, references, n_resamples=n_resamples)
    rows = [{"id": ex.id, "question": ex.question, "answers": list(ex.answer_texts), "prediction": predictions[ex.id]} for ex in raw]
    return result, rows


@torch.no_grad()
def _perplexity(model, tokenizer, data, batch_size: int, text_field: str) -> tuple[dict, list[dict]]:
    """Token-level perplexity of a decoder over the documents of ``data`` (non-overlapping context windows)."""
    from lmlab.data import read_corpus

    if model.config.arch != "decoder":
        raise LmlabError("--task lm measures a decoder's perplexity; this checkpoint is an encoder")
    docs = read_corpus(data, text_field=text_field)
    eos = tokenizer.eos_id
    T = model.config.block_size
    rows, total_nll, total_tokens = [], 0.0, 0
    device = next(model.parameters()).device
    for i, doc in enumerate(docs):
        ids = ([eos] if eos is not None else []) + tokenizer.encode(doc)
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, T):
            window = torch.tensor([ids[start : start + T + 1]], device=device)
            if window.shape[1] < 2:
                break
            logits = model(window[:, :-1]).float()
            nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            n += window.shape[1] - 1
        if n:
            rows.append({"index": i, "tokens": n, "nll": nll, "perplexity": math.exp(nll / n)})
            total_nll, total_tokens = total_nll + nll, total_tokens + n
    if not total_tokens:
        raise LmlabError(f"{data}: no text to score")
    return {"perplexity": math.exp(total_nll / total_tokens), "nll_per_token": total_nll / total_tokens, "tokens": total_tokens, "documents": len(rows)}, rows
