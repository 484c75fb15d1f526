"""One ``ModelConfig`` describes every architecture lmlab builds; named presets are data.

Families differ only in swapped parts, each a field here (never a name test in ``forward``):

=================  ===================  ==================
field              GPT-2 style          LLaMA style
=================  ===================  ==================
``norm``           ``"layernorm"``      ``"rmsnorm"``
``mlp``            ``"gelu"``           ``"swiglu"``
``position``       ``"learned"``        ``"rope"``
``bias``           ``True``             ``False``
``tie_embeddings`` ``True``             ``False``
``n_kv_heads``     ``= n_head``         ``< n_head`` (GQA)
=================  ===================  ==================

Field names follow the ones HF Transformers and litgpt users already know (``n_layer``,
``n_head``, ``n_embd``, ``n_kv_heads``, ``rope_theta``, ``block_size``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lmlab.errors import LmlabError
from lmlab.io.outputs import write_json_atomic, write_jsonl_atomic, write_text_atomic  # noqa: F401  (re-exported: the project's writers)

logger = logging.getLogger(__name__)

ARCHS = ("decoder", "encoder", "seq2seq")
NORM_PLACEMENTS = ("pre", "post")
TASKS = ("", "classify", "tag", "qa")
PROBLEM_TYPES = ("single", "multi", "regression")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
# RoPE scaling variants (HF's rope_type names) and the parameters each takes; see lmlab.model.blocks.rope_inv_freq
ROPE_SCALINGS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Sizes past these describe no model anyone trains: a damaged or hostile config.json, refused before
# anything is allocated (block_size 10**12 would ask for terabytes of position tables). Each is far above
# the largest in use: vocabularies ~2.6e5 (2**24 also keeps ids exact in float32 and is the tokenizer's
# cap), contexts ~1e7 positions, ~1000 layers (DeepNet), widths ~2.6e4, MLP widths ~7.4e4 (PaLM).
MAX_SIZES = {
    "vocab_size": 2**24,
    "block_size": 2**24,
    "n_layer": 2**12,
    "n_decoder_layer": 2**12,
    "n_head": 2**12,
    "n_embd": 2**17,
    "intermediate_size": 2**20,
    "type_vocab_size": 2**16,
    "num_labels": 2**24,
}
QUANT_METHODS = ("int8", "int8-dynamic", "int4", "int4-gptq")  # lmlab.model.quant, lmlab.compress
INT8_METHODS = ("int8", "int8-dynamic")  # int8 weights per output channel: no group size
GROUP_SIZES = (32, 64, 128)  # int4: input columns that share one scale and zero-point
# Parameters plus RoPE tables: 2**40 ≈ 1.1e12 elements (4 TiB in fp32), above the largest dense models (~4e11).
MAX_ELEMENTS = 2**40


@dataclass
class ModelConfig:
    """Everything needed to build a model. Defaults give a small GPT-2-style decoder."""

    arch: str = "decoder"
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the model sees (learned positions, RoPE cache)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_heads: int | None = None  # None: = n_head (multi-head); fewer: grouped-query attention
    # width of one attention head; None: n_embd // n_head. Head pruning (lmlab prune) keeps the width and drops
    # heads, so n_head · head_dim can be less than n_embd
    head_dim: int | None = None
    intermediate_size: int | None = None  # MLP hidden width; None: 4·n_embd (gelu) or LLaMA's 8/3 rule
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    gelu_approximate: str = "tanh"  # GPT-2's "gelu_new" is the tanh approximation
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(
        default_factory=dict
    )  # {} = plain RoPE; else {"rope_type": one of ROPE_SCALINGS, its parameters}
    bias: bool = True  # biases in every Linear and norm (GPT-2) or none (LLaMA)
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # encoder (BERT style) parts; a decoder leaves them off
    type_vocab_size: int = 0  # segment (token type) embeddings: 2 for BERT's sentence A/B, 0 for none
    norm_placement: str = (
        "pre"  # "pre": x + f(norm(x)) (GPT-2, LLaMA); "post": norm(x + f(x)) (BERT, the 2017 Transformer)
    )
    embedding_norm: bool = False  # a norm right after the embeddings (BERT)
    pooler: bool = False  # BERT's pooler: tanh(W·h_[CLS] + b), the sentence vector NSP and classifiers read
    nsp_head: bool = False  # a next-sentence-prediction head on the pooled vector (BERT pretraining)
    # a fine-tuned task head on top of the backbone ("" = none: the LM / MLM head only)
    task: str = ""  # "classify" (a label per text), "tag" (a label per token) or "qa" (answer span start/end)
    num_labels: int = 0  # classify/tag: classes (regression: 1); qa: 2 (start, end)
    problem_type: str = "single"  # classify: "single" (softmax), "multi" (sigmoid per label) or "regression"
    labels: list[str] = field(default_factory=list)  # label names, index = class id
    # encoder–decoder (seq2seq: the 2017 Transformer, T5) parts; n_layer counts the encoder blocks
    n_decoder_layer: int | None = None  # seq2seq decoder blocks; None: = n_layer
    decoder_start_token_id: int = 0  # the token the decoder starts from (T5: pad, BART: eos)
    scale_embedding: bool = False  # multiply token embeddings by √n_embd (BART's scale_embedding); seq2seq only
    # adapters: LoRA settings (LoraSpec.to_dict: r, alpha, dropout, targets); {} = none
    lora: dict[str, Any] = field(default_factory=dict)  # set by apply_lora; load_model injects the same adapters
    # weight-only quantization (lmlab.compress.quantize): {"method", "group_size", "modules"}; {} = none
    quantization: dict[str, Any] = field(default_factory=dict)  # load_model rebuilds the QuantizedLinear modules
    name: str = ""  # the preset this came from, for humans only; nothing switches on it

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.head_dim is None:  # derived (a bad n_embd or n_head is reported by validate, head_dim 0 meanwhile)
            sizes = [v if _positive_int(v) else 0 for v in (self.n_embd, self.n_head)]
            if all(sizes) and sizes[0] % sizes[1]:
                raise self._bad("n_embd", f"a multiple of n_head={self.n_head} (or an explicit head_dim)")
            self.head_dim = sizes[0] // sizes[1] if all(sizes) else 0
        if self.intermediate_size is None:
            if self.mlp == "swiglu":
                # LLaMA: 2/3 of 4d, rounded up to a multiple of 256 (keeps FLOPs ≈ a 4d GELU MLP).
                hidden = int(2 * 4 * self.n_embd / 3)
                self.intermediate_size = 256 * ((hidden + 255) // 256)
            else:
                self.intermediate_size = 4 * self.n_embd
        if self.arch == "seq2seq" and self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        self.validate()

    def _bad(self, field_name: str, expected: str) -> LmlabError:
        value = getattr(self, field_name)
        return LmlabError(f"model config field '{field_name}' is {value!r}: expected {expected}")

    def validate(self) -> None:
        """A one-line error naming the first field that is out of range or inconsistent with another."""
        self._check_shape()
        self._check_rope_scaling()
        self._check_heads()
        self._check_seq2seq()
        if not isinstance(self.lora, dict):
            raise self._bad("lora", "a dict of LoRA settings (r, alpha, dropout, targets), or {} for none")
        if self.lora:
            LoraSpec.from_dict(self.lora, source="model config field 'lora'")
        self._check_quantization()
        self._check_sizes()

    def _check_quantization(self) -> None:
        q = self.quantization
        methods = ", ".join(QUANT_METHODS)
        expected = f"{{}} or a dict of method ({methods}), group_size and modules (a list of names)"
        if not isinstance(q, dict) or (q and set(q) != {"method", "group_size", "modules"}):
            raise self._bad("quantization", expected)
        if q and (
            q["method"] not in QUANT_METHODS
            or (q["method"] not in INT8_METHODS and q["group_size"] not in GROUP_SIZES)
            or not isinstance(q["modules"], list)
            or not all(isinstance(m, str) for m in q["modules"])
        ):
            raise self._bad("quantization", expected)

    def _check_shape(self) -> None:
        for field_name, choices in (
            ("arch", ARCHS),
            ("norm", NORMS),
            ("mlp", MLPS),
            ("position", POSITIONS),
            ("norm_placement", NORM_PLACEMENTS),
        ):
            if getattr(self, field_name) not in choices:
                raise self._bad(field_name, "one of " + ", ".join(choices))
        for field_name in (
            "vocab_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "n_kv_heads",
            "head_dim",
            "intermediate_size",
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise self._bad(field_name, "a positive integer")
        if self.n_head % self.n_kv_heads:
            raise self._bad("n_kv_heads", f"a divisor of n_head={self.n_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise self._bad("head_dim", "even (n_embd / n_head when not given), as RoPE rotates pairs of dimensions")
        if not 0.0 <= self.dropout < 1.0:
            raise self._bad("dropout", "a number in [0, 1)")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise self._bad("type_vocab_size", "0 (no segments) or a positive integer")

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling != {}:
            kind = self.rope_scaling.get("rope_type") if isinstance(self.rope_scaling, dict) else None
            if self.position != "rope" or kind not in ROPE_SCALINGS:
                raise self._bad(
                    "rope_scaling",
                    "{} (plain RoPE) or, with position 'rope', a dict whose rope_type is one of "
                    + ", ".join(ROPE_SCALINGS),
                )
            params = {k: v for k, v in self.rope_scaling.items() if k != "rope_type"}
            number = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in params.values())
            if set(params) != set(ROPE_SCALINGS[kind]) or not number:
                raise self._bad(
                    "rope_scaling",
                    f"for rope_type {kind!r} exactly the positive numbers " + ", ".join(ROPE_SCALINGS[kind]),
                )

    def _check_heads(self) -> None:
        if self.task not in TASKS:
            raise self._bad("task", "one of " + ", ".join(repr(t) for t in TASKS))
        if self.problem_type not in PROBLEM_TYPES:
            raise self._bad("problem_type", "one of " + ", ".join(PROBLEM_TYPES))
        if self.task and (not isinstance(self.num_labels, int) or self.num_labels < 1):
            raise self._bad("num_labels", f"a positive integer for task {self.task!r}")
        if self.labels and len(self.labels) != self.num_labels:
            raise self._bad("labels", f"{self.num_labels} names (num_labels)")
        if self.nsp_head and not self.pooler:
            raise self._bad("nsp_head", "False unless pooler is True (NSP reads the pooled vector)")

    def _check_seq2seq(self) -> None:
        if self.n_decoder_layer is not None and (
            not isinstance(self.n_decoder_layer, int)
            or isinstance(self.n_decoder_layer, bool)
            or self.n_decoder_layer < 1
        ):
            raise self._bad("n_decoder_layer", "None (= n_layer) or a positive integer")
        if not isinstance(self.decoder_start_token_id, int) or not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise self._bad("decoder_start_token_id", f"a token id in [0, vocab_size={self.vocab_size})")
        if self.arch == "seq2seq":  # what the seq2seq model does not build: fail loudly rather than ignore
            for field_name, off in (("type_vocab_size", 0), ("pooler", False), ("nsp_head", False), ("task", "")):
                if getattr(self, field_name) != off:
                    raise self._bad(
                        field_name,
                        f"{off!r} for arch 'seq2seq' (the encoder–decoder has no segments, pooler or task heads)",
                    )
        if not isinstance(self.scale_embedding, bool) or (self.scale_embedding and self.arch != "seq2seq"):
            raise self._bad(
                "scale_embedding",
                "True or False, and True only for arch 'seq2seq' (the encoder–decoder scales its embeddings)",
            )

    def _check_sizes(self) -> None:
        """Every size within :data:`MAX_SIZES`, and the elements they describe within :data:`MAX_ELEMENTS`."""
        for field_name, limit in MAX_SIZES.items():
            value = getattr(self, field_name)
            if isinstance(value, int) and value > limit:
                raise LmlabError(
                    f"model config field '{field_name}' is {value:,}: expected at most {limit:,} (a larger value is a "
                    "damaged config, not a model)"
                )
        elements = self.num_params() + (2 * self.block_size * self.head_dim if self.position == "rope" else 0)
        if elements > MAX_ELEMENTS:
            raise LmlabError(
                f"model config describes {elements:.3g} parameters and RoPE table entries (n_layer={self.n_layer}, "
                f"n_embd={self.n_embd}, "
                f"intermediate_size={self.intermediate_size}, vocab_size={self.vocab_size}, "
                f"block_size={self.block_size}): expected at most {MAX_ELEMENTS:.3g}"
            )

    @property
    def attn_dim(self) -> int:
        """The width of the query heads side by side, n_head · head_dim: n_embd unless heads were pruned."""
        return self.n_head * self.head_dim

    # -- sizes ---------------------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, computed from the config alone (equal to the built model's)."""
        d, L, h, V = self.n_embd, self.n_layer, self.intermediate_size, self.vocab_size
        q, kv = self.attn_dim, self.n_kv_heads * self.head_dim
        b = 1 if self.bias else 0
        attn = d * (q + 2 * kv) + b * (q + 2 * kv) + q * d + b * d
        mlp = (3 * d * h if self.mlp == "swiglu" else 2 * d * h) + b * (h + d if self.mlp == "gelu" else 0)
        norm = d + b * d  # weight (+ bias for LayerNorm with bias)
        total = L * (attn + mlp + 2 * norm) + (norm if self.norm_placement == "pre" else 0)  # + final norm (pre-norm)
        total += norm if self.embedding_norm else 0
        if self.arch == "seq2seq":  # + the decoder: self-attention, cross-attention (same shapes), MLP, 3 norms each
            total += self.n_decoder_layer * (2 * attn + mlp + 3 * norm) + (norm if self.norm_placement == "pre" else 0)
            total += norm if self.embedding_norm else 0
        total += d * d + b * d if self.pooler else 0
        if self.arch == "encoder":
            total += (
                d * d + b * d + norm + b * V
            )  # MLM head: dense + norm before the (tied) vocabulary projection, its bias
        total += 2 * d + 2 if self.nsp_head else 0
        total += d * self.num_labels + self.num_labels if self.task else 0  # the task head: one Linear
        embeddings = V * d + (self.block_size * d if self.position == "learned" else 0) + self.type_vocab_size * d
        embeddings += (
            self.block_size * d if self.arch == "seq2seq" and self.position == "learned" else 0
        )  # the decoder's own table
        head = 0 if self.tie_embeddings else V * d
        if include_embeddings:
            return total + embeddings + head
        return total + head

    def attention_layers(self) -> int:
        """Attention layers one token's computation meets, as the FLOPs formula counts them: n_layer,
        or for an encoder–decoder the encoder's self-attention plus the decoder's self- and
        cross-attention (n_layer + 2·n_decoder_layer)."""
        return self.n_layer + 2 * self.n_decoder_layer if self.arch == "seq2seq" else self.n_layer

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """FLOPs per token, nanoGPT's formula (PaLM appendix B): 6·N + 12·L·d·T for a training step.

        N counts every parameter but the position embeddings; the second term is attention's
        QKᵀ and AV over T positions in each of L attention layers (:meth:`attention_layers`), d there being
        the heads' width n_head · head_dim (n_embd unless heads were pruned). For an
        encoder–decoder a "token" is a target token with one source token beside it (source and
        target of length T): the pair passes through every parameter once. A forward pass alone is
        a third of it (2·N + 4·L·d·T).

        Args:
            seq_len: sequence length for the FLOPs (default: block_size)
            training: a training step (forward + backward); False: a forward pass
        """
        T = seq_len or self.block_size
        n = self.num_params(include_embeddings=True)
        if self.position == "learned":
            n -= self.block_size * self.n_embd
        flops = 6 * n + 12 * self.attention_layers() * self.attn_dim * T
        return flops if training else flops / 3

    # -- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values; ``head_dim`` None where it is n_embd // n_head (derived, not chosen)."""
        data = dataclasses.asdict(self)
        if self.head_dim * self.n_head == self.n_embd:
            data["head_dim"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LmlabError(
                f"{source}: unknown model config key(s) {', '.join(unknown)}; expected some of "
                f"{', '.join(sorted(known))}"
            )
        try:
            return cls(**data)
        except LmlabError as err:  # name the file a bad field came from
            raise LmlabError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), {"lmlab_model_config": self.to_dict()})

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LmlabError(f"{path}: not found; expected an lmlab config.json") from None
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if "lmlab_model_config" not in data:
            raise LmlabError(f"{path}: expected a key 'lmlab_model_config' (an lmlab checkpoint config)")
        return cls.from_dict(data["lmlab_model_config"], source=str(path))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# -- LoRA settings (the adapters themselves: lmlab.model.lora) -----------------------------------------

