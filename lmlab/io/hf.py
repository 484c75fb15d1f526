"""Weights and configs between lmlab and HF Transformers, both ways: GPT-2, LLaMA, BERT and BART, with their task heads.

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

BART (``BartForConditionalGeneration``) for encoder–decoders, onto :class:`~lmlab.model.seq2seq.Seq2SeqLM`::

    tok_emb (tied: source, target, LM head)    model.shared (+ the encoder's, decoder's embed_tokens and lm_head, tied)
    enc_pos_emb / dec_pos_emb                  model.{encoder,decoder}.embed_positions, minus its first 2 rows (⁺)
    enc_emb_norm / dec_emb_norm                model.{encoder,decoder}.layernorm_embedding
    {enc,dec}_blocks.{i}.attn.qkv [q|k|v]      model.{encoder,decoder}.layers.{i}.self_attn.{q,k,v}_proj
    {enc,dec}_blocks.{i}.attn.proj / norm_1    …self_attn.out_proj / self_attn_layer_norm
    dec_blocks.{i}.cross_attn.q / kv [k|v]     model.decoder.layers.{i}.encoder_attn.q_proj / {k,v}_proj
    dec_blocks.{i}.cross_attn.proj / norm_cross  …encoder_attn.out_proj / encoder_attn_layer_norm
    {enc,dec}_blocks.{i}.mlp.fc / proj / norm_2  …fc1 / fc2 / final_layer_norm
    —  (lmlab's LM head has no bias)           final_logits_bias: all zeros (only resize_token_embeddings writes it)

Task heads (:mod:`lmlab.model.heads`, ``task_head.out``) are one Linear on the HF side too::

    classify   BertForSequenceClassification.classifier (on the pooler, as lmlab's encoder pools),
               GPT2/LlamaForSequenceClassification.score (no bias, as lmlab's decoder classifier head; HF
               reads the rightmost non-pad token, lmlab the last real one — the same for
               right padding whose pad id does not occur in the text)
    tag        Bert/GPT2ForTokenClassification.classifier, LlamaForTokenClassification.score
    qa         *ForQuestionAnswering.qa_outputs ([start | end]; LLaMA's backbone sits under ``transformer.``)

An HF task model has no LM head: importing one ties lmlab's decoder head to the token embedding and
gives an encoder a freshly initialised MLM head (a warning says so); exporting drops them.

(ᵀ): HF GPT-2 stores these in ``Conv1D`` layers, whose weight is (in, out) — the transpose of
``nn.Linear``'s (out, in). lmlab's fused ``qkv``, SwiGLU ``fc`` and cross-attention ``kv`` split along
their output rows into HF's separate projections. (⁺): BART looks positions up at p + 2 (a fairseq
left-over), so its tables have two rows lmlab never reads; exporting writes them as zeros. Every
mapping is exact, and the logits of both models agree to float rounding (``tests/test_hf.py``).

lmlab maps encoder–decoders onto BART rather than T5 because T5's relative position buckets (a
learned bias per distance bucket inside attention) are not in lmlab's blocks; BART's learned absolute
positions, post-norm LayerNorm blocks and GELU are. BART's ``scale_embedding`` (×√d) is the one
opt-in field it needed (``ModelConfig.scale_embedding``); its attention and activation dropouts are not
carried (lmlab has one ``dropout``), which changes training-mode dropout, never eval logits.

RoPE scaling (LLaMA 3.1's ``llama3``, ``linear``, ``dynamic``) is ``ModelConfig.rope_scaling``;
:func:`lmlab.model.blocks.rope_cache` computes the tables with transformers' formulas (``modeling_rope_utils``).
``dynamic`` (NTK) rescales only past ``max_position_embeddings``, which is lmlab's ``block_size``, so
within it its tables are plain RoPE's — exact for every sequence lmlab runs. Other RoPE types (yarn,
longrope, …) are refused naming the field.

**HF folders are checkpoints** (:func:`is_hf_folder`, read by :mod:`lmlab.io.checkpoint`): a folder
with an HF ``config.json`` (``model_type``, no ``lmlab_model_config``), weights as
``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (sharded or not, read with ``torch.load(weights_only=True)`` only: a pickle
holding anything but tensors is refused), and ``tokenizer.json``. :func:`read_hf_checkpoint` reads the
weights and maps them — transformers is not imported to load. Then :func:`verify_hf_folder` builds
transformers' model from the same folder once and compares outputs on a fixed batch (fp32; a
mismatch is an LmlabError with the number). The result is cached in ``lmlab-verified.json`` beside the
weights, keyed by the size and mtime of ``config.json`` and every weights file (and lmlab's version);
a folder lmlab cannot write to is verified on every load instead. Without transformers the check is
skipped with a warning. A sentence-transformers folder (``modules.json``) is read through its
Transformer module (the folder itself or ``0_Transformer/``); its pooling modules are not applied.

``transformers`` is an optional dependency (``pip install 'lmlab[hf]'``), imported only inside the
functions that need it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig, read_json_object, write_json_atomic
from lmlab.errors import LmlabError
from lmlab.io.weights import read_safetensors, safetensors_header, torch_load

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import transformers

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "bert", "bart")
PARITY_TOL = 1e-4  # max |Δ| allowed between lmlab's and HF's outputs, relative to the largest HF output (absolute below 1)
VERIFIED_FILE = "lmlab-verified.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)  # in the order they are looked for

# HF GPT-2 activation names → lmlab's ``gelu_approximate``. "gelu_new" is what GPT-2 checkpoints
# use (the tanh approximation written out by hand); "gelu_pytorch_tanh" is the same function as
# one PyTorch kernel. Exporting writes "gelu_new", the name GPT-2 tooling expects.
_GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
_GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # BERT's and BART's hidden_act / activation_function

# Tensors an HF state dict may hold that are not weights, or copies of a tied weight: causal-mask and
# RoPE buffers of some transformers versions, BERT's decoder (the word embedding and cls.predictions.bias
# again), BART's per-side embed_tokens (model.shared again) and fairseq's version counters. Importing
# ignores them: they are rebuilt from the config or tied by transformers itself.
_IGNORED_SUFFIXES = (
    ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "embeddings.position_ids",
    "cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight", "encoder.version", "decoder.version",
)

# Field defaults of the HF config classes (transformers 5), for the fields read here: a config.json
# may leave out any field at its default, and importing does not need transformers.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None, activation_function="gelu_new",
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=True,
    ),
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, head_dim=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
    ),
    "bert": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
        type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, position_embedding_type="absolute",
        is_decoder=False, add_cross_attention=False,
    ),
    "bart": dict(
        vocab_size=50265, max_position_embeddings=1024, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, encoder_attention_heads=16, decoder_attention_heads=16, activation_function="gelu",
        d_model=1024, dropout=0.1, init_std=0.02, scale_embedding=False, decoder_start_token_id=2, tie_word_embeddings=True,
        # mBART's and old BART configs' variants, absent from today's BartConfig
        normalize_before=False, add_final_layer_norm=False, add_bias_logits=False, normalize_embedding=True, static_position_embeddings=False,
    ),
}
_PROBLEM_TYPES = {"single_label_classification": "single", "multi_label_classification": "multi", "regression": "regression"}


@dataclass(frozen=True)
class Architecture:
    """An HF model class lmlab reads and writes: its family, the lmlab task of its head, where its backbone
    sits, its head's Linear (and whether that has a bias) and the transformers Auto class that loads it."""

    family: str
    task: str  # "" (an LM / MLM head, or none), "classify", "tag" or "qa"
    prefix: str
    auto: str
    head: str = ""
    head_bias: bool = True


