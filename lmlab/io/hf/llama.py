"""HF LLaMA (``LlamaForCausalLM`` and its task classes) ↔ lmlab's pre-norm RMSNorm/SwiGLU decoder with RoPE::

    lmlab                          HF LLaMA (LlamaForCausalLM)
    tok_emb                        model.embed_tokens
    —  (RoPE, no weights)
    blocks.{i}.norm_1              model.layers.{i}.input_layernorm
    blocks.{i}.attn.qkv  [q|k|v]   model.layers.{i}.self_attn.{q,k,v}_proj
    blocks.{i}.attn.proj           model.layers.{i}.self_attn.o_proj
    blocks.{i}.norm_2              model.layers.{i}.post_attention_layernorm
    blocks.{i}.mlp.fc   [gate|up]  model.layers.{i}.mlp.{gate,up}_proj
    blocks.{i}.mlp.proj            model.layers.{i}.mlp.down_proj
    norm_f                         model.norm
    lm_head                        lm_head

lmlab's fused ``qkv`` and SwiGLU ``fc`` split along their output rows into HF's separate projections
(k and v have ``n_kv_heads`` heads: grouped-query attention carries over).

RoPE scaling (LLaMA 3.1's ``llama3``, ``linear``, ``dynamic``) is ``ModelConfig.rope_scaling``;
:func:`lmlab.model.blocks.rope_cache` computes the tables with transformers' formulas (``modeling_rope_utils``).
``dynamic`` (NTK) rescales only past ``max_position_embeddings``, which is lmlab's ``block_size``, so
within it its tables are plain RoPE's — exact for every sequence lmlab runs. Other RoPE types (yarn,
longrope, …) are refused naming the field.
"""

from __future__ import annotations

from typing import Any

from lmlab.config import ROPE_SCALINGS, ModelConfig
from lmlab.errors import LmlabError
from lmlab.io.hf.family import Architecture, Family, Rule, fused, lm_head_rules, token_id, unsupported


