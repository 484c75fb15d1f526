"""``lmlab distill``: train a smaller student to match a teacher's softened distributions (Hinton et al., 2015).

The teacher is a checkpoint: a decoder (the student learns its next-token distributions on a prepared data folder,
through :func:`~lmlab.train.pretrain.pretrain`), or a classifier or tagger (the student learns its label
distributions on the task's file, through :func:`~lmlab.train.finetune.finetune`, whose hard labels are the file's).
Either way it is an ordinary run of the one training loop whose objective wraps the student's own with the frozen
teacher (:class:`~lmlab.objectives.distill.Distillation`): resume, LoRA, gradient accumulation, precision,
``dry_run`` and torchrun work as for any run, and its checkpoints are the student's alone (config.json records
``distilled_from``, ``alpha`` and ``temperature``).

The student: a preset name (fresh weights, seeded by ``seed``), a checkpoint (its weights), or with
``student_init="teacher-layers"`` DistilBERT's initialisation (Sanh et al., 2019): the teacher's width, half its
depth (or the preset's), each block copied from every other teacher block, embeddings, final norm and heads
copied. A student that is not a checkpoint is written to ``out/student-init/`` first, and the run starts from it.
Teacher and student share the tokenizer and the vocabulary (or labels), or the verb stops with one line.

At the end, the teacher and the student's best checkpoint (else its last) are measured side by side as every
compression verb measures (:mod:`lmlab.compress.measure`): ``out/compression.json`` and the table it prints.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.compress.measure import Compression, compare
from lmlab.config import PRESETS, ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import (
    check_run_output,
    latest_checkpoint,
    load_config,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.io.outputs import write_marker
from lmlab.model import build_model
from lmlab.model.heads import pools
from lmlab.objectives.distill import check_alpha_temperature
from lmlab.train.distill import Teacher
from lmlab.train.loop import TrainResult
from lmlab.train.memory import DryRun, fmt_bytes

STUDENT_INITS = ("own", "teacher-layers")
INIT_FOLDER = "student-init"  # in the run folder: the student as it starts, when it is not a checkpoint already
TASKS = ("", "classify", "tag")  # what a teacher may be: a decoder LM, a classifier, a tagger


@dataclass
class Distilled:
    """What :func:`distill` returns: the student's training run and the teacher-vs-student measurements."""

    run: TrainResult
    compression: Compression | None  # None on the other ranks of a torchrun
    finetuned: bool  # a classifier or tagger (the run's summary shows its task metrics)

    def summary(self) -> str:
        """The run's summary and the teacher-vs-student table (nothing on the other ranks of a torchrun)."""
        if self.compression is None:
            return ""
        lines = [f"lmlab: {line}" for line in self.run.summary(self.finetuned).splitlines()]
        return "\n".join([*lines, self.compression.summary()])