ARCHITECTURES: dict[str, Architecture] = {
    "GPT2LMHeadModel": Architecture("gpt2", "", "transformer.", "AutoModelForCausalLM"),
    "GPT2ForSequenceClassification": Architecture("gpt2", "classify", "transformer.", "AutoModelForSequenceClassification", "score", False),
    "GPT2ForTokenClassification": Architecture("gpt2", "tag", "transformer.", "AutoModelForTokenClassification", "classifier"),
    "GPT2ForQuestionAnswering": Architecture("gpt2", "qa", "transformer.", "AutoModelForQuestionAnswering", "qa_outputs"),
    "LlamaForCausalLM": Architecture("llama", "", "model.", "AutoModelForCausalLM"),
    "LlamaForSequenceClassification": Architecture("llama", "classify", "model.", "AutoModelForSequenceClassification", "score", False),
    "LlamaForTokenClassification": Architecture("llama", "tag", "model.", "AutoModelForTokenClassification", "score"),
    "LlamaForQuestionAnswering": Architecture("llama", "qa", "transformer.", "AutoModelForQuestionAnswering", "qa_outputs"),
    "BertModel": Architecture("bert", "", "bert.", "AutoModel"),
    "BertForPreTraining": Architecture("bert", "", "bert.", "AutoModelForPreTraining"),
    "BertForMaskedLM": Architecture("bert", "", "bert.", "AutoModelForMaskedLM"),
    "BertForSequenceClassification": Architecture("bert", "classify", "bert.", "AutoModelForSequenceClassification", "classifier"),
    "BertForTokenClassification": Architecture("bert", "tag", "bert.", "AutoModelForTokenClassification", "classifier"),
    "BertForQuestionAnswering": Architecture("bert", "qa", "bert.", "AutoModelForQuestionAnswering", "qa_outputs"),
    "BartForConditionalGeneration": Architecture("bart", "", "model.", "AutoModelForSeq2SeqLM"),
}
# bare base models read as the LM class around them (their weights lack the prefix, and a tied LM head has none)
_BARE = {"GPT2Model": "GPT2LMHeadModel", "LlamaModel": "LlamaForCausalLM", "BartModel": "BartForConditionalGeneration"}
_CLASS_PREFIX = {"gpt2": "GPT2", "llama": "Llama", "bert": "Bert"}
_TASK_SUFFIX = {"classify": "ForSequenceClassification", "tag": "ForTokenClassification", "qa": "ForQuestionAnswering"}
_LM_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForPreTraining", "bart": "BartForConditionalGeneration"}


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise LmlabError("transformers is not installed: pip install 'lmlab[hf]'") from None
    return transformers


def _family(config: ModelConfig) -> str:
    """'gpt2', 'llama', 'bert' or 'bart': the HF family that expresses ``config`` exactly, or an LmlabError naming the field."""

    def check(family: str, why: str, expected: dict[str, Any]) -> str:
        for field_name, value in expected.items():
            if getattr(config, field_name) != value:
                raise LmlabError(
                    f"model config field '{field_name}' is {getattr(config, field_name)!r}: HF {family} (the family for {why}) "
                    f"needs {value!r}; no supported HF family ({', '.join(SUPPORTED_MODEL_TYPES)}) expresses this config exactly"
                )
        if config.n_kv_heads != config.n_head and family != "llama":
            raise LmlabError(f"model config field 'n_kv_heads' is {config.n_kv_heads}: HF {family} needs n_kv_heads == n_head ({config.n_head})")
        return family

    if config.arch == "seq2seq":
        why = "arch='seq2seq': lmlab exports encoder–decoders as BART, as T5's relative position buckets are not in lmlab's blocks"
        return check("bart", why, dict(
            norm="layernorm", mlp="gelu", bias=True, position="learned", norm_placement="post", embedding_norm=True,
            tie_embeddings=True, norm_eps=1e-5,  # BART's LayerNorms have the PyTorch default eps
        ))
    if config.arch == "encoder":
        return check("bert", "arch='encoder'", dict(
            norm="layernorm", mlp="gelu", bias=True, position="learned", norm_placement="post", embedding_norm=True, tie_embeddings=True,
        ))
    if config.position == "learned":
        return check("gpt2", "position='learned'", dict(norm_placement="pre", norm="layernorm", mlp="gelu", bias=True))
    return check("llama", "position='rope'", dict(norm_placement="pre", norm="rmsnorm", mlp="swiglu"))


def hf_architecture(config: ModelConfig) -> str:
    """The HF class that holds a model of ``config`` with its head (what export writes)."""
    family = _family(config)
    if config.task:
        if family == "bert" and config.task == "classify" and not config.pooler:
            raise LmlabError("model config field 'pooler' is False: HF BertForSequenceClassification classifies the pooled [CLS] (bert.pooler)")
        return _CLASS_PREFIX[family] + _TASK_SUFFIX[config.task]
    if family == "bert" and config.pooler and not config.nsp_head:
        raise LmlabError(
            "an encoder with a pooler but no NSP head has no HF class that holds both its heads; export needs nsp_head or no pooler"
        )
    return "BertForMaskedLM" if family == "bert" and not config.pooler else _LM_CLASS[family]


def _import_architecture(config: ModelConfig, keys: set[str]) -> str:
    """The class whose weights ``keys`` (prefixed) are: a BERT without a task head is a BertForPreTraining,
    BertForMaskedLM or bare BertModel by the heads it has; every other class follows from the config."""
    if config.arch == "encoder" and not config.task:
        if any(k.startswith("cls.seq_relationship.") for k in keys):
            return "BertForPreTraining"
        return "BertForMaskedLM" if any(k.startswith("cls.predictions.") for k in keys) else "BertModel"
    return hf_architecture(config)


# -- configs ------------------------------------------------------------------------------------