KEYS = ("r", "alpha", "dropout", "targets")


@dataclass
class LoraSpec:
    """What ``--lora`` asks for: the rank ``r`` of the update, its scale ``alpha`` (the update is
    multiplied by alpha/r), dropout on the adapters' input, and the target module names."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("qkv",)

    def __post_init__(self) -> None:
        vars(self).update(_checked(vars(self), "lora"))  # normalised: targets a tuple, alpha and dropout floats

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as ``config.lora`` stores it."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "lora") -> LoraSpec:
        """The spec ``data`` describes (missing keys: the defaults); errors name ``source`` and the key."""
        return cls(**_checked(data, source))


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoraSpec)}


def _checked(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` as :class:`LoraSpec` fields (targets a tuple, alpha and dropout floats), or a one-line error
    naming ``source`` (a parameter, or where the values were read)."""
    param = source if source.isidentifier() else ""
    unknown = [k for k in values if k not in KEYS]
    if unknown:
        raise LmlabError(f"{source}: unknown key {unknown[0]!r}; expected {', '.join(KEYS)}", params=param)
    v = {**_DEFAULTS, **values}

    def bad(key: str, expected: str) -> LmlabError:
        return LmlabError(f"{source}: {key} is {v[key]!r}; expected {expected}", params=param)

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(v["r"], int) or isinstance(v["r"], bool) or v["r"] < 1:
        raise bad("r", "an integer >= 1")
    if not number(v["alpha"]) or v["alpha"] <= 0:
        raise bad("alpha", "a number > 0")
    if not number(v["dropout"]) or not 0 <= v["dropout"] < 1:
        raise bad("dropout", "a number in [0, 1)")
    targets = v["targets"].split("+") if isinstance(v["targets"], str) else v["targets"]
    if (
        not isinstance(targets, (list, tuple))
        or not targets
        or not all(isinstance(t, str) and t.strip() == t != "" for t in targets)
    ):
        raise bad("targets", "one or more module names, e.g. qkv or qkv,proj,fc")
    return {
        "r": v["r"],
        "alpha": float(v["alpha"]),
        "dropout": float(v["dropout"]),
        "targets": tuple(dict.fromkeys(targets)),
    }


