"""The one decoding path: prefill the prompt once, then one token per step through the KV cache.

:func:`decode` is a generator (STYLE habit 13): it yields the next token of every sequence as soon as
it is chosen, so ``generate``, streaming, chat and the server are thin wrappers around it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.generate.processors import LogitsProcessor


@torch.inference_mode()
def decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    processors: Sequence[LogitsProcessor] = (),
    sample: bool = False,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> Iterator[Tensor]:
    """Yield, step by step, the next token (B,) of each prompt; a finished row yields ``pad_id``.

    Prompts of different lengths are left-padded; padding is masked out of attention and each row's
    positions start at its first real token, so a prompt's output does not depend on its batch.
    Stops after ``max_new_tokens`` steps or when every row has produced a stop id.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmlabError("generation needs at least one token of prompt per sequence (an empty prompt encodes to nothing)")
    config = model.config
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    if total > config.block_size:
        raise LmlabError(
            f"prompt ({P} tokens) + --max-new-tokens ({max_new_tokens}) = {total} exceeds the model's block_size {config.block_size}"
        )
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((B, total), dtype=torch.bool, device=device)  # True where a slot holds a real token
    for row, prompt in enumerate(prompts):
        ids[row, P - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
        real[row, P - len(prompt) : P] = True
    padded = any(len(p) < P for p in prompts)
    position_ids = (real[:, :P].long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
    cache = model.new_kv_cache(B, total)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    logits = model(
        ids, kv_cache=cache, input_pos=torch.arange(P, device=device), position_ids=position_ids,
        key_padding_mask=real if padded else None, cache_len=P, logits_to_keep=1,
    )[:, -1]  # (B, vocab_size)
    next_position = position_ids[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    seq = ids
    for step in range(max_new_tokens):
        scores = logits.float()
        for processor in processors:
            scores = processor(seq, scores)
        if sample:
            next_token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
        else:
            next_token = scores.argmax(dim=-1)
        next_token = next_token.masked_fill(finished, pad_id)
        yield next_token
        if stop.numel():
            finished |= torch.isin(next_token, stop)
            if bool(finished.all()):
                return
        if step == max_new_tokens - 1:
            return
        pos = P + step
        real[:, pos] = True
        seq = torch.cat([seq, next_token[:, None]], dim=1)
        logits = model(
            next_token[:, None], kv_cache=cache, input_pos=torch.tensor([pos], device=device), position_ids=next_position,
            key_padding_mask=real if padded else None, cache_len=pos + 1,
        )[:, -1]
        next_position = next_position + 1
