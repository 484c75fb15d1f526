"""What a model family module defines (:class:`Family`), and the vocabulary its weight table is written in
(:class:`Rule`, :func:`linear`, :func:`fused`).

A family is one HF ``model_type`` (``gpt2``, ``llama``, ``bert``, ``bart``): the HF classes lmlab reads and
writes, the config fields both ways, and one table of :class:`Rule` — where each lmlab tensor sits in HF's
state dict. The machinery that walks the tables (:mod:`lmlab.io.hf.config`, :mod:`lmlab.io.hf.rules`) knows
no family by name; :mod:`lmlab.io.hf.registry` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError

if TYPE_CHECKING:  # pragma: no cover
    import transformers

# BERT's hidden_act and BART's activation_function → lmlab's ``gelu_approximate``
GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


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


@dataclass(frozen=True)
class Rule:
    """One lmlab tensor and where HF keeps it."""

    lmlab: str  # "": an HF tensor lmlab does not have (it must be zero)
    hf: tuple[str, ...]  # one name, or the pieces a fused lmlab weight splits into along dim 0
    sizes: tuple[int, ...] = ()  # rows of each piece, for a fused weight
    transpose: bool = False  # HF GPT-2's Conv1D stores (in, out)
    offset: int = 0  # rows HF keeps in front that lmlab has not (BART's positions)
    zeros: tuple[int, ...] = ()  # the shape of an HF tensor lmlab has not, always zero there


def linear(ours: str, theirs: str) -> list[Rule]:
    """A Linear (or LayerNorm) with a weight and a bias, under one name on each side."""
    return [Rule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]


def fused(
    ours: str, theirs: tuple[str, ...], sizes: tuple[int, ...], kinds: tuple[str, ...] = ("weight", "bias")
) -> list[Rule]:
    """An lmlab Linear whose output rows are HF's separate projections ``theirs``, ``sizes`` rows each."""
    return [Rule(f"{ours}.{kind}", tuple(f"{t}.{kind}" for t in theirs), sizes=sizes) for kind in kinds]


class Family:
    """One HF model family: a family module subclasses this once and sets ``FAMILY`` to an instance, which
    :mod:`lmlab.io.hf.registry` lists. The class attributes are data; the methods map configs and weights."""

    model_type: ClassVar[str]  # HF's ``model_type``
    # the HF config class's defaults of the fields read: a config.json may leave any field out, and importing
    # does not need transformers
    defaults: ClassVar[Mapping[str, Any]]
    architectures: ClassVar[Mapping[str, Architecture]]  # the HF classes lmlab reads and writes
    lm_class: ClassVar[str]  # the class of a model without a task head
    # the ModelConfig field values the family needs, checked once :meth:`claims` has chosen it
    required: ClassVar[Mapping[str, Any]]
    bare: ClassVar[Mapping[str, str]] = {}  # a bare base model's class → the class read in its place
    # name suffixes of HF tensors that are not weights (buffers) or copies of a tied one: importing ignores them
    ignored: ClassVar[tuple[str, ...]] = ()
    unprefixed: ClassVar[tuple[str, ...]] = ()  # HF weight names outside the backbone's prefix (its heads)
    grouped_kv: ClassVar[bool] = False  # whether the HF class has n_kv_heads < n_head (grouped-query attention)
    own_head_dim: ClassVar[bool] = False  # whether the HF config has a head_dim of its own (n_head · head_dim < n_embd)

    def claims(self, config: ModelConfig) -> str:
        """Why this family is the one for ``config`` (the field that decides, as the errors quote it), or ''."""
        raise NotImplementedError

    def hf_config(self, tf: Any, config: ModelConfig, common: dict[str, Any]) -> transformers.PretrainedConfig:
        """The HF config of ``config`` (``tf`` is transformers); ``common`` holds the architectures, the
        initializer range and a task head's labels, for the family to pass on."""
        raise NotImplementedError

    def config_from_hf(self, c: dict[str, Any], architecture: str, keys: set[str] | None) -> ModelConfig:
        """The ModelConfig of config.json fields ``c`` (defaults filled in) of HF class ``architecture``,
        its task head aside; ``keys`` are the (prefixed) weight names when known."""
        raise NotImplementedError

    def rules(self, config: ModelConfig, architecture: str) -> list[Rule]:
        """The weight table of ``config`` as HF ``architecture``, the task head's Linear aside: every lmlab
        tensor that class holds (a tied ``lm_head.weight`` aside), in ``model.state_dict()`` order."""
        raise NotImplementedError

    def task_class(self, task: str) -> str:
        """The HF class of the family with ``task``'s head ('': the LM class)."""
        return next(name for name, spec in self.architectures.items() if spec.task == task) if task else self.lm_class

    def architecture(self, config: ModelConfig) -> str:
        """The HF class that holds a model of ``config`` with its head (what export writes)."""
        return self.task_class(config.task)

    def import_architecture(self, config: ModelConfig, keys: set[str]) -> str:
        """The class whose (prefixed) weight names ``keys`` are, for a model of ``config``."""
        return self.architecture(config)

    def with_prefix(self, keys: set[str]) -> set[str]:
        """Weight names as the class with a head names them (a bare base model's may lack the prefix)."""
        return keys


def token_id(config: ModelConfig, default: int) -> int | None:
    """An HF family's default special token id, or None when it is outside ``vocab_size``: an id the embedding
    cannot look up means nothing, and transformers warns about it (export sets them from the tokenizer)."""
    return default if default < config.vocab_size else None


def unsupported(c: dict[str, Any], field_name: str, expected: str) -> LmlabError:
    value = c.get(field_name)
    return LmlabError(f"HF {c['model_type']} config field '{field_name}' is {value!r}: lmlab supports only {expected}")


def require(c: dict[str, Any], **expected: Any) -> None:
    """An LmlabError naming the first config.json field of ``c`` that differs from ``expected``."""
    for field_name, value in expected.items():
        if c.get(field_name) != value:
            raise unsupported(c, field_name, repr(value))


def lm_head_rules(config: ModelConfig, spec: Architecture) -> list[Rule]:
    """A decoder's untied LM head, which only the class without a task head holds."""
    return [] if spec.task or config.tie_embeddings else [Rule("lm_head.weight", ("lm_head.weight",))]
