"""What a training run needs to distill: the teacher, the mix and the temperature (:class:`Teacher`).

``lmlab distill`` (:mod:`lmlab.compress.distillation`) hands one to :func:`lmlab.train.pretrain.pretrain` (a
decoder's next-token distributions, on a prepared data folder) or :func:`lmlab.train.finetune.finetune` (a
classifier's or tagger's labels, on the task's file); each wraps its objective with :meth:`Teacher.wrap`
(:class:`~lmlab.objectives.distill.Distillation`), records :meth:`Teacher.meta` in every checkpoint's config.json,
and refuses to resume a run with another teacher, alpha or temperature (:meth:`Teacher.started`). The teacher's
weights are never part of the student's checkpoints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io.checkpoint import load_model
from lmlab.objectives.distill import Distillation, check_alpha_temperature


@dataclass
class Teacher:
    """A frozen teacher checkpoint and how the student learns from it (Hinton et al., 2015)."""

    checkpoint: Path  # resolved: an lmlab checkpoint folder
    alpha: float = 0.5  # weight of the KL term; 1 − alpha: the student objective's own (hard-label) loss
    temperature: float = 2.0  # softens both distributions; the KL is scaled by its square
    lora: Any = None  # a LoraSpec: the student trains adapters only (pretraining has no lora of its own)
    verify: bool = True

    def __post_init__(self) -> None:
        check_alpha_temperature(self.alpha, self.temperature)

    def meta(self) -> dict[str, Any]:
        """What config.json records of the distillation."""
        return {"distilled_from": str(self.checkpoint), "alpha": self.alpha, "temperature": self.temperature}

    def started(self, meta: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{parameter: (as the run started, now)}`` for :func:`~lmlab.train.loop.check_resume`."""
        from lmlab.train.loop import same_source

        was = meta.get("distilled_from")
        changes = {"alpha": (meta.get("alpha"), self.alpha), "temperature": (meta.get("temperature"), self.temperature)}
        if was is None or not same_source(was, self.checkpoint):
            changes["teacher"] = (was or "no teacher", str(self.checkpoint))
        return changes

    def load(self, device: torch.device) -> nn.Module:
        """The teacher on ``device``, in evaluation mode, without gradients (a LoRA teacher merged)."""
        model = load_model(self.checkpoint, device=device, merge_lora=True, verify=self.verify)
        return model.eval().requires_grad_(False)

    def wrap(
        self, objective: Any, device: torch.device, announce: bool = True, labels: list[str] | None = None
    ) -> Distillation:
        """``objective`` (the student's) with the KL to this teacher, loaded on ``device``. ``labels``: a task's, as
        the student's data names them, which must be the teacher's in its order (class k is the same class)."""
        teacher = self.load(device)
        if labels and teacher.config.labels and list(labels) != list(teacher.config.labels):
            raise LmlabError(
                f"teacher {self.checkpoint} has the labels {teacher.config.labels}, the training data "
                f"{list(labels)}: distillation compares the same classes in the same order",
                params="teacher",
            )
        if announce:
            print(
                f"lmlab: distilling from {self.checkpoint} ({teacher.num_params():,} parameters, frozen): alpha "
                f"{self.alpha:g} × T² · KL at temperature {self.temperature:g} + {1 - self.alpha:g} × {objective.name}",
                file=sys.stderr,
            )
        return Distillation(objective, teacher, self.alpha, self.temperature)


__all__ = ["Teacher"]