def hf_config_from(config: ModelConfig) -> "transformers.PretrainedConfig":
    """The HF config (``GPT2Config``, ``LlamaConfig``, ``BertConfig`` or ``BartConfig``) describing the same
    model as ``config``, with its architecture and, for a task head, its labels.

    Special token ids keep the HF family's defaults, except that an id outside ``vocab_size`` becomes
    None (an id the embedding cannot look up means nothing, and transformers warns about it); export
    sets them from the tokenizer.
    """
    tf = require_transformers()
    family = _family(config)

    def token_id(default: int) -> int | None:
        return default if default < config.vocab_size else None

    common: dict[str, Any] = dict(architectures=[hf_architecture(config)], initializer_range=config.init_std)
    if config.task in ("classify", "tag"):
        names = config.labels or [f"LABEL_{i}" for i in range(config.num_labels)]
        common.update(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
        if config.task == "classify":
            problem = {v: k for k, v in _PROBLEM_TYPES.items()}[config.problem_type]
            common["problem_type"] = problem
    if family == "bart":
        common.pop("initializer_range")
        return tf.BartConfig(
            vocab_size=config.vocab_size,
            max_position_embeddings=config.block_size,
            encoder_layers=config.n_layer,
            decoder_layers=config.n_decoder_layer,
            encoder_attention_heads=config.n_head,
            decoder_attention_heads=config.n_head,
            encoder_ffn_dim=config.intermediate_size,
            decoder_ffn_dim=config.intermediate_size,
            d_model=config.n_embd,
            activation_function="gelu" if config.gelu_approximate == "none" else "gelu_new",
            dropout=config.dropout,
            attention_dropout=config.dropout,  # lmlab drops attention weights and residual branches at one rate,
            activation_dropout=0.0,  # and nothing inside the MLP
            init_std=config.init_std,
            scale_embedding=config.scale_embedding,
            tie_word_embeddings=True,
            decoder_start_token_id=config.decoder_start_token_id,
            forced_eos_token_id=None,  # lmlab's decoding forces nothing
            bos_token_id=token_id(0),
            pad_token_id=token_id(1),
            eos_token_id=token_id(2),
            **common,
        )
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
            type_vocab_size=max(config.type_vocab_size, 1),  # no segments: one all-zero row, which adds nothing
            layer_norm_eps=config.norm_eps,
            tie_word_embeddings=True,
            pad_token_id=0,
            **common,
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
            tie_word_embeddings=config.tie_embeddings,
            bos_token_id=token_id(50256),
            eos_token_id=token_id(50256),
            **common,
        )
    scaling = dict(config.rope_scaling)
    rope_type = scaling.pop("rope_type", "default")
    rope: dict[str, Any]
    if _major_version(tf) >= 5:
        rope = {"rope_parameters": {"rope_type": rope_type, "rope_theta": config.rope_theta, **scaling}}
    else:  # transformers 4.x takes the base as a top-level field
        rope = {"rope_theta": config.rope_theta, "rope_scaling": {"rope_type": rope_type, **scaling} if scaling else None}
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
        **common,
    )


