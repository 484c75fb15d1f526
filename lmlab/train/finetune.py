"""``lmlab.finetune``: a pretrained checkpoint + labelled files → a task model (classify, tag, qa, seq2seq, chat).

A recipe of four steps, each a function: :func:`validate` (flags, output folder, resume, base
checkpoint), :func:`build_data` (the task's files, model config and objective), :func:`build_task_model`
(the base's weights with the task's head, LoRA adapters) and :func:`run_training` (the one training loop).
What differs between tasks — reading, encoding, heads, losses, metrics, which metric picks ``best/`` —
is the task's (:mod:`lmlab.tasks`); nothing here branches on a task's name.

The batches are example indices (a pure function of the step, so resuming is exact), the task's
objective collates them and computes its loss, and the task's metrics on the validation set at every
evaluation pick the best checkpoint and drive early stopping.

``lora`` (``--lora r=8,alpha=16,targets=qkv``) freezes the model and trains low-rank adapters through
``peft`` (:mod:`lmlab.train.lora`) plus the new task head; checkpoints hold base + adapters and resume
like any run; ``lmlab merge-lora`` folds the adapters in for export. :func:`finetune_dry_run` and
:func:`show_chat_masking` are the two entry points that train nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import (
    check_run_output,
    latest_checkpoint,
    load_config,
    load_model,
    load_tokenizer,
    load_train_state,
    read_meta,
    resolve_checkpoint,
)
from lmlab.model import build_model
from lmlab.objectives.losses import IGNORE_INDEX
from lmlab.tasks import TASKS, ObjectiveArgs, Task, TaskData, TaskFields, TaskObjective, get_task, pack_examples
from lmlab.train import dist as dist_mod
from lmlab.train.data import ExampleBatches
from lmlab.train.distill import Teacher
from lmlab.train.loop import TrainConfig, TrainResult, check_resume, same_source, train_loop
from lmlab.train.memory import DryRun, check_budget

# fine-tuning starts from BERT's recipe (Devlin et al.: 2e-5–5e-5, no long warm-up, AdamW β2 0.999, decay 0.01)
FINETUNE_DEFAULTS = dict(lr=5e-5, warmup_steps=0, weight_decay=0.01, beta2=0.999, max_steps=300, eval_interval=100)
# LoRA trains a few low-rank adapters from zero: it needs several times full fine-tuning's rate (PEFT's and litgpt's
# examples use 1e-4–3e-4 and more; Hu et al. 2e-4 for GPT-2 and up to 5e-4 for RoBERTa). Tagging 300 sentences with
# the real all-MiniLM-L6-v2 for 40 steps of 16: entity F1 0.98 at 3e-4, 0.93 at 2e-4, 0.66 at 1e-4; full 1.00
LORA_LR = 3e-4
# the flags whose default lmlab works out (the LoRA rate, --epochs, a resumed run's own): None is "not given"
DERIVED = ("max_steps", "lr")
# the finetune command line's defaults (None: lmlab works it out) and the help of those it works out
FLAG_DEFAULTS = {**FINETUNE_DEFAULTS, **dict.fromkeys(DERIVED)}
DERIVED_HELP = {
    "max_steps": f"optimizer steps in the whole run (default: --epochs's, else {FINETUNE_DEFAULTS['max_steps']}; "
    "--resume: the run's own)",
    "lr": f"peak learning rate (default: {FINETUNE_DEFAULTS['lr']:.0e}, with --lora {LORA_LR:.0e}: LoRA's adapters "
    "start from zero and need a higher rate; --resume: the run's own)".replace("e-0", "e-"),
}


@dataclasses.dataclass
class Setup:
    """What :func:`validate` settles before any data is read."""

    task: Task
    fields: TaskFields
    cfg: TrainConfig
    out: Path
    base: Path  # the base checkpoint, or the run's latest checkpoint when resuming
    resume_from: Path | None
    tokenizer: Any
    base_config: ModelConfig
    pad_id: int
    lora: Any  # the LoraSpec to train with (a resumed run's own), or None
    verify: bool = True
    epochs: float | None = None  # --epochs, when --max-steps was not given: max_steps follows from the data
    plan: dict[str, str] = dataclasses.field(default_factory=dict)  # why max_steps and lr are what they are


@dataclasses.dataclass
class Prepared:
    """What :func:`build_data` reads and builds: the data, the fine-tuned model's config, its objective."""

    train: TaskData
    valid: TaskData | None
    config: ModelConfig
    objective: TaskObjective
    features: dict[str, list]  # the training rows (packed when ``pack``)


