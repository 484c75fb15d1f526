"""``seq2seq``: JSONL source/target (or prompt/completion) → chrF, BLEU (sacrebleu), ROUGE of greedy outputs.

An encoder–decoder trains on source → target (teacher forcing, the target shifted right behind the start
token); a decoder on prompt → completion in one sequence, the loss on the completion only. Either way
the model keeps its LM head (no task head) and is scored by generating through :mod:`lmlab.generate`,
the one decoding path (:func:`generate_outputs`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.data import tasks as T
from lmlab.errors import LmlabError
from lmlab.generate import BeamSearch, GenerationConfig, decode
from lmlab.generate.processors import SuppressIdsFrom
from lmlab.generate.seq2seq import condition_on_sources
from lmlab.model.seq2seq import shift_right
from lmlab.objectives.losses import IGNORE_INDEX, lm_loss
from lmlab.tasks.base import ObjectiveArgs, Selection, Task, TaskData, TaskFields, TaskObjective, TextExample, padded


def without_head(config: ModelConfig) -> ModelConfig:
    """A generating task's model: the LM head generates, no task head (one the base had is dropped)."""
    return dataclasses.replace(config, task="", num_labels=0, problem_type="single", labels=[], lora={})


class NextTokenObjective(TaskObjective):
    """Next-token cross-entropy on the labelled tokens (seq2seq targets, chat's assistant turns).

    ``arch`` "seq2seq": the decoder fed the target shifted right behind ``start_id``; "decoder": prompt
    and target in one sequence, the prompt's labels ignored. Packed rows (``segment_ids``) keep each
    example to itself. ``ce_chunk_size``: the LM loss's chunking (:mod:`lmlab.objectives.losses`)."""

    ce_chunk_size: int | None = None

    def __init__(
        self, name: str, features, pad_id, arch: str = "decoder", start_id: int = 0, valid_features=None
    ) -> None:
        super().__init__(name, features, pad_id, valid_features)
        self.model_arch, self.start_id = arch, start_id

    def targets(self, features: dict[str, list], rows: list[int], T: int) -> dict[str, Tensor]:
        out = {"labels": padded([features["labels"][i] for i in rows], IGNORE_INDEX)}
        if "segment_ids" in features:  # packed rows: padding is a segment of its own (0), positions restart per segment
            for key in ("segment_ids", "position_ids"):
                out[key] = padded([features[key][i] for i in rows], 0, T)
        return out

    def count_tokens(self, batch: dict[str, Tensor]) -> int:
        """The source's real tokens, and an encoder–decoder's target tokens (its decoder reads them too)."""
        source = super().count_tokens(batch)
        return source + (int((batch["labels"] != IGNORE_INDEX).sum()) if self.model_arch == "seq2seq" else 0)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        # the LM head's logits, or (a large vocabulary) hidden states and the chunked cross-entropy: lm_loss
        labels, ids = batch["labels"], batch["input_ids"]
        if self.model_arch == "seq2seq":
            decoder_input = shift_right(labels, self.start_id)
            return lm_loss(
                model,
                labels,
                lambda hidden_only: model(ids, decoder_input, batch["attention_mask"], hidden_only=hidden_only),
                self.ce_chunk_size,
            )
        if "segment_ids" in batch:  # packed: each conversation sees only itself, from position 0
            packing = {"segment_ids": batch["segment_ids"], "position_ids": batch["position_ids"]}
        else:  # right padding needs no mask under causal attention: real tokens never see it
            packing = {}
        return lm_loss(
            model,
            labels[:, 1:],
            lambda hidden_only: model(ids, hidden_only=hidden_only, **packing)[:, :-1],
            self.ce_chunk_size,
        )


@torch.no_grad()
def generate_outputs(
    model: nn.Module, tokenizer, data: TaskData, *, max_new_tokens: int, batch_size: int, num_beams: int = 1
) -> list[str]:
    """The model's output text for each example's prompt (an encoder–decoder's source) — greedy, or beam
    search — stopping at the tokenizer's end-of-text token, as :meth:`lmlab.api.LM.complete_ids` does."""
    was_training = model.training
    model.eval()
    try:
        outputs: list[str] = []
        for start in range(0, len(data.prompts), batch_size):
            rows = _generate_ids(model, tokenizer, data.prompts[start : start + batch_size], max_new_tokens, num_beams)
            outputs += [tokenizer.decode(tokens).strip() for tokens in rows]
        return outputs
    finally:
        model.train(was_training)