def config_from_hf(hf_config: Any, keys: set[str] | None = None) -> ModelConfig:
    """The lmlab ``ModelConfig`` for an HF config — a ``PretrainedConfig`` or the dict of a ``config.json``
    (fields left out take the HF class's defaults; transformers is not needed). The inverse of
    :func:`hf_config_from`.

    The head comes from ``architectures`` (a task head's labels from ``id2label``, its problem type from
    ``problem_type``). ``keys``, the names of the weights, settle what a BERT has: a pooler, an NSP head.
    """
    c = _fields(hf_config)
    model_type = c["model_type"]

    def unsupported(field_name: str, expected: str) -> LmlabError:
        return LmlabError(f"HF {model_type} config field '{field_name}' is {c.get(field_name)!r}: lmlab supports only {expected}")

    def require(**expected: Any) -> None:
        for field_name, value in expected.items():
            if c.get(field_name) != value:
                raise unsupported(field_name, repr(value))

    declared = (c.get("architectures") or [_LM_CLASS[model_type]])[0]
    architecture = _BARE.get(declared, declared)
    if architecture not in ARCHITECTURES or ARCHITECTURES[architecture].family != model_type:
        known = ", ".join(a for a, spec in ARCHITECTURES.items() if spec.family == model_type)
        raise unsupported("architectures", f"one of {known} (or the bare base model)")
    task = ARCHITECTURES[architecture].task

    if model_type == "bart":
        activation = c["activation_function"]
        if activation not in _GELUS:
            raise unsupported("activation_function", "gelu, gelu_new or gelu_pytorch_tanh")
        require(
            normalize_before=False, add_final_layer_norm=False, add_bias_logits=False, normalize_embedding=True,
            static_position_embeddings=False, tie_word_embeddings=True,
        )
        for ours, theirs in (("decoder_attention_heads", "encoder_attention_heads"), ("decoder_ffn_dim", "encoder_ffn_dim")):
            if c[ours] != c[theirs]:
                raise unsupported(ours, f"{theirs} ({c[theirs]}): lmlab's encoder and decoder blocks have one shape")
        if c["decoder_start_token_id"] is None:
            raise unsupported("decoder_start_token_id", "a token id")
        config = ModelConfig(
            arch="seq2seq", vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["encoder_layers"],
            n_decoder_layer=c["decoder_layers"], n_head=c["encoder_attention_heads"], n_embd=c["d_model"],
            intermediate_size=c["encoder_ffn_dim"], norm="layernorm", norm_eps=1e-5, mlp="gelu", gelu_approximate=_GELUS[activation],
            position="learned", bias=True, tie_embeddings=True, dropout=float(c["dropout"]), init_std=c["init_std"],
            norm_placement="post", embedding_norm=True, scale_embedding=bool(c["scale_embedding"]),
            decoder_start_token_id=c["decoder_start_token_id"],
        )
    elif model_type == "bert":
        activation = c["hidden_act"]
        if activation not in _GELUS:
            raise unsupported("hidden_act", "gelu, gelu_new or gelu_pytorch_tanh")
        require(position_embedding_type="absolute", is_decoder=False, add_cross_attention=False)
        if c["hidden_dropout_prob"] != c["attention_probs_dropout_prob"]:
            raise LmlabError("HF bert config has different hidden and attention dropouts: lmlab has one 'dropout' for both")
        if keys is None:  # what the class holds
            pooler = architecture in ("BertModel", "BertForPreTraining", "BertForSequenceClassification")
            nsp = architecture == "BertForPreTraining"
        else:
            pooler = any(k.startswith(("bert.pooler.", "pooler.")) for k in keys)
            nsp = not task and any(k.startswith("cls.seq_relationship.") for k in keys)
        config = ModelConfig(
            arch="encoder", vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
            n_head=c["num_attention_heads"], n_embd=c["hidden_size"], intermediate_size=c["intermediate_size"], norm="layernorm",
            norm_eps=c["layer_norm_eps"], mlp="gelu", gelu_approximate=_GELUS[activation], position="learned", bias=True,
            tie_embeddings=True, dropout=float(c["hidden_dropout_prob"]), init_std=c["initializer_range"],
            type_vocab_size=c["type_vocab_size"], norm_placement="post", embedding_norm=True, pooler=pooler, nsp_head=nsp,
        )
    elif model_type == "gpt2":
        activation = c["activation_function"]
        if activation not in _GPT2_ACTIVATIONS:
            raise unsupported("activation_function", "one of " + ", ".join(_GPT2_ACTIVATIONS))
        require(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
        dropouts = {name: c[name] for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        if len(set(dropouts.values())) > 1:
            raise LmlabError(f"HF gpt2 config has different dropouts {dropouts}: lmlab has one 'dropout' for all three")
        config = ModelConfig(
            vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
            n_kv_heads=c["n_head"], intermediate_size=c["n_inner"] or 4 * c["n_embd"], norm="layernorm",
            norm_eps=c["layer_norm_epsilon"], mlp="gelu", gelu_approximate=_GPT2_ACTIVATIONS[activation], position="learned",
            bias=True, tie_embeddings=bool(c["tie_word_embeddings"]) or bool(task), dropout=float(dropouts["resid_pdrop"]),
            init_std=c["initializer_range"],
        )
    else:  # llama
        if c["hidden_act"] != "silu":
            raise unsupported("hidden_act", "'silu' (SwiGLU)")
        n_head, d = c["num_attention_heads"], c["hidden_size"]
        if (c["head_dim"] or d // n_head) * n_head != d:
            raise unsupported("head_dim", f"hidden_size / num_attention_heads = {d // n_head}")
        if bool(c["attention_bias"]) != bool(c["mlp_bias"]):
            raise LmlabError(f"HF llama config has attention_bias={c['attention_bias']} but mlp_bias={c['mlp_bias']}: lmlab's 'bias' sets both")
        rope_theta, rope_scaling = _llama_rope(c)
        config = ModelConfig(
            vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"], n_head=n_head,
            n_embd=d, n_kv_heads=c["num_key_value_heads"] or n_head, intermediate_size=c["intermediate_size"], norm="rmsnorm",
            norm_eps=c["rms_norm_eps"], mlp="swiglu", position="rope", rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            bias=bool(c["attention_bias"]), tie_embeddings=bool(c["tie_word_embeddings"]) or bool(task),
            dropout=float(c["attention_dropout"] or 0.0), init_std=c["initializer_range"],
        )
    return dataclasses.replace(config, **_head_fields(c, task)) if task else config


def _fields(hf_config: Any) -> dict[str, Any]:
    """An HF config (object or config.json dict) as a dict, with the class defaults of its model_type filled in."""
    data = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LmlabError(f"HF model_type {model_type!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    return {**_HF_DEFAULTS[model_type], **data}


def _head_fields(c: dict[str, Any], task: str) -> dict[str, Any]:
    """The ModelConfig task fields of an HF task model: qa's two outputs, or the labels and problem type."""
    if task == "qa":
        return dict(task="qa", num_labels=2, labels=["start", "end"])
    id2label = {int(k): str(v) for k, v in (c.get("id2label") or {}).items()}
    n = len(id2label) or c.get("num_labels") or 2
    problem_type = c.get("problem_type")
    if problem_type is not None and problem_type not in _PROBLEM_TYPES:
        raise LmlabError(f"HF config field 'problem_type' is {problem_type!r}: lmlab supports {', '.join(_PROBLEM_TYPES)}")
    # HF decides a missing problem type from the labels at training time: one output is regression
    single = "regression" if n == 1 else "single"
    return dict(
        task=task, num_labels=n, labels=[id2label.get(i, f"LABEL_{i}") for i in range(n)],
        problem_type=_PROBLEM_TYPES.get(problem_type, single) if task == "classify" else "single",
    )


def _llama_rope(c: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """RoPE's base and lmlab's ``rope_scaling`` from a LLaMA config: transformers 5's ``rope_parameters``,
    or 4.x's ``rope_theta`` with an optional ``rope_scaling`` dict."""
    field_name = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    params = dict(c.get("rope_parameters") or {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta") or 10000.0})
    rope_type = next(filter(None, [params.pop("rope_type", None), params.pop("type", None)]), "default")  # 4.x wrote "type"
    theta = params.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise LmlabError(f"HF llama config field '{field_name}' has a partial_rotary_factor: lmlab rotates whole heads")
    if rope_type == "default":
        return theta, {}
    from lmlab.config import ROPE_SCALINGS

    if rope_type not in ROPE_SCALINGS:
        supported = ", ".join(map(repr, ROPE_SCALINGS))
        raise LmlabError(f"HF llama config field '{field_name}' has rope_type {rope_type!r}: lmlab supports 'default', {supported}")
    if rope_type == "llama3":  # as transformers' standardize_rope_params: a top-level field wins, else the context length
        params["original_max_position_embeddings"] = c.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings", c["max_position_embeddings"]
        )
    unknown = sorted(set(params) - set(ROPE_SCALINGS[rope_type]))
    if unknown:
        known = ", ".join(ROPE_SCALINGS[rope_type])
        raise LmlabError(f"HF llama config field '{field_name}' has {', '.join(unknown)} for rope_type {rope_type!r}: lmlab reads only {known}")
    return theta, {"rope_type": rope_type, **params}


def _major_version(tf: Any) -> int:
    return int(tf.__version__.split(".")[0])


# -- RoPE tables --------------------------------------------------------------------------------


# -- state dicts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One lmlab tensor and where HF keeps it."""

    lmlab: str  # "": an HF tensor lmlab does not have (it must be zero)
    hf: tuple[str, ...]  # one name, or the pieces a fused lmlab weight splits into along dim 0
    sizes: tuple[int, ...] = ()  # rows of each piece, for a fused weight
    transpose: bool = False  # HF GPT-2's Conv1D stores (in, out)
    offset: int = 0  # rows HF keeps in front that lmlab has not (BART's positions)
    zeros: tuple[int, ...] = ()  # the shape of an HF tensor lmlab has not, always zero there


def _rules(config: ModelConfig, architecture: str) -> list[_Rule]:
    """The exact mapping for ``config`` as HF ``architecture``: every lmlab tensor that class holds (a
    tied ``lm_head.weight`` aside), in ``model.state_dict()`` order."""
    spec = ARCHITECTURES[architecture]
    p = spec.prefix
    if spec.family == "bart":
        rules = _bart_rules(config)
    elif spec.family == "bert":
        rules = _bert_rules(config, architecture)
    else:
        rules = (_gpt2_rules if spec.family == "gpt2" else _llama_rules)(config, p)
        if not spec.task and not config.tie_embeddings:
            rules.append(_Rule("lm_head.weight", ("lm_head.weight",)))
    if spec.task:
        rules.append(_Rule("task_head.out.weight", (f"{spec.head}.weight",)))
        if spec.head_bias:  # a decoder's sequence classifier has no bias on either side
            rules.append(_Rule("task_head.out.bias", (f"{spec.head}.bias",)))
    return rules


def _linear(ours: str, theirs: str) -> list[_Rule]:
    return [_Rule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]


def _fused(ours: str, theirs: tuple[str, ...], sizes: tuple[int, ...], kinds: tuple[str, ...] = ("weight", "bias")) -> list[_Rule]:
    return [_Rule(f"{ours}.{kind}", tuple(f"{t}.{kind}" for t in theirs), sizes=sizes) for kind in kinds]


def _gpt2_rules(config: ModelConfig, p: str) -> list[_Rule]:
    rules = [_Rule("tok_emb.weight", (p + "wte.weight",)), _Rule("pos_emb.weight", (p + "wpe.weight",))]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"{p}h.{i}."
        for a, b in (("norm_1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("norm_2", "ln_2"),
                     ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            rules.append(_Rule(f"{ours}{a}.weight", (f"{theirs}{b}.weight",), transpose=not a.startswith("norm")))
            rules.append(_Rule(f"{ours}{a}.bias", (f"{theirs}{b}.bias",)))
    return rules + _linear("norm_f", p + "ln_f")


def _llama_rules(config: ModelConfig, p: str) -> list[_Rule]:
    kv_dim = config.n_kv_heads * config.head_dim
    kinds = ("weight", "bias") if config.bias else ("weight",)
    rules = [_Rule("tok_emb.weight", (p + "embed_tokens.weight",))]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"{p}layers.{i}."
        rules.append(_Rule(f"{ours}norm_1.weight", (f"{theirs}input_layernorm.weight",)))
        rules += _fused(ours + "attn.qkv", tuple(f"{theirs}self_attn.{x}_proj" for x in "qkv"), (config.n_embd, kv_dim, kv_dim), kinds)
        rules += [_Rule(f"{ours}attn.proj.{kind}", (f"{theirs}self_attn.o_proj.{kind}",)) for kind in kinds]
        rules.append(_Rule(f"{ours}norm_2.weight", (f"{theirs}post_attention_layernorm.weight",)))
        gate_up = (f"{theirs}mlp.gate_proj", f"{theirs}mlp.up_proj")
        rules += _fused(ours + "mlp.fc", gate_up, (config.intermediate_size, config.intermediate_size), kinds)
        rules += [_Rule(f"{ours}mlp.proj.{kind}", (f"{theirs}mlp.down_proj.{kind}",)) for kind in kinds]
    return rules + [_Rule("norm_f.weight", (p + "norm.weight",))]


def _bert_rules(config: ModelConfig, architecture: str) -> list[_Rule]:
    """BERT (``BertForPreTraining`` names): a backbone under ``bert.``, the MLM and NSP heads under ``cls.``.
    Only the classes that hold them have the pooler (not MaskedLM unless its weights have one, nor
    token classification or QA) and the MLM and NSP heads (PreTraining; MaskedLM the MLM head alone)."""
    d = config.n_embd
    e = "bert.embeddings."
    rules = [_Rule("tok_emb.weight", (e + "word_embeddings.weight",)), _Rule("pos_emb.weight", (e + "position_embeddings.weight",))]
    if config.type_vocab_size:
        rules.append(_Rule("seg_emb.weight", (e + "token_type_embeddings.weight",)))
    else:  # HF always has token types: one row, all zero, adds nothing
        rules.append(_Rule("", (e + "token_type_embeddings.weight",), zeros=(1, d)))
    rules += _linear("emb_norm", e + "LayerNorm")
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        rules += _fused(ours + "attn.qkv", tuple(f"{theirs}attention.self.{x}" for x in ("query", "key", "value")), (d, d, d))
        rules += _linear(ours + "attn.proj", theirs + "attention.output.dense")
        rules += _linear(ours + "norm_1", theirs + "attention.output.LayerNorm")
        rules += _linear(ours + "mlp.fc", theirs + "intermediate.dense")
        rules += _linear(ours + "mlp.proj", theirs + "output.dense")
        rules += _linear(ours + "norm_2", theirs + "output.LayerNorm")
    if config.pooler and config.task not in ("tag", "qa"):
        rules += _linear("pooler", "bert.pooler.dense")
    if architecture in ("BertForPreTraining", "BertForMaskedLM"):
        rules += _linear("mlm_dense", "cls.predictions.transform.dense")
        rules += _linear("mlm_norm", "cls.predictions.transform.LayerNorm")
        rules.append(_Rule("lm_head.bias", ("cls.predictions.bias",)))
    if architecture == "BertForPreTraining":
        rules += _linear("nsp_head", "cls.seq_relationship")
    return rules


def _bart_rules(config: ModelConfig) -> list[_Rule]:
    d = config.n_embd
    rules = [
        _Rule("tok_emb.weight", ("model.shared.weight",)),
        _Rule("enc_pos_emb.weight", ("model.encoder.embed_positions.weight",), offset=2),
        _Rule("dec_pos_emb.weight", ("model.decoder.embed_positions.weight",), offset=2),
    ]
    rules += _linear("enc_emb_norm", "model.encoder.layernorm_embedding") + _linear("dec_emb_norm", "model.decoder.layernorm_embedding")
    for side, blocks, n in (("encoder", "enc_blocks", config.n_layer), ("decoder", "dec_blocks", config.n_decoder_layer)):
        for i in range(n):
            ours, theirs = f"{blocks}.{i}.", f"model.{side}.layers.{i}."
            rules += _linear(ours + "norm_1", theirs + "self_attn_layer_norm")
            rules += _fused(ours + "attn.qkv", tuple(f"{theirs}self_attn.{x}_proj" for x in "qkv"), (d, d, d))
            rules += _linear(ours + "attn.proj", theirs + "self_attn.out_proj")
            if side == "decoder":
                rules += _linear(ours + "norm_cross", theirs + "encoder_attn_layer_norm")
                rules += _linear(ours + "cross_attn.q", theirs + "encoder_attn.q_proj")
                rules += _fused(ours + "cross_attn.kv", (theirs + "encoder_attn.k_proj", theirs + "encoder_attn.v_proj"), (d, d))
                rules += _linear(ours + "cross_attn.proj", theirs + "encoder_attn.out_proj")
            rules += _linear(ours + "norm_2", theirs + "final_layer_norm")
            rules += _linear(ours + "mlp.fc", theirs + "fc1")
            rules += _linear(ours + "mlp.proj", theirs + "fc2")
    return rules + [_Rule("", ("final_logits_bias",), zeros=(1, config.vocab_size))]


def _check_keys(given: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
        raise LmlabError(f"{what}: " + "; ".join(parts))


def _dropped(config: ModelConfig, architecture: str, name: str) -> bool:
    """Whether exporting as ``architecture`` leaves out lmlab tensor ``name``: the LM or MLM head (and NSP
    head, and for tagging and QA the pooler) of a task model, which the HF task class does not have."""
    if not ARCHITECTURES[architecture].task:
        return False
    if config.arch == "decoder":
        return name == "lm_head.weight"
    return name.startswith(("mlm_", "lm_head.", "nsp_head.")) or (config.task in ("tag", "qa") and name.startswith("pooler."))


def state_dict_to_hf(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """An lmlab state dict as the state dict of the HF class :func:`hf_architecture` names for ``config``.

    A tied head is left out: HF ties it to the token embedding itself. Split, transposed and padded
    tensors are fresh copies (no storage shared with ``state_dict``, so the result can be saved with
    safetensors); the others are the same tensors. A tensor HF has no place for must be zero.
    """
    architecture = hf_architecture(config)
    rules = _rules(config, architecture)
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    expected = {r.lmlab for r in rules if r.lmlab} | tied
    # a tied head may or may not appear in the given dict (state_dict() lists it under both names)
    given = {k for k in state_dict if not _dropped(config, architecture, k)} | tied
    _check_keys(given, expected, "lmlab state dict")
    out: dict[str, Tensor] = {}
    ref = state_dict["tok_emb.weight"]
    for rule in rules:
        if not rule.lmlab:
            out[rule.hf[0]] = ref.new_zeros(rule.zeros)
            continue
        t = state_dict[rule.lmlab]
        if rule.transpose:
            t = t.t().contiguous()
        if rule.offset:
            t = torch.cat([t.new_zeros(rule.offset, *t.shape[1:]), t])
        if rule.sizes:
            _check_rows(t, rule)
            out.update(zip(rule.hf, (piece.clone() for piece in t.split(rule.sizes, dim=0))))
        else:
            out[rule.hf[0]] = t
    return out


def state_dict_from_hf(hf_state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """An HF state dict as the lmlab state dict for ``config`` (see :func:`config_from_hf`).

    Accepts the keys of the class with a head and those of the bare base model (``h.0....`` as the
    original GPT-2 checkpoints store them, ``layers.0....``, a sentence-transformers BERT). Non-weight
    buffers and copies of tied weights are ignored, and so is ``lm_head.weight`` when the embeddings
    are tied: the lmlab dict then holds the token embedding under both names, as ``state_dict()`` does.
    What the HF class has not (a task model's MLM head) is not in the result (:func:`complete_state_dict`).
    """
    family = _family(config)
    prefix = ARCHITECTURES[_CLASS_PREFIX[family] + _TASK_SUFFIX[config.task] if config.task else _LM_CLASS[family]].prefix
    sd = {_legacy_name(k): v for k, v in hf_state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if not any(k.startswith(prefix) for k in sd):  # a bare base model's checkpoint
        sd = {(k if k.startswith(("lm_head.", "cls.", "final_logits_bias")) else prefix + k): v for k, v in sd.items()}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    architecture = _import_architecture(config, set(sd))
    rules = _rules(config, architecture)
    optional = {r.hf[0] for r in rules if not r.lmlab}  # zero on HF's side: transformers fills it in when absent
    _check_keys(set(sd) - optional, {name for r in rules if r.lmlab for name in r.hf}, f"HF {architecture} state dict")
    out: dict[str, Tensor] = {}
    for rule in rules:
        if not rule.lmlab:
            if rule.hf[0] in sd and sd[rule.hf[0]].any():
                raise LmlabError(f"HF weight '{rule.hf[0]}' is not zero: lmlab's model has no such bias")
            continue
        pieces = [sd[name] for name in rule.hf]
        t = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        t = t[rule.offset :] if rule.offset else t
        out[rule.lmlab] = t.t().contiguous() if rule.transpose else t
    if config.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def _legacy_name(key: str) -> str:
    """TensorFlow-era BERT checkpoints name LayerNorm parameters gamma and beta; transformers renames them on load too."""
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def complete_state_dict(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """``state`` with what an HF model does not have added, freshly initialised as :func:`lmlab.model.blocks.init_weights`
    would (seeded): the MLM head of a bare BERT or a BERT task model. A warning names them."""
    from lmlab.model import build_model

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(config).state_dict().items()}
    fresh = sorted(set(shapes) - set(state))
    if not fresh:
        return state
    if any(not k.startswith(("mlm_", "lm_head.bias")) for k in fresh):
        raise LmlabError(f"HF weights lack {', '.join(fresh[:5])}: expected every weight but a BERT's MLM head")
    logger.warning("the HF model has no MLM head: lmlab's starts freshly initialised (%s)", ", ".join(fresh))
    gen = torch.Generator().manual_seed(0)
    out = dict(state)
    for name in fresh:
        t = torch.zeros(shapes[name])
        if t.dim() >= 2:
            t.normal_(0.0, config.init_std, generator=gen)
        elif name.startswith("mlm_norm.") and name.endswith(".weight"):
            t.fill_(1.0)
        out[name] = t
    return out


def _check_rows(t: Tensor, rule: _Rule) -> None:
    if t.shape[0] != sum(rule.sizes):
        raise LmlabError(f"lmlab tensor '{rule.lmlab}' has {t.shape[0]} rows: expected {sum(rule.sizes)} = {' + '.join(map(str, rule.sizes))} for the config")


def adapter_state_to_hf(adapters: dict[str, Tensor], config: ModelConfig) -> tuple[dict[str, Tensor], list[str]]:
    """lmlab's LoRA weights (``blocks.0.attn.qkv.lora_A.default.weight``, …) as a PEFT adapter file keys
    them on the HF model (``base_model.model.<module>.lora_A.weight``), and the HF modules they adapt.

    A LoRA on a fused lmlab Linear is exactly one LoRA per HF piece: ΔW = B·A, and splitting ΔW by rows
    splits B by rows while every piece keeps the whole A. GPT-2's Conv1D pieces take A and B as they are
    (PEFT's ``fan_in_fan_out`` transposes the product, not the factors).
    """
    rules = {r.lmlab: r for r in _rules(config, hf_architecture(config))}
    out: dict[str, Tensor] = {}
    modules: list[str] = []
    for key, t in adapters.items():
        layer, _, rest = key.partition(".lora_")
        rule = rules.get(layer + ".weight")
        if rule is None or rest not in ("A.default.weight", "B.default.weight"):
            raise LmlabError(f"LoRA weight '{key}': no HF module holds '{layer}' in {hf_architecture(config)}")
        hf_modules = [name.removesuffix(".weight") for name in rule.hf]
        if rest[0] == "A":
            pieces = [t] * len(hf_modules)  # every piece reads the same input through the same A
        else:
            pieces = list(t.split(rule.sizes, dim=0)) if rule.sizes else [t]  # B splits by output rows
        for module, piece in zip(hf_modules, pieces):
            out[f"base_model.model.{module}.lora_{rest[0]}.weight"] = piece.detach().to("cpu").clone()
        modules += [m for m in hf_modules if m not in modules]
    return out, modules


# -- models -------------------------------------------------------------------------------------


def to_hf_model(model: nn.Module) -> "transformers.PreTrainedModel":
    """The HF model (the class :func:`hf_architecture` names) with ``model``'s weights, fp32, eval mode, SDPA, same device."""
    tf = require_transformers()
    config: ModelConfig = model.config
    hf_config = hf_config_from(config)
    hf_model = getattr(tf, hf_architecture(config))._from_config(hf_config, attn_implementation="sdpa").float()
    weights = state_dict_to_hf(model.state_dict(), config)
    result = hf_model.load_state_dict(weights, strict=False)
    own = hf_model.state_dict()
    loaded = {own[k].data_ptr() for k in weights}
    # tied weights share a loaded tensor
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded and not k.endswith(_IGNORED_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise LmlabError(f"loading lmlab weights into HF {hf_config.model_type}: missing keys {missing}, unexpected keys {list(result.unexpected_keys)}")
    if config.tie_embeddings and hf_model.get_output_embeddings() is not None:
        if hf_model.get_output_embeddings().weight is not hf_model.get_input_embeddings().weight:
            raise LmlabError(f"HF {hf_config.model_type} did not tie lm_head to the token embedding though tie_word_embeddings=True")
    return hf_model.to(model.tok_emb.weight.device).eval()


def from_hf_model(hf_model: Any) -> nn.Module:
    """The lmlab model (fp32, eval mode, on ``hf_model``'s device) with an HF model's weights (any class of
    :data:`ARCHITECTURES`, or a bare base model). A BERT keeps the heads it has; one without an MLM head
    gets a freshly initialised one (a warning says so)."""
    from lmlab.io.checkpoint import rebuild_buffers
    from lmlab.model import build_model

    sd = hf_model.state_dict()
    fields = {**hf_model.config.to_dict(), "architectures": [type(hf_model).__name__]}
    config = config_from_hf(fields, keys=_with_prefix(set(sd), fields))
    model = build_model(config)
    model.load_state_dict(complete_state_dict(state_dict_from_hf(sd, config), config))
    rebuild_buffers(model)
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


@torch.no_grad()
def _output_pairs(model: nn.Module, hf_model: Any, class_name: str) -> list[tuple[Tensor, Tensor]]:
    """(lmlab, HF) outputs of one fixed batch: LM/MLM logits, task logits (QA: [start | end]), NSP logits,
    a bare BERT's hidden states and pooled vector; seq2seq: decoder logits for a source/target pair.
    Encoders and seq2seq sources have a padded row; a decoder classifier's ids avoid the pad id."""
    config: ModelConfig = model.config
    device = model.tok_emb.weight.device
    g = torch.Generator().manual_seed(0)
    B, T = 2, min(12, config.block_size)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, T - 3 :] = 0
    if config.arch == "seq2seq":
        target = torch.randint(0, config.vocab_size, (B, T - 2), generator=g).to(device)
        target[:, 0] = config.decoder_start_token_id
        theirs = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        return [(model(ids, target, mask), theirs)]
    if config.arch == "decoder":
        pad = getattr(hf_model.config, "pad_token_id", None)
        if config.task == "classify" and pad is None:
            ids = ids[:1]  # HF pools a batch by the pad id; without one it takes a single row
        elif config.task == "classify":
            ids = ids.masked_fill(ids == pad, (pad + 1) % config.vocab_size)
        mask, types = torch.ones_like(ids), None
        out = hf_model(input_ids=ids, attention_mask=mask)
    else:
        types = torch.zeros_like(ids)
        if config.type_vocab_size > 1:
            types[:, T // 2 :] = 1
        out = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if config.task:
        theirs = torch.stack([out.start_logits, out.end_logits], dim=-1) if config.task == "qa" else out.logits
        return [(model.task_logits(ids, types, mask), theirs)]
    if config.arch == "decoder":
        return [(model(ids), out.logits)]
    hidden = model.encode(ids, types, mask)
    if class_name == "BertModel":
        pooled = [(model.pool(hidden), out.pooler_output)] if config.pooler else []
        return [(hidden, out.last_hidden_state), *pooled]
    nsp = [(model.nsp_logits(hidden), out.seq_relationship_logits)] if class_name == "BertForPreTraining" else []
    return [(model.mlm_logits(hidden), _hf_logits(out)), *nsp]


def check_parity(model: nn.Module, hf_model: Any, what: str) -> float:
    """max |Δ| between ``model``'s and ``hf_model``'s outputs on a fixed batch (fp32, eval mode); an
    LmlabError naming ``what`` and the number when it exceeds :data:`PARITY_TOL` (relative to the
    largest HF output, absolute below 1). ``hf_model`` may be a ``peft.PeftModel``."""
    base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    modes = model.training, hf_model.training
    model.eval(), hf_model.eval()
    try:
        pairs = _output_pairs(model, hf_model, type(base).__name__)
    finally:
        model.train(modes[0]), hf_model.train(modes[1])
    diff = scale = 0.0
    for ours, theirs in pairs:
        if ours.shape != theirs.shape:
            raise LmlabError(f"{what}: output shapes differ: lmlab {tuple(ours.shape)}, HF {type(base).__name__} {tuple(theirs.shape)}")
        diff = max(diff, (ours.float() - theirs.float()).abs().max().item())
        scale = max(scale, theirs.float().abs().max().item())
    tol = PARITY_TOL * max(1.0, scale)
    if not diff <= tol:  # NaN fails too
        raise LmlabError(f"{what}: lmlab and transformers' {type(base).__name__} disagree: max |Δ| = {diff:.3g} > {tol:.3g} (fp32, a fixed batch)")
    return diff


@contextmanager
def quiet_transformers() -> Iterator[Any]:
    """transformers with its progress bars off and only errors logged (load reports of a check's own loading)."""
    tf = require_transformers()
    verbosity, bars = tf.logging.get_verbosity(), tf.utils.logging.is_progress_bar_enabled()
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        yield tf
    finally:
        tf.logging.set_verbosity(verbosity)
        if bars:
            tf.utils.logging.enable_progress_bar()


# -- HF folders ---------------------------------------------------------------------------------


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is an HF model folder: a ``config.json`` with ``model_type`` and no ``lmlab_model_config``, and weights."""
    path = Path(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES) or not (path / "config.json").is_file():
        return False
    config = read_json_object(path / "config.json")
    return "model_type" in config and "lmlab_model_config" not in config


def sentence_transformers_module(path: str | Path) -> Path | None:
    """The Transformer module's folder of a sentence-transformers folder (``modules.json``): the folder
    itself or a subfolder such as ``0_Transformer/``; None when ``path`` has no ``modules.json``."""
    path = Path(path)
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
        found = [e.get("path", "") for e in entries if str(e.get("type", "")).rsplit(".", 1)[-1] == "Transformer"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as err:
        raise LmlabError(f"{modules}: not a sentence-transformers modules list ({err})") from None
    if not found:
        raise LmlabError(f"{modules}: no module of type sentence_transformers.models.Transformer; lmlab reads that module's HF folder")
    return path / found[0]


def _weight_files(folder: Path) -> list[Path]:
    """The files holding the weights: the single file, or an index's shards (with the index)."""
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        weight_map = read_json_object(file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LmlabError(f"{file}: expected a non-empty 'weight_map' of weight name → shard file")
        shards = [folder / _shard_name(file, s) for s in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise LmlabError(f"{file}: shard {shard.name} is missing")
        return [file, *shards]
    raise LmlabError(f"{folder}: no weights; expected one of {', '.join(WEIGHT_FILES)}")


def _shard_name(index: Path, entry: Any) -> str:
    """A shard file named by an index's ``weight_map``: a relative path inside the folder (no ``..``, not absolute)."""
    parts = PurePosixPath(entry).parts if isinstance(entry, str) else ()
    if not parts or parts[0] == "/" or ".." in parts or "\\" in entry:
        raise LmlabError(f"{index}: weight_map entry {entry!r}: expected a shard file name inside the folder (no '..', not absolute)")
    return entry


def _torch_load(file: Path) -> dict[str, Tensor]:
    """A pytorch_model.bin's tensors, unpickled with ``weights_only=True``: anything but tensors and plain containers is refused."""
    state = torch_load(file)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LmlabError(f"{file}: expected a dict of weight name → tensor")
    return state


def read_hf_weights(folder: str | Path) -> dict[str, Tensor]:
    """All weights of an HF folder on the CPU, from (sharded) safetensors or (sharded) pytorch_model.bin."""
    state: dict[str, Tensor] = {}
    for file in _weight_files(Path(folder)):
        if file.name.endswith(".index.json"):
            continue
        state.update(read_safetensors(file) if file.suffix == ".safetensors" else _torch_load(file))
    return state


def _weight_names(folder: Path) -> set[str]:
    files = _weight_files(folder)
    if files[0].name.endswith(".index.json"):
        return set(read_json_object(files[0])["weight_map"])
    if files[0].suffix == ".safetensors":
        return set(safetensors_header(files[0]))
    return set(_torch_load(files[0]))


def _hf_config_dict(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / "config.json")


def hf_folder_config(folder: str | Path) -> ModelConfig:
    """The lmlab ``ModelConfig`` of an HF folder (reads config.json and the weights' names only)."""
    folder = Path(folder)
    c = _hf_config_dict(folder)
    try:
        return config_from_hf(c, keys=_with_prefix(_weight_names(folder), c))
    except LmlabError as err:
        raise LmlabError(f"{folder}: {err}") from None


def _with_prefix(keys: set[str], c: dict[str, Any]) -> set[str]:
    """Weight names as the class with a head names them (a bare BertModel's gain ``bert.``)."""
    if c.get("model_type") == "bert" and not any(k.startswith("bert.") for k in keys):
        return {k if k.startswith("cls.") else "bert." + k for k in keys}
    return keys


def read_hf_checkpoint(folder: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The lmlab config and weights (as a checkpoint stores them: a tied head once) of an HF folder:
    the tensors are read from the files and mapped, without building transformers' model."""
    folder = Path(folder)
    c = _hf_config_dict(folder)
    hf_state = read_hf_weights(folder)
    try:
        config = config_from_hf(c, keys=_with_prefix(set(hf_state), c))
        state = complete_state_dict(state_dict_from_hf(hf_state, config), config)
    except LmlabError as err:
        raise LmlabError(f"{folder}: {err}") from None
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return config, state


def _stamp(folder: Path) -> dict[str, list[int]]:
    """Size and mtime (ns) of config.json and every weights file: what a cached verification is valid for."""
    stamp = {}
    for file in (folder / "config.json", *_weight_files(folder)):
        st = file.stat()
        stamp[file.name] = [st.st_size, st.st_mtime_ns]
    return stamp


def verify_hf_folder(folder: str | Path, model: nn.Module) -> float | None:
    """Check ``model`` (as :func:`read_hf_checkpoint` built it) against transformers' model of ``folder``
    (its ``architectures`` class, fp32): an LmlabError with the number on a mismatch. Returns max |Δ|,
    or None when transformers is not installed (a warning says the check was skipped).

    A pass is recorded in ``folder/lmlab-verified.json`` (skipped when the folder is read-only); while
    config.json and the weights files keep their size and mtime, later calls return it unchecked.
    """
    from lmlab import __version__

    folder = Path(folder)
    record_file = folder / VERIFIED_FILE
    stamp = _stamp(folder)
    try:
        record = read_json_object(record_file)
    except LmlabError:
        record = {}
    if record.get("files") == stamp and record.get("lmlab") == __version__:
        return record["max_abs_diff"]
    try:
        import transformers  # noqa: F401
    except ImportError:
        logger.warning("transformers is not installed: the parity check of %s against transformers is skipped", folder)
        return None
    c = _hf_config_dict(folder)
    declared = (c.get("architectures") or [_import_architecture(model.config, _with_prefix(_weight_names(folder), c))])[0]
    class_name = declared if declared == "BertModel" else _BARE.get(declared, declared)
    with quiet_transformers() as tf:
        hf_model = getattr(tf, class_name).from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    hf_model = hf_model.to(model.tok_emb.weight.device).eval()
    diff = check_parity(model, hf_model, f"{folder}: import check (verify=False / --no-verify skips it)")
    if os.access(folder, os.W_OK):
        try:
            write_json_atomic(record_file, {"files": stamp, "lmlab": __version__, "transformers": tf.__version__, "max_abs_diff": diff})
        except OSError as err:
            logger.info("cannot record the check in %s (%s)", record_file, err)
    return diff


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "PARITY_TOL",
    "SUPPORTED_MODEL_TYPES",
    "VERIFIED_FILE",
    "WEIGHT_FILES",
    "adapter_state_to_hf",
    "check_parity",
    "complete_state_dict",
    "config_from_hf",
    "from_hf_model",
    "hf_architecture",
    "hf_config_from",
    "hf_folder_config",
    "is_hf_folder",
    "max_logit_diff",
    "quiet_transformers",
    "read_hf_checkpoint",
    "read_hf_weights",
    "require_transformers",
    "sentence_transformers_module",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "to_hf_model",
    "verify_hf_folder",
]