def check_task(task: str, *, pack: bool = False, patience: int | None = None, show_masking: bool = False) -> Task:
    """The registered task ``task`` names, after the flags that need no file are checked."""
    if pack and not getattr(TASKS.get(task), "conversational", False):
        raise LmlabError(
            f"pack packs conversations for task chat; expected task chat, not {task!r}", params="pack task"
        )
    found = get_task(task)
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise LmlabError(
            f"patience is {patience!r}: expected a positive number of evaluations (or none: no early stop)",
            params="patience",
        )
    if show_masking and not found.conversational:
        raise LmlabError(
            f"show_masking shows which tokens task chat trains on; expected task chat, not {task!r}",
            params="show_masking task",
        )
    return found


def validate(
    checkpoint: str | Path,
    task: Task,
    train: str | Path,
    out: str | Path,
    fields: TaskFields,
    *,
    lora: Any = None,
    epochs: float | None = None,
    resume: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    memory_budget: float | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    teacher: Teacher | None = None,
    **train_args: Any,
) -> Setup:
    """Check the output folder, the training settings, the resume state and the base checkpoint against ``task``."""
    from lmlab.train import lora as lora_mod

    spec = lora_mod.parse_lora(lora) if isinstance(lora, str) else lora
    out = Path(out) if dry_run else check_run_output(out, overwrite=overwrite, sources=_sources(checkpoint))
    check_budget(memory_budget, dry_run, world_size)
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        raise LmlabError(f"resume: {out} holds no checkpoint to resume from", params="resume")
    if not resume and latest_checkpoint(out) is not None:
        raise LmlabError(
            f"{out} already holds checkpoints: pass resume to continue that run, or write to another out",
            params="resume out",
        )
    derived, plan = _derived_defaults(train_args, spec is not None, epochs, resume_from)
    cfg = TrainConfig(**{**FINETUNE_DEFAULTS, **{k: v for k, v in train_args.items() if k not in DERIVED}, **derived})
    cfg.seq_len = task.seq_len(fields)
    if resume_from is not None:
        _check_resume(resume_from, cfg, checkpoint, task, train, teacher)
    base = resume_from or resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(base, verify=verify)  # the one the model was trained with, or an error
    base_config = load_config(base)  # an lmlab checkpoint's, or an HF folder's converted
    if base_config.quantization:
        raise LmlabError(f"{base} is quantized: fine-tune the checkpoint it was quantized from")
    task.check_base(base_config, fields, base)
    task.prepare_tokenizer(tokenizer)
    if tokenizer.pad_id is None and tokenizer.eos_id is None:
        raise LmlabError(f"{base}: the tokenizer has neither a pad nor an eos token to pad batches with")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    saved = lora_mod.LoraSpec.from_dict(base_config.lora) if resume_from is not None and base_config.lora else None
    if resume_from is not None and spec is not None and spec != saved:
        raise LmlabError(
            f"resume: {resume_from} was trained "
            f"{'with lora ' + str(saved.to_dict()) if saved else 'without lora'}; resume it as it was",
            params="resume lora",
        )
    return Setup(
        task,
        fields,
        cfg,
        out,
        base,
        resume_from,
        tokenizer,
        base_config,
        pad_id,
        spec if resume_from is None else saved,
        verify,
        epochs if train_args.get("max_steps") is None else None,
        plan,
    )