def parse_lora(text: str) -> LoraSpec:
    """The spec a ``--lora`` flag gives: ``r=8,alpha=16,dropout=0.1,targets=qkv,proj,fc``.

    Comma-separated ``key=value`` items; an item without ``=`` adds to the previous key's list (only
    ``targets`` takes one), and ``targets`` also takes ``+``-joined names (``targets=qkv+fc``). Missing
    keys keep their defaults; ``""`` or ``"default"`` is all defaults.
    """
    text = text.strip()
    if text in ("", "default"):
        return LoraSpec()
    values: dict[str, Any] = {}
    key = None
    for item in filter(None, (i.strip() for i in text.split(","))):
        if "=" not in item:
            if key != "targets":
                raise LmlabError(
                    f"lora: {item!r} is not key=value; only targets takes a list (targets=qkv,proj)", params="lora"
                )
            values["targets"] += [t for t in item.split("+") if t]
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in KEYS:
            raise LmlabError(f"lora: unknown key {key!r}; expected {', '.join(KEYS)}", params="lora")
        if key in values:
            raise LmlabError(f"lora: {key} is given twice", params="lora")
        if key == "targets":
            values[key] = [t for t in value.split("+") if t]
            continue
        try:
            values[key] = int(value) if key == "r" else float(value)
        except ValueError:
            raise LmlabError(
                f"lora: {key}={value!r} is not {'an integer' if key == 'r' else 'a number'}", params="lora"
            ) from None
    return LoraSpec.from_dict(values)


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


