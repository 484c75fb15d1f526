"""Weights and configs between lmlab and HF Transformers, both ways, for the GPT-2, LLaMA and BERT families.

The two sides hold the same numbers in different places::

    lmlab                          HF GPT-2 (GPT2LMHeadModel)          HF LLaMA (LlamaForCausalLM)
    tok_emb                        transformer.wte                     model.embed_tokens
    pos_emb                        transformer.wpe                     —  (RoPE, no weights)
    blocks.{i}.norm_1              transformer.h.{i}.ln_1              model.layers.{i}.input_layernorm
    blocks.{i}.attn.qkv  [q|k|v]   transformer.h.{i}.attn.c_attn  (ᵀ)  model.layers.{i}.self_attn.{q,k,v}_proj
    blocks.{i}.attn.proj           transformer.h.{i}.attn.c_proj  (ᵀ)  model.layers.{i}.self_attn.o_proj
    blocks.{i}.norm_2              transformer.h.{i}.ln_2              model.layers.{i}.post_attention_layernorm
    blocks.{i}.mlp.fc   [gate|up]  transformer.h.{i}.mlp.c_fc     (ᵀ)  model.layers.{i}.mlp.{gate,up}_proj
    blocks.{i}.mlp.proj            transformer.h.{i}.mlp.c_proj   (ᵀ)  model.layers.{i}.mlp.down_proj
    norm_f                         transformer.ln_f                    model.norm
    lm_head                        lm_head                             lm_head

BERT (``BertForPreTraining``; a bare ``BertModel`` drops the ``bert.`` prefix and the ``cls.`` heads)::

    tok_emb / pos_emb / seg_emb    bert.embeddings.{word,position,token_type}_embeddings
    emb_norm                       bert.embeddings.LayerNorm
    blocks.{i}.attn.qkv  [q|k|v]   bert.encoder.layer.{i}.attention.self.{query,key,value}
    blocks.{i}.attn.proj           bert.encoder.layer.{i}.attention.output.dense
    blocks.{i}.norm_1 (post-norm)  bert.encoder.layer.{i}.attention.output.LayerNorm
    blocks.{i}.mlp.fc / mlp.proj   bert.encoder.layer.{i}.intermediate.dense / output.dense
    blocks.{i}.norm_2 (post-norm)  bert.encoder.layer.{i}.output.LayerNorm
    pooler                         bert.pooler.dense
    mlm_dense / mlm_norm           cls.predictions.transform.dense / .LayerNorm
    lm_head (tied) + bias          cls.predictions.decoder (tied) + cls.predictions.bias
    nsp_head                       cls.seq_relationship

(ᵀ): HF GPT-2 stores these in ``Conv1D`` layers, whose weight is (in, out) — the transpose of
``nn.Linear``'s (out, in). lmlab's fused ``qkv`` and SwiGLU ``fc`` split along their output rows
into LLaMA's separate projections. Every mapping is exact: a round trip gives back the same tensors,
and the logits of both models agree to float rounding (``tests/test_hf.py`` checks it).

``transformers`` is an optional dependency (``pip install 'lmlab[hf]'``), imported only here,
inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import transformers

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "bert")

# HF GPT-2 activation names → lmlab's ``gelu_approximate``. "gelu_new" is what GPT-2 checkpoints
# use (the tanh approximation written out by hand); "gelu_pytorch_tanh" is the same function as
# one PyTorch kernel. Exporting writes "gelu_new", the name GPT-2 tooling expects.
_GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

# Tensors an HF state dict may hold that are not weights: causal-mask and RoPE buffers kept by
# some versions of transformers. They are rebuilt from the config, so importing ignores them.
_HF_BUFFER_SUFFIXES = (
    ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "embeddings.position_ids",
)
# BERT's output layer is tied twice over: decoder.weight is the word embedding, decoder.bias is cls.predictions.bias
_BERT_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise LmlabError("transformers is not installed: pip install 'lmlab[hf]'") from None
    return transformers


def _family(config: ModelConfig) -> str:
    """'gpt2' or 'llama': the HF family that expresses ``config`` exactly, or an LmlabError naming the field."""

    def cannot(field_name: str, family: str, expected: str) -> LmlabError:
        value = getattr(config, field_name)
        return LmlabError(
            f"model config field '{field_name}' is {value!r}: HF {family} (the family for position={config.position!r}) "
            f"needs {expected}; no supported HF family ({', '.join(SUPPORTED_MODEL_TYPES)}) expresses this config exactly"
        )

    if config.arch == "seq2seq":
        raise LmlabError("model config field 'arch' is 'seq2seq': HF interop for encoder–decoders (T5/BART) is not supported yet")
    if config.arch == "encoder":
        for field_name, expected in (
            ("norm", "layernorm"), ("mlp", "gelu"), ("bias", True), ("position", "learned"), ("norm_placement", "post"),
            ("embedding_norm", True), ("tie_embeddings", True),
        ):
            if getattr(config, field_name) != expected:
                raise cannot(field_name, "bert", repr(expected))
        if config.n_kv_heads != config.n_head:
            raise cannot("n_kv_heads", "bert", f"n_kv_heads == n_head ({config.n_head})")
        return "bert"
    if config.norm_placement != "pre":
        raise cannot("norm_placement", "gpt2/llama", "'pre'")
    if config.position == "learned":
        for field_name, expected in (("norm", "layernorm"), ("mlp", "gelu"), ("bias", True)):
            if getattr(config, field_name) != expected:
                raise cannot(field_name, "gpt2", repr(expected))
        if config.n_kv_heads != config.n_head:
            raise cannot("n_kv_heads", "gpt2", f"n_kv_heads == n_head ({config.n_head})")
        return "gpt2"
    for field_name, expected in (("norm", "rmsnorm"), ("mlp", "swiglu")):
        if getattr(config, field_name) != expected:
            raise cannot(field_name, "llama", repr(expected))
    return "llama"


# -- configs ------------------------------------------------------------------------------------


def hf_config_from(config: ModelConfig) -> "transformers.PretrainedConfig":
    """The ``GPT2Config`` or ``LlamaConfig`` describing the same model as ``config``.

    BOS/EOS ids keep the HF family's defaults, except that an id outside ``vocab_size`` becomes
    None (an id the embedding cannot look up means nothing, and transformers warns about it).
    """
    tf = _transformers()
    family = _family(config)

    def token_id(default: int) -> int | None:
        return default if default < config.vocab_size else None

    if family == "bert":
        return tf.BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.n_embd,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            intermediate_size=config.intermediate_size,
            hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_pytorch_tanh",
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            max_position_embeddings=config.block_size,
            type_vocab_size=max(config.type_vocab_size, 1),
            initializer_range=config.init_std,
            layer_norm_eps=config.norm_eps,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.intermediate_size,
            activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps,
            initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
            bos_token_id=token_id(50256),
            eos_token_id=token_id(50256),
        )
    rope: dict[str, Any]
    if _major_version(tf) >= 5:
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}}
    else:  # transformers 4.x takes the base as a top-level field
        rope = {"rope_theta": config.rope_theta, "rope_scaling": None}
    return tf.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.bias,  # lmlab's RMSNorm has no bias, so `bias` is exactly the Linear biases
        mlp_bias=config.bias,
        # HF LLaMA has no embedding or residual dropout: only attention dropout carries over, which
        # changes nothing in eval mode (logits) but makes training-mode dropout differ.
        attention_dropout=config.dropout,
        bos_token_id=token_id(1),
        eos_token_id=token_id(2),
        **rope,
    )


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The lmlab ``ModelConfig`` for an HF ``GPT2Config`` or ``LlamaConfig`` (the inverse of :func:`hf_config_from`)."""
    model_type = getattr(hf_config, "model_type", None)

    def unsupported(field_name: str, expected: str) -> LmlabError:
        value = getattr(hf_config, field_name, None)
        return LmlabError(f"HF {model_type} config field '{field_name}' is {value!r}: lmlab supports only {expected}")

    if model_type == "bert":
        activation = hf_config.hidden_act
        if activation not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
            raise unsupported("hidden_act", "gelu, gelu_new or gelu_pytorch_tanh")
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise unsupported("position_embedding_type", "'absolute'")
        if hf_config.hidden_dropout_prob != hf_config.attention_probs_dropout_prob:
            raise LmlabError("HF bert config has different hidden and attention dropouts: lmlab has one 'dropout' for both")
        return ModelConfig(
            arch="encoder",
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_embd=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            norm="layernorm",
            norm_eps=hf_config.layer_norm_eps,
            mlp="gelu",
            gelu_approximate="none" if activation == "gelu" else "tanh",
            position="learned",
            bias=True,
            tie_embeddings=True,
            dropout=float(hf_config.hidden_dropout_prob),
            init_std=hf_config.initializer_range,
            type_vocab_size=hf_config.type_vocab_size,
            norm_placement="post",
            embedding_norm=True,
            pooler=True,
            nsp_head=True,
        )
    if model_type == "gpt2":
        activation = hf_config.activation_function
        if activation not in _GPT2_ACTIVATIONS:
            raise unsupported("activation_function", "one of " + ", ".join(_GPT2_ACTIVATIONS))
        for field_name, expected in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        ):
            if getattr(hf_config, field_name, expected) != expected:
                raise unsupported(field_name, repr(expected))
        dropouts = {name: getattr(hf_config, name) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        if len(set(dropouts.values())) > 1:
            raise LmlabError(f"HF gpt2 config has different dropouts {dropouts}: lmlab has one 'dropout' for all three")
        return ModelConfig(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.n_positions,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            n_kv_heads=hf_config.n_head,
            intermediate_size=hf_config.n_inner or 4 * hf_config.n_embd,
            norm="layernorm",
            norm_eps=hf_config.layer_norm_epsilon,
            mlp="gelu",
            gelu_approximate=_GPT2_ACTIVATIONS[activation],
            position="learned",
            bias=True,
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            dropout=float(dropouts["resid_pdrop"]),
            init_std=hf_config.initializer_range,
        )
    if model_type == "llama":
        if hf_config.hidden_act != "silu":
            raise unsupported("hidden_act", "'silu' (SwiGLU)")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
            raise unsupported("head_dim", f"hidden_size / num_attention_heads = {hf_config.hidden_size // hf_config.num_attention_heads}")
        if bool(hf_config.attention_bias) != bool(getattr(hf_config, "mlp_bias", False)):
            raise LmlabError(
                f"HF llama config has attention_bias={hf_config.attention_bias} but mlp_bias={hf_config.mlp_bias}: "
                "lmlab's 'bias' sets both"
            )
        rope_theta = _llama_rope_theta(hf_config)
        return ModelConfig(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_embd=hf_config.hidden_size,
            n_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            norm="rmsnorm",
            norm_eps=hf_config.rms_norm_eps,
            mlp="swiglu",
            position="rope",
            rope_theta=float(rope_theta),
            bias=bool(hf_config.attention_bias),
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
            init_std=hf_config.initializer_range,
        )
    raise LmlabError(f"HF model_type {model_type!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")


def _llama_rope_theta(hf_config: Any) -> float:
    """RoPE's base from a LlamaConfig; only plain RoPE (no linear/dynamic/yarn/llama3 scaling) maps exactly."""
    params = getattr(hf_config, "rope_parameters", None)  # transformers 5
    if params is None:  # transformers 4.x: rope_theta plus an optional rope_scaling dict
        params = dict(getattr(hf_config, "rope_scaling", None) or {"rope_type": "default"})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        field_name = "rope_parameters" if hasattr(hf_config, "rope_parameters") else "rope_scaling"
        raise LmlabError(f"HF llama config field '{field_name}' has rope_type {rope_type!r}: lmlab supports only 'default' RoPE")
    return params.get("rope_theta", 10000.0)


def _major_version(tf: Any) -> int:
    return int(tf.__version__.split(".")[0])


# -- state dicts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One lmlab tensor and where HF keeps it."""

    lmlab: str
    hf: tuple[str, ...]  # one name, or the pieces a fused lmlab weight splits into along dim 0
    sizes: tuple[int, ...] = ()  # rows of each piece, for a fused weight
    transpose: bool = False  # HF GPT-2's Conv1D stores (in, out)


def _rules(config: ModelConfig) -> list[_Rule]:
    """The exact mapping for ``config``: every lmlab tensor but a tied ``lm_head.weight``, in ``DecoderLM.state_dict()`` order."""
    family = _family(config)
    rules: list[_Rule] = []
    if family == "bert":
        return _bert_rules(config)
    if family == "gpt2":
        rules += [_Rule("tok_emb.weight", ("transformer.wte.weight",)), _Rule("pos_emb.weight", ("transformer.wpe.weight",))]
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (
                ("norm_1", "ln_1"),
                ("attn.qkv", "attn.c_attn"),
                ("attn.proj", "attn.c_proj"),
                ("norm_2", "ln_2"),
                ("mlp.fc", "mlp.c_fc"),
                ("mlp.proj", "mlp.c_proj"),
            ):
                is_conv1d = not a.startswith("norm")
                rules.append(_Rule(f"{ours}{a}.weight", (f"{theirs}{b}.weight",), transpose=is_conv1d))
                rules.append(_Rule(f"{ours}{a}.bias", (f"{theirs}{b}.bias",)))
        rules += [_Rule("norm_f.weight", ("transformer.ln_f.weight",)), _Rule("norm_f.bias", ("transformer.ln_f.bias",))]
    else:
        kv_dim = config.n_kv_heads * config.head_dim
        qkv_sizes = (config.n_embd, kv_dim, kv_dim)
        fc_sizes = (config.intermediate_size, config.intermediate_size)
        rules.append(_Rule("tok_emb.weight", ("model.embed_tokens.weight",)))
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            kinds = ("weight", "bias") if config.bias else ("weight",)
            rules.append(_Rule(f"{ours}norm_1.weight", (f"{theirs}input_layernorm.weight",)))
            for kind in kinds:
                qkv = tuple(f"{theirs}self_attn.{p}_proj.{kind}" for p in "qkv")
                rules.append(_Rule(f"{ours}attn.qkv.{kind}", qkv, sizes=qkv_sizes))
            for kind in kinds:
                rules.append(_Rule(f"{ours}attn.proj.{kind}", (f"{theirs}self_attn.o_proj.{kind}",)))
            rules.append(_Rule(f"{ours}norm_2.weight", (f"{theirs}post_attention_layernorm.weight",)))
            for kind in kinds:
                gate_up = (f"{theirs}mlp.gate_proj.{kind}", f"{theirs}mlp.up_proj.{kind}")
                rules.append(_Rule(f"{ours}mlp.fc.{kind}", gate_up, sizes=fc_sizes))
            for kind in kinds:
                rules.append(_Rule(f"{ours}mlp.proj.{kind}", (f"{theirs}mlp.down_proj.{kind}",)))
        rules.append(_Rule("norm_f.weight", ("model.norm.weight",)))
    if not config.tie_embeddings:
        rules.append(_Rule("lm_head.weight", ("lm_head.weight",)))
    return rules


def _bert_rules(config: ModelConfig) -> list[_Rule]:
    """BERT (``BertForPreTraining`` names): a backbone under ``bert.``, the MLM and NSP heads under ``cls.``."""
    d = config.n_embd

    def linear(ours: str, theirs: str) -> list[_Rule]:
        return [_Rule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]

    e = "bert.embeddings."
    rules = [_Rule("tok_emb.weight", (e + "word_embeddings.weight",)), _Rule("pos_emb.weight", (e + "position_embeddings.weight",))]
    if config.type_vocab_size:
        rules.append(_Rule("seg_emb.weight", (e + "token_type_embeddings.weight",)))
    rules += linear("emb_norm", e + "LayerNorm")
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = tuple(f"{theirs}attention.self.{p}.{kind}" for p in ("query", "key", "value"))
            rules.append(_Rule(f"{ours}attn.qkv.{kind}", qkv, sizes=(d, d, d)))
        rules += linear(ours + "attn.proj", theirs + "attention.output.dense")
        rules += linear(ours + "norm_1", theirs + "attention.output.LayerNorm")
        rules += linear(ours + "mlp.fc", theirs + "intermediate.dense")
        rules += linear(ours + "mlp.proj", theirs + "output.dense")
        rules += linear(ours + "norm_2", theirs + "output.LayerNorm")
    if config.pooler:
        rules += linear("pooler", "bert.pooler.dense")
    rules += linear("mlm_dense", "cls.predictions.transform.dense")
    rules += linear("mlm_norm", "cls.predictions.transform.LayerNorm")
    rules.append(_Rule("lm_head.bias", ("cls.predictions.bias",)))
    if config.nsp_head:
        rules += linear("nsp_head", "cls.seq_relationship")
    return rules


def _check_keys(given: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
        raise LmlabError(f"{what}: " + "; ".join(parts))


def state_dict_to_hf(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """An lmlab state dict as the HF ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` state dict for ``config``.

    A tied head is left out: HF ties ``lm_head.weight`` to the token embedding itself. Split and
    transposed tensors are fresh copies (no storage shared with ``state_dict``, so the result can
    be saved with safetensors); the others are the same tensors.
    """
    rules = _rules(config)
    expected = {r.lmlab for r in rules} | ({"lm_head.weight"} if config.tie_embeddings else set())
    # a tied head may or may not appear in the given dict (state_dict() lists it under both names)
    given = set(state_dict) | ({"lm_head.weight"} if config.tie_embeddings else set())
    _check_keys(given, expected, "lmlab state dict")
    out: dict[str, Tensor] = {}
    for rule in rules:
        t = state_dict[rule.lmlab]
        if rule.transpose:
            t = t.t().contiguous()
        if rule.sizes:
            _check_rows(t, rule)
            out.update(zip(rule.hf, (piece.clone() for piece in t.split(rule.sizes, dim=0))))
        else:
            out[rule.hf[0]] = t
    return out


def state_dict_from_hf(hf_state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """An HF GPT-2 / LLaMA state dict as the lmlab ``DecoderLM`` state dict for ``config``.

    Accepts the keys of the ``...ForCausalLM`` / ``...LMHeadModel`` class and those of the bare base
    model (``h.0....`` as the original GPT-2 checkpoints store them, ``layers.0....``). Non-weight
    buffers (``attn.bias``, ``attn.masked_bias``, ``rotary_emb.inv_freq``) are ignored, and so is
    ``lm_head.weight`` when the embeddings are tied: the lmlab dict then holds the token embedding
    under both names, as ``DecoderLM.state_dict()`` does.
    """
    rules = _rules(config)
    family = _family(config)
    prefix = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}[family]
    sd = {k: v for k, v in hf_state_dict.items() if not k.endswith(_HF_BUFFER_SUFFIXES) and k not in _BERT_TIED}
    if not any(k.startswith(prefix) for k in sd):  # a bare GPT2Model / LlamaModel / BertModel checkpoint
        sd = {(k if k == "lm_head.weight" or k.startswith("cls.") else prefix + k): v for k, v in sd.items()}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if family == "bert" and not any(k.startswith("cls.") for k in sd):
        # a bare BertModel (sentence-transformers folders, MiniLM): the backbone only; the MLM head
        # keeps its fresh initialisation and the caller says so
        rules = [r for r in rules if not r.hf[0].startswith("cls.")]
    _check_keys(set(sd), {name for r in rules for name in r.hf}, f"HF {family} state dict")
    out: dict[str, Tensor] = {}
    for rule in rules:
        pieces = [sd[name] for name in rule.hf]
        t = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        out[rule.lmlab] = t.t().contiguous() if rule.transpose else t
    if config.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def _check_rows(t: Tensor, rule: _Rule) -> None:
    if t.shape[0] != sum(rule.sizes):
        raise LmlabError(f"lmlab tensor '{rule.lmlab}' has {t.shape[0]} rows: expected {sum(rule.sizes)} = {' + '.join(map(str, rule.sizes))} for the config")


# -- models -------------------------------------------------------------------------------------


def _hf_class(tf: Any, config: ModelConfig) -> Any:
    if config.arch != "encoder":
        return tf.AutoModelForCausalLM
    if config.nsp_head:
        return tf.BertForPreTraining
    if config.pooler:
        raise LmlabError("an encoder with a pooler but no NSP head has no HF class that holds both its heads; export needs nsp_head or no pooler")
    return tf.BertForMaskedLM


def to_hf_model(model: nn.Module) -> "transformers.PreTrainedModel":
    """The HF model with ``model``'s weights — ``GPT2LMHeadModel``, ``LlamaForCausalLM``, or for a BERT
    encoder ``BertForPreTraining`` (with an NSP head) / ``BertForMaskedLM`` — fp32, eval mode, SDPA, same device."""
    tf = _transformers()
    config: ModelConfig = model.config
    hf_config = hf_config_from(config)
    cls = _hf_class(tf, config)
    build = getattr(cls, "from_config", None) or cls._from_config  # Auto classes, or a concrete class
    hf_model = build(hf_config, attn_implementation="sdpa").float()
    result = hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), config), strict=False)
    tied = set(_BERT_TIED) if config.arch == "encoder" else {"lm_head.weight"} if config.tie_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied and not k.endswith(_HF_BUFFER_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise LmlabError(
            f"loading lmlab weights into HF {hf_config.model_type}: missing keys {missing}, unexpected keys {list(result.unexpected_keys)}"
        )
    if config.tie_embeddings and hf_model.get_output_embeddings().weight is not hf_model.get_input_embeddings().weight:
        raise LmlabError(f"HF {hf_config.model_type} did not tie lm_head to the token embedding though tie_word_embeddings=True")
    return hf_model.to(model.tok_emb.weight.device).eval()


def from_hf_model(hf_model: Any) -> nn.Module:
    """The lmlab model (fp32, eval mode, on ``hf_model``'s device) with an HF GPT-2, LLaMA or BERT model's weights.

    A BERT model keeps the heads it has: the pooler and NSP head come along when present; a bare
    ``BertModel`` gets a freshly initialised MLM head (a warning says so).
    """
    from lmlab.model import build_model

    config = config_from_hf(hf_model.config)
    sd = hf_model.state_dict()
    if config.arch == "encoder":
        config = dataclasses.replace(
            config, pooler=any(".pooler." in k or k.startswith("pooler.") for k in sd), nsp_head=any("seq_relationship" in k for k in sd)
        )
    model = build_model(config)
    weights = state_dict_from_hf(sd, config)
    result = model.load_state_dict(weights, strict=False)
    fresh = sorted(result.missing_keys)
    if result.unexpected_keys or any(not k.startswith(("mlm_", "lm_head.bias")) for k in fresh):
        raise LmlabError(f"loading HF {type(hf_model).__name__} weights: missing {fresh}, unexpected {result.unexpected_keys}")
    if fresh:
        logger.warning("HF %s has no MLM head: lmlab's starts freshly initialised (%s)", type(hf_model).__name__, ", ".join(fresh))
    return model.to(hf_model.device).eval()


def _hf_logits(output: Any) -> Tensor:
    logits = getattr(output, "logits", None)
    return output.prediction_logits if logits is None else logits


@torch.no_grad()
def max_logit_diff(model: nn.Module, hf_model: Any, input_ids: Tensor) -> float:
    """max |lmlab logits − HF logits| over a batch of token ids (B, T), both in fp32 and eval mode."""
    modes = model.training, hf_model.training
    model.eval(), hf_model.eval()
    try:
        ours = model(input_ids).float()
        theirs = _hf_logits(hf_model(input_ids=input_ids)).float()
    finally:
        model.train(modes[0]), hf_model.train(modes[1])
    if ours.shape != theirs.shape:
        raise LmlabError(f"logits shapes differ: lmlab {tuple(ours.shape)}, HF {tuple(theirs.shape)}")
    return (ours - theirs).abs().max().item()


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "from_hf_model",
    "hf_config_from",
    "max_logit_diff",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "to_hf_model",
]