class Llama(Family):
    model_type = "llama"
    defaults = dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
    )
    architectures = {
        "LlamaForCausalLM": Architecture("llama", "", "model.", "AutoModelForCausalLM"),
        "LlamaForSequenceClassification": Architecture(
            "llama", "classify", "model.", "AutoModelForSequenceClassification", "score", False
        ),
        "LlamaForTokenClassification": Architecture(
            "llama", "tag", "model.", "AutoModelForTokenClassification", "score"
        ),
        "LlamaForQuestionAnswering": Architecture(
            "llama", "qa", "transformer.", "AutoModelForQuestionAnswering", "qa_outputs"
        ),
    }
    lm_class = "LlamaForCausalLM"
    required = dict(norm_placement="pre", norm="rmsnorm", mlp="swiglu")
    bare = {"LlamaModel": "LlamaForCausalLM"}
    ignored = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")  # RoPE buffers of some transformers versions
    unprefixed = ("lm_head.",)
    grouped_kv = True
    own_head_dim = True

    def claims(self, config: ModelConfig) -> str:
        return "position='rope'" if config.arch == "decoder" and config.position != "learned" else ""

    def hf_config(self, tf: Any, config: ModelConfig, common: dict[str, Any]) -> Any:
        scaling = dict(config.rope_scaling)
        rope_type = scaling.pop("rope_type", "default")
        rope: dict[str, Any]
        if int(tf.__version__.split(".")[0]) >= 5:
            rope = {"rope_parameters": {"rope_type": rope_type, "rope_theta": config.rope_theta, **scaling}}
        else:  # transformers 4.x takes the base as a top-level field
            rope_scaling = {"rope_type": rope_type, **scaling} if scaling else None
            rope = {"rope_theta": config.rope_theta, "rope_scaling": rope_scaling}
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
            bos_token_id=token_id(config, 1),
            eos_token_id=token_id(config, 2),
            **rope,
            **common,
        )

    def config_from_hf(self, c: dict[str, Any], architecture: str, keys: set[str] | None) -> ModelConfig:
        if c["hidden_act"] != "silu":
            raise unsupported(c, "hidden_act", "'silu' (SwiGLU)")
        n_head, d = c["num_attention_heads"], c["hidden_size"]
        if bool(c["attention_bias"]) != bool(c["mlp_bias"]):
            raise LmlabError(
                f"HF llama config has attention_bias={c['attention_bias']} but mlp_bias={c['mlp_bias']}: "
                "lmlab's 'bias' sets both"
            )
        rope_theta, rope_scaling = _rope(c)
        task = self.architectures[architecture].task
        return ModelConfig(
            vocab_size=c["vocab_size"],
            block_size=c["max_position_embeddings"],
            n_layer=c["num_hidden_layers"],
            n_head=n_head,
            n_embd=d,
            n_kv_heads=c["num_key_value_heads"] or n_head,
            head_dim=c["head_dim"] or None,
            intermediate_size=c["intermediate_size"],
            norm="rmsnorm",
            norm_eps=c["rms_norm_eps"],
            mlp="swiglu",
            position="rope",
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            bias=bool(c["attention_bias"]),
            tie_embeddings=bool(c["tie_word_embeddings"]) or bool(task),
            dropout=float(c["attention_dropout"] or 0.0),
            init_std=c["initializer_range"],
        )

    def rules(self, config: ModelConfig, architecture: str) -> list[Rule]:
        spec = self.architectures[architecture]
        p = spec.prefix
        kv_dim = config.n_kv_heads * config.head_dim
        kinds = ("weight", "bias") if config.bias else ("weight",)
        rules = [Rule("tok_emb.weight", (p + "embed_tokens.weight",))]
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"{p}layers.{i}."
            rules.append(Rule(f"{ours}norm_1.weight", (f"{theirs}input_layernorm.weight",)))
            qkv = tuple(f"{theirs}self_attn.{x}_proj" for x in "qkv")
            rules += fused(ours + "attn.qkv", qkv, (config.attn_dim, kv_dim, kv_dim), kinds)
            rules += [Rule(f"{ours}attn.proj.{kind}", (f"{theirs}self_attn.o_proj.{kind}",)) for kind in kinds]
            rules.append(Rule(f"{ours}norm_2.weight", (f"{theirs}post_attention_layernorm.weight",)))
            gate_up = (f"{theirs}mlp.gate_proj", f"{theirs}mlp.up_proj")
            rules += fused(ours + "mlp.fc", gate_up, (config.intermediate_size, config.intermediate_size), kinds)
            rules += [Rule(f"{ours}mlp.proj.{kind}", (f"{theirs}mlp.down_proj.{kind}",)) for kind in kinds]
        return rules + [Rule("norm_f.weight", (p + "norm.weight",))] + lm_head_rules(config, spec)


def _rope(c: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """RoPE's base and lmlab's ``rope_scaling`` from a LLaMA config: transformers 5's ``rope_parameters``,
    or 4.x's ``rope_theta`` with an optional ``rope_scaling`` dict."""
    field_name = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    legacy = {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta") or 10000.0}
    params = dict(c.get("rope_parameters") or legacy)
    # transformers 4.x wrote the type as "type"
    rope_type = next(filter(None, [params.pop("rope_type", None), params.pop("type", None)]), "default")
    theta = params.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise LmlabError(f"HF llama config field '{field_name}' has a partial_rotary_factor: lmlab rotates whole heads")
    if rope_type == "default":
        return theta, {}
    if rope_type not in ROPE_SCALINGS:
        supported = ", ".join(map(repr, ROPE_SCALINGS))
        raise LmlabError(
            f"HF llama config field '{field_name}' has rope_type {rope_type!r}: lmlab supports 'default', {supported}"
        )
    if rope_type == "llama3":
        # as transformers' standardize_rope_params: a top-level field wins, else the context length
        params["original_max_position_embeddings"] = c.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings", c["max_position_embeddings"]
        )
    unknown = sorted(set(params) - set(ROPE_SCALINGS[rope_type]))
    if unknown:
        known = ", ".join(ROPE_SCALINGS[rope_type])
        raise LmlabError(
            f"HF llama config field '{field_name}' has {', '.join(unknown)} for rope_type {rope_type!r}: "
            f"lmlab reads only {known}"
        )
    return theta, {"rope_type": rope_type, **params}


FAMILY = Llama()
