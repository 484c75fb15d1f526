"""GGUF files (llama.cpp's format) in lmlab's terms, both ways: a ``.gguf`` file is a checkpoint.

:mod:`lmlab.io.checkpoint` reads a ``.gguf`` file of the ``llama`` or ``gpt2`` architecture as it reads a
folder, so ``lmlab.load`` and every verb take one. Read with the ``gguf`` package (llama.cpp's own reader,
``pip install 'lmlab[gguf]'``); every weight is dequantized to fp32 with ``gguf.quants.dequantize`` (F32, F16,
BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K…Q6_K and the IQ types, whatever ``gguf`` dequantizes)::

    GGUF                                      HF config.json (then lmlab's HF import: lmlab.io.hf.config_from_hf)
    general.architecture llama | gpt2         model_type llama | gpt2, architectures LlamaForCausalLM | GPT2LMHeadModel
    ARCH.context_length                       max_position_embeddings | n_positions
    ARCH.embedding_length, block_count        hidden_size, num_hidden_layers | n_embd, n_layer
    ARCH.feed_forward_length                  intermediate_size | n_inner
    ARCH.attention.head_count(_kv)            num_attention_heads, num_key_value_heads | n_head
    ARCH.attention.layer_norm(_rms)_epsilon   rms_norm_eps | layer_norm_epsilon
    llama.rope.freq_base, rope.scaling.*      rope_theta, rope_scaling (linear)
    rope_freqs.weight tensor (Llama 3.x),     rope_scaling llama3: factor, low/high_freq_factor fitted to the factors,
    rope.scaling.original_context_length      original_max_position_embeddings (convert_hf_to_gguf's 8192 if absent)
    no ``output.weight`` tensor               tie_word_embeddings

The tensors go back the way :mod:`lmlab.io.export.to_gguf` brings them (convert_hf_to_gguf's way): GGUF
names to HF's through ``gguf``'s ``TensorNameMap``, LLaMA's q and k rows un-permuted (:func:`unpermute`),
GPT-2's Conv1D weights transposed, then :func:`lmlab.io.hf.state_dict_from_hf`.

Llama 3.1–3.3's RoPE scaling (``llama3``) is a ``rope_freqs.weight`` tensor in GGUF: llama.cpp divides RoPE's
frequencies by its factors; convert_hf_to_gguf writes none of the four parameters (lmlab's export adds the
original context length). The factors have llama3's shape — 1 at high frequencies, ``factor`` at low ones, and
between them a ramp whose 1/factor is linear in 1/wavelength — so :func:`llama3_scaling` reads ``factor`` off
the largest, tries Llama 3.1's low/high_freq_factor (1, 4), else fits the ramp's line (or bounds it by its
neighbours when fewer than two dimensions lie on it). The model's frequencies must reproduce the file's (1e-6
relative, :func:`reproduces`), or the file is refused.

The tokenizer (``tokenizer.ggml.model = "gpt2"``, byte-level BPE) is rebuilt as a ``tokenizers`` BPE from
``tokenizer.ggml.tokens`` and ``merges``; CONTROL tokens become special added tokens, USER_DEFINED ones plain
added tokens, trailing UNUSED ones (a padded vocabulary's ``[PAD…]`` rows) are left out; the roles come from
the bos / eos / unknown / padding ids, ``tokenizer.chat_template`` is the chat template. ``tokenizer.ggml.pre``
names llama.cpp's pre-tokenizer (the regex that splits text before BPE); :data:`PRE_TOKENIZERS` gives the
``tokenizers`` pre-tokenizer that splits the same way for the names lmlab knows — and export writes the name
of the one lmlab's tokenizer has (lmlab trains byte-level BPE with GPT-2's regex: ``gpt-2``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from torch import Tensor

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io import hf
from lmlab.model import build_model
from lmlab.model.blocks import rope_inv_freq
from lmlab.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}  # GGUF architecture → the HF class it reads as
GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
LLAMA3_ORIGINAL_CONTEXT = 8192  # convert_hf_to_gguf's original_max_position_embeddings for llama3 scaling (Llama 3.x's)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool = True) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


# tokenizer.ggml.pre → the tokenizers pre-tokenizer splitting as llama.cpp's regexes for that name do
# (llama-vocab.cpp): gpt-2 is GPT-2's regex (ByteLevel's own); smollm splits every digit first, as SmolLM's
# tokenizer.json does; llama-bpe is Llama 3's regex.
PRE_TOKENIZERS = {
    "gpt-2": lambda: _byte_level(),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), _byte_level(use_regex=False)]
    ),
}


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise LmlabError(
            "format gguf needs the gguf package, which is not installed: pip install 'lmlab[gguf]'"
        ) from None
    return gguf


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a file named ``*.gguf``."""
    path = Path(path)
    return path.suffix.lower() == SUFFIX and path.is_file()


