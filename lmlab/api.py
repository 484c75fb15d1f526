"""``lmlab.load(path)``: a model and its tokenizer, ready to generate, stream and score — the notebook entry point.

    m = lmlab.load("runs/a")                                # a checkpoint or run folder
    m.generate("Once", max_new_tokens=50)                   # -> str
    m.generate(["a", "b"], strategy="sample", top_p=0.9)    # -> list[str]
    m.generate("Once", strategy="beam", num_beams=4, details=True)   # -> Completion
    for piece in m.stream("Once"): print(piece, end="")
    m.score("The cat", " sat on the mat")                    # -> Score (log-likelihood, perplexity)

Every keyword of ``generate``/``stream`` is a :class:`GenerationConfig` field (or pass ``config=``).
Decoders continue the prompt; an encoder–decoder (``t5-*`` presets) reads the prompt as its source
and generates the target — same calls, same decoding loop (:mod:`lmlab.model.seq2seq`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import torch
from torch import nn

from lmlab.config import read_json_object
from lmlab.device import resolve_device
from lmlab.errors import LmlabError
from lmlab.generate import BeamSearch, GenerationConfig, decode
from lmlab.generate.processors import SuppressIdsFrom
from lmlab.generate.speculative import speculative_decode
from lmlab.generate.stopping import TextStream, cut_at_stop
from lmlab.io.checkpoint import has_tokenizer, load_model, load_tokenizer, resolve_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """One generated sequence, with what a caller may want besides its text."""

    text: str  # the new text only, cut before a stop string; the end-of-text token is not in it
    token_ids: list[int]  # the new tokens (through the one that completed a stop string; no stop token id)
    finish_reason: str  # "stop" (end-of-text, stop id or stop string) or "length"
    tokens: list[str] | None = None  # each new token as text (with ``logprobs``)
    logprobs: list[float] | None = None  # each new token's log-probability under the model
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the n most likely (id, log-prob)
    score: float | None = None  # beam search: the length-penalised score that ranked it


@dataclass
class Decoded:
    """One greedy or sampled row as a decoding loop hands it over: its new tokens (a stop id left out), why it
    ended (``stop`` or ``length``) and, with logprobs, each token's log-probability and most likely alternatives."""

    tokens: list[int] = field(default_factory=list)
    reason: str = "length"
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    emitted: int = 0  # tokens the model chose, a stop id included

    def take(self, event) -> None:
        """A continuous-batching engine's :class:`~lmlab.generate.engine.Event` for this row."""
        self.emitted += 1
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
                self.tops.append(event.top or [])
        if event.finish_reason is not None:
            self.reason = "stop" if event.finish_reason == "stop" else "length"


@dataclass
class Score:
    """How likely the model finds a continuation: ``logprob`` is the sum over its tokens."""

    logprob: float
    num_tokens: int
    token_ids: list[int]
    token_logprobs: list[float]

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.num_tokens)