def _derived_defaults(
    train_args: dict[str, Any], lora: bool, epochs: float | None, resume_from: Path | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """``max_steps`` and ``lr`` as given, else as lmlab works them out (a resumed run's own; the LoRA rate; the
    default 300 steps, which :func:`plan_steps` replaces with ``epochs``'s), and a note on each saying why."""
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 < epochs < math.inf
    ):
        raise LmlabError(
            f"epochs is {epochs!r}: expected a positive number of passes over the training data", params="epochs"
        )
    saved = load_train_state(resume_from).get("train_config", {}) if resume_from is not None else {}
    given = {k: train_args[k] for k in DERIVED if train_args.get(k) is not None}
    plan = {k: f"--{k.replace('_', '-')} given" for k in given}
    if "lr" not in given:
        if "lr" in saved:
            given["lr"], plan["lr"] = saved["lr"], "the resumed run's own"
        elif lora:
            given["lr"], plan["lr"] = LORA_LR, "the LoRA default (--lr to change)"
        else:
            given["lr"], plan["lr"] = FINETUNE_DEFAULTS["lr"], "the default (--lr to change)"
    if "max_steps" in given and epochs is not None:
        plan["max_steps"] = f"--max-steps given, so --epochs {epochs:g} is not used"
    elif "max_steps" not in given and epochs is None:
        if "max_steps" in saved:
            given["max_steps"], plan["max_steps"] = saved["max_steps"], "the resumed run's own"
        else:
            given["max_steps"] = FINETUNE_DEFAULTS["max_steps"]
            plan["max_steps"] = "the default (--epochs or --max-steps to change)"
    elif "max_steps" not in given:  # --epochs: the steps follow from the data (plan_steps); the check needs a number
        given["max_steps"] = saved.get("max_steps", FINETUNE_DEFAULTS["max_steps"])
    return given, plan


def plan_steps(setup: Setup, rows: int) -> None:
    """With ``--epochs`` (and no ``--max-steps``): ``setup.cfg.max_steps`` from the training rows, the
    micro-batch, gradient accumulation and processes (each optimizer step reads that many rows; the epochs run on
    from one another, so the last step may start the next)."""
    if setup.epochs is None:
        return
    cfg, world = setup.cfg, int(os.environ.get("WORLD_SIZE", "1"))
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world
    steps = max(1, math.ceil(setup.epochs * rows / per_step))
    setup.plan["max_steps"] = (
        f"--epochs {setup.epochs:g} × {rows:,} training rows / {per_step:,} rows a step "
        f"(--micro-batch-size {cfg.micro_batch_size} × --grad-accum-steps {cfg.grad_accum_steps}"
        + (f" × {world} processes" if world > 1 else "")
        + ")"
    )
    if setup.resume_from is not None and steps != cfg.max_steps and os.environ.get("RANK", "0") == "0":
        print(
            f"lmlab: --resume: --epochs {setup.epochs:g} is now {steps:,} steps (the run was planned for "
            f"{cfg.max_steps:,}); the {cfg.schedule} learning-rate schedule ends at step {steps:,}",
            file=sys.stderr,
        )
    cfg.max_steps = steps


def build_data(
    setup: Setup, train: str | Path, valid: str | Path | None = None, *, class_weights: bool = False, pack: bool = False
) -> Prepared:
    """Read the training (and validation) file as the task reads it; the fine-tuned config and the objective."""
    task, fields, arch = setup.task, setup.fields, setup.base_config.arch
    train_data = task.read(train, setup.tokenizer, fields, arch=arch)
    task.check_training(train_data, train)
    valid_data = None
    if valid is not None:
        valid_data = task.read(
            valid, setup.tokenizer, fields, arch=arch, labels=train_data.labels, problem_type=train_data.problem_type
        )
    features = pack_examples(train_data.features, fields.max_length) if pack else train_data.features
    args = ObjectiveArgs(
        setup.pad_id,
        problem_type=train_data.problem_type,
        num_labels=train_data.num_labels,
        arch=arch,
        start_id=setup.base_config.decoder_start_token_id,
        class_weights=class_weights,
        valid_features=valid_data.features if valid_data is not None else None,
    )
    objective = task.objective(features, args)
    return Prepared(train_data, valid_data, task.head(setup.base_config, train_data), objective, features)


