"""Knowledge distillation (Hinton, Vinyals and Dean, 2015) as an objective that wraps the student's own.

The student learns from two signals: the labels its own objective trains on (the next token, a text's class, a
word's tag) and the teacher's whole distribution over them, softened by a temperature T::

    loss = alpha · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)) + (1 − alpha) · hard-label loss

The KL term is a mean over the predicted positions (a decoder's labelled next tokens, a tagger's labelled words,
a classifier's texts); T² keeps its gradients on the scale of the hard loss's as T grows (Hinton et al., §2).

:class:`Distillation` is an objective like any other for the one training loop: it makes the student objective's
batches, runs the student objective's loss while recording the student's logits and the inputs that made them,
runs the frozen teacher on the same inputs (no gradient) and mixes the two losses. It needs the student's logits
whole, so the student objective's cross-entropy is never chunked. In evaluation mode (the loop's validation) it
returns the student objective's own loss, so a run's validation loss, perplexity and ``best/`` mean what they mean
for any run of that objective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.objectives.losses import IGNORE_INDEX, unwrap_model


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), the mean over rows (the last dimension is the
    distribution; ``mask``, shaped like the logits without it, keeps the rows where it is True). In fp32. A weighted
    mean rather than a boolean index, so the shapes do not depend on the data."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # Σ p_t (log p_t − log p_s)
    if mask is None:
        return per_row.mean() * temperature**2
    weight = mask.to(per_row.dtype)
    return (per_row * weight).sum() / weight.sum().clamp(min=1) * temperature**2


def check_alpha_temperature(alpha: float, temperature: float) -> None:
    """One-line errors for a mixing weight outside [0, 1] or a temperature that is not positive."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        msg = f"alpha is {alpha!r}: expected a number in [0, 1] (the weight of the teacher's term)"
        raise LmlabError(msg, params="alpha")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < 1e4:
        msg = f"temperature is {temperature!r}: expected a positive number (1: no softening)"
        raise LmlabError(msg, params="temperature")


class _Recorder:
    """The student model as its objective sees it, recording each call that makes logits (``model(...)``,
    ``model.task_logits(...)``): the method, its arguments and what it returned. Everything else is the model's."""

    def __init__(self, model: nn.Module) -> None:
        self._model, self.calls = model, []

    def _record(self, method: str, args: tuple, kwargs: dict) -> Any:
        out = (self._model if method == "__call__" else getattr(self._model, method))(*args, **kwargs)
        self.calls.append((method, args, kwargs, out))
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._record("__call__", args, kwargs)

    def task_logits(self, *args: Any, **kwargs: Any) -> Any:
        return self._record("task_logits", args, kwargs)

    @property
    def _orig_mod(self) -> nn.Module:  # what unwrap_model finds under it: the model's head, config …
        return unwrap_model(self._model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class Distillation:
    """The student's objective ``student`` plus the KL to a frozen ``teacher``'s softened distribution (see the
    module docstring). ``teacher`` is put in evaluation mode with gradients off; it must be on the student's device."""

    def __init__(self, student: Any, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0) -> None:
        check_alpha_temperature(alpha, temperature)
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.name, self.arch = f"{student.name}+distill", student.arch
        if hasattr(student, "ce_chunk_size"):
            student.ce_chunk_size = 0  # the KL needs the student's logits whole
        for method in ("valid_batch", "count_tokens"):  # what the loop asks of a task objective, when it has it
            if hasattr(student, method):
                setattr(self, method, getattr(student, method))

    def batch(self, tokens: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return self.student.batch(tokens, generator)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        if not model.training:
            return self.student.loss(model, batch)
        recorder = _Recorder(model)
        hard = self.student.loss(recorder, batch)
        if not recorder.calls:
            raise LmlabError(f"objective {self.student.name}: no logits to distill (the model was not called)")
        method, args, kwargs, logits = recorder.calls[-1]
        with torch.no_grad():
            target = (self.teacher if method == "__call__" else getattr(self.teacher, method))(*args, **kwargs)
        if target.shape != logits.shape:
            raise LmlabError(
                f"the teacher's logits are {tuple(target.shape)}, the student's {tuple(logits.shape)}: "
                "distillation needs the same vocabulary (or labels)",
                params="teacher student",
            )
        kd = distillation_loss(logits, target, self.temperature, predicted_positions(logits, batch))
        return kd if self.alpha == 1.0 else self.alpha * kd + (1.0 - self.alpha) * hard


def predicted_positions(logits: Tensor, batch: dict[str, Tensor]) -> Tensor | None:
    """Which rows of ``logits`` (…, V) the hard loss trains: per token (B, T, V) the labels that are not
    ``IGNORE_INDEX`` (padding, prompts, a word's later pieces); per text (B, V) all of them (None)."""
    labels = batch.get("labels")
    if logits.dim() == 3 and labels is not None and labels.shape == logits.shape[:2]:
        return labels != IGNORE_INDEX
    if logits.dim() == 2:
        return None
    raise LmlabError(f"cannot tell which of the logits {tuple(logits.shape)} are predictions to distill")


__all__ = ["Distillation", "check_alpha_temperature", "distillation_loss", "predicted_positions"]
