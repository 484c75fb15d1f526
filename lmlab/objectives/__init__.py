"""Training objectives: small objects that turn a batch into a loss (STYLE habit 6).

The one training loop calls ``objective.loss(model, batch)`` and never knows which objective it
runs; a new pretraining objective (mlm, nsp, span, …) is a new class here, a fine-tuning task's objective
lives with its task in :mod:`lmlab.tasks` — neither copies the loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.model.seq2seq import shift_right
from lmlab.objectives.losses import (
    IGNORE_INDEX,
    lm_loss,
    unwrap_model,
)  # IGNORE_INDEX (-100): labels that add no loss, as in HF


class Objective(Protocol):
    name: str
    arch: str  # the model family it trains: "decoder", "encoder" or "seq2seq"

    def batch(self, tokens: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Turn a (B, seq_len + 1) window of packed tokens into model inputs and labels; any randomness
        (masks, pairs) comes from ``generator``, which the loop seeds by the batch's position."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Mean loss over the batch's labelled tokens (a scalar tensor)."""


class CausalLM:
    """Autoregressive language modelling: maximise log P(x_t | x_<t), i.e. next-token cross-entropy.

    ``ce_chunk_size`` (the loop sets it from ``TrainConfig.ce_chunk_size``) chooses the cross-entropy's
    chunking: None chunks large vocabularies, 0 never, n: n tokens per chunk (:mod:`lmlab.objectives.losses`)."""

    name, arch = "clm", "decoder"
    ce_chunk_size: int | None = None

    def __init__(self, tokenizer=None) -> None:
        pass

    def batch(self, tokens: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}  # targets: the input shifted by one

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        # logits (B, T, vocab_size), or — chunked for a large vocabulary — hidden states and lmlab.objectives.losses
        return lm_loss(
            model,
            batch["labels"],
            lambda hidden_only: model(batch["input_ids"], hidden_only=hidden_only),
            self.ce_chunk_size,
        )


