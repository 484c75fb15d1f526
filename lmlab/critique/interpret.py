"""The interpretability lens: where the model looks, which input tokens drive its prediction, and at
which layer that prediction forms — three pictures of one short input.

1. **Attention maps** (per layer and head; Clark et al., 2019, "What does BERT look at?").
   ``scaled_dot_product_attention`` returns no weights, so forward pre-hooks on every attention
   module capture what the module receives and :func:`attention_probs` recomputes
   softmax(QKᵀ/√d_k + mask) from the module's own projection, RoPE rotation, grouped-query key
   sharing and mask — the tensors the fused kernel saw (the tests check that these probabilities
   times V, through the output projection, reproduce the module's output). Each head's entropy
   −Σ p log p, divided by log(number of visible keys), says how focused it is: 0 = one key, 1 = uniform.
   Attention weights show what is mixed, not why the output is what it is (Jain & Wallace, 2019).
2. **Integrated gradients** (Sundararajan, Taly & Yan, 2017) on the token embeddings, with captum's
   ``LayerIntegratedGradients`` (Kokhlikyan et al., 2020): the path integral of the gradient of
   F = log p(target) from a baseline input to the input, summed over each token's embedding. By
   completeness the attributions add up to F(x) − F(baseline); captum's convergence delta is the
   numerical shortfall of the Riemann sum, reported with the result.
3. **The logit lens** (nostalgebraist, 2020): the model's own final norm and output head applied to
   the residual stream after every block, showing what each layer would predict. Intermediate layers
   were not trained to be read this way, so early layers read poorly (the tuned lens, Belrose et
   al., 2023, learns a probe per layer instead). A classifier gets the same over its task head: the
   "classifier lens".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.critique.core import (
    Figure,
    Finding,
    Section,
    Subject,
    Table,
    figure_png,
    new_figure,
    random_lm_head,
    skipped,
)
from lmlab.errors import LmlabError
from lmlab.model.blocks import Attention, apply_rope

TITLE = "Interpretability: attention, attributions and the logit lens"
BUILTIN_TEXT = "The children walked to the old library because they wanted to read a book about the"
MAX_TOKENS = 24  # longest input shown: beyond it the token labels of the pictures become unreadable
MAX_LAYERS_SHOWN, MAX_HEADS_SHOWN = 6, 8  # attention small multiples: rows × columns
SHARP, UNIFORM = 0.1, 0.95  # normalised head entropy below: nearly one key; above: nearly uniform
RELATIVE_DELTA = 0.05  # |convergence delta| / |Σ attributions| above this: too few integration steps
MAX_TARGET = 8  # encoder–decoder: greedy target tokens the decoder's logit lens reads


# -- attention probabilities --------------------------------------------------------------------


def attention_probs(
    attn: Attention, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, is_causal: bool
) -> Tensor:
    """(B, n_head, T, T) attention probabilities an :class:`Attention` computes for input ``x`` —
    the same arguments its forward takes (no KV cache). ``mask`` is boolean, True where a key is visible."""
    B, T, C = x.shape
    kv_dim = attn.n_kv_heads * attn.head_dim
    q, k, _ = attn.qkv(x).split((attn.n_head * attn.head_dim, kv_dim, kv_dim), dim=-1)
    q = q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
    k = k.view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(
        attn.n_head // attn.n_kv_heads, dim=1
    )  # GQA: each key head serves consecutive query heads, as SDPA
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(attn.head_dim)  # QKᵀ/√d_k, (B, n_head, T, T)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.softmax(dim=-1)


def _blocks(model: nn.Module, decoder: bool = False) -> nn.ModuleList:
    if model.config.arch == "seq2seq":
        return model.dec_blocks if decoder else model.enc_blocks
    return model.blocks


@torch.no_grad()
def _trace(blocks: nn.ModuleList, run: Callable[[], object]) -> tuple[list[Tensor], list[Tensor]]:
    """Run ``run()`` and capture each block's self-attention probabilities and the residual stream:
    the input of the first block, then every block's output (n_layer + 1 states, each (B, T, n_embd))."""
    probs: list[Tensor] = []
    hidden: list[Tensor] = []
    handles = [blocks[0].register_forward_pre_hook(lambda module, args: hidden.append(args[0]))]
    for block in blocks:
        # Block calls attn(x, rope, mask, is_causal, kv_cache, input_pos, cache_len) positionally
        handles.append(
            block.attn.register_forward_pre_hook(lambda module, args: probs.append(attention_probs(module, *args[:4])))
        )
        handles.append(block.register_forward_hook(lambda module, args, out: hidden.append(out)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return probs, hidden


def _backbone(model: nn.Module, ids: Tensor, types: Tensor | None, mask: Tensor | None) -> Callable[[], object]:
    """The forward pass through the self-attention blocks the attention maps are read from."""
    arch = model.config.arch
    if arch == "decoder":
        return lambda: model(ids, key_padding_mask=mask, hidden_only=True)
    if arch == "encoder":
        return lambda: model.encode(ids, types, mask)
    return lambda: model.encode(ids, mask)  # an encoder–decoder: its encoder's self-attention over the source


def attention_maps(
    model: nn.Module, input_ids: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
) -> list[Tensor]:
    """Per self-attention layer, the (B, n_head, T, T) attention probabilities for ``input_ids`` (B, T);
    ``attention_mask`` (B, T) is 1 on real tokens. An encoder–decoder gives its encoder's layers."""
    probs, _ = _trace(_blocks(model), _backbone(model, input_ids, token_type_ids, attention_mask))
    return probs


def _entropies(probs: list[Tensor], causal: bool) -> tuple[Tensor, Tensor]:
    """(n_layer, n_head) mean entropy in nats per query row, and the same divided by log(visible keys)
    over rows that see at least two keys."""
    T = probs[0].shape[-1]
    visible = torch.arange(1, T + 1, dtype=torch.float32) if causal else torch.full((T,), float(T))
    nats = torch.stack([torch.special.entr(p[0].float().cpu()).sum(-1) for p in probs])  # (n_layer, n_head, T)
    rows = visible >= 2
    normalised = (
        (nats[..., rows] / visible[rows].log()).mean(-1) if rows.any() else torch.full(nats.shape[:2], math.nan)
    )
    return nats.mean(-1), normalised


# -- integrated gradients --------------------------------------------------------------------------


def integrated_gradients(
    model: nn.Module, forward: Callable[[Tensor], Tensor], input_ids: Tensor, baseline_ids: Tensor, n_steps: int = 32
) -> tuple[Tensor, float]:
    """Per-token attributions (T,) of ``forward(ids) -> (B,)`` for ``input_ids`` (1, T), integrated
    along the straight path from the embeddings of ``baseline_ids`` (captum's LayerIntegratedGradients
    on ``model.tok_emb``, Gauss–Legendre steps), and captum's convergence delta
    Σ attributions − (F(input) − F(baseline))."""
    from captum.attr import LayerIntegratedGradients

    with torch.enable_grad():
        attributions, delta = LayerIntegratedGradients(forward, model.tok_emb).attribute(
            input_ids, baselines=baseline_ids, n_steps=n_steps, return_convergence_delta=True
        )
    return attributions[0].sum(-1).detach().float().cpu(), float(delta.sum())


# -- what the model predicts, and through which head -------------------------------------------------


@dataclass(frozen=True)
class _HeadKind:
    """How the lens reads one kind of output head. The kinds are rows of :data:`HEAD_KINDS` (keyed by
    :func:`_kind`), so the lens's steps look a property up instead of comparing head names."""

    # the head applied to a layer's residual stream: "lm_head", "decoder_lm_head", "mlm_head", "pooled" or "per_token"
    readout: str
    # the input's ids: "text" (plain encoding), "pair" (as fine-tuning encodes a text pair) or "single" (post-processor)
    encode: str
    query: str | None  # the position explained: "last", "mask", or None (the head predicts many outputs at once)
    explains: str  # what a target names and integrated gradients differentiate: "class", "token" or "" (neither)
    # the layer-by-layer read-out: "tokens" (a vocabulary), "labels" (tags), "classes" (a classifier) or "" (none)
    lens: str
    lens_query: str | None = (
        None  # the logit lens's position: "last" (of the tokens it reads), "probe" (the one explained) or None
    )
    predicts: str = ""  # what each logit-lens cell shows
    no_ig: str = ""  # why integrated gradients do not run on it, where they cannot
    no_lens: str = ""  # why the logit lens does not run on it, where it cannot
    token_types: bool = True  # the model takes token type ids (integrated gradients over tokens)


HEAD_KINDS = {
    "lm": _HeadKind("lm_head", "text", "last", "token", "tokens", "last", "the next token", token_types=False),
    "mlm": _HeadKind(
        "mlm_head",
        "single",
        "mask",
        "token",
        "tokens",
        "probe",
        "the token at each position",
        no_ig="the tokenizer has no mask token (or the input has no word to mask)",
    ),
    "seq2seq": _HeadKind(
        "decoder_lm_head",
        "single",
        None,
        "",
        "tokens",
        "last",
        "the next target token",
        no_ig=(
            "the shared token embedding feeds both the encoder and the decoder, so one embedding-layer path is "
            "ambiguous"
        ),
    ),
    "classify": _HeadKind("pooled", "pair", "last", "class", "classes"),
    "tag": _HeadKind("per_token", "single", None, "", "labels", None, "the tag"),
    "qa": _HeadKind(
        "per_token",
        "pair",
        None,
        "",
        "",
        no_lens="a QA head's start/end logits are not a vocabulary to read layer by layer",
    ),
}


def _kind(config) -> str:
    """What is explained: "lm" (next token), "mlm" (a masked token), "seq2seq" (the decoder's next
    target token), or the task head's (``config.task``)."""
    if config.arch == "seq2seq":
        return "seq2seq"
    return config.task or ("lm" if config.arch == "decoder" else "mlm")


def _class_scores(logits: Tensor, problem_type: str, log: bool = False) -> Tensor:
    """A classifier's per-label scores: softmax probabilities (single label), per-label sigmoid
    (multi-label) or the raw output (regression); their logs with ``log``."""
    if problem_type == "single":
        return logits.log_softmax(-1) if log else logits.softmax(-1)
    if problem_type == "multi":
        return F.logsigmoid(logits) if log else logits.sigmoid()
    return logits


def _layer_head(model: nn.Module, kind: str) -> Callable[[Tensor], Tensor]:
    """The model's own final norm + output head, to apply to any layer's residual stream (B, T, n_embd)."""
    from lmlab.model.heads import last_token

    readout = HEAD_KINDS[kind].readout
    if readout == "decoder_lm_head":
        return lambda h: model.lm_head(model.dec_norm_f(h))
    norm = model.norm_f
    if readout == "lm_head":
        return lambda h: model.lm_head(norm(h))
    if readout == "mlm_head":
        return lambda h: model.mlm_logits(norm(h))
    if readout == "pooled":
        pool = model.pool if model.config.arch == "encoder" else (lambda h: last_token(h, None))
        return lambda h: model.task_head(pool(norm(h)))  # (B, num_labels)
    return lambda h: model.task_head(norm(h))  # per token: (B, T, num_labels)


@torch.no_grad()
def layer_logits(model: nn.Module, input_ids: Tensor, *, token_type_ids: Tensor | None = None) -> Tensor:
    """The logit lens of one input (1, T) to a decoder or encoder: the model's head applied to the
    residual stream before the first block and after each — (n_layer + 1, T, vocab) for an LM or MLM
    head, (n_layer + 1, T, num_labels) for a tagger, (n_layer + 1, num_labels) for a classifier."""
    _, hidden = _trace(_blocks(model), _backbone(model, input_ids, token_type_ids, None))
    head = _layer_head(model, _kind(model.config))
    return torch.stack([head(h)[0].float() for h in hidden])


# -- the input ---------------------------------------------------------------------------------


@dataclass
class _Probe:
    ids: Tensor  # (1, T) what the model reads (the encoder's source for an encoder–decoder)
    types: Tensor | None  # (1, T) token type ids (encoders), None elsewhere
    tokens: list[str]  # each id as text, for the pictures
    query: int | None  # the position whose prediction is explained (LM: the last; MLM: the [MASK]); None: none
    source: str  # where the text came from, for the method text
    truncated: bool


def _token_text(tokenizer, token_id: int) -> str:
    """A token as a short label: its decoded text, or its vocabulary entry when that is blank or unprintable."""
    text = tokenizer.decode([token_id]).replace("\n", "⏎").strip()
    if not text or not text.isprintable():
        text = tokenizer.id_to_token(token_id) or str(token_id)
    return text if len(text) <= 10 else text[:9] + "…"


def _first_example(subject: Subject) -> tuple[str, str | None] | None:
    """The first example of the labelled test file: (text, second text or None)."""
    from lmlab.tasks import TASKS

    task = TASKS.get(subject.task)
    examples = task.text_examples(subject.data, subject.task_fields) if task is not None else []
    return (examples[0].text, examples[0].pair) if examples else None


def _input_text(subject: Subject, text: str | None) -> tuple[str, str | None, str]:
    from lmlab.data.corpus import iter_documents

    if text is not None:
        if not text.strip():
            raise LmlabError("interpret: text is empty; give at least one word")
        return text, None, "the text given"
    if subject.data is not None and subject.task:
        example = _first_example(subject)
        if example is not None:
            return example[0], example[1], f"the first example of {subject.data}"
    if subject.text is not None:
        for document in iter_documents(subject.text, text_field=subject.fields.get("text_field", "text")):
            line = next((line for line in document.splitlines() if line.strip()), None)
            if line is not None:
                return line, None, f"the first line of {subject.text}"
    return BUILTIN_TEXT, None, "a built-in sentence"


def _probe(subject: Subject, text: str | None) -> _Probe:
    from lmlab.data.tasks import ClassifyData, encode_classify, encode_sources

    tok, config = subject.tokenizer, subject.config
    head = HEAD_KINDS[_kind(config)]
    first, pair, source = _input_text(subject, text)
    types = None
    if head.encode == "text":
        full = tok.encode(first)
        ids = full[:MAX_TOKENS]
    elif head.encode == "pair":
        # as fine-tuning encodes them (post-processor, pairs cut longest-first); the label is a placeholder
        data = ClassifyData(
            texts=[first], labels=[0.0], kind="regression", label_names=[], pairs=[pair] if pair is not None else None
        )
        full = encode_classify(tok, data, config.block_size)["input_ids"][0]
        encoded = encode_classify(tok, data, MAX_TOKENS)
        ids, types = encoded["input_ids"][0], encoded["token_type_ids"][0]
    else:  # one text through the post-processor (mlm, tag, seq2seq), special tokens kept when cut
        full = encode_sources(tok, [first])[0]
        ids = encode_sources(tok, [first], MAX_TOKENS)[0]
    if not ids:
        raise LmlabError(f"interpret: {source} encodes to no tokens; give a text with at least one word")
    query = len(ids) - 1 if head.query == "last" else None
    if head.query == "mask" and tok.mask_id is not None:
        special = {tok.token_to_id(t) for t in tok.special_tokens.values()}
        content = [i for i, t in enumerate(ids) if t not in special]
        if content:
            query = content[-1]
            ids = ids[:query] + [tok.mask_id] + ids[query + 1 :]  # hide the last word piece: what the MLM head restores
    segments = (
        types is not None and config.arch == "encoder" and config.type_vocab_size > 0
    )  # only encoders embed segments
    return _Probe(
        torch.tensor([ids], device=subject.device),
        torch.tensor([types], device=subject.device) if segments else None,
        [_token_text(tok, t) for t in ids],
        query,
        source,
        len(full) > len(ids),
    )


def _resolve_target(subject: Subject, kind: str, target: int | str | None) -> int | None:
    """The class or token id ``target`` names (None: the model's own prediction)."""
    if target is None:
        return None
    config, tok = subject.config, subject.tokenizer
    if HEAD_KINDS[kind].explains == "class":
        names = list(config.labels)
        if isinstance(target, str):
            if target not in names:
                raise LmlabError(f"interpret: target label {target!r} is not one of the model's labels {names}")
            return names.index(target)
        if not 0 <= target < config.num_labels:
            raise LmlabError(
                f"interpret: target label id {target} is out of range: expected 0..{config.num_labels - 1}"
            )
        return int(target)
    if HEAD_KINDS[kind].explains != "token":
        raise LmlabError(f"interpret: target applies to language models and classifiers, not to a {kind!r} model")
    if isinstance(target, str):
        token_id = tok.token_to_id(target)
        if token_id is None:
            ids = tok.encode(target)
            if len(ids) != 1:
                raise LmlabError(f"interpret: target {target!r} is {len(ids)} tokens; give one token (its text or id)")
            token_id = ids[0]
        return token_id
    if not 0 <= target < config.vocab_size:
        raise LmlabError(f"interpret: target token id {target} is out of range: expected 0..{config.vocab_size - 1}")
    return int(target)


def _check_layers(layers: Sequence[int] | None, n_layer: int) -> list[int]:
    if layers is None:
        if n_layer <= MAX_LAYERS_SHOWN:
            return list(range(n_layer))
        return sorted({round(i * (n_layer - 1) / (MAX_LAYERS_SHOWN - 1)) for i in range(MAX_LAYERS_SHOWN)})
    chosen = list(layers)
    bad = [
        layer for layer in chosen if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layer
    ]
    if bad or not chosen:
        raise LmlabError(f"interpret: layers={list(layers)!r}: expected layer indices in 0..{n_layer - 1}")
    return chosen


# -- the lens ------------------------------------------------------------------------------------


def interpret(
    subject: Subject,
    *,
    text: str | None = None,
    target: int | str | None = None,
    layers: Sequence[int] | None = None,
    ig_steps: int = 32,
    progress: bool = False,
) -> Section:
    """Attention maps with per-head entropy, integrated-gradients token attributions and the logit
    (or classifier) lens for one input: ``text``, else the first example of ``subject.data``, the
    first line of ``subject.text``, or a built-in sentence (cut to its first 24 tokens). ``target``
    is the token (LMs) or label (classifiers) to explain instead of the model's top prediction;
    ``layers`` are the attention layers to draw (default: all, or 6 spread over a deeper model).

    Args:
        subject: the model and its data
        text: the text to explain (default: the first test example, or a built-in sentence)
        target: the token or label to explain (default: the top prediction)
        layers: the attention layers to draw
        ig_steps: integrated-gradients steps
        progress: show progress
    """
    del progress  # every part is one forward (or ig_steps interpolated ones) on a ≤ 24-token input: no bar
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 2:
        raise LmlabError(f"interpret: ig_steps={ig_steps!r}: expected an integer >= 2")
    model, config = subject.model, subject.config
    kind = _kind(config)
    fresh = random_lm_head(subject)
    if fresh and HEAD_KINDS[kind].readout in ("mlm_head", "lm_head"):
        return skipped(
            "interpret",
            TITLE,
            f"its attributions and logit lens read the model's language-modelling head, and "
            f"{subject.path} has none (lmlab initialised {', '.join(fresh)} at random)",
        )
    target_id = _resolve_target(subject, kind, target)
    probe = _probe(subject, text)
    shown = _check_layers(layers, config.n_layer)
    section = Section(lens="interpret", title=TITLE)
    section.metrics.update(input_tokens=len(probe.tokens), input_truncated=probe.truncated)
    section.explain.update(
        input_tokens="Tokens of the input all three parts read.",
        input_truncated=f"Whether the input was cut to its first {MAX_TOKENS} tokens so the pictures stay readable.",
    )
    if probe.truncated:
        section.findings.append(
            Finding("info", f"The input was cut to its first {MAX_TOKENS} tokens ({probe.source}).")
        )

    probs, hidden = _trace(_blocks(model), _backbone(model, probe.ids, probe.types, None))
    notes = [_attention_part(section, probs, probe, shown, causal=config.arch == "decoder")]
    if config.arch == "seq2seq":
        hidden, lens_tokens = _seq2seq_decoder_states(subject, probe)
    else:
        lens_tokens = probe.tokens
    head, readout = HEAD_KINDS[kind], _layer_head(model, kind)
    with torch.no_grad():
        logits = [readout(h)[0].float() for h in hidden]  # per layer: (T, V | labels) or (labels,)
    final = logits[-1]
    if head.explains and probe.query is not None:
        predicted = int((final if final.dim() == 1 else final[probe.query]).argmax())
        notes.append(
            _ig_part(section, subject, probe, kind, target_id if target_id is not None else predicted, ig_steps)
        )
    else:
        why = head.no_ig or f"a {kind!r} head predicts many outputs at once"
        notes.append(f"Integrated gradients were not run: {why}.")
    if head.lens == "classes":
        notes.append(_classifier_lens_part(section, subject, logits))
    elif not head.lens:
        notes.append(f"The logit lens was not run: {head.no_lens}.")
    else:
        query = {"probe": probe.query, "last": len(lens_tokens) - 1, None: None}[head.lens_query]
        notes.append(_logit_lens_part(section, subject, logits, lens_tokens, kind, query))
    section.method = (
        f"Input: {probe.source} ({len(probe.tokens)} tokens{', cut' if probe.truncated else ''}). " + " ".join(notes)
    )
    return section


def _attention_figure(probs: list[Tensor], probe: _Probe, shown: list[int], normalised: Tensor) -> Figure:
    n_layer, n_head = len(probs), probs[0].shape[1]
    heads_shown = list(range(min(n_head, MAX_HEADS_SHOWN)))
    fig, _ = new_figure(1.7 * len(heads_shown) + 0.8, 1.7 * len(shown) + 0.6)
    fig.clf()
    grid = fig.subplots(len(shown), len(heads_shown), squeeze=False)
    T = len(probe.tokens)
    for r, layer in enumerate(shown):
        for c, h in enumerate(heads_shown):
            ax = grid[r][c]
            ax.imshow(probs[layer][0, h].cpu().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"layer {layer} head {h}  H={normalised[layer, h]:.2f}", fontsize=5)
            ax.set_xticks(range(T), probe.tokens if r == len(shown) - 1 else [""] * T, rotation=90, fontsize=4)
            ax.set_yticks(range(T), probe.tokens if c == 0 else [""] * T, fontsize=4)
    caption = (
        "Each panel is one head: row = the query token, column = the key it attends to, brightness = the "
        "attention probability (0 to 1). H is the head's normalised entropy (0 = one key, 1 = uniform)."
    )
    if len(shown) < n_layer or len(heads_shown) < n_head:
        caption += (
            f" Shown: layers {shown} of {n_layer}, heads 0–{len(heads_shown) - 1} of {n_head}; the table has every "
            "head."
        )
    return Figure("Attention per layer and head", figure_png(fig), caption)


def _attention_explain() -> dict[str, str]:
    return dict(
        attention_entropy_per_layer=(
            "Mean attention entropy −Σ p·log p (nats) of each layer's heads, averaged over query tokens: lower is more "
            "focused."
        ),
        attention_entropy_normalised_per_layer=(
            "The same divided by log(number of visible keys): 0 = every query looks at one token, 1 = it spreads "
            "evenly over all it may see."
        ),
        attention_sharp_heads=(
            f"Heads whose normalised entropy is below {SHARP}: each query attends almost entirely to one token (e.g. "
            "previous-token or first-token heads)."
        ),
        attention_uniform_heads=(
            f"Heads whose normalised entropy is above {UNIFORM}: nearly uniform attention, an average over the context."
        ),
    )


def _attention_finding(sharp: int, uniform: int, total: int) -> Finding:
    if uniform == total:
        return Finding(
            "warn",
            f"All {total} heads attend almost uniformly (normalised entropy > {UNIFORM}): typical of an untrained "
            "or barely trained model.",
        )
    return Finding(
        "info",
        f"{sharp} of {total} heads are sharp (normalised entropy < {SHARP}) and {uniform} nearly uniform (> "
        f"{UNIFORM}) on this input.",
    )


def _attention_part(section: Section, probs: list[Tensor], probe: _Probe, shown: list[int], causal: bool) -> str:
    n_layer, n_head = len(probs), probs[0].shape[1]
    nats, normalised = _entropies(probs, causal)
    section.figures.append(_attention_figure(probs, probe, shown, normalised))
    section.tables.append(
        Table(
            "Attention entropy per head",
            ["layer", "head", "entropy (nats)", "normalised entropy"],
            [
                [layer, h, round(float(nats[layer, h]), 4), round(float(normalised[layer, h]), 4)]
                for layer in range(n_layer)
                for h in range(n_head)
            ],
            "Mean over query positions; normalised by log(number of keys the query may see), over queries that see at "
            "least two.",
        )
    )
    sharp = int((normalised < SHARP).sum())
    uniform = int((normalised > UNIFORM).sum())
    section.metrics.update(
        attention_entropy_per_layer=[round(float(v), 4) for v in nats.mean(-1)],
        attention_entropy_normalised_per_layer=[round(float(v), 4) for v in normalised.mean(-1)],
        attention_sharp_heads=sharp,
        attention_uniform_heads=uniform,
    )
    section.explain.update(_attention_explain())
    section.findings.append(_attention_finding(sharp, uniform, n_layer * n_head))
    return (
        "Attention maps were recomputed from each attention module's own query/key projections, RoPE and "
        "mask (softmax(QKᵀ/√d_k)), captured by forward hooks because the fused SDPA kernel returns no weights; "
        "per-head entropy follows Clark et al. (2019). Attention shows what is mixed, not why the output is what it is "
        "(Jain & Wallace, 2019)."
    )


def _ig_forward(subject: Subject, probe: _Probe, kind: str, target: int) -> tuple[Callable[[Tensor], Tensor], str, str]:
    """F, the scalar the attributions explain, with the target's label and a description of F."""
    model, tok, config = subject.model, subject.tokenizer, subject.config
    types, query, head = probe.types, probe.query, HEAD_KINDS[kind]
    if head.explains == "class":

        def forward(ids: Tensor) -> Tensor:
            t = types.expand(ids.shape[0], -1) if types is not None else None
            return _class_scores(model.task_logits(ids, t, None).float(), config.problem_type, log=True)[:, target]

        regression = config.problem_type == "regression"
        label = "output" if regression else (config.labels[target] if config.labels else str(target))
        what = "the output" if regression else f"log p(label {label!r})"
    else:

        def forward(ids: Tensor) -> Tensor:
            logits = (
                model(ids, types.expand(ids.shape[0], -1) if types is not None else None)
                if head.token_types
                else model(ids)
            )
            return logits[:, query].float().log_softmax(-1)[:, target]

        label = _token_text(tok, target)
        what = f"log p({label!r})" + (" at the masked position" if head.query == "mask" else " as the next token")
    return forward, label, what


def _ig_explain(what: str, base_name: str) -> dict[str, str]:
    return dict(
        ig_target="What the attributions explain: the model's own prediction unless a target was given.",
        ig_f_input=f"F(input): {what} for the input.",
        ig_f_baseline=f"F(baseline): the same with every non-special token replaced by the {base_name} token.",
        ig_attribution_sum="Σ of the per-token attributions; completeness says it equals F(input) − F(baseline).",
        ig_convergence_delta="Σ attributions − (F(input) − F(baseline)): the error of the numerical integral.",
        ig_relative_delta=(
            f"|convergence delta| / |Σ attributions|; above {RELATIVE_DELTA:.0%} the attributions are not to be "
            "trusted (raise ig_steps)."
        ),
        ig_top_token="The input token with the largest (most positive) attribution.",
    )


def _ig_table(probe: _Probe, attributions: Tensor, share: Tensor) -> Table:
    return Table(
        "Integrated-gradients attribution per token",
        ["position", "token", "attribution", "share of |attribution|"],
        [
            [i, t, round(float(a), 6), round(float(s), 4)]
            for i, (t, a, s) in enumerate(zip(probe.tokens, attributions, share))
        ],
        "Positive: the token pushes F up (towards the target); negative: away from it.",
    )


def _ig_figure(probe: _Probe, attributions: Tensor, what: str, total: float, delta: float) -> Figure:
    fig, ax = new_figure(6.4, max(2.5, 0.22 * len(probe.tokens) + 1))
    values = attributions.numpy()
    ax.barh(range(len(values)), values, color=["#2a9d8f" if v >= 0 else "#e76f51" for v in values])
    ax.set_yticks(range(len(values)), probe.tokens, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"attribution to {what}")
    return Figure(
        "Token attributions (integrated gradients)",
        figure_png(fig),
        f"How much each input token moves {what} from its value at the baseline (green: towards, red: away); the "
        "bars sum to "
        f"{total:.4f} = F(input) − F(baseline) up to the convergence delta {delta:.2g}.",
    )


def _ig_finding(
    probe: _Probe, attributions: Tensor, share: Tensor, top: int, what: str, relative: float, steps: int
) -> Finding:
    level = "warn" if relative > RELATIVE_DELTA else "info"
    text = (
        f"The token {probe.tokens[top]!r} gets the largest attribution ({float(attributions[top]):.4f}, "
        f"{float(share[top]):.0%} of the total magnitude) to {what}"
    )
    if relative > RELATIVE_DELTA:
        text += (
            f"; but the convergence delta is {relative:.1%} of the attribution sum (over {RELATIVE_DELTA:.0%}): raise "
            f"ig_steps above {steps}"
        )
    return Finding(level, text + ".")


def _ig_part(section: Section, subject: Subject, probe: _Probe, kind: str, target: int, steps: int) -> str:
    model, tok = subject.model, subject.tokenizer
    forward, label, what = _ig_forward(subject, probe, kind, target)
    special = {tok.token_to_id(t) for t in tok.special_tokens.values()}
    candidates = ((tok.mask_id, "mask"), (tok.pad_id, "pad"), (tok.eos_id, "end-of-text"))
    base_id, base_name = next(((i, n) for i, n in candidates if i is not None), (0, "id 0"))
    baseline = probe.ids.clone()
    keep = torch.tensor([[t in special for t in probe.ids[0].tolist()]], device=probe.ids.device)
    baseline[~keep] = base_id  # special tokens stay: the path changes only the words
    attributions, delta = integrated_gradients(model, forward, probe.ids, baseline, steps)
    with torch.no_grad():
        f_input, f_baseline = float(forward(probe.ids)), float(forward(baseline))
    total = float(attributions.sum())
    relative = abs(delta) / max(abs(total), 1e-12)
    top = int(attributions.argmax())
    share = attributions.abs() / max(float(attributions.abs().sum()), 1e-12)
    section.metrics.update(
        ig_target=label,
        ig_f_input=round(f_input, 6),
        ig_f_baseline=round(f_baseline, 6),
        ig_attribution_sum=round(total, 6),
        ig_convergence_delta=delta,
        ig_relative_delta=relative,
        ig_top_token=probe.tokens[top],
    )
    section.explain.update(_ig_explain(what, base_name))
    section.tables.append(_ig_table(probe, attributions, share))
    section.figures.append(_ig_figure(probe, attributions, what, total, delta))
    section.findings.append(_ig_finding(probe, attributions, share, top, what, relative, steps))
    return (
        "Integrated gradients (Sundararajan et al., 2017) with captum's LayerIntegratedGradients (Kokhlikyan et al., "
        "2020) on the token "
        f"embedding layer, {steps} steps, F = {what}; baseline: every non-special token replaced by the {base_name} "
        "token "
        "(special tokens kept), so position embeddings are the same along the path. A relative convergence delta "
        "above "
        f"{RELATIVE_DELTA:.0%} is flagged."
    )


def _seq2seq_decoder_states(subject: Subject, probe: _Probe) -> tuple[list[Tensor], list[str]]:
    """An encoder–decoder's decoder residual stream along its own greedy target (up to 8 tokens)."""
    model, tok = subject.model, subject.tokenizer
    with torch.no_grad():
        memory = model.encode(probe.ids)
        target = [model.config.decoder_start_token_id]
        for _ in range(MAX_TARGET):
            target.append(int(model.decode(torch.tensor([target], device=probe.ids.device), memory)[0, -1].argmax()))
            if target[-1] == tok.eos_id:
                break
    decoder_ids = torch.tensor([target[:-1]], device=probe.ids.device)
    _, hidden = _trace(_blocks(model, decoder=True), lambda: model.decode(decoder_ids, memory))
    return hidden, [_token_text(tok, t) for t in target[:-1]]


def _first_stable(values: list[bool]) -> int:
    """The first index from which every value is True (len(values) when the last is False)."""
    index = len(values)
    while index > 0 and values[index - 1]:
        index -= 1
    return index


def _logit_lens_figure(
    top_p: Tensor, top_id: Tensor, tokens: list[str], rows: list[str], names: Callable[[int], str], what: str
) -> Figure:
    fig, ax = new_figure(max(6.4, 0.42 * len(tokens) + 2), max(2.8, 0.32 * len(rows) + 1.4))
    image = ax.imshow(top_p.numpy(), vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto")
    for layer in range(len(rows)):
        for t in range(len(tokens)):
            ax.text(
                t,
                layer,
                names(int(top_id[layer, t])),
                ha="center",
                va="center",
                fontsize=5.5,
                color="white" if top_p[layer, t] > 0.6 else "black",
            )
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    ax.set_ylabel("residual stream after block")
    fig.colorbar(image, ax=ax, label="top-1 probability", fraction=0.03, pad=0.01)
    return Figure(
        "Logit lens",
        figure_png(fig),
        f"Each cell: the top-1 prediction of {what} when the model's final norm and output head are applied to the "
        "residual stream "
        "after that block ('emb': before the first block), shaded by its probability. The last row is the model's "
        "own output.",
    )


def _logit_lens_explain(where: str) -> dict[str, str]:
    return dict(
        logit_lens_final_token=f"The model's final top-1 prediction {where}.",
        logit_lens_rank_per_layer=(
            f"Its rank (1 = top) in each layer's logit-lens distribution {where}, embeddings first."
        ),
        logit_lens_prob_per_layer=f"Its probability in each layer's logit-lens distribution {where}.",
        logit_lens_first_top1_layer=(
            "The first layer (0 = the embeddings) from which it stays the top-1 prediction through the last layer."
        ),
    )


def _logit_lens_part(
    section: Section, subject: Subject, logits: list[Tensor], tokens: list[str], kind: str, query: int | None
) -> str:
    tok, config = subject.tokenizer, subject.config
    stacked = torch.stack(logits).cpu()  # (n_layer + 1, T, V)
    probs = stacked.softmax(-1)
    top_p, top_id = probs.max(-1)  # (n_layer + 1, T)
    head = HEAD_KINDS[kind]
    names = (lambda i: config.labels[i]) if head.lens == "labels" else (lambda i: _token_text(tok, i))
    rows = ["emb"] + [str(i + 1) for i in range(len(logits) - 1)]
    section.figures.append(_logit_lens_figure(top_p, top_id, tokens, rows, names, head.predicts))
    agreement = (top_id == top_id[-1]).float().mean(-1)
    section.metrics["logit_lens_agreement_per_layer"] = [round(float(a), 4) for a in agreement]
    section.explain["logit_lens_agreement_per_layer"] = (
        "Per layer (embeddings first), the fraction of positions whose top-1 prediction already equals the final "
        "layer's."
    )
    if query is None:
        return (
            "The logit lens (nostalgebraist, 2020) applied the model's final norm and head to every layer's residual "
            "stream."
        )
    final = int(top_id[-1, query])
    rank = [int((stacked[layer, query] > stacked[layer, query, final]).sum()) + 1 for layer in range(len(rows))]
    first = _first_stable([r == 1 for r in rank])
    section.metrics.update(
        logit_lens_final_token=names(final),
        logit_lens_rank_per_layer=rank,
        logit_lens_prob_per_layer=[round(float(probs[layer, query, final]), 6) for layer in range(len(rows))],
        logit_lens_first_top1_layer=first,
    )
    where = "at the masked position" if head.lens_query == "probe" else "at the last position"
    section.explain.update(_logit_lens_explain(where))
    section.findings.append(
        Finding(
            "info",
            f"The final prediction {names(final)!r} {where} becomes and stays the logit lens's top-1 at layer {first} "
            f"of {len(rows) - 1} "
            f"(its probability goes from {float(probs[0, query, final]):.3f} at the embeddings to "
            f"{float(probs[-1, query, final]):.3f}).",
        )
    )
    return (
        "The logit lens (nostalgebraist, 2020) applied the model's final norm and output head to the residual stream "
        "before the first "
        "block and after each; early layers were not trained to be read this way (Belrose et al., 2023, the tuned "
        "lens)."
    )


def _classifier_lens_part(section: Section, subject: Subject, logits: list[Tensor]) -> str:
    config = subject.config
    scores = _class_scores(torch.stack(logits).cpu(), config.problem_type)  # (n_layer + 1, num_labels)
    regression = config.problem_type == "regression"
    final = 0 if regression else int(logits[-1].argmax())
    label = "output" if regression else (config.labels[final] if config.labels else str(final))
    curve = [round(float(v), 6) for v in scores[:, final]]
    first = _first_stable([int(row.argmax()) == final for row in scores]) if not regression else None
    rows = ["emb"] + [str(i + 1) for i in range(len(logits) - 1)]
    fig, ax = new_figure()
    ax.plot(range(len(rows)), curve, marker="o")
    ax.set_xticks(range(len(rows)), rows)
    ax.set_xlabel("residual stream after block")
    ax.set_ylabel("regression output" if regression else f"p({label})")
    if not regression:
        ax.set_ylim(0, 1)
    section.figures.append(
        Figure(
            "Classifier lens",
            figure_png(fig),
            f"The task head applied to every layer's {'pooled' if config.arch == 'encoder' else 'last-token'} state: "
            f"{'its output' if regression else f'the probability of the final label {label!r}'} by layer; the last "
            "point is the model's own.",
        )
    )
    section.metrics["classifier_lens_per_layer"] = curve
    section.explain["classifier_lens_per_layer"] = (
        "The task head's output at each layer (embeddings first)."
        if regression
        else f"The probability of the final predicted label {label!r} when the task head reads each layer "
        "(embeddings first)."
    )
    if first is not None:
        section.metrics["classifier_lens_first_layer"] = first
        section.explain["classifier_lens_first_layer"] = (
            "The first layer (0 = the embeddings) from which the final label stays the top one."
        )
        section.findings.append(
            Finding(
                "info",
                f"The final label {label!r} becomes and stays the top label at layer {first} of {len(rows) - 1}.",
            )
        )
    return (
        "A classifier lens, the logit lens (nostalgebraist, 2020) over the task head: the final norm, pooling and task "
        "head applied to each "
        "layer's residual stream."
    )