def check_seed(seed: Any, param: str = "seed") -> int:
    """``seed`` when it is an integer in [0, 2**63), else a one-line error naming ``param``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LmlabError(f"{param} is {seed!r}: expected an integer from 0 to 2**63 - 1", params=param)
    return seed


def option(default: Any, help: str) -> Any:
    """A dataclass field with its ``--help`` text: the CLI builds its flags from these."""
    return field(default=default, metadata={"help": help})


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding an object; {} when the file is missing; unreadable JSON or another kind of
    value is a one-line error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LmlabError(f"{path}: cannot read JSON ({err})") from None
    if not isinstance(data, dict):
        raise LmlabError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_jsonl_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (a run's ``log.jsonl``), one object a line.

    A crash can leave the tail damaged, and that is expected: a kill mid-write leaves the last line torn
    (without its newline), and a filesystem that had allocated the blocks but not written them reads back
    NUL bytes. Such a tail is dropped with a warning. A bad line anywhere else is an error naming file:line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise LmlabError(f"{path}: cannot read the log ({err.strerror or err})") from None
    body = text.rstrip("\0")
    if len(body) < len(text):
        logger.warning("%s: dropped %d NUL bytes at its end (left by a crash)", path, len(text) - len(body))
    lines = body.split("\n")
    torn = lines.pop()  # "" when the last line ended with its newline
    records = [json_line_object(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if torn.strip():
        try:
            records.append(json_line_object(path, len(lines) + 1, torn))
        except LmlabError:
            logger.warning(
                "%s:%d: dropped the torn last line (a run killed mid-write leaves one): %.60r",
                path,
                len(lines) + 1,
                torn,
            )
    return records


def json_line_object(path: Path, number: int, line: str) -> dict[str, Any]:
    """Line ``number`` of the JSON Lines file ``path``, which must hold an object (else a one-line error)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise LmlabError(f"{path}:{number}: invalid JSON ({err.msg}); expected one object per line") from None
    if not isinstance(record, dict):
        raise LmlabError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


