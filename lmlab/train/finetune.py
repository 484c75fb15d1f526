"""``lmlab.finetune``: a pretrained checkpoint + labelled files → a task model (classify, tag, qa, seq2seq, chat).

The same one training loop as pretraining: the batches are example indices (a pure function of the
step, so resuming is exact), a :class:`TaskObjective` collates them and computes the task's loss,
and a scorer computes the task metric on the validation set at every evaluation, which picks the
best checkpoint and drives early stopping.

    classify   JSONL/CSV/TSV with text (+ pair) and label(s)   accuracy, macro-F1 (torchmetrics)
    tag        CoNLL or JSONL tokens/tags (BIO, IOB1, IOBES)    entity F1 (seqeval)
    qa         SQuAD v1.1 / v2.0 JSON                           exact match, F1 (SQuAD rules)
    seq2seq    JSONL source/target (or prompt/completion)       chrF, BLEU (sacrebleu), ROUGE of greedy outputs
    chat       JSONL messages (or prompt/response)              loss on assistant tokens (picks best/), their accuracy

``seq2seq`` trains an encoder–decoder on source → target (teacher forcing, the target shifted right
behind the start token), or a decoder on prompt → completion with the loss on the completion only;
either way the model keeps its LM head (no task head) and is scored by generating through
:class:`lmlab.api.LM`, the one decoding path.

``chat`` trains a decoder on conversations rendered by its chat template (lmlab's default when the
tokenizer has none, written into every checkpoint's ``tokenizer_config.json`` so ``lmlab chat`` and an
export render alike), the loss on the assistant messages only (:func:`lmlab.data.tasks.encode_conversation`).
Each conversation is one padded row: packing several into a row would need a block-diagonal attention
mask, which :class:`~lmlab.model.decoder.DecoderLM` does not take (it takes per-row position ids, and a
key-padding mask only). The validation loss on assistant tokens picks ``best/``; their next-token
accuracy is logged beside it.

``lora`` (``--lora r=8,alpha=16,targets=qkv``) freezes the model and trains low-rank adapters through
``peft`` (:mod:`lmlab.train.lora`) plus the new task head; checkpoints hold base + adapters and resume
like any run; ``lmlab merge-lora`` folds the adapters in for export.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import check_run_output, latest_checkpoint, load_config, load_model, load_tokenizer, read_meta, resolve_checkpoint
from lmlab.model import build_model
from lmlab.train import dist as dist_mod
from lmlab.train.data import hash_position
from lmlab.train.loop import TrainConfig, TrainResult, check_resume, same_source, train_loop
from lmlab.train.losses import lm_loss
from lmlab.train.memory import DryRun, check_budget
from lmlab.train.objectives import IGNORE_INDEX

TASKS = ("classify", "tag", "qa", "seq2seq", "chat")
# fine-tuning starts from BERT's recipe (Devlin et al.: 2e-5–5e-5, no long warm-up, AdamW β2 0.999, decay 0.01)
FINETUNE_DEFAULTS = dict(lr=5e-5, warmup_steps=0, weight_decay=0.01, beta2=0.999, max_steps=300, eval_interval=100)
# the metric that picks the best checkpoint, per task (higher is better)
# (seq2seq: chrF, as BLEU of a small validation set sits at 0 until whole 4-grams match; both are logged)
SELECT = {"classify": "accuracy", "multi": "f1_micro", "regression": "pearson", "tag": "f1", "qa": "f1", "seq2seq": "chrf"}


class ExampleBatches:
    """Shuffled epochs over ``n`` examples: ``(step, micro)`` → the example indices of that micro-batch.

    Example ``q`` of the whole run (counting across steps, micro-steps and ranks) is
    ``perm_e[q mod n]`` with ``perm_e`` the permutation of epoch ``e = q // n``, seeded by (seed, e).
    """

    def __init__(self, n: int, batch_size: int, grad_accum_steps: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise LmlabError("the training file holds no examples")
        self.n, self.batch_size, self.accum, self.seed = n, batch_size, grad_accum_steps, seed
        self.rank, self.world = rank, world_size
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(hash_position(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def __call__(self, step: int, micro: int) -> Tensor:
        first = ((step * self.accum + micro) * self.world + self.rank) * self.batch_size
        return torch.stack([self._perm(q // self.n)[q % self.n] for q in range(first, first + self.batch_size)])

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n / (self.batch_size * self.accum * self.world)))


class TaskObjective:
    """Collate examples into padded tensors and compute the task's loss from the model's task head.

    classify: cross-entropy (optionally class-weighted), binary cross-entropy per label (multi-label)
    or mean squared error (regression); tag: token cross-entropy on the first sub-token of each word;
    qa: the mean of the start and end cross-entropies; seq2seq: next-token cross-entropy on the
    target (``model_arch`` "seq2seq": the decoder fed the target shifted right behind ``start_id``;
    "decoder": prompt + completion in one sequence, the prompt's labels ignored); chat: the same
    next-token cross-entropy as a decoder's seq2seq, on the assistant tokens.
    """

    arch = "any"
    ce_chunk_size: int | None = None  # seq2seq, chat: the LM loss's chunking (TrainConfig.ce_chunk_size; lmlab.train.losses)

    def __init__(
        self, task: str, features: dict[str, list], pad_id: int, problem_type: str = "single",
        class_weights: Tensor | None = None, valid_features: dict[str, list] | None = None,
        model_arch: str = "encoder", start_id: int = 0,
    ) -> None:
        self.name, self.task, self.features, self.pad_id = task, task, features, pad_id
        self.problem_type, self.class_weights, self.valid_features = problem_type, class_weights, valid_features
        self.model_arch, self.start_id = model_arch, start_id

    def batch(self, indices: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training examples ``indices``, padded on the right."""
        return self._collate(self.features, indices)

    def valid_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Validation examples ``indices`` (the loop builds validation batches with this when present)."""
        return self._collate(self.valid_features, indices)

    def _collate(self, features: dict[str, list], indices: Tensor) -> dict[str, Tensor]:
        rows = indices.tolist()
        ids = [features["input_ids"][i] for i in rows]
        T = max(len(r) for r in ids)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for k, i in enumerate(rows):
            n = len(ids[k])
            input_ids[k, :n] = torch.tensor(ids[k])
            mask[k, :n] = 1
            if features.get("token_type_ids"):
                types[k, :n] = torch.tensor(features["token_type_ids"][i])
        out = {"input_ids": input_ids, "token_type_ids": types, "attention_mask": mask}
        if self.task == "classify":
            labels = [features["labels"][i] for i in rows]
            out["labels"] = torch.tensor(labels, dtype=torch.long if self.problem_type == "single" else torch.float)
        elif self.task == "tag":
            labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
            for k, i in enumerate(rows):
                row = features["labels"][i]
                labels[k, : len(row)] = torch.tensor(row)
            out["labels"] = labels
        elif self.task in ("seq2seq", "chat"):
            targets = [features["labels"][i] for i in rows]
            labels = torch.full((len(rows), max(len(t) for t in targets)), IGNORE_INDEX, dtype=torch.long)
            for k, target in enumerate(targets):
                labels[k, : len(target)] = torch.tensor(target)
            out["labels"] = labels
            if "segment_ids" in features:  # packed rows: padding is a segment of its own (0), positions restart per segment
                for key in ("segment_ids", "position_ids"):
                    out[key] = torch.zeros((len(rows), T), dtype=torch.long)
                    for k, i in enumerate(rows):
                        out[key][k, : len(ids[k])] = torch.tensor(features[key][i])
        else:
            out["start_positions"] = torch.tensor([features["start_positions"][i] for i in rows])
            out["end_positions"] = torch.tensor([features["end_positions"][i] for i in rows])
        return out

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        if self.task in ("seq2seq", "chat"):
            # the LM head's logits, or (a large vocabulary) hidden states and the chunked cross-entropy: lm_loss
            labels, ids = batch["labels"], batch["input_ids"]
            if self.model_arch == "seq2seq":
                from lmlab.model.seq2seq import shift_right

                decoder_input = shift_right(labels, self.start_id)
                return lm_loss(model, labels, lambda hidden_only: model(ids, decoder_input, batch["attention_mask"], hidden_only=hidden_only), self.ce_chunk_size)
            if "segment_ids" in batch:  # packed: each conversation sees only itself, from position 0
                packing = {"segment_ids": batch["segment_ids"], "position_ids": batch["position_ids"]}
            else:  # right padding needs no mask under causal attention: real tokens never see it
                packing = {}
            return lm_loss(model, labels[:, 1:], lambda hidden_only: model(ids, hidden_only=hidden_only, **packing)[:, :-1], self.ce_chunk_size)
        logits = model.task_logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
        if self.task == "classify":
            if self.problem_type == "single":
                weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
                return F.cross_entropy(logits, batch["labels"], weight=weight)
            if self.problem_type == "multi":
                return F.binary_cross_entropy_with_logits(logits, batch["labels"])
            return F.mse_loss(logits.squeeze(-1), batch["labels"])
        if self.task == "tag":
            return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        start, end = logits.unbind(-1)  # (B, T) each
        return (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2


def pack_examples(features: dict[str, list], max_length: int) -> dict[str, list]:
    """Pack examples (``input_ids`` with aligned ``labels``) into rows of at most ``max_length`` tokens,
    first-fit in order, with ``segment_ids`` (1, 2, … per example in its row), ``position_ids``
    restarting at 0 for each and ``examples`` (which examples a row holds, in order): the decoder's block-diagonal causal mask keeps every example to itself,
    so a packed row trains exactly as its examples would alone, with less padding. An example's first
    label is never trained on (chat rows start with a system or user turn), so the token that ends one
    example and is followed by the next learns nothing across the boundary."""
    rows: list[dict[str, list]] = []
    for index, (ids, labels) in enumerate(zip(features["input_ids"], features["labels"])):
        row = next((r for r in rows if len(r["input_ids"]) + len(ids) <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "segment_ids": [], "position_ids": [], "examples": []}
            rows.append(row)
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + list(labels[1:])
        row["segment_ids"] += [len(row["examples"]) + 1] * len(ids)
        row["position_ids"] += list(range(len(ids)))
        row["examples"].append(index)
    return {key: [r[key] for r in rows] for key in ("input_ids", "labels", "segment_ids", "position_ids", "examples")}


@dataclasses.dataclass
class TaskData:
    """A task's examples, their features, and what scoring needs to turn predictions into metrics."""

    task: str
    features: dict[str, list]
    num_labels: int
    problem_type: str = "single"
    labels: list[str] = dataclasses.field(default_factory=list)
    raw: Any = None  # the reader's object (ClassifyData, TagData, SquadExamples, Seq2SeqData)
    qa_features: list | None = None
    prompts: list[list[int]] | None = None  # seq2seq: what generation starts from (sources, or decoder prompts)

    def __len__(self) -> int:
        return len(self.features["input_ids"])


def load_task_data(
    task: str, path: str | Path, tokenizer, *, max_length: int, labels: list[str] | None = None, problem_type: str | None = None,
    text_field: str = "text", pair_field: str | None = None, label_field: str = "label", doc_stride: int = 128,
    source_field: str = "source", target_field: str = "target", max_target_length: int = 128, decoder_only: bool = False,
) -> TaskData:
    """Read a task file and build its features. ``labels`` (the training labels) check a validation file.
    seq2seq: ``max_length`` bounds the source (a decoder's prompt), ``max_target_length`` the target;
    chat: ``max_length`` bounds a conversation, rendered by the tokenizer's chat template."""
    from lmlab.data import tasks as T

    if task == "chat":
        data = T.read_chat(path)
        return TaskData("chat", T.encode_chat(tokenizer, data, max_length), 0, raw=data)
    if task == "seq2seq":
        data = T.read_seq2seq(path, source_field=source_field, target_field=target_field)
        features = T.encode_seq2seq(tokenizer, data, max_length, max_target_length, decoder_only=decoder_only)
        if decoder_only:
            prompts = [ids[: labels.count(IGNORE_INDEX)] for ids, labels in zip(features["input_ids"], features["labels"])]
            for k, prompt in enumerate(prompts):
                if not prompt:
                    raise LmlabError(f"{path}:{data.lines[k]}: the prompt encodes to no tokens; a decoder needs a prompt to continue")
        else:
            prompts = features["input_ids"]
        return TaskData("seq2seq", features, 0, raw=data, prompts=prompts)

    if task == "classify":
        data = T.read_classify(path, text_field=text_field, pair_field=pair_field, label_field=label_field)
        if labels is not None:
            if problem_type is not None and data.kind != problem_type:
                raise LmlabError(f"{path}: its labels are {data.kind}, the training file's are {problem_type}")
            data = T.check_labels(data, labels, path)
        features = T.encode_classify(tokenizer, data, max_length)
        names = list(data.label_names)
        return TaskData("classify", features, 1 if data.kind == "regression" else len(names), data.kind, names, raw=data)
    if task == "tag":
        data = T.read_tags(path)
        if labels is not None:
            data = T.check_tags(data, labels, path)
        names = list(labels if labels is not None else data.tag_names)
        features = T.align_tags(tokenizer, data, {t: i for i, t in enumerate(names)}, max_length)
        return TaskData("tag", features, len(names), labels=names, raw=data)
    if task == "qa":
        examples = T.read_squad(path)
        # HF run_qa's 384/128/64, scaled down for short windows so each window still holds new context
        quarter = max(1, max_length // 4)
        feats = T.qa_features(
            tokenizer, examples, max_length=max_length, doc_stride=min(doc_stride, quarter), max_query_length=min(64, quarter)
        )
        features = {
            "input_ids": [f.input_ids for f in feats], "token_type_ids": [f.token_type_ids for f in feats],
            "start_positions": [f.start_position for f in feats], "end_positions": [f.end_position for f in feats],
        }
        return TaskData("qa", features, 2, raw=examples, qa_features=feats)
    raise LmlabError(f"unknown --task '{task}'; expected one of {', '.join(TASKS)}")


@torch.no_grad()
def assistant_token_accuracy(model: nn.Module, objective: TaskObjective, n: int, batch_size: int, device: torch.device) -> float:
    """chat: the share of assistant tokens (the labelled ones) of examples 0..n-1 that the model predicts
    greedily from the tokens before them."""
    was_training = model.training
    model.eval()
    right = total = 0
    for start in range(0, n, batch_size):
        batch = objective.batch(torch.arange(start, min(start + batch_size, n)))
        labels = batch["labels"][:, 1:].to(device)
        trained = labels != IGNORE_INDEX
        predicted = model(batch["input_ids"].to(device))[:, :-1].argmax(-1)
        right += int((predicted == labels)[trained].sum())
        total += int(trained.sum())
    model.train(was_training)
    return right / total


@torch.no_grad()
def predict_logits(model: nn.Module, objective: TaskObjective, n: int, batch_size: int, device: torch.device) -> list[Tensor]:
    """Task-head logits for examples 0..n-1, one CPU tensor per example (unpadded for token tasks)."""
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    for start in range(0, n, batch_size):
        batch = objective.batch(torch.arange(start, min(start + batch_size, n)))
        logits = model.task_logits(*(batch[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask"))).float().cpu()
        lengths = batch["attention_mask"].sum(1).tolist()
        out += [logits[k] if logits.dim() == 2 else logits[k, : lengths[k]] for k in range(logits.shape[0])]
    model.train(was_training)
    return out


def generate_outputs(
    model: nn.Module, tokenizer, data: TaskData, *, max_new_tokens: int, batch_size: int, num_beams: int = 1
) -> list[str]:
    """seq2seq: the model's output text for each example's source (prompt) — greedy, or beam search."""
    from lmlab.api import LM
    from lmlab.generate import GenerationConfig

    was_training = model.training
    lm = LM(model, tokenizer)  # puts the model in eval mode
    config = GenerationConfig(strategy="beam" if num_beams > 1 else "greedy", num_beams=num_beams, max_new_tokens=max_new_tokens)
    try:
        outputs: list[str] = []
        for start in range(0, len(data.prompts), batch_size):
            outputs += [row[0].text.strip() for row in lm.complete_ids(data.prompts[start : start + batch_size], config)]
        return outputs
    finally:
        model.train(was_training)


def task_metrics(data: TaskData, predictions: list[Tensor] | list[str]) -> dict[str, float]:
    """The headline metrics of predictions (logits; seq2seq: output texts) against ``data``'s gold labels."""
    from lmlab.data import tasks as T
    from lmlab.evaluate import metrics as M

    if data.task == "seq2seq":
        m = M.seq2seq_metrics(predictions, [t.strip() for t in data.raw.targets])
        return {k: m[k] for k in ("chrf", "bleu", "rougeL")}
    logits = predictions
    if data.task == "classify":
        stacked = torch.stack(logits)
        gold = data.features["labels"]
        if data.problem_type == "single":
            m = M.classification_metrics(stacked.argmax(-1).tolist(), gold, num_classes=data.num_labels, label_names=data.labels)
            return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}
        if data.problem_type == "multi":
            m = M.multilabel_metrics((stacked > 0).int().tolist(), [[int(v) for v in row] for row in gold], label_names=data.labels)
            return {k: m[k] for k in ("subset_accuracy", "f1_micro", "f1_macro") if k in m}
        m = M.regression_metrics(stacked.squeeze(-1).tolist(), gold)
        return {k: m[k] for k in ("mse", "pearson", "spearman") if k in m}
    if data.task == "tag":
        pred_tags = [
            T.tags_from_predictions(row.argmax(-1).tolist(), word_ids, data.labels, n_words=len(words))
            for row, word_ids, words in zip(logits, data.features["word_ids"], data.raw.words)
        ]
        m = M.tagging_metrics(pred_tags, data.raw.tags)
        return {"f1": m["f1"], "precision": m["precision"], "recall": m["recall"]}
    starts = [row[:, 0].tolist() for row in logits]
    ends = [row[:, 1].tolist() for row in logits]
    version_2 = getattr(data.raw, "version_2", False)
    predictions = T.qa_postprocess(data.raw, data.qa_features, starts, ends, version_2=version_2)
    references = {ex.id: list(ex.answer_texts) for ex in data.raw}
    m = M.squad_metrics(predictions, references)
    return {"exact": m["exact"], "f1": m["f1"]}


def _sources(checkpoint: str | Path) -> tuple[Path, ...]:
    """The folders a fine-tune reads: the checkpoint as given and as resolved (a run's best/)."""
    try:
        return (Path(checkpoint), resolve_checkpoint(checkpoint))
    except LmlabError:
        return (Path(checkpoint),)


def finetune(
    checkpoint: str | Path,
    task: str,
    train: str | Path,
    out: str | Path,
    *,
    valid: str | Path | None = None,
    max_length: int = 128,
    text_field: str = "text",
    pair_field: str | None = None,
    label_field: str = "label",
    source_field: str = "source",
    target_field: str = "target",
    max_target_length: int = 128,
    class_weights: bool = False,
    patience: int | None = None,
    resume: bool = False,
    lora: str | Any | None = None,
    show_masking: bool = False,
    pack: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    memory_budget: float | None = None,
    overwrite: bool = False,
    **train_args: Any,
) -> TrainResult | str | DryRun:
    """Fine-tune ``checkpoint`` (an lmlab checkpoint or run folder) on a task; checkpoints go to ``out``.

    The model gets a fresh task head for ``task`` (a checkpoint already fine-tuned on the same task
    keeps its head; seq2seq keeps the LM head and needs none); ``train_args`` are :class:`TrainConfig`
    fields. With ``valid`` the task metric picks ``best/`` and ``patience`` evaluations without
    improvement stop the run early. seq2seq: ``max_length`` bounds the source (a decoder's prompt)
    and ``max_target_length`` the target; a decoder holds both in its context window. ``lora`` (a
    ``--lora`` string or a :class:`~lmlab.train.lora.LoraSpec`) trains adapters instead of the weights.
    chat: ``max_length`` bounds a conversation; ``show_masking`` trains nothing and returns (and prints)
    :func:`show_chat_masking` of the first training conversation; ``pack`` packs several conversations
    into each training row (:func:`pack_examples`), none attending to another. ``dry_run`` reads the data
    and checks everything but trains and writes nothing: it returns the predicted peak memory of a training
    step (:class:`~lmlab.train.memory.DryRun`), checked against ``memory_budget`` GiB or the GPU's memory.
    ``out`` must be new, empty or an lmlab run; ``overwrite`` lets lmlab write its files into another folder,
    deleting nothing else there (:mod:`lmlab.io.outputs`).
    """
    from lmlab.train import lora as lora_mod

    spec = lora_mod.parse_lora(lora) if isinstance(lora, str) else lora
    if pack and task != "chat":
        raise LmlabError(f"--pack packs conversations for --task chat; expected --task chat, not {task!r}")

    if task not in TASKS:
        raise LmlabError(f"unknown --task '{task}'; expected one of {', '.join(TASKS)}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise LmlabError(f"--patience is {patience!r}: expected a positive number of evaluations (or none: no early stop)")
    if show_masking:
        if task != "chat":
            raise LmlabError(f"--show-masking shows which tokens --task chat trains on; expected --task chat, not {task!r}")
        return show_chat_masking(checkpoint, train, max_length)
    out = Path(out) if dry_run else check_run_output(out, overwrite=overwrite, sources=_sources(checkpoint))
    cfg = TrainConfig(**{**FINETUNE_DEFAULTS, **train_args})
    check_budget(memory_budget, dry_run)
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        raise LmlabError(f"--resume: {out} holds no checkpoint to resume from")
    if not resume and latest_checkpoint(out) is not None:
        raise LmlabError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose another --out")
    cfg.seq_len = max_length + (max_target_length if task == "seq2seq" else 0)
    if resume_from is not None:
        _check_resume(resume_from, cfg, checkpoint, task, train)
    base = resume_from or resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(base, verify=verify)  # the one the model was trained with, or an error
    base_config = load_config(base)  # an lmlab checkpoint's, or an HF folder's converted
    arch = base_config.arch
    if task == "chat" and arch != "decoder":
        raise LmlabError(f"{base}: a{'n' if arch[0] in 'aeiou' else ''} {arch} model; --task chat fine-tunes decoders")
    if task == "chat" and tokenizer.chat_template is None:
        from lmlab.templates import DEFAULT_CHAT_TEMPLATE

        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # saved with every checkpoint: chat and export render alike
    if task == "seq2seq" and arch == "encoder":
        raise LmlabError(f"{base}: an encoder (BERT style) does not generate; --task seq2seq fine-tunes encoder–decoders and decoders")
    if task != "seq2seq" and arch not in ("encoder", "decoder"):
        raise LmlabError(f"{base}: a {arch} model; --task {task} fine-tunes encoders and decoders (an encoder–decoder takes --task seq2seq)")
    if max_length > base_config.block_size:
        raise LmlabError(f"--max-length {max_length} exceeds the model's block_size {base_config.block_size}")
    if task == "seq2seq":
        room = base_config.block_size - (max_length if arch == "decoder" else 0)
        if max_target_length > room:
            where = f"after a --max-length {max_length} prompt in" if arch == "decoder" else "in"
            raise LmlabError(f"--max-target-length {max_target_length} does not fit {where} the model's block_size {base_config.block_size}")
    if tokenizer.pad_id is None and tokenizer.eos_id is None:
        raise LmlabError(f"{base}: the tokenizer has neither a pad nor an eos token to pad batches with")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id

    options = dict(max_length=max_length, text_field=text_field, pair_field=pair_field, label_field=label_field, source_field=source_field,
                   target_field=target_field, max_target_length=max_target_length, decoder_only=arch == "decoder")
    train_data = load_task_data(task, train, tokenizer, **options)
    valid_data = None
    if valid is not None:
        valid_data = load_task_data(task, valid, tokenizer, labels=train_data.labels if task in ("classify", "tag") else None,
                                    problem_type=train_data.problem_type if task == "classify" else None, **options)

    if task in ("seq2seq", "chat"):  # the LM head generates: no task head (one the base had is dropped)
        config = dataclasses.replace(base_config, task="", num_labels=0, problem_type="single", labels=[], lora={})
    else:
        config = dataclasses.replace(
            base_config, task=task, num_labels=train_data.num_labels, problem_type=train_data.problem_type,
            labels=train_data.labels if task != "qa" else ["start", "end"], lora={},
        )
    weights = None
    if class_weights and task == "classify" and train_data.problem_type == "single":
        counts = torch.bincount(torch.tensor(train_data.features["labels"]), minlength=train_data.num_labels).float()
        weights = counts.sum() / (len(counts) * counts.clamp(min=1))  # "balanced", as scikit-learn
    features = pack_examples(train_data.features, max_length) if pack else train_data.features
    objective = TaskObjective(
        task, features, pad_id, train_data.problem_type, weights, model_arch=arch, start_id=base_config.decoder_start_token_id
    )
    saved = lora_mod.LoraSpec.from_dict(base_config.lora) if resume_from is not None and base_config.lora else None
    if resume_from is not None and spec is not None and spec != saved:
        raise LmlabError(f"--resume: {resume_from} was trained {'with --lora ' + str(saved.to_dict()) if saved else 'without --lora'}; resume it as it was")
    if dry_run:
        return _dry_run(config, objective, features, cfg, spec if resume_from is None else saved, task, arch, max_length, memory_budget)

    info, device = dist_mod.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    if resume_from is not None:
        model = load_model(resume_from, device=device).train()  # adapters and all, as saved
    else:
        model = _with_task_head(base, base_config, config, device, verify)
        if spec is not None:
            lora_mod.apply_lora(model, spec)
    if model.config.lora and info.is_main:
        print(f"lmlab: {lora_mod.trainable_summary(model)}", file=sys.stderr)

    batches = ExampleBatches(len(features["input_ids"]), cfg.micro_batch_size, cfg.grad_accum_steps, cfg.seed, info.rank, info.world_size)
    if pack and info.is_main:
        print(f"lmlab: {len(train_data):,} conversations packed into {len(features['input_ids']):,} rows of at most {max_length} tokens", file=sys.stderr)

    valid_batches: list[Tensor] = []
    score_fn: Callable[[nn.Module], dict[str, float]] | None = None
    select = None  # the metric that picks best/ (None: the validation loss)
    if valid_data is not None:
        objective.valid_features = valid_data.features
        scorer = TaskObjective(task, valid_data.features, pad_id, valid_data.problem_type)
        valid_batches = [torch.arange(i, min(i + cfg.micro_batch_size, len(valid_data))) for i in range(0, len(valid_data), cfg.micro_batch_size)]

        def score_fn(m: nn.Module) -> dict[str, float]:  # noqa: F811 (replaces the None above)
            if task == "chat":
                return {"token_accuracy": assistant_token_accuracy(m, scorer, len(valid_data), cfg.micro_batch_size, device)}
            if task == "seq2seq":
                outputs = generate_outputs(m, tokenizer, valid_data, max_new_tokens=max_target_length, batch_size=cfg.micro_batch_size)
                return task_metrics(valid_data, outputs)
            return task_metrics(valid_data, predict_logits(m, scorer, len(valid_data), cfg.micro_batch_size, device))

        if task != "chat":  # chat: the lowest validation loss (on assistant tokens) picks best/
            select = SELECT[train_data.problem_type if task == "classify" and train_data.problem_type != "single" else task]
    if info.is_main:
        what = {"seq2seq": "source → target" if arch == "seq2seq" else "prompt → completion", "chat": "loss on assistant turns"}
        print(
            f"lmlab: fine-tuning {base} for {task} ({what.get(task, f'{config.num_labels} labels')})"
            + f", {len(train_data):,} training examples"
            + (f", {len(valid_data):,} validation" if valid_data is not None else "")
            + f"; {batches.steps_per_epoch():,} steps per epoch, {cfg.max_steps:,} steps",
            file=sys.stderr,
        )
    started_from = read_meta(resume_from).get("base", base) if resume_from is not None else base  # a resumed run keeps its base
    meta = {"objective": task, "tokenizer_sha256": tokenizer.sha256, "base": str(started_from), "train": str(train)}
    try:
        return train_loop(
            model, objective, batches, valid_batches, cfg, out, device=device, dist=info, tokenizer=tokenizer, meta=meta,
            resume_from=resume_from, desc=f"finetune {task}", score_fn=score_fn, select=select, patience=patience, overwrite=overwrite,
        )
    finally:
        dist_mod.teardown(info)


def _check_resume(resume_from: Path, cfg: TrainConfig, checkpoint: str | Path, task: str, train: str | Path) -> None:
    """Refuse to resume with another task, base checkpoint or training file than the run started with, or with
    training settings that change its course (:func:`~lmlab.train.loop.check_resume`)."""
    meta = read_meta(resume_from)
    try:
        base = resolve_checkpoint(checkpoint)
    except LmlabError:  # gone since: the run's checkpoint holds the weights, only the name can be compared
        base = Path(checkpoint)
    started = {"--task": (meta.get("objective", task), task)}
    if not same_source(meta.get("base"), base):
        started["the base checkpoint"] = (meta["base"], checkpoint)
    if not same_source(meta.get("train"), train):
        started["--train"] = (meta["train"], train)
    seq_len = "--max-length + --max-target-length" if task == "seq2seq" else "--max-length"
    check_resume(resume_from, cfg, started, flags={"seq_len": seq_len}, announce=os.environ.get("RANK", "0") == "0")  # rank 0 speaks


def _dry_run(config: ModelConfig, objective: TaskObjective, features: dict[str, list], cfg: TrainConfig, lora: Any, task: str, arch: str,
             max_length: int, memory_budget: float | None) -> DryRun:
    """``finetune(dry_run=True)``: the predicted memory of a training step on the longest training examples
    (a batch is padded to its longest row), without loading a weight (:mod:`lmlab.train.memory`)."""
    from lmlab.train import memory

    device = dist_mod.pick_device(cfg.device, dist_mod.DistInfo(), present=False)
    lengths = [len(ids) + (len(labels) if arch == "seq2seq" else 0) for ids, labels in zip(features["input_ids"], features.get("labels", features["input_ids"]))]
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def make_batch(settings: memory.Settings) -> dict[str, Tensor]:
        batch = objective.batch(torch.tensor(longest[: settings.micro_batch_size]))
        T, keep = batch["input_ids"].shape[1], settings.seq_len
        if keep < T:  # a shorter --max-length: the input side (and a decoder's aligned labels) cut to it
            aligned = ("input_ids", "token_type_ids", "attention_mask", "segment_ids", "position_ids") + (("labels",) if arch != "seq2seq" else ())
            batch = {k: v[:, :keep] if k in aligned and v.dim() == 2 and v.shape[1] == T else v for k, v in batch.items()}
        return batch

    return memory.plan(
        lambda: build_model(config), objective, make_batch, cfg, device, seq_len=max_length, lora=lora, memory_budget=memory_budget,
        title=f"{config.name or 'custom'} ({config.arch}) fine-tuned for {task}, on its longest training examples",
        seq_flag="--max-length", lora_flag=True, vocab_size=config.vocab_size if task in ("seq2seq", "chat") else 0, up_to=True,
    )


def show_chat_masking(checkpoint: str | Path, train: str | Path, max_length: int = 128) -> str:
    """The first conversation of ``train`` as ``--task chat`` trains ``checkpoint`` on it: printed with the
    trained (assistant) tokens in colour on a terminal, and returned with them in ``[[…]]``."""
    from lmlab.chat import mark_trained

    base = resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(base)
    data = load_task_data("chat", train, tokenizer, max_length=max_length)
    ids, labels = data.features["input_ids"][0], data.features["labels"][0]
    trained = sum(label != IGNORE_INDEX for label in labels)
    print(f"lmlab: {data.raw.path}:{data.raw.lines[0]} as --task chat trains on it: {len(ids)} tokens, {trained} trained "
          f"({'in colour' if sys.stdout.isatty() else 'in [[…]]'})", file=sys.stderr)
    print(mark_trained(tokenizer, ids, labels, color=sys.stdout.isatty()))
    return mark_trained(tokenizer, ids, labels)


def _with_task_head(base: Path, base_config: ModelConfig, config: ModelConfig, device: torch.device, verify: bool = True) -> nn.Module:
    """The base checkpoint's weights in a model with ``config``'s task head (fresh unless the base has the same one).
    A LoRA base is merged first: its adapters become part of the weights the new run starts from; an HF
    folder's weights are converted (and checked against transformers once, see :func:`load_model`)."""
    from lmlab.io.checkpoint import WEIGHTS_FILE, rebuild_buffers, weights_for_saving
    from lmlab.io.hf import is_hf_folder
    from lmlab.io.weights import read_safetensors

    model = build_model(config)
    rebuild_buffers(model)  # RoPE tables with the config's scaling
    if base_config.lora or is_hf_folder(base):
        state = weights_for_saving(load_model(base, merge_lora=True, verify=verify))
    else:
        state = read_safetensors(base / WEIGHTS_FILE)
    same_head = base_config.task == config.task and base_config.num_labels == config.num_labels
    state = {k: v for k, v in state.items() if same_head or not k.startswith("task_head.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("task_head.") and not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise LmlabError(f"{base}: weights do not fit the model (missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})")
    model.tie_weights()
    return model.to(device).train()
