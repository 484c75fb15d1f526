"""``chat``: JSONL messages (or prompt/response) → loss on assistant tokens (picks best/), their accuracy.

A decoder trains on conversations rendered by its chat template (lmlab's default when the tokenizer has
none, written into every checkpoint's ``tokenizer_config.json`` so ``lmlab chat`` and an export render
alike), the loss on the assistant messages only (:func:`lmlab.data.tasks.encode_conversation`). Each
conversation is one padded row, or — ``--pack`` — several share a row (:func:`pack_examples`), each
attending only to itself through per-row segment and position ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.data import tasks as T
from lmlab.errors import LmlabError
from lmlab.objectives.losses import IGNORE_INDEX
from lmlab.tasks.base import ObjectiveArgs, Selection, Task, TaskData, TaskFields
from lmlab.tasks.seq2seq import NextTokenObjective, without_head
from lmlab.templates import DEFAULT_CHAT_TEMPLATE


def pack_examples(features: dict[str, list], max_length: int) -> dict[str, list]:
    """Pack examples (``input_ids`` with aligned ``labels``) into rows of at most ``max_length`` tokens, first-fit in
    order, with ``segment_ids`` (1, 2, … per example in its row), ``position_ids`` restarting at 0 for each and
    ``examples`` (which examples a row holds, in order): the decoder's block-diagonal causal mask keeps every
    example to itself, so a packed row trains exactly as its examples would alone, with less padding. An
    example's first label is never trained on (chat rows start with a system or user turn), so the token that
    ends one example and is followed by the next learns nothing across the boundary."""
    rows: list[dict[str, list]] = []
    for index, (ids, labels) in enumerate(zip(features["input_ids"], features["labels"])):
        row = next((r for r in rows if len(r["input_ids"]) + len(ids) <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "segment_ids": [], "position_ids": [], "examples": []}
            rows.append(row)
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + list(labels[1:])
        row["segment_ids"] += [len(row["examples"]) + 1] * len(ids)
        row["position_ids"] += list(range(len(ids)))
        row["examples"].append(index)
    return {key: [r[key] for r in rows] for key in ("input_ids", "labels", "segment_ids", "position_ids", "examples")}


@torch.no_grad()
def assistant_token_accuracy(
    model: nn.Module, objective: NextTokenObjective, n: int, batch_size: int, device: torch.device
) -> float:
    """The share of assistant tokens (the labelled ones) of examples 0..n-1 that the model predicts
    greedily from the tokens before them."""
    right, total = _right_and_total(model, objective, n, batch_size, device)
    return right / total


def _right_and_total(
    model: nn.Module, objective: NextTokenObjective, n: int, batch_size: int, device: torch.device
) -> tuple[int, int]:
    was_training = model.training
    model.eval()
    right = total = 0
    for start in range(0, n, batch_size):
        batch = objective.batch(torch.arange(start, min(start + batch_size, n)))
        labels = batch["labels"][:, 1:].to(device)
        trained = labels != IGNORE_INDEX
        predicted = model(batch["input_ids"].to(device))[:, :-1].argmax(-1)
        right += int((predicted == labels)[trained].sum())
        total += int(trained.sum())
    model.train(was_training)
    return right, total


class Chat(Task):
    name = "chat"
    uses = ("finetune",)
    generates = True
    conversational = True
    archs = ("decoder",)

    def check_base(self, config: ModelConfig, fields: TaskFields, base: Path | str) -> None:
        if config.arch != "decoder":
            raise LmlabError(
                f"{base}: a{'n' if config.arch[0] in 'aeiou' else ''} {config.arch} model; task chat fine-tunes "
                "decoders",
                params="task",
            )
        super().check_base(config, fields, base)

    def prepare_tokenizer(self, tokenizer) -> None:
        if tokenizer.chat_template is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # saved with every checkpoint: chat and export render alike

    def read(
        self,
        path: str | Path,
        tokenizer,
        fields: TaskFields,
        *,
        arch: str = "decoder",
        labels: list[str] | None = None,
        problem_type: str | None = None,
    ) -> TaskData:
        data = T.read_chat(path)
        return TaskData("chat", T.encode_chat(tokenizer, data, fields.max_length), 0, raw=data)

    def head(self, config: ModelConfig, data: TaskData) -> ModelConfig:
        return without_head(config)

    def objective(self, features, args: ObjectiveArgs) -> NextTokenObjective:
        return NextTokenObjective("chat", features, args.pad_id, args.arch, args.start_id, args.valid_features)

    def select(self, data: TaskData) -> Selection:
        return Selection(None, higher_is_better=False)  # the lowest validation loss (on assistant tokens)

    def describe(self, data: TaskData, arch: str) -> str:
        return "loss on assistant turns"

    def predict(
        self, model, tokenizer, data, *, batch_size, device, pad_id=0, max_new_tokens=128, num_beams=1
    ) -> list[tuple[int, int]]:
        """One (right, total) count of greedily predicted assistant tokens for the whole of ``data``."""
        return [
            _right_and_total(
                model,
                self.objective(data.features, ObjectiveArgs(pad_id, arch="decoder")),
                len(data),
                batch_size,
                device,
            )
        ]

    def metrics(self, data: TaskData, predictions: list[tuple[int, int]]) -> dict[str, float]:
        right, total = map(sum, zip(*predictions))
        return {"token_accuracy": right / total}
