"""``GenerationConfig``: every decoding option in one dataclass, checked once, turned into processors.

Every field is a ``lmlab generate`` flag of the same name (``--top-p``, ``--num-beams`` …) and a
keyword of ``LM.generate``. Its names and meanings follow ``transformers.GenerationConfig`` where HF
has the option, and the OpenAI API where it does not (presence/frequency penalties, ``stop``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from lmlab.config import check_seed, option
from lmlab.errors import LmlabError
from lmlab.generate.processors import (
    LogitsProcessorList,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
)
from lmlab.generate.stopping import StopStrings

STRATEGIES = ("greedy", "sample", "beam")
SAMPLING_OPTIONS = ("top_k", "top_p", "min_p", "typical_p")


@dataclass
class GenerationConfig:
    """How to decode. Penalties apply to every strategy; top-k/p, min-p and typical-p to sampling."""

    max_new_tokens: int = option(50, "tokens to generate per sequence")
    max_length: int | None = option(
        None, "stop when prompt + generated tokens reach this many (whichever of the two limits comes first)"
    )
    min_new_tokens: int = option(0, "forbid the end-of-text ids before this many new tokens")
    strategy: str = option("greedy", "greedy, sample or beam")
    temperature: float = option(1.0, "sampling temperature; 0 means greedy (sample only)")
    top_k: int = option(0, "sample among the k most likely tokens; 0 = off (sample only)")
    top_p: float = option(1.0, "nucleus: sample from the smallest set reaching probability p; 1 = off (sample only)")
    min_p: float = option(0.0, "drop tokens less than min_p × the top token's probability; 0 = off (sample only)")
    typical_p: float = option(1.0, "locally typical sampling mass; 1 = off (sample only)")
    repetition_penalty: float = option(
        1.0, "CTRL penalty on tokens already in prompt or output; > 1 discourages repeats, 1 = off"
    )
    presence_penalty: float = option(0.0, "subtract this from tokens already generated (OpenAI); in [-2, 2]")
    frequency_penalty: float = option(0.0, "subtract this × count from tokens already generated (OpenAI); in [-2, 2]")
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size; 0 = off")
    num_beams: int = option(1, "beams for --strategy beam")
    length_penalty: float = option(1.0, "beam score = log-prob / length^this; > 0 favours longer output (beam only)")
    early_stopping: bool = option(False, "beam: stop a prompt as soon as num_beams hypotheses have finished")
    num_return_sequences: int = option(1, "sequences returned per prompt: independent samples, or the best beams")
    stop: list[str] = field(
        default_factory=list,
        metadata={"help": "stop when the output contains one of these strings; the text is cut before it"},
    )
    stop_token_ids: list[int] = field(
        default_factory=list,
        metadata={
            "help": (
                "stop on these token ids (besides the end-of-text ids: the tokenizer's, and the eos_token_id of the "
                "folder's generation_config.json)"
            )
        },
    )
    ignore_eos: bool = option(
        False,
        "do not stop at the end-of-text ids (the tokenizer's, and the eos_token_id of the folder's "
        "generation_config.json)",
    )
    seed: int | None = option(None, "seed for reproducible sampling; None: a fresh random seed")
    truncate: str = option(
        "left", "a prompt too long for the context window: left (drop its oldest tokens, with a warning) or error"
    )
    compile: bool = option(
        False,
        "torch.compile the one-token decode step over a static KV cache (a CUDA graph on GPU; decoder-only models): "
        "the first generation of each batch size compiles for seconds to a minute, later ones decode faster",
    )

    draft: str | None = option(
        None,
        "speculative decoding: a smaller checkpoint with the same tokenizer drafts tokens that the model checks, "
        "several per forward pass; prompt-lookup drafts them from n-gram matches in the prompt (no model); the "
        "output is what decoding without a draft gives; several prompts (or samples) draft and are checked together",
    )
    num_draft_tokens: int = option(5, "tokens drafted per round (with draft)")

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise LmlabError(
                f"unknown strategy '{self.strategy}'; expected one of {', '.join(STRATEGIES)}", params="strategy"
            )
        if self.seed is not None:
            check_seed(self.seed)
        if self.truncate not in ("left", "error"):
            raise LmlabError(f"truncate is '{self.truncate}': expected left or error", params="truncate")
        for name in ("max_new_tokens", "num_beams", "num_return_sequences"):
            if getattr(self, name) < 1:
                raise LmlabError(f"{name} is {getattr(self, name)}: expected a positive integer", params=name)
        if self.max_length is not None and self.max_length < 2:
            raise LmlabError(
                f"max_length is {self.max_length}: expected at least 2 (prompt + one new token)", params="max_length"
            )
        if self.temperature < 0:
            raise LmlabError(
                f"temperature is {self.temperature}: expected 0 (greedy) or a positive number", params="temperature"
            )
        if self.top_k < 0:
            raise LmlabError(f"top_k is {self.top_k}: expected 0 (off) or a positive integer", params="top_k")
        for name, low in (("top_p", 0.0), ("typical_p", 0.0)):
            if not low < getattr(self, name) <= 1.0:
                raise LmlabError(f"{name} is {getattr(self, name)}: expected a number in (0, 1]", params=name)
        if not 0.0 <= self.min_p <= 1.0:
            raise LmlabError(f"min_p is {self.min_p}: expected a number in [0, 1]", params="min_p")
        defaults = GenerationConfig.__dataclass_fields__
        if self.strategy != "sample":
            changed = [
                name for name in (*SAMPLING_OPTIONS, "temperature") if getattr(self, name) != defaults[name].default
            ]
            if changed:
                raise LmlabError(
                    f"{', '.join(changed)} shape(s) sampling: add strategy sample (strategy {self.strategy} does "
                    "not sample)",
                    params=" ".join(["strategy", *changed]),
                )
        if self.strategy == "beam":
            if self.num_return_sequences > self.num_beams:
                raise LmlabError(
                    f"num_return_sequences {self.num_return_sequences} > num_beams {self.num_beams}: beam search "
                    "returns at most num_beams sequences",
                    params="num_return_sequences num_beams",
                )
        elif self.num_beams != 1:
            raise LmlabError(
                f"num_beams {self.num_beams} needs strategy beam (beam sampling is not supported)",
                params="num_beams strategy",
            )
        if self.strategy == "greedy" and self.num_return_sequences > 1:
            raise LmlabError(
                "num_return_sequences > 1 with strategy greedy would repeat one output; use sample or beam",
                params="num_return_sequences strategy",
            )
        self._check_draft()
        # validate the numbers the processors own (one place for each message)
        self.processors(eos_ids=[])

    def _check_draft(self) -> None:
        if self.num_draft_tokens < 1:
            raise LmlabError(
                f"num_draft_tokens is {self.num_draft_tokens}: expected a positive integer", params="num_draft_tokens"
            )
        if self.draft is None:
            return
        if self.strategy == "beam":
            raise LmlabError("draft (speculative decoding) needs strategy greedy or sample", params="draft strategy")
        if self.compile:
            raise LmlabError("draft (speculative decoding) decodes eagerly: drop compile", params="draft compile")

    @property
    def samples(self) -> bool:
        """Whether decoding draws tokens at random (temperature 0 falls back to greedy, as in OpenAI's API)."""
        return self.strategy == "sample" and self.temperature > 0

    def replace(self, **changes) -> GenerationConfig:
        unknown = set(changes) - set(self.__dataclass_fields__)
        if unknown:
            raise LmlabError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def processors(self, eos_ids: Sequence[int]) -> LogitsProcessorList:
        """The processor list in Hugging Face's order: penalties, then the sampling warpers."""
        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenalty(self.repetition_penalty))
        if self.presence_penalty or self.frequency_penalty:
            out.append(PresenceFrequencyPenalty(self.presence_penalty, self.frequency_penalty))
        if self.no_repeat_ngram_size:
            out.append(NoRepeatNGram(self.no_repeat_ngram_size))
        if self.min_new_tokens and eos_ids:
            out.append(MinNewTokens(self.min_new_tokens, eos_ids))
        if self.min_new_tokens < 0:
            raise LmlabError(f"min_new_tokens is {self.min_new_tokens}: expected 0 or more", params="min_new_tokens")
        if self.samples:
            if self.temperature != 1.0:
                out.append(Temperature(self.temperature))
            if self.top_k:
                out.append(TopK(self.top_k))
            if self.top_p < 1.0:
                out.append(TopP(self.top_p))
            if self.min_p > 0.0:
                out.append(MinP(self.min_p))
            if self.typical_p < 1.0:
                out.append(TypicalP(self.typical_p))
        return out

    def stop_rules(self, tokenizer) -> list:
        return [StopStrings(tokenizer, self.stop)] if self.stop else []