def build_task_model(setup: Setup, config: ModelConfig, device: torch.device) -> nn.Module:
    """The model to train: a resumed run's (adapters and all, as saved), or the base's weights with the task's head."""
    from lmlab.train import lora as lora_mod

    if setup.resume_from is not None:
        return load_model(setup.resume_from, device=device).train()
    model = _with_task_head(setup.base, setup.base_config, config, device, setup.verify)
    if setup.lora is not None:
        lora_mod.apply_lora(model, setup.lora)
    return model


def _validation(setup: Setup, data: Prepared, device: torch.device):
    """The validation batches (rows of the validation set) and the task's score function over it (None without one)."""
    if data.valid is None:
        return [], None
    task, valid, size = setup.task, data.valid, setup.cfg.micro_batch_size
    batches = [torch.arange(i, min(i + size, len(valid))) for i in range(0, len(valid), size)]

    def score_fn(m: nn.Module) -> dict[str, float]:
        predictions = task.predict(
            m,
            setup.tokenizer,
            valid,
            batch_size=size,
            device=device,
            pad_id=setup.pad_id,
            max_new_tokens=setup.fields.max_target_length,
        )
        return task.metrics(valid, predictions)

    return batches, score_fn


def run_training(
    setup: Setup,
    data: Prepared,
    train_file: str | Path,
    *,
    pack: bool = False,
    patience: int | None = None,
    overwrite: bool = False,
    teacher: Teacher | None = None,
) -> TrainResult:
    """Fine-tune: the one training loop, scored at every evaluation by the task's metrics on the validation set;
    with a ``teacher``, its objective distils from it too (:mod:`lmlab.train.distill`)."""
    from lmlab.train import lora as lora_mod

    task, cfg, arch = setup.task, setup.cfg, setup.base_config.arch
    info, device = dist_mod.setup(cfg.device, cfg.strategy)
    torch.manual_seed(cfg.seed)
    model = build_task_model(setup, data.config, torch.device("cpu") if info.sharded else device)
    if model.config.lora and info.is_main:
        print(f"lmlab: {lora_mod.trainable_summary(model)}", file=sys.stderr)
    n_rows = len(data.features["input_ids"])
    batches = ExampleBatches(n_rows, cfg.micro_batch_size, cfg.grad_accum_steps, cfg.seed, info.rank, info.world_size)
    if pack and info.is_main:
        print(
            f"lmlab: {len(data.train):,} conversations packed into {n_rows:,} rows of at most "
            f"{setup.fields.max_length} tokens",
            file=sys.stderr,
        )
    valid_batches, score_fn = _validation(setup, data, device)
    selection = task.select(data.train)
    if info.is_main:
        print(
            f"lmlab: fine-tuning {setup.base} for {task.name} ({task.describe(data.train, arch)})"
            + f", {len(data.train):,} training examples"
            + (f", {len(data.valid):,} validation" if data.valid is not None else "")
            + f"; {batches.steps_per_epoch():,} steps per epoch",
            file=sys.stderr,
        )
        print(
            f"lmlab: {cfg.max_steps:,} steps: {setup.plan.get('max_steps', 'as given')}; learning rate "
            f"{cfg.lr:g}: {setup.plan.get('lr', 'as given')}"
            + (
                f"; validation (loss, then the task's predictions) every {cfg.eval_interval:,} steps and at the end"
                if data.valid is not None
                else ""
            ),
            file=sys.stderr,
        )
    # a resumed run keeps its base
    base = read_meta(setup.resume_from).get("base", setup.base) if setup.resume_from is not None else setup.base
    meta = {
        "objective": task.name,
        "tokenizer_sha256": setup.tokenizer.sha256,
        "base": str(base),
        "train": str(train_file),
    }
    objective, distilled = _distilling(teacher, data, device, info.is_main)
    try:
        return train_loop(
            model,
            objective,
            batches,
            valid_batches,
            cfg,
            setup.out,
            device=device,
            dist=info,
            tokenizer=setup.tokenizer,
            meta={**meta, **distilled},
            resume_from=setup.resume_from,
            desc=f"finetune {task.name}",
            score_fn=score_fn,
            select=selection.metric if score_fn is not None else None,
            higher_is_better=selection.higher_is_better,
            patience=patience,
            overwrite=overwrite,
        )
    finally:
        dist_mod.teardown(info)