def _generate_ids(
    model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, num_beams: int
) -> list[list[int]]:
    """New token ids (the end-of-text token left out) for each prompt."""
    config = GenerationConfig(
        strategy="beam" if num_beams > 1 else "greedy", num_beams=num_beams, max_new_tokens=max_new_tokens
    )
    block = model.config.block_size
    if model.config.arch == "seq2seq":
        new = min(max_new_tokens, block - 1)
    else:
        new = min(max_new_tokens, block - max(len(row) for row in prompts))
        if new < 1:
            raise LmlabError(
                f"a prompt of {max(len(row) for row in prompts)} tokens leaves no room in the {block}-token context "
                "window"
            )
    stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    processors = config.processors(stop_ids)
    if model.config.vocab_size > tokenizer.vocab_size:
        processors.insert(0, SuppressIdsFrom(tokenizer.vocab_size))  # never a padding row of the embedding
    pad_id = next((c for c in (tokenizer.pad_id, tokenizer.eos_id) if c is not None), 0)
    decoder, ids = model, [list(row) for row in prompts]
    if model.config.arch == "seq2seq":
        with torch.inference_mode():
            decoder, ids = condition_on_sources(model, ids, pad_id)
    if num_beams > 1:
        search = BeamSearch(
            decoder,
            ids,
            num_beams=num_beams,
            max_new_tokens=new,
            processors=processors,
            stop_ids=stop_ids,
            stop_rules=[],
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
            num_return_sequences=1,
            pad_id=pad_id,
            compile=False,
        )
        for _ in search.run():
            pass
        return [
            h.tokens[:-1] if h.tokens and h.tokens[-1] in stop_ids else h.tokens
            for h in (hyps[0] for hyps in search.results)
        ]
    new_tokens: list[list[int]] = [[] for _ in ids]
    for step in decode(
        decoder,
        ids,
        max_new_tokens=new,
        processors=processors,
        sample=False,
        generator=None,
        stop_ids=stop_ids,
        stop_rules=[],
        pad_id=pad_id,
        logprobs=None,
        compile=False,
    ):
        tokens, active, finished = step.tokens.tolist(), step.active.tolist(), step.finished.tolist()
        for r, token in enumerate(tokens):
            if active[r] and not (finished[r] and token in stop_ids):  # the end-of-text token is not part of the output
                new_tokens[r].append(token)
    return new_tokens


class Seq2Seq(Task):
    name = "seq2seq"
    generates = True
    archs = ("seq2seq", "decoder")
    seq_len_params = "max_length + max_target_length"
    references = True

    def check_base(self, config: ModelConfig, fields: TaskFields, base: Path | str) -> None:
        if config.arch == "encoder":
            raise LmlabError(
                f"{base}: an encoder (BERT style) does not generate; task seq2seq fine-tunes encoder–decoders and "
                "decoders",
                params="task",
            )
        super().check_base(config, fields, base)
        room = config.block_size - (fields.max_length if config.arch == "decoder" else 0)
        if fields.max_target_length > room:
            where = f"after a max_length {fields.max_length} prompt in" if config.arch == "decoder" else "in"
            raise LmlabError(
                f"max_target_length {fields.max_target_length} does not fit {where} the model's block_size "
                f"{config.block_size}",
                params="max_target_length max_length",
            )

    def seq_len(self, fields: TaskFields) -> int:
        return fields.max_length + fields.max_target_length

    def read(
        self,
        path: str | Path,
        tokenizer,
        fields: TaskFields,
        *,
        arch: str = "encoder",
        labels: list[str] | None = None,
        problem_type: str | None = None,
    ) -> TaskData:
        data = T.read_seq2seq(path, source_field=fields.source_field, target_field=fields.target_field)
        decoder_only = arch == "decoder"
        features = T.encode_seq2seq(
            tokenizer, data, fields.max_length, fields.max_target_length, decoder_only=decoder_only
        )
        if decoder_only:
            prompts = [
                ids[: labels.count(IGNORE_INDEX)] for ids, labels in zip(features["input_ids"], features["labels"])
            ]
            for k, prompt in enumerate(prompts):
                if not prompt:
                    raise LmlabError(
                        f"{path}:{data.lines[k]}: the prompt encodes to no tokens; a decoder needs a prompt to continue"
                    )
        else:
            prompts = features["input_ids"]
        return TaskData("seq2seq", features, 0, raw=data, prompts=prompts)

    def head(self, config: ModelConfig, data: TaskData) -> ModelConfig:
        return without_head(config)

    def objective(self, features, args: ObjectiveArgs) -> NextTokenObjective:
        return NextTokenObjective("seq2seq", features, args.pad_id, args.arch, args.start_id, args.valid_features)

    def select(self, data: TaskData) -> Selection:
        # chrF: BLEU of a small validation set sits at 0 until whole 4-grams match; both are logged
        return Selection("chrf")

    def describe(self, data: TaskData, arch: str) -> str:
        return "source → target" if arch == "seq2seq" else "prompt → completion"

    def check_model(self, config: ModelConfig) -> None:
        if config.arch == "encoder":
            raise LmlabError(
                "this checkpoint is an encoder (BERT style): task seq2seq needs a model that generates "
                "(encoder–decoder or decoder)",
                params="task",
            )

    def predict(
        self, model, tokenizer, data, *, batch_size, device, pad_id=0, max_new_tokens=128, num_beams=1
    ) -> list[str]:
        return generate_outputs(
            model, tokenizer, data, max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams
        )

    def metrics(self, data: TaskData, predictions: list[str]) -> dict[str, float]:
        from lmlab import metrics as M  # torchmetrics takes seconds to import: only when scoring

        m = M.seq2seq_metrics(predictions, [t.strip() for t in data.raw.targets])
        return {k: m[k] for k in ("chrf", "bleu", "rougeL")}

    def evaluate(self, data: TaskData, predictions: list[str], n_resamples: int) -> tuple[dict[str, Any], list[dict]]:
        from lmlab import metrics as M  # torchmetrics takes seconds to import: only when scoring

        references = [t.strip() for t in data.raw.targets]
        result = M.with_cis("seq2seq", predictions, references, n_resamples=n_resamples)
        rows = [
            {"index": i, "source": src, "target": ref, "prediction": out}
            for i, (src, ref, out) in enumerate(zip(data.raw.sources, references, predictions))
        ]
        return result, rows

    def text_examples(self, path: str | Path, fields: TaskFields) -> list[TextExample]:
        data = T.read_seq2seq(path, source_field=fields.source_field, target_field=fields.target_field)
        return [TextExample(source, reference=target) for source, target in zip(data.sources, data.targets)]
