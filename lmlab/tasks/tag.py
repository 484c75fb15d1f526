"""``tag``: CoNLL or JSONL tokens/tags (BIO, IOB1, IOBES) → entity F1 (seqeval).

Each word's tag is learned and predicted on its first sub-token (token cross-entropy, the other
sub-tokens ignored), as BERT's NER recipe does (:func:`lmlab.data.tasks.align_tags`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.data import tasks as T
from lmlab.objectives.losses import IGNORE_INDEX
from lmlab.tasks.base import ObjectiveArgs, Selection, Task, TaskData, TaskFields, TaskObjective, TextExample, padded


class TagObjective(TaskObjective):
    """Token cross-entropy on the first sub-token of each word."""

    def __init__(self, features, pad_id, valid_features=None) -> None:
        super().__init__("tag", features, pad_id, valid_features)

    def targets(self, features: dict[str, list], rows: list[int], T: int) -> dict[str, Tensor]:
        return {"labels": padded([features["labels"][i] for i in rows], IGNORE_INDEX, T)}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model.task_logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


class Tag(Task):
    name = "tag"
    labels_in_text = True
    fraction_metrics = ("accuracy", "f1_macro", "f1")  # seqeval's entity F1 is a fraction

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
        data = T.read_tags(path)
        if labels is not None:
            data = T.check_tags(data, labels, path)
        names = list(labels if labels is not None else data.tag_names)
        features = T.align_tags(tokenizer, data, {t: i for i, t in enumerate(names)}, fields.max_length)
        return TaskData("tag", features, len(names), labels=names, raw=data)

    def objective(self, features, args: ObjectiveArgs) -> TagObjective:
        return TagObjective(features, args.pad_id, args.valid_features)

    def select(self, data: TaskData) -> Selection:
        return Selection("f1")

    def tags(self, data: TaskData, predictions: list[Tensor]) -> list[list[str]]:
        """Each sentence's predicted tags, one per word."""
        return [
            T.tags_from_predictions(row.argmax(-1).tolist(), word_ids, data.labels, n_words=len(words))
            for row, word_ids, words in zip(predictions, data.features["word_ids"], data.raw.words)
        ]

    def metrics(self, data: TaskData, predictions: list[Tensor]) -> dict[str, float]:
        from lmlab import metrics as M  # torchmetrics takes seconds to import: only when scoring

        m = M.tagging_metrics(self.tags(data, predictions), data.raw.tags)
        return {"f1": m["f1"], "precision": m["precision"], "recall": m["recall"]}

    def evaluate(
        self, data: TaskData, predictions: list[Tensor], n_resamples: int
    ) -> tuple[dict[str, Any], list[dict]]:
        from lmlab import metrics as M  # torchmetrics takes seconds to import: only when scoring

        pred_tags, raw = self.tags(data, predictions), data.raw
        result = M.with_cis("tag", pred_tags, raw.tags, n_resamples=n_resamples)
        rows = [
            {"index": i, "tokens": w, "tags": g, "prediction": p}
            for i, (w, g, p) in enumerate(zip(raw.words, raw.tags, pred_tags))
        ]
        return result, rows

    def text_examples(self, path: str | Path, fields: TaskFields) -> list[TextExample]:
        return [TextExample(" ".join(words)) for words in T.read_tags(path).words]