def distill(
    teacher: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    student: str | None = None,
    student_init: str = "own",
    alpha: float = 0.5,
    temperature: float = 2.0,
    valid: str | Path | None = None,
    eval_data: str | Path | None = None,
    max_length: int = 128,
    text_field: str = "text",
    pair_field: str | None = None,
    label_field: str = "label",
    lora: str | None = None,
    resume: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    memory_budget: float | None = None,
    overwrite: bool = False,
    **train_args: Any,
) -> Distilled | DryRun:
    """Distill ``teacher`` into a smaller ``student``: loss = alpha · T² · KL(teacher ‖ student at temperature T)
    + (1 − alpha) · the student's own loss; then measure both (``out``/compression.json).

    Args:
        teacher: the teacher checkpoint (or run folder): a decoder, a classifier or a tagger
        data: a decoder teacher: a prepared data folder (made with the teacher's tokenizer); a classifier or tagger:
            the task's training file, as `lmlab finetune` reads it
        out: run folder: the student's checkpoints, best/, log.jsonl, compression.json
        student: a preset name (fresh weights, or the depth for teacher-layers) or a checkpoint; none: with
            teacher-layers, half the teacher's depth
        student_init: own (a preset's fresh weights, a checkpoint's own) or teacher-layers (DistilBERT: the
            teacher's width, every other teacher block, embeddings and heads copied)
        alpha: weight of the teacher's term (1: the teacher alone; 0: the labels alone)
        temperature: softens both distributions (the KL term is scaled by its square)
        valid: a classifier or tagger: the validation file (task metrics pick best/); a decoder: the data's valid split
        eval_data: what teacher and student are measured on at the end (default: a decoder's data folder, its
            validation tokens; a task's valid file; none: sizes and FLOPs only)
        max_length: a classifier or tagger: tokens per example
        text_field: a classifier or tagger: the field holding the text
        pair_field: classify: the second text of a pair
        label_field: a classifier or tagger: the label field
        lora: train LoRA adapters on the student instead of all its weights: r=8,alpha=16,targets=qkv (see
            `lmlab finetune --help`)
        resume: continue the latest checkpoint in ``out`` exactly where it stopped
        verify: check the checkpoints' tokenizers (and a Hugging Face teacher against transformers)
        dry_run: predict the student's training step's peak memory (the teacher's weights and logits named beside)
        memory_budget: GiB a training step may use, for ``dry_run`` (default: the GPU's memory)
        overwrite: write into an existing folder that is not an lmlab run
        **train_args: :class:`~lmlab.train.loop.TrainConfig` fields (``max_steps``, ``lr``, …)
    """
    check_alpha_temperature(alpha, temperature)
    teacher_path, config, tokenizer = _check_teacher(teacher, student_init, verify)
    start, student_config = _check_student(student, student_init, config, tokenizer, verify)
    _check_context(config, student_config or load_config(start), train_args.get("seq_len"))
    if not config.task:
        _check_data(data, teacher_path, tokenizer, valid)
    init = (student_config, student_init, tokenizer, train_args.get("seed", 0))
    spec = Teacher(teacher_path, alpha, temperature, verify=verify)
    task = dict(max_length=max_length, text_field=text_field, pair_field=pair_field, label_field=label_field)
    common = dict(resume=resume, verify=verify, memory_budget=memory_budget, **train_args)
    if dry_run:
        with tempfile.TemporaryDirectory() as folder:
            if start is None:
                start = _write_student(Path(folder), teacher_path, *init)
            result = _train(spec, config, start, data, out, valid, lora, task, dry_run=True, **common)
        return _with_teacher_note(result, config, train_args)
    if start is None:
        start = _start_folder(Path(out), teacher_path, init, resume, overwrite)
    run = _train(spec, config, start, data, out, valid, lora, task, overwrite=overwrite, **common)
    compression = None
    if os.environ.get("RANK", "0") == "0":
        default = data if not config.task else valid
        settings = dict(alpha=alpha, temperature=temperature, student_init=student_init)
        compression = _measure(
            teacher_path, run, tokenizer, eval_data or default, train_args.get("device", "auto"), settings
        )
    return Distilled(run, compression, bool(config.task))


def _train(
    spec: Teacher, config: ModelConfig, start: Path, data, out, valid, lora, task: dict, **common: Any
) -> TrainResult | DryRun:
    """The student's run: pretraining a decoder's next tokens, or fine-tuning a classifier's or tagger's labels."""
    from lmlab.train.finetune import finetune
    from lmlab.train.pretrain import pretrain

    if config.task:
        return finetune(start, config.task, data, out, valid=valid, lora=lora, teacher=spec, **task, **common)
    if lora is not None:
        from lmlab.train.lora import parse_lora

        spec.lora = parse_lora(lora) if isinstance(lora, str) else lora
    return pretrain(data=data, out=out, init_from=start, teacher=spec, **common)


def _check_teacher(teacher: str | Path, student_init: str, verify: bool) -> tuple[Path, ModelConfig, Any]:
    """The teacher's folder, config and tokenizer, after checking it is something lmlab distills."""
    if student_init not in STUDENT_INITS:
        raise LmlabError(
            f"student_init is {student_init!r}: expected one of {', '.join(STUDENT_INITS)}", params="student_init"
        )
    path = resolve_checkpoint(teacher)
    config = load_config(path)
    kind = f"{config.arch}{' ' + config.task if config.task else ''}"
    if config.task not in TASKS or (not config.task and config.arch != "decoder"):
        raise LmlabError(
            f"teacher {path} is a {kind} model: lmlab distills decoders (next tokens), classifiers and taggers",
            params="teacher",
        )
    if config.task and config.problem_type != "single":  # a tagger's is "single" too
        raise LmlabError(
            f"teacher {path} is a {config.problem_type}-label classifier: distillation needs one softmax per text",
            params="teacher",
        )
    if config.quantization and student_init == "teacher-layers":
        raise LmlabError(f"teacher {path} is quantized: copy layers from the checkpoint it came from", params="teacher")
    return path, config, load_tokenizer(path, verify=verify)