def tensor_name_map(arch: str, n_layer: int) -> Any:
    """``gguf``'s map from HF tensor names to the GGUF names of ``arch`` (gpt2 or llama)."""
    gguf = require_gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2 if arch == "gpt2" else gguf.MODEL_ARCH.LLAMA, n_layer)


def permute(w: Tensor, n_head: int) -> Tensor:
    """convert_hf_to_gguf's ``LlamaModel.permute``: each head's rows, HF's rotate-half order → llama.cpp's pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: Tensor, n_head: int) -> Tensor:
    """The inverse of :func:`permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer_name(backend: tokenizers.Tokenizer) -> str | None:
    """The ``tokenizer.ggml.pre`` name of ``backend``'s pre-tokenizer (:data:`PRE_TOKENIZERS`), None if unknown."""
    spec = json.loads(backend.to_str()).get("pre_tokenizer")
    for name, make in PRE_TOKENIZERS.items():
        if json.loads(make().__getstate__()) == spec:
            return name
    return None


# -- reading a file -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int) -> Any:
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise LmlabError(f"{path}: not a readable GGUF file ({err})") from None


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` (kept while the file is unchanged: reading memory-maps it)."""
    stat = Path(path).stat()
    return _reader(str(path), stat.st_mtime_ns, stat.st_size)


def field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` (a number, string or list), ``default`` when the file lacks it."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def architecture(reader: Any, path: str | Path) -> str:
    """The file's ``general.architecture``, or an LmlabError naming the ones lmlab reads."""
    arch = field(reader, "general.architecture")
    if arch not in HF_CLASSES:
        raise LmlabError(
            f"{path}: GGUF architecture {arch!r} is not supported; lmlab reads {', '.join(HF_CLASSES)}",
            params="checkpoint",
        )
    return arch


def _shape(reader: Any, name: str) -> tuple[int, ...] | None:
    """A tensor's shape in PyTorch's order (GGUF lists ggml's, innermost first), None if the file lacks it."""
    for t in reader.tensors:
        if t.name == name:
            return tuple(int(n) for n in reversed(t.shape))
    return None


def _require_whole_rotary(reader: Any, path: str | Path, head_dim: int) -> None:
    dims = field(reader, "llama.rope.dimension_count", head_dim)
    if dims != head_dim:
        raise LmlabError(f"{path}: llama.rope.dimension_count is {dims}: lmlab rotates whole heads ({head_dim})")