def _distilling(teacher: Teacher | None, data: Prepared, device: torch.device, announce: bool) -> tuple[Any, dict]:
    """The task's objective, distilling from ``teacher`` when there is one (its labels the data's, in order), and
    what config.json records of the distillation."""
    if teacher is None:
        return data.objective, {}
    return teacher.wrap(data.objective, device, announce, labels=data.config.labels), teacher.meta()


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
    epochs: float | None = None,
    show_masking: bool = False,
    pack: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    memory_budget: float | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    teacher: Teacher | None = None,
    **train_args: Any,
) -> TrainResult | str | DryRun:
    """Fine-tune ``checkpoint`` (an lmlab checkpoint or run folder) on a task; checkpoints go to ``out``.

    The model gets a fresh task head for ``task`` (one already fine-tuned on it keeps it; seq2seq needs none). With
    ``valid`` the task metric picks ``best/``. ``show_masking``: :func:`show_chat_masking`. ``dry_run`` trains and
    writes nothing: :func:`finetune_dry_run`'s predicted peak memory. ``out``: new, empty or an lmlab run, unless
    ``overwrite`` (:mod:`lmlab.io.outputs`).

    Args:
        checkpoint: the pretrained checkpoint (or run folder) to start from
        task: classify, tag, qa, seq2seq or chat
        train: training file: classify .jsonl/.csv/.tsv, tag CoNLL or .jsonl (tokens, tags), qa SQuAD .json,
            seq2seq .jsonl (source, target), chat .jsonl (messages, or prompt and response)
        out: run folder: checkpoints, best/, log.jsonl, loss.png
        valid: validation file of the same kind (metrics, best checkpoint)
        max_length: tokens per example, special tokens included; seq2seq: per source or prompt; chat: per conversation
        text_field: the field (column) holding the text
        pair_field: classify: the second text of a pair
        label_field: classify: the label field/column
        source_field: seq2seq: the source field
        target_field: seq2seq: the target field
        max_target_length: seq2seq: tokens per target, end-of-text included; also the generation length when scoring
        class_weights: classify: weight classes by inverse frequency (imbalanced data)
        patience: stop after this many evaluations without a better validation metric
        resume: continue the latest checkpoint in ``out`` exactly where it stopped
        lora: train LoRA adapters (peft) instead of all weights: r=8,alpha=16,dropout=0.05,targets=qkv (targets: qkv,
            proj, attn.proj, mlp.fc, mlp.proj; several as qkv,proj), or 'default'; it learns at 3e-4 unless --lr says
        epochs: passes over the training data (3, 0.5): steps from its rows, --micro-batch-size, --grad-accum-steps
            and processes; --max-steps, when given, wins (default: none: --max-steps, else 300 whatever the data)
        show_masking: chat: print the first training conversation with the trained tokens marked, and exit
        pack: chat: pack conversations into --max-length rows, each attending only to itself (less padding, same loss)
        verify: check the checkpoint's tokenizer (and a Hugging Face folder against transformers)
        dry_run: predict a training step's peak memory instead of training
        memory_budget: GiB a training step may use, for ``dry_run`` (default: the GPU's memory)
        world_size: for ``dry_run``: the processes (GPUs) of the run (default: torchrun's WORLD_SIZE, else 1)
        overwrite: write into an existing folder that is not an lmlab run
        teacher: distill from this frozen teacher as the model trains (:mod:`lmlab.train.distill`; `lmlab distill`)
        **train_args: TrainConfig fields; ``max_steps`` or ``lr`` None or absent: lmlab's (``--help`` says which)
    """
    kind = check_task(task, pack=pack, patience=patience, show_masking=show_masking)
    if show_masking:
        return show_chat_masking(checkpoint, train, max_length)
    fields = TaskFields(text_field, pair_field, label_field, source_field, target_field, max_length, max_target_length)
    common = dict(lora=lora, epochs=epochs, resume=resume, verify=verify, memory_budget=memory_budget, **train_args)
    common["world_size"] = world_size
    if dry_run:
        more = {"valid": valid, "class_weights": class_weights, "pack": pack}
        return finetune_dry_run(checkpoint, task, train, out, fields=fields, **more, **common)
    setup = validate(checkpoint, kind, train, out, fields, overwrite=overwrite, teacher=teacher, **common)
    data = build_data(setup, train, valid, class_weights=class_weights, pack=pack)
    plan_steps(setup, len(data.features["input_ids"]))
    return run_training(setup, data, train, pack=pack, patience=patience, overwrite=overwrite, teacher=teacher)


