"""Task heads: what fine-tuning puts on top of a backbone's hidden states.

    classify   one vector per text ──► dropout ──► Linear(n_embd, num_labels)
               (an encoder's pooled [CLS]; a decoder's last real token, which has read the whole text)
    tag        every token's hidden state ──► dropout ──► Linear(n_embd, num_labels)
    qa         every token's hidden state ──► Linear(n_embd, 2): answer-start and answer-end logits

The head lives in the model (``model.task_head``) when ``config.task`` is set, so a fine-tuned
checkpoint is an ordinary checkpoint: ``load_model`` gives the model with its head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig

# what each head reads: one vector per text ("sequence": pooled) or every token's hidden state ("token")
HEAD_INPUTS = {"classify": "sequence", "tag": "token", "qa": "token"}


def pools(config: ModelConfig) -> bool:
    """Whether ``config``'s task head reads one vector per text (a pooled [CLS], a decoder's last token)."""
    return HEAD_INPUTS.get(config.task) == "sequence"


class TaskHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.drop = nn.Dropout(config.dropout)
        # a decoder's sequence classifier has no bias, as HF's GPT-2/LLaMA ``score`` layer (so it exports exactly)
        self.out = nn.Linear(config.n_embd, config.num_labels, bias=not (config.arch == "decoder" and pools(config)))

    def forward(self, features: Tensor) -> Tensor:
        return self.out(self.drop(features))


def last_token(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, n_embd): each row's hidden state at its last real token (right padding)."""
    if attention_mask is None:
        return hidden[:, -1]
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def task_logits(
    model: nn.Module, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
) -> Tensor:
    """The task head's logits: (B, num_labels) for classify, (B, T, num_labels) for tag, (B, T, 2) for qa."""
    config = model.config
    if model.task_head is None:
        raise RuntimeError("this model has no task head (config.task is empty)")
    hidden = model.encode(input_ids, token_type_ids, attention_mask)
    if pools(config):
        features = model.pool(hidden) if config.arch == "encoder" else last_token(hidden, attention_mask)
        return model.task_head(features)
    return model.task_head(hidden)
