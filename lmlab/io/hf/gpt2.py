"""HF GPT-2 (``GPT2LMHeadModel`` and its task classes) ↔ lmlab's pre-norm decoder with learned positions::

    lmlab                          HF GPT-2 (GPT2LMHeadModel)
    tok_emb                        transformer.wte
    pos_emb                        transformer.wpe
    blocks.{i}.norm_1              transformer.h.{i}.ln_1
    blocks.{i}.attn.qkv  [q|k|v]   transformer.h.{i}.attn.c_attn  (ᵀ)
    blocks.{i}.attn.proj           transformer.h.{i}.attn.c_proj  (ᵀ)
    blocks.{i}.norm_2              transformer.h.{i}.ln_2
    blocks.{i}.mlp.fc              transformer.h.{i}.mlp.c_fc     (ᵀ)
    blocks.{i}.mlp.proj            transformer.h.{i}.mlp.c_proj   (ᵀ)
    norm_f                         transformer.ln_f
    lm_head                        lm_head

(ᵀ): HF GPT-2 stores these in ``Conv1D`` layers, whose weight is (in, out) — the transpose of
``nn.Linear``'s (out, in). HF's ``c_attn`` holds q, k and v in one matrix, as lmlab's ``qkv`` does.
"""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io.hf.family import Architecture, Family, Rule, linear, lm_head_rules, require, token_id, unsupported

# HF GPT-2 activation names → lmlab's ``gelu_approximate``. "gelu_new" is what GPT-2 checkpoints
# use (the tanh approximation written out by hand); "gelu_pytorch_tanh" is the same function as
# one PyTorch kernel. Exporting writes "gelu_new", the name GPT-2 tooling expects.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


# lmlab's block module → HF GPT-2's, inside blocks.{i}. / h.{i}.
_BLOCK_NAMES = (
    ("norm_1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("norm_2", "ln_2"),
    ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj"),
)


class GPT2(Family):
    model_type = "gpt2"
    defaults = dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
        initializer_range=0.02, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        add_cross_attention=False, tie_word_embeddings=True,
    )
    architectures = {
        "GPT2LMHeadModel": Architecture("gpt2", "", "transformer.", "AutoModelForCausalLM"),
        "GPT2ForSequenceClassification": Architecture(
            "gpt2", "classify", "transformer.", "AutoModelForSequenceClassification", "score", False
        ),
        "GPT2ForTokenClassification": Architecture(
            "gpt2", "tag", "transformer.", "AutoModelForTokenClassification", "classifier"
        ),
        "GPT2ForQuestionAnswering": Architecture(
            "gpt2", "qa", "transformer.", "AutoModelForQuestionAnswering", "qa_outputs"
        ),
    }
    lm_class = "GPT2LMHeadModel"
    required = dict(norm_placement="pre", norm="layernorm", mlp="gelu", bias=True)
    bare = {"GPT2Model": "GPT2LMHeadModel"}
    ignored = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of some transformers versions
    unprefixed = ("lm_head.",)

    def claims(self, config: ModelConfig) -> str:
        return "position='learned'" if config.arch == "decoder" and config.position == "learned" else ""

    def hf_config(self, tf: Any, config: ModelConfig, common: dict[str, Any]) -> Any:
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
            bos_token_id=token_id(config, 50256),
            eos_token_id=token_id(config, 50256),
            **common,
        )

    def config_from_hf(self, c: dict[str, Any], architecture: str, keys: set[str] | None) -> ModelConfig:
        activation = c["activation_function"]
        if activation not in ACTIVATIONS:
            raise unsupported(c, "activation_function", "one of " + ", ".join(ACTIVATIONS))
        require(c, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
        dropouts = {name: c[name] for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        if len(set(dropouts.values())) > 1:
            raise LmlabError(f"HF gpt2 config has different dropouts {dropouts}: lmlab has one 'dropout' for all three")
        task = self.architectures[architecture].task
        return ModelConfig(
            vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"],
            n_embd=c["n_embd"], n_kv_heads=c["n_head"], intermediate_size=c["n_inner"] or 4 * c["n_embd"],
            norm="layernorm", norm_eps=c["layer_norm_epsilon"], mlp="gelu", gelu_approximate=ACTIVATIONS[activation],
            position="learned", bias=True, tie_embeddings=bool(c["tie_word_embeddings"]) or bool(task),
            dropout=float(dropouts["resid_pdrop"]), init_std=c["initializer_range"],
        )

    def rules(self, config: ModelConfig, architecture: str) -> list[Rule]:
        spec = self.architectures[architecture]
        p = spec.prefix
        rules = [Rule("tok_emb.weight", (p + "wte.weight",)), Rule("pos_emb.weight", (p + "wpe.weight",))]
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"{p}h.{i}."
            for a, b in _BLOCK_NAMES:
                rules.append(Rule(f"{ours}{a}.weight", (f"{theirs}{b}.weight",), transpose=not a.startswith("norm")))
                rules.append(Rule(f"{ours}{a}.bias", (f"{theirs}{b}.bias",)))
        return rules + linear("norm_f", p + "ln_f") + lm_head_rules(config, spec)


FAMILY = GPT2()
