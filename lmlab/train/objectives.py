"""Training objectives: small objects that turn a batch into a loss (STYLE habit 6).

The one training loop calls ``objective.loss(model, batch)`` and never knows which objective it
runs; a new objective (mlm, nsp, span, classify, …) is a new class here, not a copy of the loop.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import LmlabError

IGNORE_INDEX = -100  # label value that contributes no loss (padding, prompt tokens), as in HF


class Objective(Protocol):
    name: str

    def batch(self, tokens: Tensor) -> dict[str, Tensor]:
        """Turn a (B, seq_len + 1) window of packed tokens into model inputs and labels."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Mean loss over the batch's labelled tokens (a scalar tensor)."""


class CausalLM:
    """Autoregressive language modelling: maximise log P(x_t | x_<t), i.e. next-token cross-entropy."""

    name = "clm"

    def batch(self, tokens: Tensor) -> dict[str, Tensor]:
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}  # targets: the input shifted by one

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model(batch["input_ids"])  # (B, T, vocab_size)
        labels = batch["labels"]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


OBJECTIVES: dict[str, type] = {"clm": CausalLM}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise LmlabError(f"unknown --objective '{name}'; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


@torch.no_grad()
def evaluate_loss(model: nn.Module, objective: Objective, batches: list[dict[str, Tensor]], autocast) -> Tensor:
    """Mean objective loss over fixed batches, as a tensor (no host sync here)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=batches[0]["input_ids"].device)
    for batch in batches:
        with autocast():
            total += objective.loss(model, batch).float()
    model.train(was_training)
    return total / len(batches)