def folder_eos_ids(path: Path | None, vocab_size: int) -> list[int]:
    """The end-of-sequence ids a model folder's ``generation_config.json`` names (``eos_token_id``: one id,
    or a list such as Llama 3 Instruct's [128001, 128009], as transformers reads it); [] without the
    file or the field. A value that is not an id or a list of ids is a one-line error naming the file and
    the field; an id past the vocabulary (small test models often keep GPT-2's 50256) can never be
    generated, so it is left out with a warning, as transformers runs such a folder."""
    if path is None or not Path(path).is_dir():  # a GGUF file names its eos id in its tokenizer
        return []
    file = Path(path) / "generation_config.json"
    eos = read_json_object(file).get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise LmlabError(f"{file}: eos_token_id is {eos!r}: expected a token id or a list of token ids")
    outside = [i for i in ids if i >= vocab_size]
    if outside:
        logger.warning(
            "%s: eos_token_id %s is past the vocabulary (%d ids) and can never be generated: ignored",
            file,
            ", ".join(map(str, outside)),
            vocab_size,
        )
    return [i for i in ids if i < vocab_size]


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids for the same tokens (what a draft and its target must share)."""
    return a.sha256 == b.sha256 or a.backend.get_vocab(with_added_tokens=True) == b.backend.get_vocab(
        with_added_tokens=True
    )


class LM:
    """A model and its tokenizer. ``generate`` returns text; ``stream`` yields it; ``score`` rates it.

    Generation stops at the tokenizer's end-of-text token and at every ``eos_token_id`` the folder's
    ``generation_config.json`` names (as ``transformers``' ``generate()`` does), unless ``ignore_eos``."""

    def __init__(self, model: nn.Module, tokenizer, path: Path | None = None) -> None:
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path
        eos = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
        self.eos_ids = sorted(eos | set(folder_eos_ids(path, model.config.vocab_size)))  # what ends a generation
        self._drafts: dict[str, LM] = {}  # draft checkpoints, loaded on first use (speculative decoding)
        self.last_speculation = None  # the last speculative generation's SpeculationStats
        self._checked_drafts: list[LM] = []  # drafts whose tokenizer matched this one's

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def __repr__(self) -> str:
        c = self.model.config
        return f"LM({c.name or c.arch}, {self.model.num_params():,} parameters, vocab {c.vocab_size}, path={self.path})"

    # -- preparing a request ---------------------------------------------------------------------

    @staticmethod
    def _config(config: GenerationConfig | None, options: dict) -> GenerationConfig:
        if config is None:
            unknown = set(options) - set(GenerationConfig.__dataclass_fields__)
            if unknown:
                raise LmlabError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
            return GenerationConfig(**options)
        return config.replace(**options) if options else config

    def _stop_ids(self, config: GenerationConfig) -> list[int]:
        vocab = self.model.config.vocab_size
        wrong = [
            i for i in config.stop_token_ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab
        ]
        if wrong:
            raise LmlabError(
                f"stop_token_ids {' '.join(map(str, wrong))}: expected token ids from 0 to {vocab - 1} (this model's "
                "vocabulary)",
                params="stop_token_ids",
            )
        return sorted(set(config.stop_token_ids) | (set() if config.ignore_eos else set(self.eos_ids)))

    def _processors(self, config: GenerationConfig, stop_ids: list[int]):
        """``config``'s processors, plus — when the model's vocabulary is padded past the tokenizer's — one that
        never lets a padding row (an id no text maps to) be chosen."""
        processors = config.processors(stop_ids)
        if self.model.config.vocab_size > self.tokenizer.vocab_size:
            processors.insert(
                0, SuppressIdsFrom(self.tokenizer.vocab_size)
            )  # first: a warper never keeps only padding rows
        return processors

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_id, self.tokenizer.eos_id):
            if candidate is not None:
                return candidate
        return 0

    @property
    def is_seq2seq(self) -> bool:
        return self.model.config.arch == "seq2seq"

    def _need_generator(self) -> None:
        if self.model.config.arch == "encoder":
            raise LmlabError(
                f"{self.path or 'this model'} is an encoder (BERT style): it reads text but does not generate it; "
                "use a decoder or encoder–decoder checkpoint"
            )

    def _encode_prompts(self, prompts: Sequence[str], config: GenerationConfig) -> tuple[list[list[int]], int]:
        """Token ids of the prompts (cut from the left to fit the context window) and the tokens to generate."""
        self._need_generator()
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise LmlabError(f"prompt {i} is {type(p).__name__}: expected a string")
        if self.is_seq2seq:
            return self._encode_sources(prompts, config)
        ids = self.tokenizer.encode_batch(list(prompts))
        for i, row in enumerate(ids):
            if not row:
                raise LmlabError(
                    f"prompt {i} is empty (it encodes to no tokens): give at least one character of prompt"
                )
        return self._fit(ids, config)

    def _fit(self, ids: list[list[int]], config: GenerationConfig) -> tuple[list[list[int]], int]:
        """Decoder prompts cut from the left to leave room for the new tokens, and how many to make."""
        longest = max(len(row) for row in ids)
        new = config.max_new_tokens
        if config.max_length is not None:
            new = min(new, config.max_length - longest)
            if new < 1:
                raise LmlabError(
                    f"max_length {config.max_length} leaves no room after the {longest}-token prompt",
                    params="max_length",
                )
        room = self.block_size - new
        if room < 1:
            raise LmlabError(
                f"max_new_tokens {new} leaves no room for a prompt in the model's context window of "
                f"{self.block_size} tokens",
                params="max_new_tokens",
            )
        if longest > room:
            if config.truncate == "error":
                raise LmlabError(
                    f"a prompt has {longest} tokens; with max_new_tokens {new} the context window of "
                    f"{self.block_size} holds {room} "
                    "(use truncate left to keep its last tokens)",
                    params="max_new_tokens truncate",
                )
            logger.warning(
                "a prompt of %d tokens is cut to its last %d to fit the %d-token context window",
                longest,
                room,
                self.block_size,
            )
            ids = [row[-room:] for row in ids]
        return ids, new

    def _encode_sources(self, sources: Sequence[str], config: GenerationConfig) -> tuple[list[list[int]], int]:
        """An encoder–decoder's source ids (as fine-tuning encodes them) and the target tokens to make:
        the source has the whole context window; the target all of it but the start token."""
        from lmlab.data.tasks import encode_sources

        if any(not s.strip() for s in sources):
            raise LmlabError("a source is empty: give at least one character of text to transform")
        ids = encode_sources(self.tokenizer, sources)
        longest = max(len(row) for row in ids)
        if longest > self.block_size:
            if config.truncate == "error":
                raise LmlabError(
                    f"a source has {longest} tokens; the encoder's context window holds {self.block_size} (use "
                    "truncate to cut it)",
                    params="truncate",
                )
            logger.warning(
                "a source of %d tokens is cut to its first %d, the encoder's context window", longest, self.block_size
            )
            ids = encode_sources(self.tokenizer, sources, self.block_size)
        new = min(config.max_new_tokens, self.block_size - 1)
        if config.max_length is not None:
            new = min(new, config.max_length - 1)  # a target's length counts its start token, as HF's max_length does
            if new < 1:
                raise LmlabError(
                    f"max_length {config.max_length} leaves no room for a target token after the start token",
                    params="max_length",
                )
        return ids, new

    def _decoder(self, ids: list[list[int]]) -> tuple[nn.Module, list[list[int]]]:
        """The module the decoding loop drives and its prompts: the decoder-only model and its prompts, or an
        encoder–decoder's decoder bound to the encoded sources, each starting from the start token."""
        if not self.is_seq2seq:
            return self.model, ids
        from lmlab.generate.seq2seq import condition_on_sources

        with torch.inference_mode():
            return condition_on_sources(self.model, ids, self._pad_id())

    def _generator(self, config: GenerationConfig) -> torch.Generator | None:
        if not config.samples:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
        return generator

    def decoding_rules(self, config: GenerationConfig) -> dict[str, Any]:
        """What ``config`` asks of one sequence decoded by a loop other than :meth:`generate`'s (the server's
        :class:`~lmlab.generate.engine.Engine`): its processors, whether it samples, its seeded generator, the
        ids and the rules that end it — the keyword arguments of an engine :class:`~lmlab.generate.engine.Request`."""
        stop_ids = self._stop_ids(config)
        return {
            "processors": self._processors(config, stop_ids),
            "sample": config.samples,
            "generator": self._generator(config),
            "stop_ids": frozenset(stop_ids),
            "stop_rules": config.stop_rules(self.tokenizer),
        }

    # -- the decoding paths ------------------------------------------------------------------------

    def _completions(
        self, ids: list[list[int]], new: int, config: GenerationConfig, logprobs: int | None
    ) -> list[list[Completion]]:
        """``num_return_sequences`` completions for each prompt."""
        n, stop_ids = config.num_return_sequences, self._stop_ids(config)
        if config.strategy == "beam":
            search = self._beam_search(ids, new, config)
            for _ in search.run():
                pass
            out = []
            for prompt_ids, hyps in zip(ids, search.results):
                row = []
                for h in hyps:
                    tokens = h.tokens[:-1] if h.tokens and h.tokens[-1] in stop_ids else h.tokens
                    c = self._completion(tokens, h.finish_reason, config)
                    c.score = h.score
                    if logprobs is not None:
                        self._add_logprobs(c, prompt_ids, logprobs)
                    row.append(c)
                out.append(row)
            return out
        rows = [row for row in ids for _ in range(n)]
        if config.draft is not None and len(rows) > 1:
            decoded = self._speculative_rows(rows, new, config, logprobs)
        else:
            decoded = self._decoded_rows(rows, new, config, logprobs)
        return [[self._sampled(d, config, logprobs) for d in decoded[i * n : (i + 1) * n]] for i in range(len(ids))]

    def _decoded_rows(
        self, rows: list[list[int]], new: int, config: GenerationConfig, logprobs: int | None
    ) -> list[Decoded]:
        """Every row decoded together by :meth:`_steps` (one :class:`Decoded` each)."""
        decoded, stop_set = [Decoded() for _ in rows], set(self._stop_ids(config))
        for step in self._steps(rows, new, config, logprobs):
            tokens, active, finished = step.tokens.tolist(), step.active.tolist(), step.finished.tolist()
            step_lps = step.logprobs.tolist() if step.logprobs is not None else None
            top = (step.top_ids.tolist(), step.top_logprobs.tolist()) if step.top_ids is not None else None
            for r, token in enumerate(tokens):
                if not active[r]:
                    continue
                if finished[r]:
                    decoded[r].reason = "stop"
                    if token in stop_set:
                        continue  # the end-of-text token is not part of the output
                decoded[r].tokens.append(token)
                if step_lps is not None:
                    decoded[r].logprobs.append(step_lps[r])
                if top is not None:
                    decoded[r].tops.append(list(zip(top[0][r], top[1][r])))
        return decoded

    def _sampled(self, d: Decoded, config: GenerationConfig, logprobs: int | None) -> Completion:
        """The :class:`Completion` of a greedy or sampled row."""
        c = self._completion(d.tokens, d.reason, config)
        if logprobs is not None:
            c.tokens = [self.tokenizer.decode([t]) for t in d.tokens]
            c.logprobs, c.top_logprobs = d.logprobs, (d.tops if logprobs > 0 else None)
        return c

    def _steps(self, ids: list[list[int]], new: int, config: GenerationConfig, logprobs: int | None = None):
        """The greedy/sampling decoding loop for ``config`` (stop ids, stop strings, seed, processors)."""
        if config.draft is not None:
            return self._speculative_steps(ids, new, config, logprobs)
        stop_ids = self._stop_ids(config)
        model, ids = self._decoder(ids)
        return decode(
            model,
            ids,
            max_new_tokens=new,
            processors=self._processors(config, stop_ids),
            sample=config.samples,
            generator=self._generator(config),
            stop_ids=stop_ids,
            stop_rules=config.stop_rules(self.tokenizer),
            pad_id=self._pad_id(),
            logprobs=logprobs,
            compile=config.compile,
        )

    def _speculative_steps(self, ids: list[list[int]], new: int, config: GenerationConfig, logprobs: int | None):
        """:meth:`_steps` with a drafter (``config.draft``): :func:`~lmlab.generate.speculative.speculative_decode`;
        :attr:`last_speculation` counts its drafted and accepted tokens."""
        from lmlab.generate.speculative import SpeculationStats

        if self.is_seq2seq:
            raise LmlabError("draft (speculative decoding) needs a decoder-only model", params="draft")
        stop_ids = self._stop_ids(config)
        drafter, vocab = self.drafter(config.draft, max(len(row) for row in ids) + new)
        self.last_speculation = SpeculationStats()
        return speculative_decode(
            self.model,
            drafter,
            ids,
            num_draft_tokens=config.num_draft_tokens,
            max_new_tokens=new,
            processors=self._processors(config, stop_ids),
            sample=config.samples,
            generator=self._generator(config),
            stop_ids=stop_ids,
            stop_rules=config.stop_rules(self.tokenizer),
            vocab_size=vocab,
            logprobs=logprobs,
            stats=self.last_speculation,
        )

    def _speculative_rows(
        self, rows: list[list[int]], new: int, config: GenerationConfig, logprobs: int | None
    ) -> list[Decoded]:
        """Several rows with a drafter: all of them through one
        :class:`~lmlab.generate.speculative_engine.BatchedSpeculativeEngine` (each row drafts, one forward pass
        verifies every row's draft, each keeps its own accepted tokens), stepped on this thread until done;
        :attr:`last_speculation` sums the rows' drafted and accepted tokens."""
        from lmlab.generate.engine import Request
        from lmlab.generate.speculative import SpeculationStats

        longest = max(len(row) for row in rows) + new
        engine = self.speculative_engine(
            config.draft, config.num_draft_tokens, max_batch_size=len(rows), max_queue=len(rows), max_len=longest
        )
        decoded = [Decoded() for _ in rows]
        for row, prompt, generator in zip(decoded, rows, self._row_generators(config, len(rows))):
            rules = {**self.decoding_rules(config), "generator": generator}
            engine.submit(Request(prompt, new, row.take, logprobs=logprobs, **rules))
        while not engine.idle():
            engine.step()
        stats = engine.stats  # its verifying passes; a row's first token comes from the prefill, not a round
        emitted = sum(row.emitted for row in decoded)
        self.last_speculation = SpeculationStats(stats.drafted, stats.accepted, stats.rounds, emitted)
        return decoded

    def speculative_engine(
        self,
        draft: str | Path | LM,
        num_draft_tokens: int = 5,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_len: int | None = None,
    ):
        """A :class:`~lmlab.generate.speculative_engine.BatchedSpeculativeEngine` for this model: continuous
        batching where every row drafts ``num_draft_tokens`` tokens as ``draft`` says (``"prompt-lookup"``, or a
        draft checkpoint or :class:`LM`, loaded once and checked to share the tokenizer) and one forward pass
        checks them all. ``max_len``: a row's KV slots (default: the context window). ``serve --draft`` and
        several rows of :meth:`complete_ids` with a draft run on it."""
        from lmlab.generate.speculative_engine import BatchedSpeculativeEngine

        if self.is_seq2seq or self.model.config.arch != "decoder":
            raise LmlabError("draft (speculative decoding) needs a decoder-only model", params="draft")
        model, vocab = self._draft_model(draft)
        return BatchedSpeculativeEngine(
            self.model,
            num_draft_tokens=num_draft_tokens,
            draft=model,
            vocab_size=vocab,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_len=max_len,
        )

    def _row_generators(self, config: GenerationConfig, rows: int) -> list[torch.Generator | None]:
        """A generator for each sampled row (None when greedy), each seeded by a draw from ``config.seed`` (or a
        random seed): a seeded run repeats, and the rows draw independently."""
        if not config.samples:
            return [None] * rows
        seeds = torch.Generator().manual_seed(config.seed if config.seed is not None else torch.seed())
        generators = []
        for seed in torch.randint(2**62, (rows,), generator=seeds).tolist():
            generators.append(torch.Generator(device=self.device))
            generators[-1].manual_seed(seed)
        return generators

    def drafter(self, draft: str | Path | LM, max_len: int):
        """A drafter for speculative decoding of sequences up to ``max_len`` tokens, and the vocabulary size the
        two models share: ``draft`` is ``"prompt-lookup"``, a checkpoint (loaded once) or an :class:`LM`."""
        from lmlab.generate.speculative import DraftModel, PromptLookup

        model, vocab = self._draft_model(draft)
        return (PromptLookup() if model is None else DraftModel(model, max_len, vocab)), vocab

    def _draft_model(self, draft: str | Path | LM) -> tuple[nn.Module | None, int]:
        """The draft model ``draft`` names (None for ``"prompt-lookup"``) and the vocabulary both models score."""
        from lmlab.generate.speculative import PROMPT_LOOKUP

        if isinstance(draft, str) and draft == PROMPT_LOOKUP:
            return None, self.model.config.vocab_size
        model = self._draft_lm(draft).model
        return model, min(self.model.config.vocab_size, model.config.vocab_size)

    def _draft_lm(self, draft: str | Path | LM) -> LM:
        """The draft model ``draft`` names (a checkpoint, loaded once per LM, on this model's device and dtype), checked
        to share this model's tokenizer."""
        if not isinstance(draft, LM):
            key = str(draft)
            if key not in self._drafts:
                dtype = next(self.model.parameters()).dtype
                self._drafts[key] = load(draft, device=str(self.device), dtype=dtype)
            draft = self._drafts[key]
        if draft.model.config.arch != "decoder":
            raise LmlabError(
                f"draft {draft.path or 'model'} is not a decoder: expected a decoder-only checkpoint", params="draft"
            )
        if draft.device != self.device:
            raise LmlabError(
                f"draft {draft.path or 'model'} is on {draft.device}, the model on {self.device}: expected one device",
                params="draft",
            )
        if any(draft is checked for checked in self._checked_drafts):  # hashing a tokenizer takes tens of ms
            return draft
        if not same_tokenizer(self.tokenizer, draft.tokenizer):
            raise LmlabError(
                f"draft {draft.path or 'model'} has another tokenizer than {self.path or 'the model'}: speculative "
                "decoding needs the model's own tokenizer (the same ids for the same tokens)",
                params="draft",
            )
        self._checked_drafts = [*self._checked_drafts[-7:], draft]
        return draft

    def _completion(self, tokens: list[int], reason: str, config: GenerationConfig) -> Completion:
        text, hit = cut_at_stop(self.tokenizer.decode(tokens), config.stop)
        return Completion(text, tokens, "stop" if hit else reason)

    def _beam_search(self, ids: list[list[int]], new: int, config: GenerationConfig) -> BeamSearch:
        stop_ids = self._stop_ids(config)
        model, ids = self._decoder(ids)
        return BeamSearch(
            model,
            ids,
            num_beams=config.num_beams,
            max_new_tokens=new,
            processors=self._processors(config, stop_ids),
            stop_ids=stop_ids,
            stop_rules=config.stop_rules(self.tokenizer),
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
            num_return_sequences=config.num_return_sequences,
            pad_id=self._pad_id(),
            compile=config.compile,
        )

    def _add_logprobs(self, c: Completion, prompt_ids: list[int], n: int) -> None:
        """Per-token log-probabilities of a finished sequence, by one forward pass (beam search)."""
        if not c.token_ids:
            c.tokens, c.logprobs, c.top_logprobs = [], [], ([] if n > 0 else None)
            return
        logprobs = self._logprobs(prompt_ids, c.token_ids)
        chosen = logprobs.gather(-1, torch.tensor(c.token_ids, device=logprobs.device)[:, None]).squeeze(-1)
        c.tokens = [self.tokenizer.decode([t]) for t in c.token_ids]
        c.logprobs = chosen.tolist()
        if n > 0:
            values, indices = logprobs.topk(min(n, logprobs.shape[-1]), dim=-1)
            c.top_logprobs = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]

    @torch.inference_mode()
    def _logprobs(self, context: list[int], continuation: list[int]) -> torch.Tensor:
        """(len(continuation), vocab_size) log-probabilities of each continuation position given what precedes it
        (for an encoder–decoder: given the source ``context`` and the target tokens before it)."""
        if not context:
            raise LmlabError("scoring needs at least one token of context before the continuation")
        if self.is_seq2seq:
            if len(context) > self.block_size:
                raise LmlabError(
                    f"the source has {len(context)} tokens; the encoder's context window holds {self.block_size}"
                )
            target = [self.model.config.decoder_start_token_id] + continuation[:-1]
            if len(target) > self.block_size:
                raise LmlabError(
                    f"the continuation has {len(continuation)} tokens; the decoder's context window holds "
                    f"{self.block_size}"
                )
            logits = self.model(
                torch.tensor([context], device=self.device), torch.tensor([target], device=self.device)
            )[0]
            return logits.float().log_softmax(dim=-1)
        if len(continuation) >= self.block_size:
            raise LmlabError(
                f"the continuation has {len(continuation)} tokens; the context window holds {self.block_size}"
            )
        seq = (context + continuation)[-self.block_size :]
        logits = self.model(torch.tensor([seq], device=self.device))[0, -len(continuation) - 1 : -1]
        return logits.float().log_softmax(dim=-1)

    # -- public ------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str],
        config: GenerationConfig | None = None,
        *,
        return_ids: bool = False,
        details: bool = False,
        logprobs: int | None = None,
        **options,
    ):
        """The continuation of ``prompt`` (a str, or a list of str for a batch).

        Returns text; with ``return_ids`` the new token ids; with ``details`` (or ``logprobs=n``,
        which adds each token's log-probability and its n most likely alternatives) a
        :class:`Completion`. With ``num_return_sequences > 1`` each prompt gets a list of them.
        """
        config = self._config(config, options)
        if logprobs is not None and (isinstance(logprobs, bool) or logprobs < 0):
            raise LmlabError(f"logprobs={logprobs!r}: expected a count of alternatives, 0 or more")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise LmlabError("no prompt: give a string or a non-empty list of strings")
        ids, new = self._encode_prompts(prompts, config)
        results = self._completions(ids, new, config, logprobs)
        shaped = []
        for row in results:
            items = [c if details or logprobs is not None else (c.token_ids if return_ids else c.text) for c in row]
            shaped.append(items[0] if config.num_return_sequences == 1 else items)
        return shaped[0] if single else shaped

    def generate_records(
        self,
        prompts: Sequence[str],
        config: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        logprobs: int | None = None,
        **options,
    ) -> list[dict]:
        """One JSON-ready record per output of every prompt (``num_return_sequences`` each, in prompt order) —
        what ``lmlab generate --format jsonl`` writes.

        A record holds ``prompt``, ``index`` (of the output among its prompt's), ``completion`` (the new text)
        and ``finish_reason``; ``score`` with beam search; with ``logprobs=n`` also ``tokens``, ``token_ids``,
        ``logprobs`` and, for n > 0, ``top_logprobs``: per token its n most likely ``{"id", "token", "logprob"}``.

        Args:
            prompts: the prompts, each a string.
            config: the decoding options (or give them as keywords, as to :meth:`generate`).
            batch_size: prompts decoded together
            logprobs: add each token's log-probability and its N most likely alternatives
        """
        config = self._config(config, options)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LmlabError(f"batch_size is {batch_size!r}: expected a positive integer")
        if isinstance(prompts, str):
            raise LmlabError("generate_records takes a list of prompts (strings)")
        prompts, records = list(prompts), []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            for prompt, outputs in zip(chunk, self.generate(chunk, config, details=True, logprobs=logprobs)):
                for index, c in enumerate(outputs if isinstance(outputs, list) else [outputs]):
                    records.append(self._record(prompt, index, c, logprobs is not None))
        return records

    def format_records(self, records: Sequence[dict], format: str = "text") -> str:
        """:meth:`generate_records`' records as ``lmlab generate`` prints them: ``"jsonl"``, one JSON object a line;
        ``"text"``, each prompt and its continuation (an encoder–decoder's target alone), a blank line between."""
        if format == "jsonl":
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return "\n\n".join(("" if self.is_seq2seq else r["prompt"]) + r["completion"] for r in records) + "\n"

    def _record(self, prompt: str, index: int, c: Completion, with_logprobs: bool) -> dict:
        record = {"prompt": prompt, "index": index, "completion": c.text, "finish_reason": c.finish_reason}
        if c.score is not None:
            record["score"] = c.score
        if with_logprobs:
            record.update(tokens=c.tokens, token_ids=c.token_ids, logprobs=c.logprobs)
            if c.top_logprobs is not None:
                text = self.tokenizer.decode
                record["top_logprobs"] = [
                    [{"id": i, "token": text([i]), "logprob": lp} for i, lp in alts] for alts in c.top_logprobs
                ]
        return record

    def complete_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        config: GenerationConfig | None = None,
        *,
        logprobs: int | None = None,
        **options,
    ) -> list[list[Completion]]:
        """Generate from prompts already tokenized (sources, for an encoder–decoder): per prompt, a list of
        ``num_return_sequences`` :class:`Completion` s. Prompts must fit the context window with the new
        tokens (nothing is cut); evaluation uses this to decode exactly the ids it trained on."""
        config = self._config(config, options)
        self._need_generator()
        ids = [[int(t) for t in row] for row in prompt_ids]
        if not ids or any(not row for row in ids):
            raise LmlabError("complete_ids: expected a non-empty list of non-empty token id lists")
        if self.is_seq2seq:
            new = min(config.max_new_tokens, self.block_size - 1)
        else:
            new = min(config.max_new_tokens, self.block_size - max(len(row) for row in ids))
            if new < 1:
                raise LmlabError(
                    f"a prompt of {max(len(row) for row in ids)} tokens leaves no room in the {self.block_size}-token "
                    "context window"
                )
        return self._completions(ids, new, config, logprobs)

    def stream(self, prompt: str, config: GenerationConfig | None = None, **options) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece, as tokens are made.

        A character split across byte-level tokens is held until whole, and text that may be the
        start of a stop string is held until it is known not to be. Beam search yields the tokens
        all surviving beams agree on. The pieces join to exactly what ``generate`` returns.
        """
        config = self._config(config, options)
        if not isinstance(prompt, str):
            raise LmlabError("stream takes one prompt (a string)")
        if config.num_return_sequences != 1:
            raise LmlabError("stream makes one sequence: num_return_sequences must be 1", params="num_return_sequences")
        ids, new = self._encode_prompts([prompt], config)
        text = TextStream(self.tokenizer.decode, config.stop)
        for tokens in self._token_stream(ids, new, config):
            piece = text.push(tokens)
            if piece:
                yield piece
            if text.hit:
                return
        rest = text.flush()  # the end: what was held back is final
        if rest:
            yield rest

    def _token_stream(self, ids: list[list[int]], new: int, config: GenerationConfig) -> Iterator[list[int]]:
        """The new tokens of the one prompt so far (no stop token id), after each step."""
        stop_ids = self._stop_ids(config)
        if config.strategy == "beam":
            search = self._beam_search(ids, new, config)
            for committed in search.run():
                yield committed[0]
            best = search.results[0][0].tokens
            yield best[:-1] if best and best[-1] in stop_ids else best
            return
        tokens: list[int] = []
        for step in self._steps(ids, new, config):
            token = int(step.tokens[0])
            if token in stop_ids:
                return
            tokens.append(token)
            yield tokens
            if bool(step.finished[0]):
                return

    def score(self, text: str | Sequence[str], continuation: str | Sequence[int] | None = None) -> Score | list[Score]:
        """Log-likelihood of ``continuation`` after ``text`` (or of ``text`` itself when no continuation).

        A string continuation is tokenized as lm-evaluation-harness does: the tokens of
        ``text + continuation`` after those of ``text``. Token ids are scored as given. Without a
        continuation every token of ``text`` after the first is scored (all of them when the
        tokenizer has a beginning-of-text token, which is put in front). A list of texts gives a list.
        An encoder–decoder scores the target ``continuation`` (its tokens, without end-of-text) given the
        source ``text``.
        """
        self._need_generator()
        if not isinstance(text, str):
            if continuation is not None and not isinstance(continuation, (list, tuple)):
                raise LmlabError("score: with a list of texts, give a list of continuations (or none)")
            conts = list(continuation) if continuation is not None else [None] * len(text)
            if len(conts) != len(text):
                raise LmlabError(f"score: {len(text)} texts but {len(conts)} continuations")
            return [self.score(t, c) for t, c in zip(text, conts)]
        if self.is_seq2seq:
            from lmlab.data.tasks import encode_sources

            if continuation is None:
                raise LmlabError("an encoder–decoder scores a target given a source: score(source, target)")
            context = encode_sources(self.tokenizer, [text])[0]
            cont = (
                self.tokenizer.encode(continuation) if isinstance(continuation, str) else [int(t) for t in continuation]
            )
        elif continuation is None:
            tokens = self.tokenizer.encode(text)
            bos = self.tokenizer.bos_id
            context, cont = ([bos], tokens) if bos is not None else (tokens[:1], tokens[1:])
        elif isinstance(continuation, str):
            context = self.tokenizer.encode(text)
            whole = self.tokenizer.encode(text + continuation)
            cont = whole[len(context) :] if whole[: len(context)] == context else self.tokenizer.encode(continuation)
        else:
            context, cont = self.tokenizer.encode(text), [int(t) for t in continuation]
        if not cont:
            raise LmlabError("score: nothing to score (the continuation encodes to no tokens)")
        logprobs = self._logprobs(context, cont)
        token_logprobs = logprobs.gather(-1, torch.tensor(cont, device=logprobs.device)[:, None]).squeeze(-1).tolist()
        return Score(sum(token_logprobs), len(cont), cont, token_logprobs)


def read_prompts(path: Path) -> list[str]:
    """The prompts of ``--prompts-file``: one per non-blank line, or the ``prompt`` field of each JSON Lines object."""
    from lmlab.config import json_line_object

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = f"cannot read it ({type(e).__name__}); expected a UTF-8 text file"
        raise LmlabError(f"prompts_file {path}: {why}", params="prompts_file") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    records = [(n, json_line_object(path, n, line)) for n, line in enumerate(lines, 1) if line.strip()]
    for number, record in records:
        if not isinstance(record.get("prompt"), str):
            raise LmlabError(
                f"prompts_file {path}:{number}: expected an object with a string field 'prompt'", params="prompts_file"
            )
    return [record["prompt"] for _, record in records]


def write_stream(lm: LM, prompt: str, config: GenerationConfig, out: TextIO) -> int:
    """Write ``prompt`` (not for an encoder–decoder, whose output is no continuation) and its continuation to
    ``out`` as it is made, then a newline."""
    out.write("" if lm.is_seq2seq else prompt)
    for piece in lm.stream(prompt, config):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def generate_repl(lm: LM, config: GenerationConfig) -> int:
    """``lmlab generate --interactive``: read a prompt, stream its continuation, until ``/quit`` or end of input
    (Ctrl-D). A prompt that fails ends its turn with a one-line error, not the session."""
    print(
        f"lmlab: {lm!r}; {config.strategy} decoding, {config.max_new_tokens} new tokens. "
        "Type a prompt; Ctrl-D or /quit ends.",
        file=sys.stderr,
    )
    while True:
        try:
            prompt = input("» ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if prompt.strip() in ("/quit", "/exit"):
            return 0
        if not prompt.strip():
            continue
        try:
            write_stream(lm, prompt, config, sys.stdout)
        except LmlabError as e:
            print(f"\nlmlab: error: {e}", file=sys.stderr)


def load(path: str | Path, device: str = "auto", dtype: torch.dtype | None = None, verify: bool = True) -> LM:
    """Load an lmlab checkpoint folder (or a run folder: its best checkpoint), a Hugging Face model
    folder (GPT-2, LLaMA, BERT, BART; checked once against transformers unless ``verify=False``) or a GGUF file
    (llama.cpp's; GPT-2 and LLaMA, dequantized to fp32), with its tokenizer (an lmlab checkpoint's must be the
    one it was trained with: ``verify=False`` turns the error into a warning)."""
    path = resolve_checkpoint(path)
    device = str(resolve_device(device))
    if not has_tokenizer(path):
        raise LmlabError(f"{path}: no tokenizer.json; expected the tokenizer beside the weights")
    tokenizer = load_tokenizer(path, verify=verify)  # the one the model was trained with, or an error
    # adapters folded in: plain, faster inference
    model = load_model(path, device=device, dtype=dtype, merge_lora=True, verify=verify)
    if model.fresh_weights:  # an LM reads the head a folder lacked (an embedding or a fine-tune would not)
        logger.warning(
            "%s has no language-modelling head: lmlab initialised %s at random, so its scores and generations "
            "are noise",
            path,
            ", ".join(model.fresh_weights),
        )
    return LM(model, tokenizer, path)