# -- presets: an exact-match table (docs/architecture.md, habit 12) --------------------------------------------
# vocab_size here is the family's own; `pretrain` replaces it with the tokenizer's.

_GPT2 = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True, vocab_size=50257)
_LLAMA = dict(
    norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False, vocab_size=32000, norm_eps=1e-5
)

# BERT (Devlin et al., 2019): post-norm, exact GELU, segments, an embedding LayerNorm, pooler + NSP head
_BERT = dict(
    arch="encoder",
    norm="layernorm",
    norm_eps=1e-12,
    mlp="gelu",
    gelu_approximate="none",
    position="learned",
    bias=True,
    tie_embeddings=True,
    vocab_size=30522,
    type_vocab_size=2,
    norm_placement="post",
    embedding_norm=True,
    pooler=True,
    nsp_head=True,
    dropout=0.1,
)

# Encoder–decoders. The blocks have two position schemes, learned and RoPE; neither is the original's:
# - T5 (Raffel et al., 2020) v1.0 shape: pre-norm RMSNorm, no biases, tied embeddings, d_ff = 4d. T5's
#   relative position bias is replaced by RoPE (also relative, also free of a length-bound table), and
#   its ReLU MLP by GELU.
# - The 2017 Transformer (Vaswani et al.): post-norm LayerNorm with biases, shared source/target/output
#   embeddings. Sinusoidal positions are replaced by learned ones, which the paper found "nearly
#   identical" (Table 3, row E), one table each for encoder and decoder; ReLU by exact GELU; no √d
#   embedding scale.
_T5 = dict(
    arch="seq2seq",
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="gelu",
    gelu_approximate="none",
    position="rope",
    bias=False,
    tie_embeddings=True,
    vocab_size=32128,
    norm_placement="pre",
    dropout=0.1,
    decoder_start_token_id=0,
)
_TRANSFORMER = dict(
    arch="seq2seq",
    norm="layernorm",
    norm_eps=1e-6,
    mlp="gelu",
    gelu_approximate="none",
    position="learned",
    bias=True,
    tie_embeddings=True,
    vocab_size=37000,
    norm_placement="post",
    dropout=0.1,
    decoder_start_token_id=0,
)

