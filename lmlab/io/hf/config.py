"""lmlab's ``ModelConfig`` ↔ HF configs, both ways, for every registered family: which family and HF class
express a config (:func:`family_of`, :func:`hf_architecture`), and the task-head fields all families share
(labels, problem type), by the kind of head (:data:`HEAD_KINDS`). Each family maps its own fields
(:meth:`~lmlab.io.hf.family.Family.hf_config`, :meth:`~lmlab.io.hf.family.Family.config_from_hf`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io.hf.family import Architecture, Family, unsupported
from lmlab.io.hf.registry import ARCHITECTURES, BARE, FAMILIES, SUPPORTED_MODEL_TYPES

if TYPE_CHECKING:  # pragma: no cover
    import transformers

_PROBLEM_TYPES = {
    "single_label_classification": "single",
    "multi_label_classification": "multi",
    "regression": "regression",
}


@dataclass(frozen=True)
class HeadKind:
    """What HF makes of one kind of lmlab task head (a ``ModelConfig.task``), in every family alike. Whether
    the head pools a text into one vector is the model's to say (:func:`lmlab.model.heads.pools`)."""

    # its logits are HF's ``start_logits`` and ``end_logits`` (lmlab's one Linear: [start | end]), whose two
    # outputs have fixed names; otherwise HF's ``logits``, one per label, the labels in ``id2label``
    span: bool = False
    # HF's ``problem_type`` says how its logits are read (single-label, multi-label, regression)
    problem_types: bool = False


# the kinds of task head (ModelConfig.task) and what HF makes of each; the code shared by the families reads
# this table (and ``pools``) and never a head's name
HEAD_KINDS: dict[str, HeadKind] = {
    "classify": HeadKind(problem_types=True),  # *ForSequenceClassification: logits (B, num_labels)
    "tag": HeadKind(),  # *ForTokenClassification: logits (B, T, num_labels)
    "qa": HeadKind(span=True),  # *ForQuestionAnswering: start_logits, end_logits (B, T)
}
SPAN_LABELS = ("start", "end")  # the names of a span head's two outputs


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise LmlabError("transformers is not installed: pip install 'lmlab[hf]'") from None
    return transformers


def family_of(config: ModelConfig) -> Family:
    """The HF family that expresses ``config`` exactly, or an LmlabError naming the field."""
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    for family in FAMILIES.values():
        why = family.claims(config)
        if why:
            break
    else:
        raise LmlabError(f"model config field 'arch' is {config.arch!r}: no supported HF family ({supported}) holds it")
    for field_name, value in family.required.items():
        if getattr(config, field_name) != value:
            raise LmlabError(
                f"model config field '{field_name}' is {getattr(config, field_name)!r}: HF {family.model_type} "
                f"(the family for {why}) needs {value!r}; no supported HF family ({supported}) expresses this config "
                "exactly"
            )
    if config.n_kv_heads != config.n_head and not family.grouped_kv:
        raise LmlabError(
            f"model config field 'n_kv_heads' is {config.n_kv_heads}: HF {family.model_type} needs "
            f"n_kv_heads == n_head ({config.n_head})"
        )
    if config.attn_dim != config.n_embd and not family.own_head_dim:
        raise LmlabError(
            f"model config field 'head_dim' is {config.head_dim} with n_head={config.n_head}, n_embd={config.n_embd} "
            f"(attention heads were pruned): HF {family.model_type} derives head_dim as n_embd / n_head; only HF "
            "llama holds pruned heads"
        )
    return family


def hf_architecture(config: ModelConfig) -> str:
    """The HF class that holds a model of ``config`` with its head (what export writes)."""
    return family_of(config).architecture(config)


def import_architecture(config: ModelConfig, keys: set[str]) -> str:
    """The class whose weights ``keys`` (prefixed) are: a BERT without a task head is a BertForPreTraining,
    BertForMaskedLM or bare BertModel by the heads it has; every other class follows from the config."""
    return family_of(config).import_architecture(config, keys)


