"""HF BERT (``BertForPreTraining``, ``BertForMaskedLM``, a bare ``BertModel`` and the task classes) ↔ lmlab's
post-norm encoder. ``BertForPreTraining``'s names; a bare ``BertModel`` drops the ``bert.`` prefix and the
``cls.`` heads::

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

Which heads a BERT has (pooler, MLM, NSP) is read from its weights' names: a folder's ``architectures``
may say ``BertModel`` for weights with an MLM head, and a sentence-transformers BERT has none.
"""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io.hf.family import GELUS, Architecture, Family, Rule, fused, linear, require, unsupported
from lmlab.model.heads import pools


class Bert(Family):
    model_type = "bert"
    defaults = dict(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        position_embedding_type="absolute",
        is_decoder=False,
        add_cross_attention=False,
    )
    architectures = {
        "BertModel": Architecture("bert", "", "bert.", "AutoModel"),
        "BertForPreTraining": Architecture("bert", "", "bert.", "AutoModelForPreTraining"),
        "BertForMaskedLM": Architecture("bert", "", "bert.", "AutoModelForMaskedLM"),
        "BertForSequenceClassification": Architecture(
            "bert", "classify", "bert.", "AutoModelForSequenceClassification", "classifier"
        ),
        "BertForTokenClassification": Architecture(
            "bert", "tag", "bert.", "AutoModelForTokenClassification", "classifier"
        ),
        "BertForQuestionAnswering": Architecture("bert", "qa", "bert.", "AutoModelForQuestionAnswering", "qa_outputs"),
    }
    lm_class = "BertForPreTraining"
    required = dict(
        norm="layernorm",
        mlp="gelu",
        bias=True,
        position="learned",
        norm_placement="post",
        embedding_norm=True,
        tie_embeddings=True,
    )
    # position ids buffer; the MLM decoder is the word embedding and cls.predictions.bias again
    ignored = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    unprefixed = ("cls.",)

    def claims(self, config: ModelConfig) -> str:
        return "arch='encoder'" if config.arch == "encoder" else ""

    def architecture(self, config: ModelConfig) -> str:
        if config.task:
            if pools(config) and not config.pooler:
                raise LmlabError(
                    f"model config field 'pooler' is False: HF {self.task_class(config.task)} classifies the pooled "
                    "[CLS] (bert.pooler)"
                )
            return self.task_class(config.task)
        if config.pooler and not config.nsp_head:
            raise LmlabError(
                "an encoder with a pooler but no NSP head has no HF class that holds both its heads; "
                "export needs nsp_head or no pooler"
            )
        return self.lm_class if config.pooler else "BertForMaskedLM"

    def import_architecture(self, config: ModelConfig, keys: set[str]) -> str:
        """Without a task head, a BertForPreTraining, BertForMaskedLM or bare BertModel by the heads it has."""
        if config.task:
            return self.architecture(config)
        if any(k.startswith("cls.seq_relationship.") for k in keys):
            return "BertForPreTraining"
        return "BertForMaskedLM" if any(k.startswith("cls.predictions.") for k in keys) else "BertModel"

    def with_prefix(self, keys: set[str]) -> set[str]:
        if not any(k.startswith("bert.") for k in keys):  # a bare BertModel's
            return {k if k.startswith("cls.") else "bert." + k for k in keys}
        return keys

    def hf_config(self, tf: Any, config: ModelConfig, common: dict[str, Any]) -> Any:
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

    def config_from_hf(self, c: dict[str, Any], architecture: str, keys: set[str] | None) -> ModelConfig:
        activation = c["hidden_act"]
        if activation not in GELUS:
            raise unsupported(c, "hidden_act", "gelu, gelu_new or gelu_pytorch_tanh")
        require(c, position_embedding_type="absolute", is_decoder=False, add_cross_attention=False)
        if c["hidden_dropout_prob"] != c["attention_probs_dropout_prob"]:
            raise LmlabError(
                "HF bert config has different hidden and attention dropouts: lmlab has one 'dropout' for both"
            )
        if keys is None:  # what the class holds
            pooler = architecture in ("BertModel", "BertForPreTraining", "BertForSequenceClassification")
            nsp = architecture == "BertForPreTraining"
        else:
            pooler = any(k.startswith(("bert.pooler.", "pooler.")) for k in keys)
            nsp = not self.architectures[architecture].task and any(k.startswith("cls.seq_relationship.") for k in keys)
        return ModelConfig(
            arch="encoder",
            vocab_size=c["vocab_size"],
            block_size=c["max_position_embeddings"],
            n_layer=c["num_hidden_layers"],
            n_head=c["num_attention_heads"],
            n_embd=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            norm="layernorm",
            norm_eps=c["layer_norm_eps"],
            mlp="gelu",
            gelu_approximate=GELUS[activation],
            position="learned",
            bias=True,
            tie_embeddings=True,
            dropout=float(c["hidden_dropout_prob"]),
            init_std=c["initializer_range"],
            type_vocab_size=c["type_vocab_size"],
            norm_placement="post",
            embedding_norm=True,
            pooler=pooler,
            nsp_head=nsp,
        )

    def rules(self, config: ModelConfig, architecture: str) -> list[Rule]:
        """A backbone under ``bert.``, the MLM and NSP heads under ``cls.``. Only the classes that hold them
        have the pooler (not MaskedLM unless its weights have one, nor token classification or QA) and the
        MLM and NSP heads (PreTraining; MaskedLM the MLM head alone)."""
        d = config.n_embd
        e = "bert.embeddings."
        rules = [
            Rule("tok_emb.weight", (e + "word_embeddings.weight",)),
            Rule("pos_emb.weight", (e + "position_embeddings.weight",)),
        ]
        if config.type_vocab_size:
            rules.append(Rule("seg_emb.weight", (e + "token_type_embeddings.weight",)))
        else:  # HF always has token types: one row, all zero, adds nothing
            rules.append(Rule("", (e + "token_type_embeddings.weight",), zeros=(1, d)))
        rules += linear("emb_norm", e + "LayerNorm")
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
            qkv = tuple(f"{theirs}attention.self.{x}" for x in ("query", "key", "value"))
            rules += fused(ours + "attn.qkv", qkv, (d, d, d))
            rules += linear(ours + "attn.proj", theirs + "attention.output.dense")
            rules += linear(ours + "norm_1", theirs + "attention.output.LayerNorm")
            rules += linear(ours + "mlp.fc", theirs + "intermediate.dense")
            rules += linear(ours + "mlp.proj", theirs + "output.dense")
            rules += linear(ours + "norm_2", theirs + "output.LayerNorm")
        if config.pooler and (not config.task or pools(config)):  # a head on every token leaves the pooler out
            rules += linear("pooler", "bert.pooler.dense")
        if architecture in ("BertForPreTraining", "BertForMaskedLM"):
            rules += linear("mlm_dense", "cls.predictions.transform.dense")
            rules += linear("mlm_norm", "cls.predictions.transform.LayerNorm")
            rules.append(Rule("lm_head.bias", ("cls.predictions.bias",)))
        if architecture == "BertForPreTraining":
            rules += linear("nsp_head", "cls.seq_relationship")
        return rules


FAMILY = Bert()
