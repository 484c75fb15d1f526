"""``qa``: SQuAD v1.1 / v2.0 JSON → exact match, F1 (the official SQuAD rules).

Long contexts are cut into overlapping windows (HF ``run_qa``'s doc stride); the head scores each
token as an answer's start and end, and :func:`lmlab.data.tasks.qa_postprocess` picks the best span.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.data import tasks as T
from lmlab.tasks.base import ObjectiveArgs, Selection, Task, TaskData, TaskFields, TaskObjective, TextExample


class QAObjective(TaskObjective):
    """The mean of the start and end cross-entropies."""

    def __init__(self, features, pad_id, valid_features=None) -> None:
        super().__init__("qa", features, pad_id, valid_features)

    def targets(self, features: dict[str, list], rows: list[int], T: int) -> dict[str, Tensor]:
        return {
            "start_positions": torch.tensor([features["start_positions"][i] for i in rows]),
            "end_positions": torch.tensor([features["end_positions"][i] for i in rows]),
        }

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model.task_logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
        start, end = logits.unbind(-1)  # (B, T) each
        return (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2


class QA(Task):
    name = "qa"
    labels_in_text = True

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
        examples = T.read_squad(path)
        # HF run_qa's 384/128/64, scaled down for short windows so each window still holds new context
        quarter = max(1, fields.max_length // 4)
        feats = T.qa_features(
            tokenizer,
            examples,
            max_length=fields.max_length,
            doc_stride=min(fields.doc_stride, quarter),
            max_query_length=min(64, quarter),
        )
        features = {
            "input_ids": [f.input_ids for f in feats],
            "token_type_ids": [f.token_type_ids for f in feats],
            "start_positions": [f.start_position for f in feats],
            "end_positions": [f.end_position for f in feats],
        }
        return TaskData("qa", features, 2, raw=examples, qa_features=feats)

    def head(self, config: ModelConfig, data: TaskData) -> ModelConfig:
        return dataclasses.replace(super().head(config, data), labels=["start", "end"])

    def objective(self, features, args: ObjectiveArgs) -> QAObjective:
        return QAObjective(features, args.pad_id, args.valid_features)

    def select(self, data: TaskData) -> Selection:
        return Selection("f1")

    def answers(self, data: TaskData, predictions: list[Tensor]) -> dict[str, str]:
        """Each question's predicted answer text (empty: no answer), by question id."""
        starts = [row[:, 0].tolist() for row in predictions]
        ends = [row[:, 1].tolist() for row in predictions]
        return T.qa_postprocess(
            data.raw, data.qa_features, starts, ends, version_2=getattr(data.raw, "version_2", False)
        )

    def metrics(self, data: TaskData, predictions: list[Tensor]) -> dict[str, float]:
        from lmlab import metrics as M  # torchmetrics takes seconds to import: only when scoring

        m = M.squad_metrics(self.answers(data, predictions), {ex.id: list(ex.answer_texts) for ex in data.raw})
        return {"exact": m["exact"], "f1": m["f1"]}

    def evaluate(
        self, data: TaskData, predictions: list[Tensor], n_resamples: int
    ) -> tuple[dict[str, Any], list[dict]]:
        from lmlab import metrics as M  # torchmetrics takes seconds to import: only when scoring

        answers = self.answers(data, predictions)
        references = {ex.id: list(ex.answer_texts) for ex in data.raw}
        result = M.with_cis("qa", answers, references, n_resamples=n_resamples)
        rows = [
            {"id": ex.id, "question": ex.question, "answers": list(ex.answer_texts), "prediction": answers[ex.id]}
            for ex in data.raw
        ]
        return result, rows

    def text_examples(self, path: str | Path, fields: TaskFields) -> list[TextExample]:
        return [TextExample(example.question, example.context) for example in T.read_squad(path)]
