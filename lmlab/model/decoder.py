"""A decoder-only language model (GPT-2 and LLaMA style), read top to bottom.

    token ids ──► token embedding (+ learned positions) ──► N × Block ──► final norm ──► LM head ──► logits

A language model gives P(x_t | x_<t); the causal mask in every attention layer is what makes
position t see only positions ≤ t, so one forward pass scores every next token of a sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.kernels import cpu_decode_head
from lmlab.model.blocks import Block, KVCache, init_weights, make_norm, rope_cache, rope_dtype, run_block
from lmlab.model.heads import TaskHead, task_logits
from lmlab.model.quant import quantized_weights


class DecoderLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config) if config.norm_placement == "pre" else nn.Identity()  # post-norm ends normed
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.task_head = TaskHead(config) if config.task else None
        self.gradient_checkpointing = False  # set by the training loop: see lmlab.model.blocks.run_block
        self.tie_weights()
        if config.position == "rope":
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, config)

    def forward(
        self,
        idx: Tensor,
        *,
        kv_cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        position_ids: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache_len: int | None = None,
        logits_to_keep: int = 0,
        hidden_only: bool = False,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab_size) for token ids ``idx`` (B, T).

        Training passes ``idx`` alone. Decoding passes a ``kv_cache`` and ``input_pos`` (T,), the
        cache slots of these tokens; ``cache_len`` (a Python int) lets attention read only the first
        slots, ``key_padding_mask`` (B, S) marks real tokens (True) against left padding, and
        ``position_ids`` (T,) or (B, T) give positions when they differ from the slots.
        ``segment_ids`` (B, T) packs several sequences in a row for training: a token attends only to
        earlier tokens of its own segment (pass ``position_ids`` restarting at each segment too).
        ``logits_to_keep=n`` computes logits for the last n positions only (1 while decoding).
        ``attn_mask`` (B, 1, T, S), True where a query sees a key, replaces the mask built from the slots and
        ``key_padding_mask``: continuous batching, where every row is at its own position, builds its own.
        """
        B, T = idx.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        if position_ids is None:
            position_ids = input_pos
        if attn_mask is not None:
            mask, is_causal = attn_mask, False
        else:
            mask, is_causal = self._mask(T, input_pos, kv_cache, cache_len, key_padding_mask)
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("segment_ids (packed training rows) cannot be combined with a KV cache")
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask, is_causal = (
                causal & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]),
                False,
            )  # (B, 1, T, T)

        x = self.tok_emb(idx)  # (B, T, n_embd)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        rope = None
        if self.config.position == "rope":
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]  # (T | B×T, head_dim)
            if cos.dim() == 3:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, head_dim): one per batch row
            dtype = rope_dtype(x)
            rope = (cos.to(dtype), sin.to(dtype))
        if self.training and self.drop.p > 0:  # a no-op otherwise: skip the module call
            x = self.drop(x)
        for block in self.blocks:
            x = run_block(self, block, x, rope, mask, is_causal, kv_cache, input_pos, cache_len)
        x = self.norm_f(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return x if hidden_only else self.lm_logits(x)  # (B, T, vocab_size)

    def lm_logits(self, x: Tensor) -> Tensor:
        """The LM head: logits (…, vocab_size) from final hidden states (…, n_embd). Decoding on CPU
        (inference mode, at most 64 rows) takes the fastest kernel for the row count (see
        :func:`cpu_decode_head`): this matmul is half of a small model's decode step."""
        if torch.compiler.is_compiling() or not (
            torch.is_inference_mode_enabled()
            and x.device.type == "cpu"
            and x.shape[:-1].numel() <= 64
            and type(self.lm_head) is nn.Linear
        ):
            return self.lm_head(x)
        return cpu_decode_head(self.lm_head.weight, x)

    def encode(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Final hidden states (B, T, n_embd) of right-padded inputs (causal attention never looks at
        the padding after a token, so ``attention_mask`` only matters to the heads that pool)."""
        return self(input_ids, hidden_only=True)

    def task_logits(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """The fine-tuned task head's logits (see :mod:`lmlab.model.heads`); classification reads the last real
        token."""
        return task_logits(self, input_ids, token_type_ids, attention_mask)

    @staticmethod
    def _mask(
        T: int, input_pos: Tensor, kv_cache: KVCache | None, cache_len: int | None, key_padding_mask: Tensor | None
    ) -> tuple[Tensor | None, bool]:
        """The attention mask, built once per forward and shared by every layer.

        Returns (mask, is_causal): without a cache or padding, SDPA's own causal mask is fastest.
        Otherwise a boolean (B|1, 1, T, S) mask: key slot s is visible to the query at slot p when
        s ≤ p and s holds a real token. A query always sees itself, so a padding row is never
        empty (an empty row would give NaN).
        """
        if kv_cache is None and key_padding_mask is None:
            return None, T > 1
        if key_padding_mask is None and cache_len is not None:
            # without padding, reading exactly the first cache_len slots needs no explicit mask: one new
            # token sees them all, and a prefill into an empty cache is plain causal — SDPA's fast paths
            if T == 1:
                return None, False
            if cache_len == T:
                return None, True
        S = (cache_len or kv_cache.max_len) if kv_cache is not None else T
        slots = torch.arange(S, device=input_pos.device)
        visible = slots[None, :] <= input_pos[:, None]  # (T, S) causal
        mask = visible[None, None]  # (1, 1, T, S)
        if key_padding_mask is not None:
            itself = slots[None, :] == input_pos[:, None]
            mask = (mask & key_padding_mask[:, None, None, :S].bool()) | itself
        return mask, False

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head (Press & Wolf, 2017) when the config says so."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # -- sizes -------------------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters()) + quantized_weights(self)  # tied weights are counted once
        if not include_embeddings:
            n -= self.tok_emb.weight.numel()  # when tied, the head goes with it (as in ModelConfig)
            n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return n

    def new_kv_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, static: bool = False
    ) -> KVCache:
        ref = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, dtype=dtype or ref.dtype, device=ref.device, static=static)