def finetune_dry_run(
    checkpoint: str | Path,
    task: str,
    train: str | Path,
    out: str | Path,
    *,
    valid: str | Path | None = None,
    fields: TaskFields = TaskFields(),
    class_weights: bool = False,
    resume: bool = False,
    lora: str | Any | None = None,
    epochs: float | None = None,
    pack: bool = False,
    verify: bool = True,
    memory_budget: float | None = None,
    world_size: int | None = None,
    **train_args: Any,
) -> DryRun:
    """What :func:`finetune` would do, checked and planned but not done: the data is read and every check
    runs, nothing is written, no weight is loaded. The predicted peak memory of a training step on the
    longest training examples (a batch is padded to its longest row) (:mod:`lmlab.train.memory`)."""
    from lmlab.train import memory

    kind = check_task(task, pack=pack)
    setup = validate(
        checkpoint,
        kind,
        train,
        out,
        fields,
        lora=lora,
        epochs=epochs,
        resume=resume,
        verify=verify,
        dry_run=True,
        memory_budget=memory_budget,
        world_size=world_size,
        **train_args,
    )
    data = build_data(setup, train, valid, class_weights=class_weights, pack=pack)
    plan_steps(setup, len(data.features["input_ids"]))
    cfg, config, arch = setup.cfg, data.config, setup.base_config.arch
    device = dist_mod.pick_device(cfg.device, dist_mod.DistInfo(), present=False)
    features = data.features
    lengths = [
        len(ids) + (len(labels) if arch == "seq2seq" else 0)
        for ids, labels in zip(features["input_ids"], features.get("labels", features["input_ids"]))
    ]
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def make_batch(settings: memory.Settings) -> dict[str, Tensor]:
        batch = data.objective.batch(torch.tensor(longest[: settings.micro_batch_size]))
        T, keep = batch["input_ids"].shape[1], settings.seq_len
        if keep < T:  # a shorter --max-length: the input side (and a decoder's aligned labels) cut to it
            aligned = ("input_ids", "token_type_ids", "attention_mask", "segment_ids", "position_ids") + (
                ("labels",) if arch != "seq2seq" else ()
            )
            batch = {
                k: v[:, :keep] if k in aligned and v.dim() == 2 and v.shape[1] == T else v for k, v in batch.items()
            }
        return batch

    return memory.plan(
        lambda: build_model(config),
        data.objective,
        make_batch,
        cfg,
        device,
        seq_len=setup.fields.max_length,
        lora=setup.lora,
        memory_budget=memory_budget,
        world_size=world_size,
        title=f"{config.name or 'custom'} ({config.arch}) fine-tuned for {kind.name}, on its longest training examples",
        seq_flag="--max-length",
        lora_flag=True,
        vocab_size=config.vocab_size if kind.generates else 0,
        up_to=True,
    )


