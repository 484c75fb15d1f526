"""The :class:`Task` protocol: everything lmlab knows about one fine-tuning or evaluation task, in one object.

``finetune``, ``evaluate`` and ``critique`` hold no task knowledge of their own: they ask the registry
(:mod:`lmlab.tasks`) for a task and call these methods, in this order::

    finetune:  check_base → prepare_tokenizer → read (train, valid) → head → objective → train_loop
               (each evaluation: predict → metrics; ``select`` names the metric that picks best/)
    evaluate:  check_model → read → predict → evaluate

A task module subclasses :class:`Task`, overrides what differs from the defaults, and adds one line
to the registry. ``docs/tasks.md`` walks through adding one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError


@dataclasses.dataclass(frozen=True)
class TaskFields:
    """Where a task file keeps its parts, and how many tokens an example may take — one bundle for
    ``finetune``, ``evaluate`` and ``critique`` (each task reads the fields it needs).

    ``max_length`` bounds an example (seq2seq: the source, or a decoder's prompt; chat: a conversation);
    ``max_target_length`` a seq2seq target (and the generation length when scoring)."""

    text_field: str = "text"
    pair_field: str | None = None
    label_field: str = "label"
    source_field: str = "source"
    target_field: str = "target"
    max_length: int = 128
    max_target_length: int = 128
    doc_stride: int = 128

    def replace(self, **changes: Any) -> TaskFields:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class ObjectiveArgs:
    """What a task's training objective may need besides its features; each task reads the fields it uses."""

    pad_id: int
    problem_type: str = "single"
    num_labels: int = 0
    arch: str = "encoder"
    start_id: int = 0  # an encoder–decoder's decoder start token
    class_weights: bool = False  # weight classes by inverse frequency, where the task can
    valid_features: dict[str, list] | None = None


@dataclasses.dataclass
class TaskData:
    """A task's examples, their features, and what scoring needs to turn predictions into metrics."""

    task: str
    features: dict[str, list]
    num_labels: int
    problem_type: str = "single"
    labels: list[str] = dataclasses.field(default_factory=list)
    raw: Any = None  # the reader's object (ClassifyData, TagData, SquadExamples, Seq2SeqData, ChatData, documents)
    qa_features: list | None = None
    prompts: list[list[int]] | None = None  # seq2seq: what generation starts from (sources, or decoder prompts)

    def __len__(self) -> int:
        return len(self.features["input_ids"])


class Selection(NamedTuple):
    """The validation metric that picks ``best/``; ``metric`` None: the validation loss (lower is better)."""

    metric: str | None
    higher_is_better: bool = True


class Task:
    """One task. Class attributes describe it; methods are the steps the verbs call (see the module doc).

    ``uses``: the verbs that take it (``"finetune"``, ``"evaluate"``). ``generates``: the model keeps its
    LM head and no task head is added (seq2seq, chat, lm). ``conversational``: examples are chat
    conversations (``--pack``, ``--show-masking``). ``seq_len_params``: the parameters that bound a training row,
    as a resume error names them. What the critique's lenses ask: ``label_per_text`` (one label for the
    whole text, which a meaning-preserving edit keeps: classify), ``labels_in_text`` (gold labels point
    at words or character offsets, which edits move: tag, qa), ``references`` (examples carry a
    reference output text: seq2seq), ``fraction_metrics`` (headline metrics in [0, 1]; the rest 0–100)."""

    name: str = ""
    uses: tuple[str, ...] = ("finetune", "evaluate")
    generates: bool = False
    conversational: bool = False
    seq_len_params: str = "max_length"
    archs: tuple[str, ...] = ("encoder", "decoder")  # what it fine-tunes
    label_per_text: bool = False
    labels_in_text: bool = False
    references: bool = False
    fraction_metrics: tuple[str, ...] = ("accuracy", "f1_macro")

    # -- fine-tuning ---------------------------------------------------------------------------------

    def check_base(self, config: ModelConfig, fields: TaskFields, base: Path | str) -> None:
        """Refuse a base checkpoint the task cannot fine-tune, or lengths that do not fit it."""
        if config.arch not in self.archs:
            raise LmlabError(
                f"{base}: a {config.arch} model; task {self.name} fine-tunes encoders and decoders (an "
                "encoder–decoder takes task seq2seq)",
                params="task",
            )
        if fields.max_length > config.block_size:
            raise LmlabError(
                f"max_length {fields.max_length} exceeds the model's block_size {config.block_size}",
                params="max_length",
            )

    def prepare_tokenizer(self, tokenizer) -> None:
        """Give the tokenizer what the task needs before reading (chat: a chat template)."""

    def seq_len(self, fields: TaskFields) -> int:
        """Tokens a training row holds at most (``TrainConfig.seq_len``)."""
        return fields.max_length

    def read(
        self,
        path: str | Path,
        tokenizer,
        fields: TaskFields,
        *,
        arch: str = "encoder",
        labels: list[str] | None = None,
        problem_type: str | None = None,
    ) -> TaskData:
        """Read, check and encode a task file. ``labels``/``problem_type`` (the training file's, or a
        checkpoint's) check a validation or test file against them; tasks without labels ignore them."""
        raise NotImplementedError

    def check_training(self, data: TaskData, path: str | Path) -> None:
        """A one-line error when ``data`` (the training file, read) cannot train this task; by default any file can."""

    def head(self, config: ModelConfig, data: TaskData) -> ModelConfig:
        """The fine-tuned model's config: the base's with this task's head for ``data``'s labels."""
        return dataclasses.replace(
            config,
            task=self.name,
            num_labels=data.num_labels,
            problem_type=data.problem_type,
            labels=list(data.labels),
            lora={},
        )

    def objective(self, features: dict[str, list], args: ObjectiveArgs) -> TaskObjective:
        """The training objective (collate + loss) over ``features``; ``args`` say how to pad, the model's
        architecture, an encoder–decoder's start token, whether to weight classes (:class:`ObjectiveArgs`)."""
        raise NotImplementedError

    def select(self, data: TaskData) -> Selection:
        """The validation metric that picks ``best/``."""
        raise NotImplementedError

    def describe(self, data: TaskData, arch: str) -> str:
        """What is learned, for the line fine-tuning starts with."""
        return f"{data.num_labels} labels"

    # -- predicting and scoring ----------------------------------------------------------------------

    def check_model(self, config: ModelConfig) -> None:
        """Refuse a model this task cannot evaluate."""
        if config.task != self.name:
            raise LmlabError(
                f"the checkpoint was fine-tuned for {config.task or 'no task'!r}; it cannot be evaluated on task "
                f"{self.name}",
                params="task",
            )

    def predict(
        self,
        model: nn.Module,
        tokenizer,
        data: TaskData,
        *,
        batch_size: int,
        device: torch.device,
        pad_id: int = 0,
        max_new_tokens: int = 128,
        num_beams: int = 1,
    ) -> list:
        """The model's predictions for ``data``'s examples (task-head logits; texts for a generating task)."""
        objective = self.objective(data.features, ObjectiveArgs(pad_id, problem_type=data.problem_type))
        return predict_logits(model, objective, len(data), batch_size, device)

    def metrics(self, data: TaskData, predictions: list) -> dict[str, float]:
        """The headline metrics fine-tuning logs at each evaluation."""
        raise NotImplementedError

    def evaluate(self, data: TaskData, predictions: list, n_resamples: int) -> tuple[dict[str, Any], list[dict]]:
        """``lmlab evaluate``'s metrics (with bootstrap CIs) and its per-example prediction rows."""
        raise NotImplementedError

    def text_examples(self, path: str | Path, fields: TaskFields) -> list[TextExample]:
        """A task file's examples as a person reads them (what the critique's lenses probe); [] when the
        task's examples are not texts to probe."""
        return []


class TextExample(NamedTuple):
    """One example as text: what the model reads (``text``, and a ``pair`` second text: a classifier's pair,
    a question's context) and, for a task with references, the ``reference`` output."""

    text: str
    pair: str | None = None
    reference: str | None = None


class TaskObjective:
    """Collate examples (indices into ``features``) into padded tensors and compute a task's loss.

    The one training loop calls ``batch`` and ``loss``; ``valid_batch`` builds validation batches when
    ``valid_features`` is given. Subclasses add their labels (:meth:`targets`) and their :meth:`loss`."""

    arch = "any"

    def __init__(
        self, name: str, features: dict[str, list], pad_id: int, valid_features: dict[str, list] | None = None
    ) -> None:
        self.name = self.task = name
        self.features, self.pad_id, self.valid_features = features, pad_id, valid_features

    def batch(self, indices: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training examples ``indices``, padded on the right."""
        return self._collate(self.features, indices)

    def valid_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Validation examples ``indices``."""
        return self._collate(self.valid_features, indices)

    def count_tokens(self, batch: dict[str, Tensor]) -> int:
        """The real tokens of a batch :meth:`batch` made (its padding left out): what the training loop's
        tokens and tokens per second count."""
        return int(batch["attention_mask"].sum())

    def _collate(self, features: dict[str, list], indices: Tensor) -> dict[str, Tensor]:
        rows = indices.tolist()
        ids = [features["input_ids"][i] for i in rows]
        T = max(len(r) for r in ids)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for k, i in enumerate(rows):
            n = len(ids[k])
            input_ids[k, :n] = torch.tensor(ids[k])
            mask[k, :n] = 1
            if features.get("token_type_ids"):
                types[k, :n] = torch.tensor(features["token_type_ids"][i])
        out = {"input_ids": input_ids, "token_type_ids": types, "attention_mask": mask}
        return {**out, **self.targets(features, rows, T)}

    def targets(self, features: dict[str, list], rows: list[int], T: int) -> dict[str, Tensor]:
        """The batch's labels (rows ``rows``, inputs padded to ``T``)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


def padded(rows: list[list[int]], fill: int, width: int | None = None) -> Tensor:
    """(len(rows), width) long tensor of ``rows`` padded on the right with ``fill`` (width: the longest row)."""
    out = torch.full((len(rows), width or max(len(r) for r in rows)), fill, dtype=torch.long)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


@torch.no_grad()
def predict_logits(
    model: nn.Module, objective: TaskObjective, n: int, batch_size: int, device: torch.device
) -> list[Tensor]:
    """Task-head logits for examples 0..n-1, one CPU tensor per example (unpadded for token tasks)."""
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    for start in range(0, n, batch_size):
        batch = objective.batch(torch.arange(start, min(start + batch_size, n)))
        logits = (
            model.task_logits(*(batch[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")))
            .float()
            .cpu()
        )
        lengths = batch["attention_mask"].sum(1).tolist()
        out += [logits[k] if logits.dim() == 2 else logits[k, : lengths[k]] for k in range(logits.shape[0])]
    model.train(was_training)
    return out
