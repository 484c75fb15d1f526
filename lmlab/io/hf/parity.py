"""lmlab models ↔ transformers models in memory (:func:`to_hf_model`, :func:`from_hf_model`), and the check
that both compute the same thing (:func:`max_logit_diff`, :func:`check_parity`): logits, task outputs,
hidden states, on a fixed batch in fp32. Export and the import of an HF folder run :func:`check_parity`.

``transformers`` is an optional dependency (``pip install 'lmlab[hf]'``), imported only inside the
functions that need it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io.hf.config import (
    HEAD_KINDS,
    config_from_hf,
    hf_architecture,
    hf_config_from,
    require_transformers,
    with_prefix,
)
from lmlab.io.hf.registry import IGNORED_SUFFIXES
from lmlab.io.hf.rules import complete_state_dict, state_dict_from_hf, state_dict_to_hf
from lmlab.model import build_model
from lmlab.model.heads import pools

if TYPE_CHECKING:  # pragma: no cover
    import transformers

# max |Δ| allowed between lmlab's and HF's outputs, relative to the largest HF output (absolute below 1)
PARITY_TOL = 1e-4


def to_hf_model(model: nn.Module) -> transformers.PreTrainedModel:
    """The HF model (the class :func:`~lmlab.io.hf.config.hf_architecture` names) with ``model``'s weights,
    fp32, eval mode, SDPA, same device."""
    tf = require_transformers()
    config: ModelConfig = model.config
    hf_config = hf_config_from(config)
    hf_model = getattr(tf, hf_architecture(config))._from_config(hf_config, attn_implementation="sdpa").float()
    weights = state_dict_to_hf(model.state_dict(), config)
    result = hf_model.load_state_dict(weights, strict=False)
    own = hf_model.state_dict()
    loaded = {own[k].data_ptr() for k in weights}
    # tied weights share a loaded tensor
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded and not k.endswith(IGNORED_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise LmlabError(
            f"loading lmlab weights into HF {hf_config.model_type}: missing keys {missing}, "
            f"unexpected keys {list(result.unexpected_keys)}"
        )
    if config.tie_embeddings and hf_model.get_output_embeddings() is not None:
        if hf_model.get_output_embeddings().weight is not hf_model.get_input_embeddings().weight:
            raise LmlabError(
                f"HF {hf_config.model_type} did not tie lm_head to the token embedding though tie_word_embeddings=True"
            )
    return hf_model.to(model.tok_emb.weight.device).eval()


def from_hf_model(hf_model: Any) -> nn.Module:
    """The lmlab model (fp32, eval mode, on ``hf_model``'s device) with an HF model's weights (any class of
    :data:`~lmlab.io.hf.registry.ARCHITECTURES`, or a bare base model). A BERT keeps the heads it has; one
    without an MLM head gets a freshly initialised one (a warning says so)."""
    sd = hf_model.state_dict()
    fields = {**hf_model.config.to_dict(), "architectures": [type(hf_model).__name__]}
    config = config_from_hf(fields, keys=with_prefix(set(sd), fields))
    model = build_model(config)  # its RoPE tables are the config's (non-persistent buffers: not in the state dict)
    model.load_state_dict(complete_state_dict(state_dict_from_hf(sd, config), config))
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
        if pools(config) and pad is None:
            ids = ids[:1]  # HF pools a batch by the pad id; without one it takes a single row
        elif pools(config):
            ids = ids.masked_fill(ids == pad, (pad + 1) % config.vocab_size)
        mask, types = torch.ones_like(ids), None
        out = hf_model(input_ids=ids, attention_mask=mask)
    else:
        types = torch.zeros_like(ids)
        if config.type_vocab_size > 1:
            types[:, T // 2 :] = 1
        out = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if config.task:
        theirs = torch.stack([out.start_logits, out.end_logits], dim=-1) if HEAD_KINDS[config.task].span else out.logits
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
            raise LmlabError(
                f"{what}: output shapes differ: lmlab {tuple(ours.shape)}, "
                f"HF {type(base).__name__} {tuple(theirs.shape)}"
            )
        diff = max(diff, (ours.float() - theirs.float()).abs().max().item())
        scale = max(scale, theirs.float().abs().max().item())
    tol = PARITY_TOL * max(1.0, scale)
    if not diff <= tol:  # NaN fails too
        raise LmlabError(
            f"{what}: lmlab and transformers' {type(base).__name__} disagree: max |Δ| = {diff:.3g} > {tol:.3g} "
            "(fp32, a fixed batch)"
        )
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


__all__ = ["PARITY_TOL", "check_parity", "from_hf_model", "max_logit_diff", "quiet_transformers", "to_hf_model"]
