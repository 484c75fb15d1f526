"""``POST /v1/embeddings``: an encoder's sentence vectors, pooled as the folder's sentence-transformers
modules say (``modules.json``: a Pooling module's ``1_Pooling/config.json`` — mean, CLS or max over the
real tokens — and a Normalize module), so a sentence-transformers folder such as all-MiniLM-L6-v2 gives
the vectors ``sentence-transformers`` gives. A folder without those files is mean-pooled, unnormalised."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def pooling_of(path: Path | None) -> tuple[str, bool, int | None]:
    """The pooling mode (``mean``, ``cls`` or ``max``), whether vectors are normalised, and the
    sentence-transformers maximum sequence length, from the folder at ``path``."""
    mode, normalize, max_len = "mean", False, None
    modules = path / "modules.json" if path is not None else None
    if modules is None or not modules.is_file():
        return mode, normalize, max_len
    for module in json.loads(modules.read_text(encoding="utf-8")):
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            config_file = path / module.get("path", "") / "config.json"
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
            if config.get("pooling_mode_cls_token"):
                mode = "cls"
            elif config.get("pooling_mode_max_tokens"):
                mode = "max"
        normalize = normalize or kind.endswith("Normalize")
    bert_config = path / "sentence_bert_config.json"
    if bert_config.is_file():
        max_len = json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length")
    return mode, normalize, max_len


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Sentence vectors (B, d) from hidden states (B, T, d) over the real tokens (``mask`` (B, T))."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embed(lm, texts: list[str], batch_size: int = 32) -> tuple[list[list[float]], int]:
    """The vectors of ``texts`` and the tokens read."""
    mode, normalize, max_len = pooling_of(lm.path)
    limit = min(max_len or lm.block_size, lm.block_size)
    vectors, tokens = [], 0
    for start in range(0, len(texts), batch_size):
        encoded = lm.tokenizer.encode_batch(texts[start : start + batch_size], add_special_tokens=True)
        ids = [row if len(row) <= limit else row[: limit - 1] + row[-1:] for row in encoded]  # keeps [SEP]
        width = max(len(row) for row in ids)
        pad = lm.tokenizer.pad_id or 0
        batch = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=lm.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=lm.device)
        hidden = lm.model.encode(batch, attention_mask=mask)
        pooled = pool(hidden.float(), mask, mode)
        vectors += (F.normalize(pooled, dim=-1) if normalize else pooled).tolist()
        tokens += sum(len(row) for row in ids)
    return vectors, tokens
