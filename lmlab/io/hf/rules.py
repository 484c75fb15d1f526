"""State dicts between lmlab and HF, both ways, by walking a family's weight table (a list of
:class:`~lmlab.io.hf.family.Rule`): renamed, fused pieces split or joined along dim 0, Conv1D weights
transposed, BART's unused position rows added or cut, zero-only HF tensors written or checked. Every
mapping is exact, and the logits of both models agree to float rounding (``tests/test_hf.py``).

Task heads (:mod:`lmlab.model.heads`, ``task_head.out``) are one Linear on the HF side too, the same
rule for every family::

    classify   BertForSequenceClassification.classifier (on the pooler, as lmlab's encoder pools),
               GPT2/LlamaForSequenceClassification.score (no bias, as lmlab's decoder classifier head; HF
               reads the rightmost non-pad token, lmlab the last real one — the same for
               right padding whose pad id does not occur in the text)
    tag        Bert/GPT2ForTokenClassification.classifier, LlamaForTokenClassification.score
    qa         *ForQuestionAnswering.qa_outputs ([start | end]; LLaMA's backbone sits under ``transformer.``)

An HF task model has no LM head: importing one ties lmlab's decoder head to the token embedding and
gives an encoder a freshly initialised MLM head (a warning says so); exporting drops them.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io.hf.config import family_of, hf_architecture, import_architecture
from lmlab.io.hf.family import Rule
from lmlab.io.hf.registry import ARCHITECTURES, FAMILIES, IGNORED_SUFFIXES, UNPREFIXED
from lmlab.model import build_model
from lmlab.model.heads import pools

logger = logging.getLogger(__package__)  # "lmlab.io.hf": one logger for the package, as users saw it


def _rules(config: ModelConfig, architecture: str) -> list[Rule]:
    """The exact mapping for ``config`` as HF ``architecture``: every lmlab tensor that class holds (a
    tied ``lm_head.weight`` aside), in ``model.state_dict()`` order."""
    spec = ARCHITECTURES[architecture]
    rules = FAMILIES[spec.family].rules(config, architecture)
    if spec.task:
        rules.append(Rule("task_head.out.weight", (f"{spec.head}.weight",)))
        if spec.head_bias:  # a decoder's sequence classifier has no bias on either side
            rules.append(Rule("task_head.out.bias", (f"{spec.head}.bias",)))
    return rules


def _check_keys(given: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    parts = [
        f"{kind} {len(keys)} key(s): {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    if parts:
        raise LmlabError(f"{what}: " + "; ".join(parts))


def _dropped(config: ModelConfig, architecture: str, name: str) -> bool:
    """Whether exporting as ``architecture`` leaves out lmlab tensor ``name``: the LM or MLM head (and NSP
    head, and for a head that reads every token — tagging, QA — the pooler) of a task model, which the HF
    task class does not have."""
    if not ARCHITECTURES[architecture].task:
        return False
    if config.arch == "decoder":
        return name == "lm_head.weight"
    heads = name.startswith(("mlm_", "lm_head.", "nsp_head."))
    return heads or (not pools(config) and name.startswith("pooler."))


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


def _check_rows(t: Tensor, rule: Rule) -> None:
    if t.shape[0] != sum(rule.sizes):
        raise LmlabError(
            f"lmlab tensor '{rule.lmlab}' has {t.shape[0]} rows: expected {sum(rule.sizes)} = "
            f"{' + '.join(map(str, rule.sizes))} for the config"
        )


def state_dict_from_hf(hf_state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """An HF state dict as the lmlab state dict for ``config`` (see :func:`~lmlab.io.hf.config.config_from_hf`).

    Accepts the keys of the class with a head and those of the bare base model (``h.0....`` as the
    original GPT-2 checkpoints store them, ``layers.0....``, a sentence-transformers BERT). Non-weight
    buffers and copies of tied weights are ignored, and so is ``lm_head.weight`` when the embeddings
    are tied: the lmlab dict then holds the token embedding under both names, as ``state_dict()`` does.
    What the HF class has not (a task model's MLM head) is not in the result (:func:`complete_state_dict`).
    """
    family = family_of(config)
    prefix = ARCHITECTURES[family.task_class(config.task)].prefix
    sd = {_legacy_name(k): v for k, v in hf_state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    if not any(k.startswith(prefix) for k in sd):  # a bare base model's checkpoint
        sd = {(k if k.startswith(UNPREFIXED) else prefix + k): v for k, v in sd.items()}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    architecture = import_architecture(config, set(sd))
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
    """TensorFlow-era BERT checkpoints name LayerNorm parameters gamma and beta; transformers renames them on
    load too."""
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def complete_state_dict(state: dict[str, Tensor], config: ModelConfig, warn: bool = True) -> dict[str, Tensor]:
    """``state`` with what an HF model does not have added, freshly initialised as
    :func:`lmlab.model.blocks.init_weights` would (seeded): the MLM head of a bare BERT or a BERT task model.
    A warning names them (``warn=False``: the caller records them instead, as ``load_model`` does in the model's
    ``fresh_weights``, and what would read them says so)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(config).state_dict().items()}
    fresh = sorted(set(shapes) - set(state))
    if not fresh:
        return state
    if any(not k.startswith(("mlm_", "lm_head.bias")) for k in fresh):
        raise LmlabError(f"HF weights lack {', '.join(fresh[:5])}: expected every weight but a BERT's MLM head")
    if warn:
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


__all__ = ["adapter_state_to_hf", "complete_state_dict", "state_dict_from_hf", "state_dict_to_hf"]
