"""A bidirectional encoder (BERT style), from the same blocks as the decoder, read top to bottom.

    token + position (+ segment) embeddings ──► norm ──► N × Block (no causal mask) ──► hidden states
        hidden[:, 0] ([CLS]) ──► pooler tanh(W·h + b) ──► NSP head (is B the sentence after A?)
        hidden ──► MLM head: dense ─ GELU ─ norm ─ (tied) vocabulary projection + bias ──► token logits

Every position sees every other real position (only padding is masked), so the model reads a
token in its full context: what masked-language-model pretraining (Devlin et al., 2019) needs, and
what classification, tagging and extractive QA fine-tune.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.model.blocks import Block, init_weights, make_norm, rope_cache, rope_dtype, run_block
from lmlab.model.heads import TaskHead, task_logits
from lmlab.model.quant import quantized_weights


class EncoderLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Embedding(config.block_size, d) if config.position == "learned" else None
        self.seg_emb = nn.Embedding(config.type_vocab_size, d) if config.type_vocab_size else None
        self.emb_norm = make_norm(config) if config.embedding_norm else nn.Identity()
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.pooler = nn.Linear(d, d, bias=config.bias) if config.pooler else None
        # the MLM head (BERT's cls.predictions): a transform, then the tied vocabulary projection
        self.mlm_dense = nn.Linear(d, d, bias=config.bias)
        self.mlm_norm = make_norm(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=config.bias)
        self.nsp_head = nn.Linear(d, 2) if config.nsp_head else None
        self.task_head = TaskHead(config) if config.task else None
        self.gradient_checkpointing = False  # set by the training loop: see lmlab.model.blocks.run_block
        self.tie_weights()
        if config.position == "rope":
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, config)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def encode(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Hidden states (B, T, n_embd). ``attention_mask`` (B, T) is 1 on real tokens, 0 on padding."""
        B, T = input_ids.shape
        x = self.tok_emb(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.seg_emb is not None:
            x = x + self.seg_emb(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        x = self.drop(self.emb_norm(x))
        rope = None
        if self.config.position == "rope":
            dtype = rope_dtype(x)
            rope = (self.rope_cos[:T].to(dtype), self.rope_sin[:T].to(dtype))
        # (B, 1, 1, T): every query sees every real key; None when nothing is padding (SDPA's fast path)
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = run_block(self, block, x, rope, mask, False)
        return self.norm_f(x)

    def pool(self, hidden: Tensor) -> Tensor:
        """The sentence vector: tanh(W·h_[CLS] + b) with a pooler, else h_[CLS] itself."""
        first = hidden[:, 0]
        return torch.tanh(self.pooler(first)) if self.pooler is not None else first

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits for hidden states (…, n_embd): pass only the masked positions to save the big matmul."""
        h = F.gelu(self.mlm_dense(hidden), approximate=self.config.gelu_approximate)
        return self.lm_head(self.mlm_norm(h))

    def nsp_logits(self, hidden: Tensor) -> Tensor:
        """(B, 2) logits: index 0 = B follows A, 1 = B is random (BERT's convention)."""
        if self.nsp_head is None:
            raise RuntimeError("this encoder has no NSP head (config.nsp_head is False)")
        return self.nsp_head(self.pool(hidden))

    def task_logits(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """The fine-tuned task head's logits (see :mod:`lmlab.model.heads`)."""
        return task_logits(self, input_ids, token_type_ids, attention_mask)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """MLM logits (B, T, vocab_size) at every position."""
        return self.mlm_logits(self.encode(input_ids, token_type_ids, attention_mask))

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters()) + quantized_weights(self)
        if not include_embeddings:
            n -= sum(e.weight.numel() for e in (self.tok_emb, self.pos_emb, self.seg_emb) if e is not None)
        return n
