"""The parts every lmlab model is built from: norms, positions, attention, MLPs, the block, the KV cache.

One attention class serves every architecture (multi-head, grouped-query, causal or not, with or
without a cache); the families differ only in which norm, MLP and position encoding the config
picks (see :mod:`lmlab.config`). A pre-norm block, as GPT-2 and LLaMA use it::

    x ──┬──► norm_1 ──► attention ──►(+)──┬──► norm_2 ──► mlp ──►(+)──► out
        └────────────────────────────────┘└───────────────────────┘
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmlab.config import ModelConfig


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight (Zhang & Sennrich, 2019), computed in fp32 as LLaMA does.

    In fp32, PyTorch's own ``rms_norm`` computes exactly these numbers in one call instead of six
    tensor ops (a one-token decode step runs 2·n_layer + 1 norms); for half precision it would
    round differently from LLaMA's reference (the weight multiplies before the cast), so those
    dtypes take the explicit formula."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# -- rotary position embedding (Su et al., 2021) ------------------------------------------------


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """RoPE's inverse frequencies θ_i = rope_theta^(-2i/head_dim), scaled as ``config.rope_scaling`` says —
    transformers' formulas (``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``)
    op for op, so the tables are bit-identical. ``dynamic`` changes nothing within ``block_size``."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = config.rope_scaling
    kind = s.get("rope_type")
    if kind == "linear":  # positions / factor, folded into the frequencies
        return inv_freq / s["factor"]
    if kind == "llama3":  # LLaMA 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
        factor, low, high, old_len = (
            s["factor"],
            s["low_freq_factor"],
            s["high_freq_factor"],
            s["original_max_position_embeddings"],
        )
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cache(config: ModelConfig, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables, (block_size, head_dim), in fp32, from :func:`rope_inv_freq` (scaling included)."""
    positions = torch.arange(config.block_size, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, rope_inv_freq(config, device))  # (block_size, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # the "rotate half" layout HF LLaMA checkpoints use
    return emb.cos(), emb.sin()


def rope_dtype(x: Tensor) -> torch.dtype:
    """The dtype to give RoPE's tables for residual stream ``x``: that of the queries and keys they rotate —
    the autocast dtype under autocast (bf16 q, k rotated by fp32 tables would come out fp32, for attention
    to cast back: twice the bytes saved for backward), else ``x``'s own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles. x: (B, n_head, T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# -- the KV cache -------------------------------------------------------------------------------


class KVCache:
    """Static, pre-allocated key/value buffers for every layer, as gpt-fast keeps them.

    Shapes never change while decoding, so a decode step can be compiled or captured as a CUDA
    graph; ``input_pos`` says which slots the new keys and values fill. ``static=True`` marks the
    buffers as living at fixed addresses (``torch._dynamo.mark_static_address``), which a CUDA graph
    needs in order to write into them in place; :meth:`select` keeps that mark.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        static: bool = False,
    ) -> None:
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.max_len, self.static = max_len, static
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self._mark_static()

    def _mark_static(self) -> None:
        if self.static:
            import torch._dynamo  # imported on first use: it is heavy

            for buffer in (*self.k, *self.v):
                torch._dynamo.mark_static_address(buffer)

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, length: int | None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at slots ``input_pos``; return the first ``length`` slots."""
        self.k[layer].index_copy_(2, input_pos, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, input_pos, v.to(self.v[layer].dtype))
        if length is None:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, :length], self.v[layer][:, :, :length]

    def row(self, index: int) -> KVCache:
        """A cache of batch row ``index`` alone that shares this one's buffers (see :meth:`row_span`)."""
        return self.row_span(index, index + 1)

    def row_span(self, start: int, stop: int) -> KVCache:
        """A cache of batch rows ``start..stop-1`` that shares this one's buffers: what it writes lands here
        (continuous batching prefills a few prompts into free rows while the other rows keep theirs)."""
        view = object.__new__(KVCache)
        view.max_len, view.static = self.max_len, False
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        return view

    def select(self, rows: Tensor) -> None:
        """Keep the batch rows ``rows`` (in that order), as beam search reorders its hypotheses."""
        if len(rows) == self.k[0].shape[0]:  # same batch size: reorder in place, the buffers stay put
            for buffer in (*self.k, *self.v):
                buffer.copy_(buffer.index_select(0, rows))
        else:
            self.k = [k.index_select(0, rows) for k in self.k]
            self.v = [v.index_select(0, rows) for v in self.v]
            self._mark_static()