PRESETS: dict[str, dict[str, Any]] = {
    # tests and demos: seconds on a laptop CPU
    "gpt2-tiny": dict(_GPT2, n_layer=2, n_head=2, n_embd=64, block_size=128),
    "gpt2-mini": dict(_GPT2, n_layer=4, n_head=4, n_embd=128, block_size=256),
    # GPT-2 (Radford et al., 2019)
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-355m": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-774m": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    # LLaMA style (Touvron et al., 2023): RoPE, RMSNorm, SwiGLU, GQA, untied head
    "llama-tiny": dict(_LLAMA, n_layer=2, n_head=4, n_kv_heads=2, n_embd=64, intermediate_size=176, block_size=128),
    "llama-mini": dict(_LLAMA, n_layer=4, n_head=4, n_kv_heads=2, n_embd=128, intermediate_size=352, block_size=256),
    # TinyLlama-1.1B's shape (Zhang et al., 2024)
    "llama-1b": dict(_LLAMA, n_layer=22, n_head=32, n_kv_heads=4, n_embd=2048, intermediate_size=5632, block_size=2048),
    # BERT encoders: tiny/mini/small are Turc et al. (2019)'s compact BERTs, base the original
    "bert-tiny": dict(_BERT, n_layer=2, n_head=2, n_embd=128, block_size=128),
    "bert-mini": dict(_BERT, n_layer=4, n_head=4, n_embd=256, block_size=512),
    "bert-small": dict(_BERT, n_layer=4, n_head=8, n_embd=512, block_size=512),
    "bert-base": dict(_BERT, n_layer=12, n_head=12, n_embd=768, block_size=512),
    # encoder–decoders: n_layer encoder + n_decoder_layer decoder blocks
    "t5-tiny": dict(_T5, n_layer=2, n_decoder_layer=2, n_head=2, n_embd=64, block_size=128),
    "t5-mini": dict(_T5, n_layer=4, n_decoder_layer=4, n_head=4, n_embd=128, block_size=256),
    "t5-small": dict(
        _T5, n_layer=6, n_decoder_layer=6, n_head=8, n_embd=512, intermediate_size=2048, block_size=512
    ),  # ≈ 60M
    "transformer-base": dict(
        _TRANSFORMER, n_layer=6, n_decoder_layer=6, n_head=8, n_embd=512, intermediate_size=2048, block_size=512
    ),
}