def _check_resume(
    resume_from: Path, cfg: TrainConfig, checkpoint: str | Path, task: Task, train: str | Path, teacher: Teacher | None
) -> None:
    """Refuse to resume with another task, base checkpoint or training file than the run started with, or with
    training settings that change its course (:func:`~lmlab.train.loop.check_resume`)."""
    meta = read_meta(resume_from)
    try:
        base = resolve_checkpoint(checkpoint)
    except LmlabError:  # gone since: the run's checkpoint holds the weights, only the name can be compared
        base = Path(checkpoint)
    started = {"task": (meta.get("objective", task.name), task.name)}
    if not same_source(meta.get("base"), base):
        started["the base checkpoint"] = (meta["base"], checkpoint)
    if not same_source(meta.get("train"), train):
        started["train"] = (meta["train"], train)
    if teacher is not None or "distilled_from" in meta:
        started.update(teacher.started(meta) if teacher is not None else {"teacher": (meta["distilled_from"], None)})
    check_resume(
        resume_from, cfg, started, flags={"seq_len": task.seq_len_params}, announce=os.environ.get("RANK", "0") == "0"
    )  # rank 0 speaks


def show_chat_masking(checkpoint: str | Path, train: str | Path, max_length: int = 128) -> str:
    """The first conversation of ``train`` as ``--task chat`` trains ``checkpoint`` on it: printed with the
    trained (assistant) tokens in colour on a terminal, and returned with them in ``[[…]]``."""
    from lmlab.chat import mark_trained

    tokenizer = load_tokenizer(resolve_checkpoint(checkpoint))
    data = get_task("chat").read(train, tokenizer, TaskFields(max_length=max_length))
    ids, labels = data.features["input_ids"][0], data.features["labels"][0]
    trained = sum(label != IGNORE_INDEX for label in labels)
    print(
        f"lmlab: {data.raw.path}:{data.raw.lines[0]} as --task chat trains on it: {len(ids)} tokens, {trained} trained "
        f"({'in colour' if sys.stdout.isatty() else 'in [[…]]'})",
        file=sys.stderr,
    )
    print(mark_trained(tokenizer, ids, labels, color=sys.stdout.isatty()))
    return mark_trained(tokenizer, ids, labels)


def _with_task_head(
    base: Path, base_config: ModelConfig, config: ModelConfig, device: torch.device, verify: bool = True
) -> nn.Module:
    """The base checkpoint's weights in a model with ``config``'s task head (fresh unless the base has the same one).
    A LoRA base is merged first: its adapters become part of the weights the new run starts from; an HF
    folder's or GGUF file's weights are converted (an HF folder's checked against transformers once, see
    :func:`load_model`); a sharded checkpoint's are read through :func:`load_model`."""
    from lmlab.io.checkpoint import WEIGHTS_FILE, rebuild_buffers, weights_for_saving
    from lmlab.io.gguf_file import is_gguf_file
    from lmlab.io.hf import is_hf_folder, parity_checked
    from lmlab.io.weights import read_safetensors

    model = build_model(config)
    rebuild_buffers(model)  # RoPE tables with the config's scaling
    sharded = not (base / WEIGHTS_FILE).is_file()  # (a GGUF file, or a sharded checkpoint: lmlab.io.dcp)
    if base_config.lora or is_hf_folder(base) or is_gguf_file(base) or sharded:
        checking = verify and is_hf_folder(base) and not parity_checked(base) and os.environ.get("RANK", "0") == "0"
        if checking:  # a fixed cost the user should know of, paid once per folder
            print(
                f"lmlab: checking {base} against transformers' model of it, once (recorded in lmlab's cache; "
                "--no-verify skips it)",
                file=sys.stderr,
            )
        started = time.perf_counter()
        state = weights_for_saving(load_model(base, merge_lora=True, verify=verify))
        if checking:
            print(f"lmlab: loaded and checked in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    else:
        state = read_safetensors(base / WEIGHTS_FILE)
    same_head = base_config.task == config.task and base_config.num_labels == config.num_labels
    state = {k: v for k, v in state.items() if same_head or not k.startswith("task_head.")}
    result = model.load_state_dict(state, strict=False)
    missing = [
        k
        for k in result.missing_keys
        if not k.startswith("task_head.") and not (config.tie_embeddings and k == "lm_head.weight")
    ]
    if missing or result.unexpected_keys:
        raise LmlabError(
            f"{base}: weights do not fit the model (missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]})"
        )
    model.tie_weights()
    return model.to(device).train()
