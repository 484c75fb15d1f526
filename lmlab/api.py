"""``lmlab.load(path)``: a model and its tokenizer, ready to generate — the notebook entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.generate import Temperature, TopK, TopP, decode
from lmlab.generate.processors import LogitsProcessor
from lmlab.io.checkpoint import load_model, resolve_checkpoint

STRATEGIES = ("greedy", "sample")


def build_processors(strategy: str, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> list[LogitsProcessor]:
    """The processor list for a strategy, in a fixed order: temperature, then top-k, then top-p (as HF orders them)."""
    if strategy not in STRATEGIES:
        raise LmlabError(f"unknown --strategy '{strategy}'; expected one of {', '.join(STRATEGIES)}")
    if strategy == "greedy":
        return []
    processors: list[LogitsProcessor] = []
    if temperature != 1.0:
        processors.append(Temperature(temperature))
    if top_k is not None and top_k > 0:
        processors.append(TopK(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopP(top_p))
    return processors


class LM:
    """A model and its tokenizer. ``generate`` returns text; ``stream`` yields it piece by piece."""

    def __init__(self, model: nn.Module, tokenizer, path: Path | None = None) -> None:
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokens(
        self, prompts: Sequence[str], max_new_tokens: int, strategy: str, temperature: float, top_k: int | None,
        top_p: float | None, seed: int | None, stop_at_eos: bool,
    ) -> Iterator[torch.Tensor]:
        processors = build_processors(strategy, temperature, top_k, top_p)
        generator = None
        if strategy == "sample":
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        ids = [self.tokenizer.encode(p) for p in prompts]
        eos = self.tokenizer.eos_id
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else (eos or 0)
        return decode(
            self.model, ids, max_new_tokens=max_new_tokens, processors=processors, sample=strategy == "sample",
            generator=generator, stop_ids=[eos] if stop_at_eos and eos is not None else [], pad_id=pad,
        )

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 50,
        strategy: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        return_ids: bool = False,
        stop_at_eos: bool = True,
    ):
        """The continuation of ``prompt`` (a str, or a list of str for a batch): text, or new token ids."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        steps = list(self._tokens(prompts, max_new_tokens, strategy, temperature, top_k, top_p, seed, stop_at_eos))
        eos = self.tokenizer.eos_id if stop_at_eos else None
        outputs = []
        for row in range(len(prompts)):
            new = []
            for step in steps:
                token = int(step[row])
                if token == eos:
                    break
                new.append(token)
            outputs.append(new if return_ids else self.tokenizer.decode(new))
        return outputs[0] if single else outputs

    def stream(
        self, prompt: str, max_new_tokens: int = 50, strategy: str = "greedy", temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stop_at_eos: bool = True,
    ) -> Iterator[str]:
        """Yield pieces of text as tokens are made; a character split across tokens is held until whole."""
        new: list[int] = []
        shown = ""
        eos = self.tokenizer.eos_id if stop_at_eos else None
        for step in self._tokens([prompt], max_new_tokens, strategy, temperature, top_k, top_p, seed, stop_at_eos):
            token = int(step[0])
            if token == eos:
                break
            new.append(token)
            text = self.tokenizer.decode(new)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            yield text[len(shown) :]
            shown = text


def load(path: str | Path, device: str = "auto", dtype: torch.dtype | None = None) -> LM:
    """Load an lmlab checkpoint folder (or a run folder: its best checkpoint) with its tokenizer."""
    from lmlab.tokenizer import Tokenizer

    path = resolve_checkpoint(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, device=device, dtype=dtype)
    if not (path / "tokenizer.json").is_file():
        raise LmlabError(f"{path}: no tokenizer.json; expected the tokenizer beside the weights")
    return LM(model, Tokenizer.load(path), path)