def size_table(configs: list[ModelConfig], seq_len: int | None = None) -> str:
    """A table of the models' sizes, a row each: layers, width, heads (query/key-value when grouped), parameters
    with and without embeddings, and GFLOPs per token of a training step at ``seq_len`` (default: each model's
    block_size); with a line saying how the FLOPs are counted. What ``lmlab info`` prints."""
    lines = [
        f"{'model':<12} {'layers':>6} {'d_model':>7} {'heads':>8} {'params':>14} {'non-emb':>14} {'GFLOPs/tok':>10}"
    ]
    for c in configs:
        heads = f"{c.n_head}/{c.n_kv_heads}" if c.n_kv_heads != c.n_head else str(c.n_head)
        lines.append(
            f"{c.name or 'custom':<12} {c.n_layer:>6} {c.n_embd:>7} {heads:>8} {c.num_params():>14,} "
            f"{c.num_params(include_embeddings=False):>14,} {c.flops_per_token(seq_len) / 1e9:>10.3f}"
        )
    lines.append("GFLOPs/tok: one training step (forward + backward) per token, 6·N + 12·L·d·T (nanoGPT / PaLM).")
    return "\n".join(lines)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with ``overrides`` applied. Unknown names fail loudly, listing the known ones."""
    if name not in PRESETS:
        raise LmlabError(f"unknown model preset '{name}'; expected one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name], name=name)
    values.update(overrides)
    return ModelConfig.from_dict(values, source=f"preset '{name}'")