def with_prefix(keys: set[str], c: dict[str, Any]) -> set[str]:
    """Weight names as the class with a head names them (a bare BertModel's gain ``bert.``); ``c`` is config.json."""
    family = FAMILIES.get(str(c.get("model_type")))
    return family.with_prefix(keys) if family else keys


def hf_config_from(config: ModelConfig) -> transformers.PretrainedConfig:
    """The HF config (``GPT2Config``, ``LlamaConfig``, ``BertConfig`` or ``BartConfig``) describing the same
    model as ``config``, with its architecture and, for a task head, its labels.

    Special token ids keep the HF family's defaults, except that an id outside ``vocab_size`` becomes
    None (an id the embedding cannot look up means nothing, and transformers warns about it); export
    sets them from the tokenizer.
    """
    tf = require_transformers()
    family = family_of(config)
    common: dict[str, Any] = dict(architectures=[family.architecture(config)], initializer_range=config.init_std)
    kind = HEAD_KINDS.get(config.task)
    if kind is not None and not kind.span:  # a span head's outputs keep HF's names
        names = config.labels or [f"LABEL_{i}" for i in range(config.num_labels)]
        common.update(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
        if kind.problem_types:
            problem = {v: k for k, v in _PROBLEM_TYPES.items()}[config.problem_type]
            common["problem_type"] = problem
    return family.hf_config(tf, config, common)


def config_from_hf(hf_config: Any, keys: set[str] | None = None) -> ModelConfig:
    """The lmlab ``ModelConfig`` for an HF config — a ``PretrainedConfig`` or the dict of a ``config.json``
    (fields left out take the HF class's defaults; transformers is not needed). The inverse of
    :func:`hf_config_from`.

    The head comes from ``architectures`` (a task head's labels from ``id2label``, its problem type from
    ``problem_type``). ``keys``, the names of the weights, settle what a BERT has: a pooler, an NSP head.
    """
    c = _fields(hf_config)
    family = FAMILIES[c["model_type"]]
    declared = (c.get("architectures") or [family.lm_class])[0]
    architecture = BARE.get(declared, declared)
    if architecture not in ARCHITECTURES or ARCHITECTURES[architecture].family != family.model_type:
        raise unsupported(c, "architectures", f"one of {', '.join(family.architectures)} (or the bare base model)")
    config = family.config_from_hf(c, architecture, keys)
    task = ARCHITECTURES[architecture].task
    return dataclasses.replace(config, **_head_fields(c, task)) if task else config


def _fields(hf_config: Any) -> dict[str, Any]:
    """An HF config (object or config.json dict) as a dict, with the class defaults of its model_type filled in."""
    data = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise LmlabError(f"HF model_type {model_type!r} is not supported; expected one of {supported}")
    return {**FAMILIES[model_type].defaults, **data}


def _head_fields(c: dict[str, Any], task: str) -> dict[str, Any]:
    """The ModelConfig task fields of an HF task model: a span head's two outputs, or the labels and problem type."""
    kind = HEAD_KINDS[task]
    if kind.span:
        return dict(task=task, num_labels=2, labels=list(SPAN_LABELS))
    id2label = {int(k): str(v) for k, v in (c.get("id2label") or {}).items()}
    n = len(id2label) or c.get("num_labels") or 2
    problem_type = c.get("problem_type")
    if problem_type is not None and problem_type not in _PROBLEM_TYPES:
        supported = ", ".join(_PROBLEM_TYPES)
        raise LmlabError(f"HF config field 'problem_type' is {problem_type!r}: lmlab supports {supported}")
    # HF decides a missing problem type from the labels at training time: one output is regression
    single = "regression" if n == 1 else "single"
    return dict(
        task=task,
        num_labels=n,
        labels=[id2label.get(i, f"LABEL_{i}") for i in range(n)],
        problem_type=_PROBLEM_TYPES.get(problem_type, single) if kind.problem_types else "single",
    )


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "HEAD_KINDS",
    "HeadKind",
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "family_of",
    "hf_architecture",
    "hf_config_from",
    "import_architecture",
    "require_transformers",
    "with_prefix",
]