def _check_student(
    student: str | None, student_init: str, teacher: ModelConfig, tokenizer, verify: bool
) -> tuple[Path | None, ModelConfig | None]:
    """(the student's checkpoint, None) when it is one, else (None, the config of the student to build)."""
    if student is not None and str(student) not in PRESETS:
        if student_init == "teacher-layers":
            raise LmlabError(
                "student_init teacher-layers builds the student: give a preset name (its depth) or no student",
                params="student student_init",
            )
        path = resolve_checkpoint(student)
        if load_tokenizer(path, verify=verify).sha256 != tokenizer.sha256:
            raise LmlabError(f"student {path} uses another tokenizer than the teacher's", params="student")
        _check_vocab(load_config(path), teacher, path)
        return path, None
    if student is None and student_init != "teacher-layers":
        raise LmlabError(
            "no student: give a preset name or a checkpoint, or student_init teacher-layers", params="student"
        )
    if student is None:
        return None, dataclasses.replace(teacher, n_layer=max(1, teacher.n_layer // 2), lora={}, quantization={})
    config = preset(str(student), vocab_size=teacher.vocab_size)
    if config.arch != teacher.arch:
        raise LmlabError(f"student {student} is a {config.arch}, the teacher a {teacher.arch}", params="student")
    if student_init == "teacher-layers":
        if config.n_layer > teacher.n_layer:
            raise LmlabError(
                f"student {student} has {config.n_layer} blocks, the teacher {teacher.n_layer}: teacher-layers needs "
                "a shallower student",
                params="student",
            )
        return None, dataclasses.replace(teacher, n_layer=config.n_layer, lora={}, quantization={})
    return None, config


def _check_data(data: str | Path, teacher: Path, tokenizer, valid) -> None:
    """A decoder teacher's data: a prepared folder whose tokens are the teacher's tokenizer's (and no ``valid``)."""
    from lmlab.data.pack import data_tokenizer

    if valid is not None:
        raise LmlabError(
            "valid is for a classifier or tagger teacher; a decoder's run validates on the data's split", params="valid"
        )

    if data_tokenizer(data).sha256 != tokenizer.sha256:
        raise LmlabError(
            f"teacher {teacher} uses another tokenizer than the one data {data} was prepared with",
            params="teacher data",
        )


def _check_context(teacher: ModelConfig, student: ModelConfig, seq_len: int | None) -> None:
    """A decoder's windows (``seq_len``, else the student's context) must fit the teacher's context too."""
    length = seq_len or student.block_size
    if not teacher.task and length > teacher.block_size:
        raise LmlabError(
            f"seq_len {length} exceeds the teacher's block_size {teacher.block_size}: give seq_len up to it",
            params="seq_len",
        )


def _check_vocab(student: ModelConfig, teacher: ModelConfig, path: Path) -> None:
    if student.vocab_size != teacher.vocab_size:
        raise LmlabError(
            f"student {path} has a vocabulary of {student.vocab_size:,}, the teacher {teacher.vocab_size:,}: "
            "the KL compares distributions over the same tokens",
            params="student",
        )
    if student.task and teacher.task and (student.task, student.num_labels) != (teacher.task, teacher.num_labels):
        raise LmlabError(
            f"student {path} is a {student.task} model with {student.num_labels} labels, the teacher a {teacher.task} "
            f"model with {teacher.num_labels}",
            params="student",
        )


def teacher_layers(teacher: nn.Module, n_layer: int | None = None) -> nn.Module:
    """DistilBERT's student (Sanh et al., 2019): ``teacher``'s config with ``n_layer`` blocks (default: half its
    depth), block i a copy of teacher block ``i · L_teacher // n_layer`` (every other one at half depth: 0, 2, 4, …),
    and every other weight (embeddings, final norm, LM and task heads) copied."""
    config = teacher.config
    n_layer = n_layer or max(1, config.n_layer // 2)
    if config.arch == "seq2seq" or not 1 <= n_layer <= config.n_layer:
        raise LmlabError(f"teacher-layers: a decoder or encoder of at most {config.n_layer} blocks", params="student")
    picked = [i * config.n_layer // n_layer for i in range(n_layer)]
    student = build_model(dataclasses.replace(config, n_layer=n_layer, lora={}, quantization={}))
    source = teacher.state_dict()

    def teachers(name: str) -> str:
        block = re.match(r"blocks\.(\d+)\.(.*)", name)
        return f"blocks.{picked[int(block.group(1))]}.{block.group(2)}" if block else name

    student.load_state_dict({name: source[teachers(name)].clone() for name in student.state_dict()})
    return student


def _write_student(folder: Path, teacher: Path, config: ModelConfig, student_init: str, tokenizer, seed: int) -> Path:
    """The student as it starts, saved as a checkpoint in ``folder``: ``config``'s fresh weights seeded by ``seed``
    (own), or the teacher's every other block (teacher-layers)."""
    torch.manual_seed(seed)
    if student_init == "teacher-layers":
        model = teacher_layers(load_model(teacher, merge_lora=True), config.n_layer)
    else:
        model = build_model(config)
    meta = {"tokenizer_sha256": tokenizer.sha256, "student_of": str(teacher), "student_init": student_init}
    return save_checkpoint(folder, model, tokenizer=tokenizer, meta=meta, overwrite=True)


def _start_folder(out: Path, teacher: Path, init: tuple, resume: bool, overwrite: bool) -> Path:
    """``out``/student-init: written once by the first (or only) process, after ``out`` is checked and marked as a
    run; other torchrun processes wait for it. A resumed run keeps the one it started from."""
    folder = out / INIT_FOLDER
    if os.environ.get("RANK", "0") != "0":
        return _wait_for(folder / "config.json")
    check_run_output(out, overwrite=overwrite, sources=(teacher,))
    if not resume and latest_checkpoint(out) is not None:
        raise LmlabError(
            f"{out} already holds checkpoints: pass resume to continue that run, or write to another out",
            params="resume out",
        )
    if resume and (folder / "config.json").is_file():
        return folder
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "run")
    return _write_student(folder, teacher, *init)


def _wait_for(file: Path, timeout: float = 600.0) -> Path:
    deadline = time.monotonic() + timeout
    while not file.is_file():
        if time.monotonic() > deadline:
            raise LmlabError(f"{file.parent} was not written by the first process within {timeout:.0f} s")
        time.sleep(0.5)
    return file.parent


def _measure(teacher: Path, run: TrainResult, tokenizer, eval_data, device: str, settings: dict) -> Compression:
    """The teacher and the student's best (else last) checkpoint measured side by side: ``out``/compression.json."""
    from lmlab.device import resolve_device

    student = Path(run.best_checkpoint or run.last_checkpoint)
    device = resolve_device(device)
    original = load_model(teacher, device=device, merge_lora=True)
    model = load_model(student, device=device, merge_lora=True)
    tc, sc = original.config, model.config
    title = (
        f"distilled {teacher} ({tc.n_layer} blocks × {tc.n_embd}) into a student ({sc.n_layer} blocks × {sc.n_embd})"
    )
    fields = dict(title=title, method="distill", **settings, columns=("teacher", "student"))
    return compare(teacher, student, original, model, tokenizer, eval_data=eval_data, folder=student.parent, **fields)


def _with_teacher_note(result: DryRun, config: ModelConfig, train_args: dict) -> DryRun:
    """A dry run's title, with what the frozen teacher adds beside the student's step: its weights (fp32) and its
    logits for one micro-batch (fp32; a classifier's are a row per text)."""
    with torch.device("meta"):
        model = build_model(dataclasses.replace(config, lora={}, quantization={}))
    weights = sum(p.numel() for p in model.parameters())
    s = result.memory.settings
    rows = s.micro_batch_size * (1 if pools(config) else s.seq_len)
    logits = rows * (config.num_labels if config.task else config.vocab_size) * 4
    result.title += (
        f"; plus the frozen teacher (not in the figures below): {fmt_bytes(weights * 4)} of weights and "
        f"{fmt_bytes(logits)} of logits per micro-batch"
    )
    return result


__all__ = ["Distilled", "distill", "teacher_layers"]
