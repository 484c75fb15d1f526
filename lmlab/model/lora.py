"""LoRA adapters (Hu et al., 2021) through Hugging Face ``peft``: a frozen model learns a low-rank update.

A targeted Linear layer ``y = W·x + b`` becomes ``y = W·x + b + (alpha/r)·B·A·dropout(x)``, with A
(r × in) random and B (out × r) zero at the start, so the adapted model begins exactly where the base
model is. Only A and B train (and a fine-tuning task head, which is new): a few percent of the
parameters, and of the optimizer state.

The settings are :class:`lmlab.config.LoraSpec` (``--lora``, :func:`~lmlab.config.parse_lora`).

lmlab writes no LoRA layers of its own: :func:`apply_lora` hands the model to
``peft.inject_adapter_in_model``, which swaps each targeted ``nn.Linear`` for peft's ``lora.Linear``
in place. The model class, its forward code and the training loop stay as they are. What changes:

- the state dict: a targeted layer's weights move under ``base_layer`` and the adapters sit beside
  them — ``blocks.0.attn.qkv.base_layer.weight`` (and ``.bias``), ``blocks.0.attn.qkv.lora_A.default.weight``,
  ``blocks.0.attn.qkv.lora_B.default.weight`` (``default`` is peft's adapter name; lmlab uses one adapter);
- ``config.lora`` records the :class:`LoraSpec`, so :func:`lmlab.io.checkpoint.load_model` injects the
  same adapters before it loads a checkpoint strictly: base weights and adapters come back, with the
  same trainable parameters in the same order, so a resumed run's optimizer state fits;
- :func:`merge_lora` folds ``(alpha/r)·B·A`` into W and puts the plain Linear back: the state dict is an
  ordinary model's again (``load_model(..., merge_lora=True)``, :func:`lmlab.train.lora.merge_checkpoint`), for
  inference, export and HF conversion.

Targets are module names matched by suffix, as peft matches a ``target_modules`` list: ``qkv`` is every
self-attention's fused Q/K/V projection, ``proj`` every output projection (attention, cross-attention,
MLP), ``attn.proj`` self-attention's only, ``mlp.fc`` / ``mlp.proj`` the MLP's, ``q`` / ``kv`` the
cross-attention's of an encoder–decoder. Two Linear layers are never adapted: the LM head (usually the
token embedding itself, tied, and :class:`~lmlab.model.decoder.DecoderLM` multiplies by a cached copy
of its weight when decoding on CPU, which would skip an adapter) and the task head (it trains in full).

``peft`` is an optional dependency (``pip install 'lmlab[lora]'``) that imports ``transformers``
(seconds), so only the functions that touch adapters import it: parsing ``--lora`` and validating a
config do not need it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.config import LoraSpec
from lmlab.errors import LmlabError

NEVER_ADAPTED = ("lm_head", "task_head")  # top-level modules no target reaches (see the module docstring)


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject ``spec``'s adapters into ``model`` in place (peft), freeze every other parameter but the
    task head's, and record the spec in ``model.config.lora``. Returns ``model``.

    Works on a model built on the meta device too (``load_model`` injects before ``to_empty``). A
    target that matches no adaptable Linear layer is an error listing the names that would.
    """
    peft = _peft()
    if _lora_layers(model):
        raise LmlabError(
            "lora: this model already has LoRA adapters; merge them (merge_lora) before adding others", params="lora"
        )
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[0] not in NEVER_ADAPTED]
    for target in spec.targets:
        if not any(_matches(name, target) for name in linears):
            raise LmlabError(
                f"lora: target {target!r} matches no Linear layer of this model; expected one of "
                f"{', '.join(_suffixes(linears))} (the LM head and task head are never adapted)",
                params="lora",
            )
    chosen = [
        name for name in linears if any(_matches(name, t) for t in spec.targets)
    ]  # full names: peft matches them exactly
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=chosen)
    peft.inject_adapter_in_model(config, model)
    for _, layer in _lora_layers(model):  # peft's new dropout modules start in training mode, even in an eval() model
        layer.train(layer.get_base_layer().training)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith("task_head."))
    model.config = dataclasses.replace(model.config, lora=spec.to_dict())
    return model


def _matches(name: str, target: str) -> bool:
    """peft's rule for a ``target_modules`` list: the module name is the target or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def _suffixes(names: list[str]) -> list[str]:
    """The short targets that reach ``names``: last components (``qkv``, ``proj``), then parent.last (``mlp.proj``)."""
    short = {n.rsplit(".", 1)[-1] for n in names}
    pairs = {".".join(n.split(".")[-2:]) for n in names if n.count(".") and not n.split(".")[-2].isdigit()}
    return sorted(short) + sorted(pairs)


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise LmlabError("LoRA needs peft, which is not installed: pip install 'lmlab[lora]'") from None
    return peft


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    lora_layer = _peft().tuners.lora.LoraLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, lora_layer)]


def trainable_summary(model: nn.Module) -> str:
    """One line for the log: ``LoRA r=8 alpha=16 on qkv: 12,288 trainable of 1,234,567 parameters (1.00%)``."""
    params = list(model.parameters())  # a tied weight once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    counts = f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
    if not model.config.lora:
        return counts
    spec = LoraSpec.from_dict(model.config.lora)
    head = " + task head" if getattr(model, "task_head", None) is not None else ""
    return f"LoRA r={spec.r} alpha={spec.alpha:g} on {', '.join(spec.targets)}{head}: {counts}"


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha/r)·B·A, peft's ``merge``) and put the plain
    Linear back, in place: the state dict loads into ``build_model`` of the config without ``lora``.
    Every parameter is trainable again and ``config.lora`` is ``{}``. Returns ``model``."""
    layers = _lora_layers(model)
    if not layers:
        raise LmlabError("merge_lora: this model has no LoRA adapters")
    for name, layer in layers:
        layer.merge()
        model.set_submodule(name, layer.get_base_layer())
    del model.peft_config  # peft's record of the injected adapters
    model.requires_grad_(True)
    model.config = dataclasses.replace(model.config, lora={})
    return model


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights alone, keyed as PEFT's adapter files key them (``blocks.0.attn.qkv.lora_A.weight``:
    no adapter name; a ``PeftModel`` would prefix ``base_model.model.``)."""
    if not _lora_layers(model):
        raise LmlabError("adapter_state: this model has no LoRA adapters")
    return _peft().get_peft_model_state_dict(model)
