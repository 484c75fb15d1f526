"""The task layer: one module per task, one :class:`~lmlab.tasks.base.Task` object each, one registry.

``finetune``, ``evaluate`` and ``critique`` look a task up here (:func:`get_task`) and never branch on
its name; adding a task is one module and one line in :data:`TASKS` (``docs/tasks.md``).

    classify   JSONL/CSV/TSV with text (+ pair) and label(s)   accuracy, macro-F1 (torchmetrics)
    tag        CoNLL or JSONL tokens/tags (BIO, IOB1, IOBES)    entity F1 (seqeval)
    qa         SQuAD v1.1 / v2.0 JSON                           exact match, F1 (SQuAD rules)
    seq2seq    JSONL source/target (or prompt/completion)       chrF, BLEU (sacrebleu), ROUGE of greedy outputs
    chat       JSONL messages (or prompt/response)              loss on assistant tokens (picks best/), their accuracy
    lm         plain text (evaluation only)                     perplexity
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.tasks.base import (
    ObjectiveArgs,
    Selection,
    Task,
    TaskData,
    TaskFields,
    TaskObjective,
    TextExample,
    predict_logits,
)
from lmlab.tasks.chat import Chat, assistant_token_accuracy, pack_examples
from lmlab.tasks.classify import Classify
from lmlab.tasks.lm import LM
from lmlab.tasks.qa import QA
from lmlab.tasks.seq2seq import Seq2Seq, generate_outputs
from lmlab.tasks.tag import Tag

TASKS: dict[str, Task] = {task.name: task for task in (Classify(), Tag(), QA(), Seq2Seq(), Chat(), LM())}


def task_names(use: str) -> tuple[str, ...]:
    """The tasks a verb (``"finetune"``, ``"evaluate"``) takes, in the registry's order."""
    return tuple(name for name, task in TASKS.items() if use in task.uses)


def get_task(name: str, use: str = "finetune") -> Task:
    """The task called ``name`` that ``use`` takes, or a one-line error listing the ones it does."""
    task = TASKS.get(name)
    if task is None or use not in task.uses:
        raise LmlabError(f"unknown task '{name}'; expected one of {', '.join(task_names(use))}", params="task")
    return task


def trained_task(config, meta: dict[str, Any] | None) -> str:
    """What a checkpoint was fine-tuned for: its task head's task, seq2seq for an encoder–decoder or a
    decoder fine-tuned on it (its config.json's ``objective``), else ""."""
    generated = (meta or {}).get("objective") == Seq2Seq.name
    return config.task or (Seq2Seq.name if config.arch == "seq2seq" or generated else "")


def default_task(config, meta: dict[str, Any] | None) -> str:
    """What ``evaluate`` scores a checkpoint on unless told: what it was fine-tuned for, else a plain
    decoder's perplexity (``lm``); "" for a model with neither."""
    return trained_task(config, meta) or (LM.name if config.arch == "decoder" else "")


def head_task(config) -> Task | None:
    """The task a model's task head was trained for (``config.task``), or None for a model without one."""
    return TASKS.get(config.task) if config.task else None


def load_task_data(
    task: str,
    path: str | Path,
    tokenizer,
    *,
    labels: list[str] | None = None,
    problem_type: str | None = None,
    decoder_only: bool = False,
    **fields: Any,
) -> TaskData:
    """Read a task file and build its features (``fields``: :class:`TaskFields`' fields). ``labels`` (the
    training labels) check a validation file; ``decoder_only``: seq2seq for a decoder (prompt + completion)."""
    return get_task(task).read(
        path,
        tokenizer,
        TaskFields(**fields),
        arch="decoder" if decoder_only else "encoder",
        labels=labels,
        problem_type=problem_type,
    )


def task_objective(
    task: str,
    features: dict[str, list],
    pad_id: int,
    problem_type: str = "single",
    *,
    model_arch: str = "encoder",
    start_id: int = 0,
) -> TaskObjective:
    """``task``'s training objective over ``features`` (:meth:`Task.objective`)."""
    args = ObjectiveArgs(pad_id, problem_type=problem_type, arch=model_arch, start_id=start_id)
    return get_task(task).objective(features, args)


__all__ = [
    "TASKS",
    "ObjectiveArgs",
    "Selection",
    "Task",
    "TaskData",
    "TaskFields",
    "TaskObjective",
    "TextExample",
    "assistant_token_accuracy",
    "default_task",
    "generate_outputs",
    "get_task",
    "head_task",
    "load_task_data",
    "pack_examples",
    "predict_logits",
    "task_names",
    "task_objective",
    "trained_task",
]
