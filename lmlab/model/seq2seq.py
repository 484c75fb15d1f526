"""An encoder–decoder Transformer (Vaswani et al., 2017; T5, Raffel et al., 2020), from the same blocks.

    source ids ──► token emb (+ pos) ──► N × Block (bidirectional) ──► norm ──► memory
                                                                                  │
                                                                                  └────┐ K, V of every decoder block:
                                                                                       ▼ once per source
    target ids ──► token emb (+ pos) ──► M × Block(cross=True): causal self-attn ─ cross-attn ─ MLP ──► norm
                                                                                                         │
                                                                                                         ▼
                                                                                              logits ◄── LM head

The model gives P(y_t | y_<t, x): the decoder is a causal language model over the target whose
every block also attends to the encoded source. Training feeds the target shifted right behind a
start token (teacher forcing, :func:`shift_right`); generation runs the encoder once, computes each
decoder block's cross-attention keys and values once, and then decodes one token per step through
the decoder's self-attention :class:`~lmlab.model.blocks.KVCache` — through lmlab's own decoding loop
(:func:`lmlab.generate.seq2seq.generate_seq2seq`, :func:`~lmlab.generate.seq2seq.seq2seq_beam_search`).

One token embedding serves the source, the target and (when ``tie_embeddings``) the output
projection, as both papers share them. The encoder masks source padding as
:class:`~lmlab.model.encoder.EncoderLM` does; cross-attention masks it too.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model.blocks import Block, KVCache, init_weights, make_norm, rope_cache, rope_dtype, run_block
from lmlab.model.decoder import DecoderLM
from lmlab.model.quant import quantized_weights

MemoryKV = list[
    tuple[Tensor, Tensor]
]  # per decoder block: cross-attention keys and values, (B, n_kv_heads, S, head_dim) each


class Seq2SeqLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, learned = config.n_embd, config.position == "learned"
        self.tok_emb = nn.Embedding(config.vocab_size, d)  # shared: source, target and the tied LM head
        self.enc_pos_emb = nn.Embedding(config.block_size, d) if learned else None
        self.dec_pos_emb = nn.Embedding(config.block_size, d) if learned else None  # each side its own table (BART)
        self.enc_emb_norm = make_norm(config) if config.embedding_norm else nn.Identity()
        self.dec_emb_norm = make_norm(config) if config.embedding_norm else nn.Identity()
        self.drop = nn.Dropout(config.dropout)
        self.enc_blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.enc_norm_f = (
            make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        )  # post-norm ends normed
        self.dec_blocks = nn.ModuleList(Block(config, i, cross=True) for i in range(config.n_decoder_layer))
        self.dec_norm_f = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # set by the training loop: see lmlab.model.blocks.run_block
        self.tie_weights()
        if config.position == "rope":
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, config)

    def _embed(self, ids: Tensor, positions: Tensor, pos_emb: nn.Embedding | None, emb_norm: nn.Module) -> Tensor:
        x = self.tok_emb(ids)  # (B, T, n_embd)
        if self.config.scale_embedding:  # BART's scale_embedding: token embeddings × √d, positions as they are
            x = x * math.sqrt(self.config.n_embd)
        if pos_emb is not None:
            x = x + pos_emb(positions)
        return self.drop(emb_norm(x))

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        if self.config.position != "rope":
            return None
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T | B×T, head_dim)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, head_dim): one per batch row
        return cos.to(dtype), sin.to(dtype)

    # -- encoder -------------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The memory (B, S, n_embd) of source ids (B, S); ``attention_mask`` (B, S) is 1 on real tokens, 0 on
        padding."""
        S = input_ids.shape[1]
        positions = torch.arange(S, device=input_ids.device)
        x = self._embed(input_ids, positions, self.enc_pos_emb, self.enc_emb_norm)
        rope = self._rope(positions, rope_dtype(x))
        mask = _key_mask(attention_mask)  # every source position sees every real source position
        for block in self.enc_blocks:
            x = run_block(self, block, x, rope, mask, False)
        return self.enc_norm_f(x)

    def memory_kv(self, memory: Tensor) -> MemoryKV:
        """Every decoder block's cross-attention keys and values of ``memory``: computed once per source."""
        return [block.cross_attn.memory_kv(memory) for block in self.dec_blocks]

    # -- decoder -------------------------------------------------------------------------------

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        *,
        memory_kv: MemoryKV | None = None,
        kv_cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        position_ids: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cache_len: int | None = None,
        logits_to_keep: int = 0,
        hidden_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab_size) for target ids (B, T) given the encoder's ``memory`` (B, S, n_embd).

        ``memory_mask`` (B, S) is the source's attention mask. While decoding, pass ``memory_kv``
        (from :meth:`memory_kv`) instead of ``memory``, and the self-attention cache arguments as
        :meth:`DecoderLM.forward <lmlab.model.decoder.DecoderLM.forward>` takes them: ``kv_cache``
        (:meth:`new_kv_cache`), ``input_pos`` (T,) its slots, ``cache_len``, ``position_ids``,
        ``key_padding_mask`` and ``logits_to_keep``. ``hidden_only`` returns the decoder's final hidden
        states (B, T, n_embd) instead of logits (the chunked cross-entropy applies the LM head itself).
        """
        T = decoder_input_ids.shape[1]
        if memory_kv is None:
            if memory is None:
                raise LmlabError("Seq2SeqLM.decode needs the encoder output: pass memory (or memory_kv)")
            memory_kv = self.memory_kv(memory)
        if input_pos is None:
            input_pos = torch.arange(T, device=decoder_input_ids.device)
        if position_ids is None:
            position_ids = input_pos
        mask, is_causal = DecoderLM._mask(T, input_pos, kv_cache, cache_len, key_padding_mask)  # the decoder-only rule
        cross_mask = _key_mask(memory_mask)
        x = self._embed(decoder_input_ids, position_ids, self.dec_pos_emb, self.dec_emb_norm)
        rope = self._rope(position_ids, rope_dtype(x))
        for block, kv in zip(self.dec_blocks, memory_kv):
            x = run_block(self, block, x, rope, mask, is_causal, kv_cache, input_pos, cache_len, kv, cross_mask)
        x = self.dec_norm_f(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return x if hidden_only else self.lm_head(x)  # (B, T, vocab_size)

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        hidden_only: bool = False,
    ) -> Tensor:
        """Logits (B, T_dec, vocab_size): source ids (B, S) with their ``attention_mask``, target ids (B, T_dec);
        ``hidden_only``: the decoder's final hidden states (B, T_dec, n_embd) instead."""
        return self.decode(
            decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask, hidden_only=hidden_only
        )

    def new_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """The decoder self-attention's cache: one static buffer per decoder block."""
        ref = self.tok_emb.weight
        config = dataclasses.replace(self.config, n_layer=self.config.n_decoder_layer)
        return KVCache(config, batch_size, max_len, dtype=dtype or ref.dtype, device=ref.device)

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head (Press & Wolf, 2017) when the config says so."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters()) + quantized_weights(self)  # tied weights are counted once
        if not include_embeddings:
            n -= sum(e.weight.numel() for e in (self.tok_emb, self.enc_pos_emb, self.dec_pos_emb) if e is not None)
        return n


def _key_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, S) 1/0 → (B, 1, 1, S) bool, the keys every query may see; None stays None (SDPA's fast path)."""
    return None if attention_mask is None else attention_mask[:, None, None, :].bool()


def shift_right(labels: Tensor, start_id: int) -> Tensor:
    """Teacher forcing's decoder input: [start, y_0, …, y_{T-2}] for labels y (B, T).

    Ignored labels (negative, e.g. -100) become ``start_id``: any id does, as the positions they feed
    predict ignored labels too.
    """
    start = labels.new_full((labels.shape[0], 1), start_id)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted < 0, start_id)