class MaskedLM:
    """BERT's masked language model (Devlin et al., 2019), optionally with next-sentence prediction.

    Each window becomes ``[CLS] x [SEP]`` (or, with NSP, ``[CLS] A [SEP] B [SEP]`` where B follows A
    in half the rows and comes from another window in the rest, label 1). ``mask_prob`` of the
    non-special tokens are chosen — whole words with ``whole_word`` — and of those 80% become
    ``[MASK]``, 10% a random token and 10% stay, so the model cannot rely on seeing ``[MASK]``. The
    loss is cross-entropy on the chosen tokens only (plus the NSP cross-entropy). Masks are drawn
    anew for every batch (dynamic masking, as RoBERTa), from the loop's seeded generator.
    """

    arch = "encoder"

    def __init__(self, tokenizer, *, nsp: bool = False, mask_prob: float = 0.15, whole_word: bool = False) -> None:
        if tokenizer is None:
            raise LmlabError("the mlm objective needs the tokenizer (its [MASK], [CLS] and [SEP] tokens)")
        for role in ("mask", "bos", "eos"):
            if getattr(tokenizer, f"{role}_id") is None:
                raise LmlabError(
                    f"objective mlm needs a tokenizer with a {role} token ([MASK], [CLS], [SEP]); "
                    "train one with `lmlab tokenizer train --kind wordpiece`",
                    params="objective",
                )
        if not 0.0 < mask_prob < 1.0:
            raise LmlabError(f"mask_prob is {mask_prob}: expected a number in (0, 1)")
        self.name = "mlm+nsp" if nsp else "mlm"
        self.nsp, self.mask_prob, self.whole_word = nsp, mask_prob, whole_word
        self.mask_id, self.cls_id, self.sep_id = tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id
        self.vocab_size = tokenizer.vocab_size
        self.special = torch.zeros(self.vocab_size, dtype=torch.bool)  # added tokens: [CLS], [SEP], [MASK], …
        self.special[list(tokenizer.backend.get_added_tokens_decoder())] = True
        # a token continues a word when WordPiece marks it "##" (byte-level BPE: when it lacks the "Ġ" space)
        vocab = tokenizer.backend.get_vocab()
        byte_level = any(t.startswith("Ġ") for t in vocab)
        self.continues = torch.zeros(self.vocab_size, dtype=torch.bool)
        for token, i in vocab.items():
            if i < self.vocab_size and not self.special[i]:
                self.continues[i] = token.startswith("##") or (byte_level and not token.startswith("Ġ"))

    def _pairs(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """[CLS] A [SEP] B [SEP] rows, their segment ids, and NSP labels (0: B follows A, 1: random)."""
        B, T = x.shape
        budget = T - 3
        ids = torch.empty(B, T, dtype=x.dtype)
        types = torch.zeros(B, T, dtype=torch.long)
        cut = torch.randint(1, budget, (B,), generator=generator).tolist()
        random_next = torch.rand(B, generator=generator) < 0.5
        others = torch.roll(x, shifts=1, dims=0)  # another random window of the corpus
        for row in range(B):
            a = cut[row]
            first, second = x[row, :a], (others[row] if random_next[row] and B > 1 else x[row])[a:budget]
            ids[row] = torch.cat(
                [x.new_tensor([self.cls_id]), first, x.new_tensor([self.sep_id]), second, x.new_tensor([self.sep_id])]
            )
            types[row, a + 2 :] = 1
        return ids, types, (random_next & (B > 1)).long()

    def batch(self, tokens: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x = tokens[:, :-1].long()
        B, T = x.shape
        out: dict[str, Tensor] = {}
        if self.nsp:
            ids, types, out["nsp_labels"] = self._pairs(x, generator)
            out["token_type_ids"] = types
        else:
            cls = x.new_full((B, 1), self.cls_id)
            sep = x.new_full((B, 1), self.sep_id)
            ids = torch.cat([cls, x[:, : T - 2], sep], dim=1)
        maskable = ~self.special[ids]
        draw = torch.rand(ids.shape, generator=generator)
        if self.whole_word:  # a word is chosen as one: every token reads its first token's draw
            starts = ~self.continues[ids]
            first = torch.where(starts, torch.arange(T).expand(B, T), torch.zeros_like(ids)).cummax(dim=1).values
            draw = draw.gather(1, first)
        chosen = maskable & (draw < self.mask_prob)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        how = torch.rand(ids.shape, generator=generator)
        random_tokens = torch.randint(0, self.vocab_size, ids.shape, generator=generator)
        random_tokens = torch.where(self.special[random_tokens], ids, random_tokens)  # never a special token
        inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, self.mask_id), ids)
        inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_tokens, inputs)
        # the chosen positions, flat: the loss gathers them with a shape known from the batch alone (a boolean
        # mask's would depend on its values, which the memory estimate's fake tensors do not have)
        out.update(input_ids=inputs, labels=labels, mlm_positions=chosen.flatten().nonzero().squeeze(1))
        return out

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        hidden = model.encode(batch["input_ids"], batch.get("token_type_ids"))
        positions = batch.get("mlm_positions")
        if positions is None:
            positions = (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        # only the chosen positions: the vocabulary matmul is the big one
        logits = model.mlm_logits(hidden.flatten(0, 1)[positions])
        loss = (
            F.cross_entropy(logits.float(), batch["labels"].flatten()[positions])
            if logits.shape[0]
            else hidden.sum() * 0.0
        )
        if self.nsp:
            loss = loss + F.cross_entropy(model.nsp_logits(hidden).float(), batch["nsp_labels"])
        return loss


class SpanCorruption:
    """T5's span corruption (Raffel et al., 2020, §3.1.4), the seq2seq denoising objective.

    In each window, ``noise_density`` of the tokens, in spans of mean length ``mean_span_length``,
    are dropped from the input; each dropped span leaves one sentinel in its place, and the target
    lists every sentinel followed by the span it stands for, then eos::

        window:  Thank you for inviting me to your party last week .
        input:   Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
        target:  <extra_id_0> for inviting <extra_id_1> last </s>

    As T5's ``random_spans_noise_mask``: every row has exactly round(n·density) noise tokens in
    round(noise / mean_span_length) spans, span and gap lengths split uniformly at random, the
    window starting with kept text — so inputs and targets have the same length in every row (no
    padding). The window is cut, where needed, so that the input with its sentinels and eos fits in
    the ``seq_len`` tokens the model was told it reads.

    Sentinels are T5's: the tokenizer must hold added tokens ``<extra_id_0>``, ``<extra_id_1>``, …
    (the first span gets ``<extra_id_0>``), as T5's own tokenizer does. lmlab does not take ids from
    the top of an ordinary vocabulary, where they would also stand for real text.
    """

    name, arch = "span", "seq2seq"
    ce_chunk_size: int | None = None  # as CausalLM's

    def __init__(self, tokenizer, *, noise_density: float = 0.15, mean_span_length: float = 3.0) -> None:
        if tokenizer is None:
            raise LmlabError("the span objective needs the tokenizer (its eos and <extra_id_N> sentinel tokens)")
        if tokenizer.eos_id is None:
            raise LmlabError(
                "objective span needs a tokenizer with an eos token (it ends every input and target)",
                params="objective",
            )
        from lmlab.tokenizer import sentinel_token

        added = {t.content: i for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
        sentinels = []
        while sentinel_token(len(sentinels)) in added:
            sentinels.append(added[sentinel_token(len(sentinels))])
        if not sentinels:
            raise LmlabError(
                "objective span needs sentinel tokens <extra_id_0>, <extra_id_1>, … (T5's) among the tokenizer's "
                "added tokens; train one with `lmlab tokenizer train --sentinels 100 …` "
                "(about seq_len·density/mean_span_length of them are used, T5 has 100) or use a T5 tokenizer.json",
                params="objective",
            )
        if not 0.0 < noise_density < 1.0:
            raise LmlabError(f"noise_density is {noise_density}: expected a number in (0, 1)")
        if mean_span_length < 1.0:
            raise LmlabError(f"mean_span_length is {mean_span_length}: expected a number >= 1")
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.sentinels = torch.tensor(sentinels, dtype=torch.long)  # span k -> <extra_id_k>
        self.eos_id = tokenizer.eos_id

    def plan(self, seq_len: int) -> tuple[int, int, int]:
        """(window tokens used n, noise tokens, noise spans) for inputs of at most ``seq_len`` tokens."""
        for n in range(seq_len + 1, 1, -1):  # the window holds seq_len + 1 tokens
            noise = min(max(round(n * self.noise_density), 1), n - 1)
            spans = max(round(noise / self.mean_span_length), 1)
            if n - noise + spans + 1 <= seq_len:  # kept tokens + a sentinel per span + eos
                return n, noise, spans
        raise LmlabError(f"seq_len {seq_len} is too short for span corruption: expected at least 3", params="seq_len")

    def noise_mask(
        self, B: int, n: int, noise: int, spans: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """(is_noise, span_index), both (B, n): which tokens are dropped, and the span each token is in."""
        noise_lengths = _random_segmentation(B, noise, spans, generator)
        kept_lengths = _random_segmentation(B, n - noise, spans, generator)
        lengths = torch.stack([kept_lengths, noise_lengths], dim=2).view(B, 2 * spans)  # kept, noise, kept, noise, …
        starts = lengths.cumsum(dim=1)[:, :-1]  # where every span but the first begins
        span_num = (
            torch.zeros(B, n, dtype=torch.long).scatter_(1, starts, 1).cumsum(dim=1)
        )  # 0 kept, 1 noise, 2 kept, …
        return span_num % 2 == 1, span_num // 2

    def batch(self, tokens: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n, noise, spans = self.plan(tokens.shape[1] - 1)
        if spans > len(self.sentinels):
            raise LmlabError(
                f"span corruption of {n}-token windows makes {spans} spans, but the tokenizer has "
                f"{len(self.sentinels)} "
                f"sentinels (<extra_id_0> … <extra_id_{len(self.sentinels) - 1}>): add more or use a smaller seq_len",
                params="seq_len",
            )
        x = tokens[:, :n].long()
        is_noise, span_index = self.noise_mask(x.shape[0], n, noise, spans, generator)
        return {
            "input_ids": self._collapse(x, is_noise, span_index),  # (B, n - noise + spans + 1)
            "labels": self._collapse(x, ~is_noise, span_index),  # (B, noise + spans + 1)
        }

    def _collapse(self, x: Tensor, drop: Tensor, span_index: Tensor) -> Tensor:
        """Replace every run of ``drop`` tokens by the sentinel of its span; append eos."""
        first = drop & ~F.pad(drop[:, :-1], (1, 0), value=False)  # the first token of each dropped run
        out = torch.where(first, self.sentinels[span_index], x)
        out = out[~drop | first].view(x.shape[0], -1)  # every row keeps the same number of tokens
        return F.pad(out, (0, 1), value=self.eos_id)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        start_id = unwrap_model(model).config.decoder_start_token_id  # DDP keeps the model in .module
        decoder_input = shift_right(batch["labels"], start_id)
        # logits (B, T_target, vocab_size), or chunked: see CausalLM.loss
        return lm_loss(
            model,
            batch["labels"],
            lambda hidden_only: model(batch["input_ids"], decoder_input, hidden_only=hidden_only),
            self.ce_chunk_size,
        )


def _random_segmentation(B: int, n_items: int, n_segments: int, generator: torch.Generator | None) -> Tensor:
    """(B, n_segments) lengths >= 1 summing to ``n_items``, each row a uniformly random composition
    (T5's ``_random_segmentation``): choose n_segments - 1 of the n_items - 1 gaps as boundaries."""
    if n_segments == 1:
        return torch.full((B, 1), n_items, dtype=torch.long)
    boundary = torch.rand(B, n_items - 1, generator=generator).argsort(dim=1) < n_segments - 1
    segment = F.pad(boundary, (1, 0), value=False).long().cumsum(dim=1)  # (B, n_items): each item's segment
    return torch.zeros(B, n_segments, dtype=torch.long).scatter_add_(1, segment, torch.ones_like(segment))


OBJECTIVES: dict[str, Any] = {
    "clm": CausalLM,
    "mlm": MaskedLM,
    "mlm+nsp": lambda tokenizer: MaskedLM(tokenizer, nsp=True),
    "wwm": lambda tokenizer: MaskedLM(tokenizer, whole_word=True),
    "span": SpanCorruption,
}


def get_objective(name: str, tokenizer=None, config=None) -> Objective:
    """The objective called ``name``; with a model ``config``, check that it trains that family."""
    if name not in OBJECTIVES:
        raise LmlabError(f"unknown objective '{name}'; expected one of {', '.join(OBJECTIVES)}", params="objective")
    objective = OBJECTIVES[name](tokenizer)
    if config is not None:
        if config.arch != objective.arch:
            raise LmlabError(
                f"objective {name} trains {objective.arch} models; the model is a {config.arch} "
                f"({config.name or 'custom'})",
                params="objective",
            )
        if name == "mlm+nsp" and not config.nsp_head:
            raise LmlabError(
                f"objective mlm+nsp needs a model with an NSP head; {config.name or 'this model'} has none (use mlm)",
                params="objective",
            )
    return objective


@torch.no_grad()
def evaluate_loss(model: nn.Module, objective: Objective, batches: list[dict[str, Tensor]], autocast) -> Tensor:
    """Mean objective loss over fixed batches, as a tensor (no host sync here)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=batches[0]["input_ids"].device)
    for batch in batches:
        with autocast():
            total += objective.loss(model, batch).float()
    model.train(was_training)
    return total / len(batches)