# -- attention and MLP --------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention: softmax(QKᵀ/√d_k)·V per head, then a projection."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        # one matmul for Q, K and V: [q | k | v] along the output dimension (q: n_head · head_dim = attn_dim, which is
        # n_embd unless heads were pruned)
        self.qkv = nn.Linear(config.n_embd, config.attn_dim + 2 * kv_dim, bias=config.bias)
        self.proj = nn.Linear(config.attn_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        cache_len: int | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        nh, nkv = self.n_head, self.n_kv_heads
        # [q | k | v] is n_head + 2·n_kv_heads heads side by side: one view, and each part a slice of it
        # (a few tensor ops fewer than split-then-view per part, which counts in a one-token decode step)
        heads = self.qkv(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        qk = heads[:, : nh + nkv]
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys in one rotation
        q, k, v = qk[:, :nh], qk[:, nh:], heads[:, nh + nkv :]  # (B, n_head | n_kv_heads, T, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, input_pos, k, v, cache_len)  # (B, n_kv_heads, S, head_dim)
        # softmax(QKᵀ / √d_k) V — the attention formula, one fused kernel (flash / memory-efficient on GPU)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_head,
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, nh * self.head_dim)  # concatenate the heads
        return self.proj(y)


class CrossAttention(nn.Module):
    """Encoder–decoder attention (Vaswani et al., 2017, §3.2.3): the decoder's queries attend over the
    encoder's output ("memory"), softmax(Q_dec·K_memᵀ/√d_k)·V_mem. Keys and values depend on the
    source alone, so :meth:`memory_kv` computes them once per source and every decoding step reuses
    them. Separate ``q`` and ``kv`` projections (not one fused matrix): they read different inputs."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, config.head_dim
        self.q = nn.Linear(config.n_embd, config.attn_dim, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_kv_heads * config.head_dim, bias=config.bias)  # [k | v]
        self.proj = nn.Linear(config.attn_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, n_kv_heads, S, head_dim) of the encoder output ``memory`` (B, S, n_embd)."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).chunk(2, dim=-1)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, memory_kv: tuple[Tensor, Tensor], memory_mask: Tensor | None) -> Tensor:
        """``memory_mask`` (B, 1, 1, S) bool: True on real source tokens; None: no padding."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k, v = memory_kv  # (B, n_kv_heads, S, head_dim)
        # softmax(QKᵀ / √d_k) V with K, V from the source: no causal mask, every target position sees the whole source
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=memory_mask,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_head,
        )  # (B, n_head, T, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2) or SwiGLU (Shazeer, 2020; LLaMA)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.intermediate_size
        # SwiGLU's gate and up projections share one matmul: fc outputs [gate | up]
        self.fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.proj(h)


class Block(nn.Module):
    """A Transformer block. Pre-norm (GPT-2, LLaMA): x + attn(norm(x)), then x + mlp(norm(x)).
    Post-norm (BERT, Vaswani et al. 2017): norm(x + attn(x)), then norm(x + mlp(x)).

    ``cross=True`` makes the decoder block of an encoder–decoder (Vaswani et al. 2017, §3.1): a third
    sub-layer between the two, cross-attention over the encoder output, with its own norm placed the
    same way — x + cross_attn(norm_cross(x)) (pre) or norm_cross(x + cross_attn(x)) (post)."""

    def __init__(self, config: ModelConfig, layer_idx: int, cross: bool = False) -> None:
        super().__init__()
        self.post_norm = config.norm_placement == "post"
        self.norm_1 = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.norm_cross = make_norm(config) if cross else None
        self.cross_attn = CrossAttention(config) if cross else None
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope,
        mask,
        is_causal,
        kv_cache=None,
        input_pos=None,
        cache_len=None,
        memory_kv=None,
        memory_mask=None,
    ) -> Tensor:
        # a cross block also takes memory_kv: its cross_attn.memory_kv(encoder output), and memory_mask (B, 1, 1, S)
        drop = self.drop if self.training and self.drop.p > 0 else _identity  # no module call where dropout is a no-op
        if self.post_norm:
            x = self.norm_1(x + drop(self.attn(x, rope, mask, is_causal, kv_cache, input_pos, cache_len)))
            if self.cross_attn is not None:
                x = self.norm_cross(x + drop(self.cross_attn(x, memory_kv, memory_mask)))
            return self.norm_2(x + drop(self.mlp(x)))
        x = x + drop(self.attn(self.norm_1(x), rope, mask, is_causal, kv_cache, input_pos, cache_len))
        if self.cross_attn is not None:
            x = x + drop(self.cross_attn(self.norm_cross(x), memory_kv, memory_mask))
        return x + drop(self.mlp(self.norm_2(x)))


def run_block(model: nn.Module, block: nn.Module, *args) -> Tensor:
    """``block(*args)``, or — when ``model.gradient_checkpointing`` is set and the model trains with
    gradients on — the same under activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`,
    non-reentrant): the block keeps only its input for backward and recomputes the rest there. The RNG
    state is saved and restored around the recomputation, so dropout draws the same masks and the
    gradients are those of the plain forward."""
    if model.gradient_checkpointing and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def _identity(x: Tensor) -> Tensor:
    return x


def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases; residual projections scaled by 1/√(2L)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = config.init_std
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                std = std / math.sqrt(2 * config.n_layer)
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)  # norm weights