def rope_freqs(reader: Any) -> Tensor | None:
    """The file's ``rope_freqs.weight`` (llama.cpp divides RoPE's frequencies by these factors), None if absent."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            gguf = require_gguf()
            return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    return None


def _scratch_config(head_dim: int, theta: float, scaling: dict[str, Any]) -> ModelConfig:
    return ModelConfig(position="rope", n_embd=head_dim, n_head=1, rope_theta=theta, rope_scaling=scaling)


def reproduces(factors: Tensor, config: ModelConfig) -> bool:
    """Whether ``config``'s RoPE frequencies are plain RoPE's divided by ``factors`` (1e-6 relative)."""
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling={}))
    return factors.shape == plain.shape and torch.allclose(plain / factors, rope_inv_freq(config), rtol=1e-6, atol=0)


def _fit_ramp(u: Tensor, factors: Tensor, factor: float) -> tuple[float, float]:
    """low_freq_factor and high_freq_factor of llama3 scaling from its factors: 1 where ``u`` (the original
    context length over the wavelength) is past high_freq_factor, ``factor`` where it is below low_freq_factor,
    and between them 1 / ((1 - s) / factor + s) with s = (u - low) / (high - low): s is read off each ramp
    factor, and two or more of them give the line; with fewer, the neighbouring dimensions bound it."""
    one, top = (factors - 1).abs() <= 1e-6, (factors - factors.max()).abs() <= 1e-6 * factors.max()
    ramp = ~one & ~top
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)
    if ramp.sum() >= 2:  # s = a u + b: zero at low, one at high
        a, b = np.polyfit(u[ramp].numpy(), s[ramp].numpy(), 1)
        return float(-b / a), float((1 - b) / a)
    low = float(u[top].max())  # at least every factor-scaled dimension's u, at most every unscaled one's
    high = float(u[one].min()) if one.any() else 2 * float(u.max())
    if not ramp.any():
        return low, high
    uj, sj = float(u[ramp][0]), float(s[ramp][0])  # one point on the line: keep low, or else high
    if low + (uj - low) / sj <= high:
        return low, low + (uj - low) / sj
    return (uj - sj * high) / (1 - sj), high


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def llama3_scaling(factors: Tensor, head_dim: int, theta: float, old_len: int) -> dict[str, Any] | None:
    """HF's ``rope_scaling`` (rope_type llama3) whose frequencies are plain RoPE's divided by ``factors``
    (``rope_freqs.weight``), ``original_max_position_embeddings`` being ``old_len``: Llama 3.1's
    low_freq_factor 1 and high_freq_factor 4 when they reproduce the factors, else the pair fitted to them
    (rounded to 6 digits when that still reproduces them); None when no llama3 scaling does."""
    plain = rope_inv_freq(_scratch_config(head_dim, theta, {})).double()
    if factors.shape != plain.shape or not bool(torch.isfinite(factors).all() and (factors > 0).all()):
        return None
    candidates = []
    for factor in dict.fromkeys([_round(float(factors.max())), float(factors.max())]):
        candidates.append((factor, 1.0, 4.0))
        if factor > 1:
            fitted = _fit_ramp(old_len * plain / (2 * math.pi), factors.double(), factor)
            candidates += [(factor, *map(_round, fitted)), (factor, *fitted)]
    for factor, low, high in candidates:
        scaling = dict(factor=factor, low_freq_factor=low, high_freq_factor=high)
        scaling = dict(rope_type="llama3", **scaling, original_max_position_embeddings=old_len)
        try:
            if reproduces(factors, _scratch_config(head_dim, theta, scaling)):
                return scaling
        except LmlabError:  # a fit outside what llama3 scaling allows (a negative or zero factor)
            continue
    return None


def _rope_scaling(reader: Any, path: str | Path, head_dim: int, theta: float) -> dict[str, Any] | None:
    """HF's ``rope_scaling`` of the file: ``linear`` from rope.scaling.type/factor, ``llama3`` from the
    ``rope_freqs`` factors and rope.scaling.original_context_length (convert_hf_to_gguf's 8192 if absent)."""
    kind = field(reader, "llama.rope.scaling.type", "none")
    factors = rope_freqs(reader)
    if factors is None or bool((factors == 1).all()):
        return None if kind == "none" else {"type": kind, "factor": field(reader, "llama.rope.scaling.factor")}
    if kind != "none":
        raise LmlabError(
            f"{path}: RoPE scaling {kind!r} and a rope_freqs tensor together: lmlab reads one of them",
            params="checkpoint",
        )
    old_len = field(reader, "llama.rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT)
    scaling = llama3_scaling(factors, head_dim, theta, old_len)
    if scaling is None:
        raise LmlabError(
            f"{path}: rope_freqs.weight is not llama3 RoPE scaling's factors (1 at high frequencies, one factor at "
            "low ones, a smooth ramp between); lmlab cannot reproduce its frequencies",
            params="checkpoint",
        )
    return scaling


def hf_config_dict(reader: Any, path: str | Path) -> dict[str, Any]:
    """The HF ``config.json`` dict of the model a GGUF file holds (the table in the module docstring)."""
    arch = architecture(reader, path)
    embedding = _shape(reader, "token_embd.weight")
    if embedding is None:
        raise LmlabError(f"{path}: no token_embd.weight tensor; expected a {arch} model's weights", params="checkpoint")
    vocab, tied = embedding[0], _shape(reader, "output.weight") is None
    common = dict(model_type=arch, architectures=[HF_CLASSES[arch]], vocab_size=vocab, tie_word_embeddings=tied)
    get = functools.partial(field, reader)
    if arch == "gpt2":
        return dict(
            common,
            n_positions=get("gpt2.context_length"),
            n_embd=get("gpt2.embedding_length"),
            n_layer=get("gpt2.block_count"),
            n_head=get("gpt2.attention.head_count"),
            n_inner=get("gpt2.feed_forward_length"),
            layer_norm_epsilon=get("gpt2.attention.layer_norm_epsilon", 1e-5),
            activation_function="gelu_new",  # llama.cpp's gpt2 computes the tanh approximation
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    n_embd, n_head = get("llama.embedding_length"), get("llama.attention.head_count")
    head_dim = get("llama.attention.key_length", n_embd // n_head)
    _require_whole_rotary(reader, path, head_dim)
    theta = get("llama.rope.freq_base", 10000.0)
    bias = _shape(reader, "blk.0.attn_q.bias") is not None
    return dict(
        common,
        max_position_embeddings=get("llama.context_length"),
        hidden_size=n_embd,
        num_hidden_layers=get("llama.block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=get("llama.attention.head_count_kv", n_head),
        head_dim=head_dim,
        intermediate_size=get("llama.feed_forward_length"),
        rms_norm_eps=get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, path, head_dim, theta),
        attention_bias=bias,
        mlp_bias=_shape(reader, "blk.0.ffn_up.bias") is not None,
    )


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The lmlab :class:`ModelConfig` of the model in the GGUF file ``path`` (metadata only: no weight is read)."""
    reader = open_gguf(path)
    try:
        config = hf.config_from_hf(hf_config_dict(reader, path))
    except LmlabError as err:
        message = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise LmlabError(message, params=" ".join(err.params)) from None
    factors = rope_freqs(reader)
    if factors is not None and not reproduces(factors, config):  # the HF import's config, checked once more
        raise LmlabError(f"{path}: the model's RoPE frequencies differ from the file's rope_freqs", params="checkpoint")
    return config


def read_tensors(reader: Any, path: str | Path = "the GGUF file") -> dict[str, Tensor]:
    """GGUF name → fp32 tensor (PyTorch's shape), dequantized with ``gguf.quants.dequantize``."""
    gguf = require_gguf()
    out = {}
    for t in reader.tensors:
        try:
            out[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        except NotImplementedError:
            known = ", ".join(["F32", "F16"] + sorted(q.name for q in gguf.quants._type_traits))
            raise LmlabError(
                f"{path}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot dequantize; lmlab reads {known}",
                params="checkpoint",
            ) from None
    return out


def hf_state_from_gguf(tensors: dict[str, Tensor], config: ModelConfig, arch: str) -> dict[str, Tensor]:
    """GGUF tensors → HF's names and layouts for ``config`` (the inverse of export's changes: q and k rows
    un-permuted, GPT-2's Conv1D weights transposed back to (in, out))."""
    names = tensor_name_map(arch, config.n_layer)
    with torch.device("meta"):
        template = hf.state_dict_to_hf(build_model(config).state_dict(), config)
    state = {}
    for name in template:
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in tensors:
            raise LmlabError(f"the GGUF file has no tensor {gguf_name} (HF's {name})")
        t = tensors[gguf_name]
        if arch == "gpt2" and name.endswith(GPT2_CONV1D):
            t = t.T
        elif name.endswith(("q_proj.weight", "q_proj.bias")):
            t = unpermute(t, config.n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = unpermute(t, config.n_kv_heads)
        state[name] = t.contiguous()
    return state


def read_gguf_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The lmlab config and weights (fp32, as a checkpoint stores them: a tied head once) of a GGUF file."""
    config = read_gguf_config(path)
    reader = open_gguf(path)
    arch = architecture(reader, path)
    try:
        state = hf.state_dict_from_hf(hf_state_from_gguf(read_tensors(reader, path), config, arch), config)
    except LmlabError as err:
        raise LmlabError(f"{path}: {err}") from None
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return config, state


# -- the tokenizer --------------------------------------------------------------------------------------------

_ROLE_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def _pre_tokenizer(reader: Any, path: str | Path) -> pre_tokenizers.PreTokenizer:
    name = field(reader, "tokenizer.ggml.pre")
    if name is None:
        logger.warning("%s has no tokenizer.ggml.pre: splitting text with GPT-2's regex", path)
        name = "gpt-2"
    if name not in PRE_TOKENIZERS:
        raise LmlabError(
            f"{path}: tokenizer.ggml.pre {name!r} is not supported; lmlab reads {', '.join(PRE_TOKENIZERS)}",
            params="checkpoint",
        )
    return PRE_TOKENIZERS[name]()


def _backend(tokens: list[str], types: list[int], merges: list[str], path: str | Path) -> tokenizers.Tokenizer:
    """The byte-level BPE ``tokenizers.Tokenizer`` of a vocabulary and its merges (no pre-tokenizer yet)."""
    gguf = require_gguf()
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise LmlabError(f"{path}: tokenizer.ggml.tokens lists a token twice")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise LmlabError(f"{path}: tokenizer.ggml.merges holds an entry that is not two tokens")
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    added = list(zip(tokens, types))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in added if k == control])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in added if k == user])
    return backend


def read_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a GGUF file (byte-level BPE, ``tokenizer.ggml.model = "gpt2"``) as an lmlab
    :class:`~lmlab.tokenizer.Tokenizer`: ids, pre-tokenization, special-token roles and chat template as the
    file says."""
    gguf = require_gguf()
    reader = open_gguf(path)
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmlabError(
            f"{path}: tokenizer.ggml.model is {kind!r}; lmlab reads byte-level BPE vocabularies ('gpt2')",
            params="checkpoint",
        )
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = list(field(reader, "tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens)))
    while tokens and types[len(tokens) - 1] == int(gguf.TokenType.UNUSED):  # a padded vocabulary's extra rows
        tokens.pop()
    backend = _backend(tokens, types, list(field(reader, "tokenizer.ggml.merges", [])), path)
    backend.pre_tokenizer = _pre_tokenizer(reader, path)
    roles = {}
    for role, key in _ROLE_KEYS.items():
        token_id = field(reader, f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            roles[role] = tokens[token_id]
    return Tokenizer(
        backend,
        roles,
        model_max_length=field(reader, f"{architecture(reader, path)}.context_length"),
        chat_template=field(reader, "tokenizer.chat_template"),
    )


__all__ = [
    "GPT2_CONV1D",
    "PRE_TOKENIZERS",
    "SUFFIX",
    "hf_config_dict",
    "hf_state_from_gguf",
    "is_gguf_file",
    "llama3_scaling",
    "open_gguf",
    "permute",
    "pre_tokenizer_name",
    "read_gguf_checkpoint",
    "read_gguf_config",
    "read_gguf_tokenizer",
    "read_tensors",
    "reproduces",
    "require_gguf",
    "rope_freqs",
    "tensor_name_map",
    "unpermute",
]
