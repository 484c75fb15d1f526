"""Decoding an encoder–decoder (:class:`~lmlab.model.seq2seq.Seq2SeqLM`) through lmlab's one decoding loop.

The encoder runs once per batch of sources and each decoder block's cross-attention keys and values
are computed once (:func:`condition_on_sources`); the decoder, bound to them, then looks like a
decoder-only model to :func:`lmlab.generate.loop.decode` and :class:`~lmlab.generate.loop.BeamSearch`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.generate.loop import BeamSearch, Step, StopRule, decode
from lmlab.model.blocks import KVCache
from lmlab.model.seq2seq import MemoryKV, Seq2SeqLM

# -- generation: lmlab's decoding loop over the decoder, conditioned on encoded sources -------------


class _SourceCache(KVCache):
    """The decoder's self-attention cache, carrying the sources' cross-attention keys and values:
    when beam search reorders or repeats the cache's rows, the sources follow them."""

    def __init__(
        self, model: Seq2SeqLM, batch_size: int, max_len: int, memory_kv: MemoryKV, memory_mask: Tensor | None, dtype
    ) -> None:
        ref = model.tok_emb.weight
        config = dataclasses.replace(model.config, n_layer=model.config.n_decoder_layer)
        super().__init__(config, batch_size, max_len, dtype=dtype or ref.dtype, device=ref.device)
        self.memory_kv, self.memory_mask = memory_kv, memory_mask

    def select(self, rows: Tensor) -> None:
        super().select(rows)
        self.memory_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.memory_kv]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, rows)


class _ConditionedDecoder(nn.Module):
    """The decoder of a :class:`Seq2SeqLM` bound to a batch of encoded sources, behind the interface of
    a decoder-only model (``forward(idx, *, kv_cache, …)``, ``new_kv_cache``, ``config``), so that
    :func:`lmlab.generate.loop.decode` and :class:`~lmlab.generate.loop.BeamSearch` drive it as they
    drive a :class:`~lmlab.model.decoder.DecoderLM`: one decoding path for every architecture."""

    def __init__(self, model: Seq2SeqLM, memory_kv: MemoryKV, memory_mask: Tensor | None) -> None:
        super().__init__()
        self.model, self.config = model, model.config
        self.memory_kv, self.memory_mask = memory_kv, memory_mask

    def new_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return _SourceCache(self.model, batch_size, max_len, self.memory_kv, self.memory_mask, dtype)

    def forward(self, idx: Tensor, *, kv_cache: KVCache | None = None, **decoder_args) -> Tensor:
        memory_kv, memory_mask = (
            (kv_cache.memory_kv, kv_cache.memory_mask) if kv_cache is not None else (self.memory_kv, self.memory_mask)
        )
        if idx.shape[0] != memory_kv[0][0].shape[0]:
            raise LmlabError(
                "beam search over a seq2seq model needs the KV cache (use_cache=True): it carries the sources"
            )
        return self.model.decode(idx, memory_mask=memory_mask, memory_kv=memory_kv, kv_cache=kv_cache, **decoder_args)


def condition_on_sources(
    model: Seq2SeqLM, source_ids: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[nn.Module, list[list[int]]]:
    """Encode the sources (right-padded with ``pad_id``, padding masked) once; return the decoder bound to
    them and the decoder prompts (the start token, one per source) that lmlab's decoding loops take."""
    if not source_ids or any(len(s) == 0 for s in source_ids):
        raise LmlabError(
            "seq2seq generation needs at least one source token per sequence (an empty source encodes to nothing)"
        )
    B, S = len(source_ids), max(len(s) for s in source_ids)
    if S > model.config.block_size:
        raise LmlabError(f"a source has {S} tokens; the model's block_size is {model.config.block_size}")
    device = model.tok_emb.weight.device
    ids = torch.full((B, S), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, S), dtype=torch.long, device=device)
    for row, source in enumerate(source_ids):
        ids[row, : len(source)] = torch.tensor(list(source), dtype=torch.long, device=device)
        mask[row, : len(source)] = 1
    memory_mask = mask if any(len(s) < S for s in source_ids) else None
    memory_kv = model.memory_kv(model.encode(ids, memory_mask))
    return _ConditionedDecoder(model, memory_kv, memory_mask), [[model.config.decoder_start_token_id]] * B


@torch.inference_mode()
def generate_seq2seq(
    model: Seq2SeqLM,
    source_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    processors: Sequence = (),
    sample: bool = False,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    stop_rules: Sequence[StopRule] = (),
    pad_id: int = 0,
    logprobs: int | None = None,
    use_cache: bool = True,
) -> Iterator[Step]:
    """Greedy or sampled decoding of the targets of ``source_ids``; yields one
    :class:`~lmlab.generate.loop.Step` per new token, exactly as :func:`lmlab.generate.loop.decode`
    (same arguments, same stopping). The token buffer the ``processors`` see is the decoder's: the
    start token, then the generated tokens.
    """
    decoder, prompts = condition_on_sources(model, source_ids, pad_id)
    yield from decode(
        decoder,
        prompts,
        max_new_tokens=max_new_tokens,
        processors=processors,
        sample=sample,
        generator=generator,
        stop_ids=stop_ids,
        stop_rules=stop_rules,
        pad_id=pad_id,
        logprobs=logprobs,
        use_cache=use_cache,
    )


def seq2seq_beam_search(
    model: Seq2SeqLM,
    source_ids: Sequence[Sequence[int]],
    *,
    num_beams: int,
    max_new_tokens: int,
    pad_id: int = 0,
    **options,
) -> BeamSearch:
    """A :class:`~lmlab.generate.loop.BeamSearch` over the targets of ``source_ids`` (``options``: its
    other arguments): ``for committed in search.run(): …``, then ``search.results``."""
    if not options.get("use_cache", True):
        raise LmlabError("beam search over a seq2seq model needs the KV cache (use_cache=True): it carries the sources")
    with torch.inference_mode():
        decoder, prompts = condition_on_sources(model, source_ids, pad_id)
    return BeamSearch(decoder, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens, pad_id=pad_id, **options)
