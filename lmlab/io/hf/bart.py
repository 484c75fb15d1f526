"""HF BART (``BartForConditionalGeneration``) ↔ lmlab's encoder–decoder, :class:`~lmlab.model.seq2seq.Seq2SeqLM`::

    tok_emb (tied: source, target, LM head)    model.shared (+ the encoder's, decoder's embed_tokens and lm_head, tied)
    enc_pos_emb / dec_pos_emb                  model.{encoder,decoder}.embed_positions, minus its first 2 rows (⁺)
    enc_emb_norm / dec_emb_norm                model.{encoder,decoder}.layernorm_embedding
    {enc,dec}_blocks.{i}.attn.qkv [q|k|v]      model.{encoder,decoder}.layers.{i}.self_attn.{q,k,v}_proj
    {enc,dec}_blocks.{i}.attn.proj / norm_1    …self_attn.out_proj / self_attn_layer_norm
    dec_blocks.{i}.cross_attn.q / kv [k|v]     model.decoder.layers.{i}.encoder_attn.q_proj / {k,v}_proj
    dec_blocks.{i}.cross_attn.proj / norm_cross  …encoder_attn.out_proj / encoder_attn_layer_norm
    {enc,dec}_blocks.{i}.mlp.fc / proj / norm_2  …fc1 / fc2 / final_layer_norm
    —  (lmlab's LM head has no bias)           final_logits_bias: all zeros (only resize_token_embeddings writes it)

(⁺): BART looks positions up at p + 2 (a fairseq left-over), so its tables have two rows lmlab never
reads; exporting writes them as zeros.

lmlab maps encoder–decoders onto BART rather than T5 because T5's relative position buckets (a
learned bias per distance bucket inside attention) are not in lmlab's blocks; BART's learned absolute
positions, post-norm LayerNorm blocks and GELU are. BART's ``scale_embedding`` (×√d) is the one
opt-in field it needed (``ModelConfig.scale_embedding``); its attention and activation dropouts are not
carried (lmlab has one ``dropout``), which changes training-mode dropout, never eval logits.
"""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.io.hf.family import GELUS, Architecture, Family, Rule, fused, linear, require, token_id, unsupported


class Bart(Family):
    model_type = "bart"
    defaults = dict(
        vocab_size=50265, max_position_embeddings=1024, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, encoder_attention_heads=16, decoder_attention_heads=16, activation_function="gelu",
        d_model=1024, dropout=0.1, init_std=0.02, scale_embedding=False, decoder_start_token_id=2,
        tie_word_embeddings=True,
        # mBART's and old BART configs' variants, absent from today's BartConfig
        normalize_before=False, add_final_layer_norm=False, add_bias_logits=False, normalize_embedding=True,
        static_position_embeddings=False,
    )
    architectures = {"BartForConditionalGeneration": Architecture("bart", "", "model.", "AutoModelForSeq2SeqLM")}
    lm_class = "BartForConditionalGeneration"
    required = dict(
        norm="layernorm", mlp="gelu", bias=True, position="learned", norm_placement="post", embedding_norm=True,
        tie_embeddings=True, norm_eps=1e-5,  # BART's LayerNorms have the PyTorch default eps
    )
    bare = {"BartModel": "BartForConditionalGeneration"}
    # the per-side embed_tokens are model.shared again; fairseq's version counters
    ignored = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "encoder.version", "decoder.version")
    unprefixed = ("lm_head.", "final_logits_bias")

    def claims(self, config: ModelConfig) -> str:
        if config.arch != "seq2seq":
            return ""
        return (
            "arch='seq2seq': lmlab exports encoder–decoders as BART, as T5's relative position buckets are not in "
            "lmlab's blocks"
        )

    def hf_config(self, tf: Any, config: ModelConfig, common: dict[str, Any]) -> Any:
        common = {k: v for k, v in common.items() if k != "initializer_range"}  # BART's is init_std
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
            bos_token_id=token_id(config, 0),
            pad_token_id=token_id(config, 1),
            eos_token_id=token_id(config, 2),
            **common,
        )

    def config_from_hf(self, c: dict[str, Any], architecture: str, keys: set[str] | None) -> ModelConfig:
        activation = c["activation_function"]
        if activation not in GELUS:
            raise unsupported(c, "activation_function", "gelu, gelu_new or gelu_pytorch_tanh")
        require(
            c, normalize_before=False, add_final_layer_norm=False, add_bias_logits=False, normalize_embedding=True,
            static_position_embeddings=False, tie_word_embeddings=True,
        )
        one_shape = ("decoder_attention_heads", "encoder_attention_heads"), ("decoder_ffn_dim", "encoder_ffn_dim")
        for ours, theirs in one_shape:
            if c[ours] != c[theirs]:
                raise unsupported(c, ours, f"{theirs} ({c[theirs]}): lmlab's encoder and decoder blocks have one shape")
        if c["decoder_start_token_id"] is None:
            raise unsupported(c, "decoder_start_token_id", "a token id")
        return ModelConfig(
            arch="seq2seq", vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
            n_layer=c["encoder_layers"], n_decoder_layer=c["decoder_layers"], n_head=c["encoder_attention_heads"],
            n_embd=c["d_model"], intermediate_size=c["encoder_ffn_dim"], norm="layernorm", norm_eps=1e-5, mlp="gelu",
            gelu_approximate=GELUS[activation], position="learned", bias=True, tie_embeddings=True,
            dropout=float(c["dropout"]), init_std=c["init_std"],
            norm_placement="post", embedding_norm=True, scale_embedding=bool(c["scale_embedding"]),
            decoder_start_token_id=c["decoder_start_token_id"],
        )

    def rules(self, config: ModelConfig, architecture: str) -> list[Rule]:
        d = config.n_embd
        rules = [
            Rule("tok_emb.weight", ("model.shared.weight",)),
            Rule("enc_pos_emb.weight", ("model.encoder.embed_positions.weight",), offset=2),
            Rule("dec_pos_emb.weight", ("model.decoder.embed_positions.weight",), offset=2),
        ]
        rules += linear("enc_emb_norm", "model.encoder.layernorm_embedding")
        rules += linear("dec_emb_norm", "model.decoder.layernorm_embedding")
        sides = ("encoder", "enc_blocks", config.n_layer), ("decoder", "dec_blocks", config.n_decoder_layer)
        for side, blocks, n in sides:
            for i in range(n):
                ours, theirs = f"{blocks}.{i}.", f"model.{side}.layers.{i}."
                rules += linear(ours + "norm_1", theirs + "self_attn_layer_norm")
                rules += fused(ours + "attn.qkv", tuple(f"{theirs}self_attn.{x}_proj" for x in "qkv"), (d, d, d))
                rules += linear(ours + "attn.proj", theirs + "self_attn.out_proj")
                if side == "decoder":
                    rules += linear(ours + "norm_cross", theirs + "encoder_attn_layer_norm")
                    rules += linear(ours + "cross_attn.q", theirs + "encoder_attn.q_proj")
                    kv = (theirs + "encoder_attn.k_proj", theirs + "encoder_attn.v_proj")
                    rules += fused(ours + "cross_attn.kv", kv, (d, d))
                    rules += linear(ours + "cross_attn.proj", theirs + "encoder_attn.out_proj")
                rules += linear(ours + "norm_2", theirs + "final_layer_norm")
                rules += linear(ours + "mlp.fc", theirs + "fc1")
                rules += linear(ours + "mlp.proj", theirs + "fc2")
        return rules + [Rule("", ("final_logits_bias",), zeros=(1, config.vocab_size))]


FAMILY = Bart()
