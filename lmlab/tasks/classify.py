"""``classify``: JSONL/CSV/TSV with text (+ pair) and label(s) → accuracy, macro-F1 (torchmetrics).

Single-label (cross-entropy, optionally class-weighted), multi-label (binary cross-entropy per label)
or regression (mean squared error), as the labels say (:func:`lmlab.data.tasks.read_classify`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.data import tasks as T
from lmlab.errors import LmlabError
from lmlab.tasks.base import ObjectiveArgs, Selection, Task, TaskData, TaskFields, TaskObjective, TextExample

# the metric that picks best/, per kind of label (higher is better)
SELECT = {"single": "accuracy", "multi": "f1_micro", "regression": "pearson"}


class ClassifyObjective(TaskObjective):
    """Cross-entropy (``class_weights``: per class), binary cross-entropy per label, or mean squared error."""

    def __init__(
        self, features, pad_id, problem_type: str = "single", class_weights: Tensor | None = None, valid_features=None
    ) -> None:
        super().__init__("classify", features, pad_id, valid_features)
        self.problem_type, self.class_weights = problem_type, class_weights

    def targets(self, features: dict[str, list], rows: list[int], T: int) -> dict[str, Tensor]:
        labels = [features["labels"][i] for i in rows]
        return {"labels": torch.tensor(labels, dtype=torch.long if self.problem_type == "single" else torch.float)}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model.task_logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
        if self.problem_type == "single":
            weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
            return F.cross_entropy(logits, batch["labels"], weight=weight)
        if self.problem_type == "multi":
            return F.binary_cross_entropy_with_logits(logits, batch["labels"])
        return F.mse_loss(logits.squeeze(-1), batch["labels"])


class Classify(Task):
    name = "classify"
    label_per_text = True

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
        data = T.read_classify(
            path, text_field=fields.text_field, pair_field=fields.pair_field, label_field=fields.label_field
        )
        if labels is not None:
            if problem_type is not None and data.kind != problem_type:
                raise LmlabError(f"{path}: its labels are {data.kind}, the training file's are {problem_type}")
            data = T.check_labels(data, labels, path)
        features = T.encode_classify(tokenizer, data, fields.max_length)
        names = list(data.label_names)
        return TaskData(
            "classify", features, 1 if data.kind == "regression" else len(names), data.kind, names, raw=data
        )

    def check_training(self, data: TaskData, path: str | Path) -> None:
        if data.problem_type == "single" and len(data.labels) < 2:
            raise LmlabError(
                f"{path}: every example has the label {data.labels[0]!r}; a classifier learns to tell at least two "
                "labels apart (expected two or more in the training file)"
            )

    def objective(self, features, args: ObjectiveArgs) -> ClassifyObjective:
        weights = None
        if args.class_weights and args.problem_type == "single":
            counts = torch.bincount(torch.tensor(features["labels"]), minlength=args.num_labels).float()
            weights = counts.sum() / (len(counts) * counts.clamp(min=1))  # "balanced", as scikit-learn
        return ClassifyObjective(features, args.pad_id, args.problem_type, weights, args.valid_features)

    def select(self, data: TaskData) -> Selection:
        return Selection(SELECT[data.problem_type])

    def metrics(self, data: TaskData, predictions: list[Tensor]) -> dict[str, float]:
        from lmlab import metrics as M  # torchmetrics takes seconds to import: only when scoring

        stacked = torch.stack(predictions)
        gold = data.features["labels"]
        if data.problem_type == "single":
            m = M.classification_metrics(
                stacked.argmax(-1).tolist(), gold, num_classes=data.num_labels, label_names=data.labels
            )
            return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}
        if data.problem_type == "multi":
            m = M.multilabel_metrics(
                (stacked > 0).int().tolist(), [[int(v) for v in row] for row in gold], label_names=data.labels
            )
            return {k: m[k] for k in ("subset_accuracy", "f1_micro", "f1_macro") if k in m}
        m = M.regression_metrics(stacked.squeeze(-1).tolist(), gold)
        return {k: m[k] for k in ("mse", "pearson", "spearman") if k in m}

    def evaluate(
        self, data: TaskData, predictions: list[Tensor], n_resamples: int
    ) -> tuple[dict[str, Any], list[dict]]:
        from lmlab import metrics as M  # torchmetrics takes seconds to import: only when scoring

        raw, stacked, gold = data.raw, torch.stack(predictions), data.features["labels"]
        if data.problem_type == "regression":
            preds = stacked.squeeze(-1).tolist()
            rows = [
                {"index": i, "text": raw.texts[i], "label": g, "prediction": p}
                for i, (g, p) in enumerate(zip(gold, preds))
            ]
            return M.regression_metrics(preds, gold), rows
        if data.problem_type == "multi":
            probs = stacked.sigmoid()
            preds = (probs > 0.5).int().tolist()
            rows = [
                {
                    "index": i,
                    "text": raw.texts[i],
                    "labels": raw.labels[i],
                    "prediction": [n for n, on in zip(data.labels, p) if on],
                    "probabilities": dict(zip(data.labels, pr)),
                }
                for i, (p, pr) in enumerate(zip(preds, probs.tolist()))
            ]
            return M.multilabel_metrics(preds, [[int(v) for v in row] for row in gold], label_names=data.labels), rows
        probs = stacked.softmax(-1)
        confidence, preds = probs.max(-1)
        result = M.with_cis(
            "classify",
            preds.tolist(),
            gold,
            n_resamples=n_resamples,
            num_classes=data.num_labels,
            label_names=data.labels,
        )
        correct = (preds == torch.tensor(gold)).int().tolist()
        result["calibration"] = M.calibration(confidence.tolist(), correct, n_bins=min(10, len(gold)))
        rows = []
        for i, (p, c) in enumerate(zip(preds.tolist(), confidence.tolist())):
            row = {
                "index": i,
                "text": raw.texts[i],
                "label": data.labels[gold[i]],
                "prediction": data.labels[p],
                "confidence": c,
            }
            if raw.pairs is not None:
                row["pair"] = raw.pairs[i]
            row["probabilities"] = dict(zip(data.labels, probs[i].tolist()))
            rows.append(row)
        return result, rows

    def text_examples(self, path: str | Path, fields: TaskFields) -> list[TextExample]:
        data = T.read_classify(
            path, text_field=fields.text_field, pair_field=fields.pair_field, label_field=fields.label_field
        )
        return [
            TextExample(text, data.pairs[i] if data.pairs is not None else None) for i, text in enumerate(data.texts)
        ]
