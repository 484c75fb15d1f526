"""``lmlab.pretrain``: packed tokens + a preset (or a checkpoint) → a trained checkpoint."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.config import LoraSpec, ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import (
    check_run_output,
    has_tokenizer,
    latest_checkpoint,
    list_checkpoints,
    load_config,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_checkpoint,
)
from lmlab.model import build_model
from lmlab.model.lora import apply_lora
from lmlab.objectives import get_objective
from lmlab.train import dist as dist_mod
from lmlab.train import memory
from lmlab.train.data import EpochWindows, fixed_windows
from lmlab.train.distill import Teacher
from lmlab.train.loop import TrainConfig, TrainResult, autocast_for, check_resume, same_source, train_loop
from lmlab.train.memory import DryRun, Settings, check_budget


def pretrain(
    model: str | ModelConfig = "gpt2-tiny",
    data: str | Path = "data",
    out: str | Path = "runs/pretrain",
    *,
    objective: str = "clm",
    resume: bool = False,
    init_from: str | Path | None = None,
    model_overrides: dict[str, Any] | None = None,
    pad_vocab_multiple: int = 1,
    verify: bool = True,
    dry_run: bool = False,
    memory_budget: float | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    teacher: Teacher | None = None,
    **train_args: Any,
) -> TrainResult | DryRun:
    """Pretrain a model on a folder made by :func:`lmlab.prepare`.

    The model's vocab size becomes the tokenizer's, rounded up to a multiple of ``pad_vocab_multiple``. ``dry_run``
    builds and checks everything the run would (config, data, model, optimizer, a batch) but trains and writes
    nothing: it returns the :class:`~lmlab.train.memory.DryRun` prediction of a training step's peak memory, checked
    against ``memory_budget`` GiB (or the GPU's memory) with what to change when it does not fit. ``out`` must be
    new, empty or an lmlab run; ``overwrite`` lets lmlab write its files into another folder, deleting nothing else
    there (:mod:`lmlab.io.outputs`).

    Args:
        model: a preset name (``lmlab.config.PRESETS``) or a :class:`ModelConfig`
        data: folder made by `lmlab prepare`
        out: run folder: checkpoints, log.jsonl, loss.png
        objective: training objective: clm (causal LM, decoders), mlm, mlm+nsp or wwm (whole-word mlm) for encoders
        resume: continue the latest checkpoint in ``out`` exactly where it stopped
        init_from: start from this checkpoint's (or Hugging Face folder's) weights (fresh optimizer)
        model_overrides: ModelConfig fields that replace the preset's (``dropout``, ``block_size`` …)
        pad_vocab_multiple: round the model's vocabulary up to a multiple of this: 64 or 128 make the LM head's
            matmuls faster on GPUs (nanoGPT trains GPT-2's 50257 tokens as 50304); the extra rows are never inputs
            or targets and generation never emits them
        verify: check a Hugging Face ``init_from`` against transformers (once)
        dry_run: predict a training step's peak memory instead of training
        memory_budget: GiB a training step may use, for ``dry_run`` (default: the GPU's memory)
        world_size: for ``dry_run``: the processes (GPUs) of the run (default: torchrun's WORLD_SIZE, else 1)
        overwrite: write into an existing folder that is not an lmlab run
        teacher: distill from this frozen teacher as the model trains (:mod:`lmlab.train.distill`; `lmlab distill`)
        **train_args: :class:`TrainConfig` fields (``max_steps``, ``lr``, …)
    """
    cfg = _train_config(train_args)
    check_budget(memory_budget, dry_run, world_size)
    _check_pad_vocab_multiple(pad_vocab_multiple)
    run = _start(cfg, data, Path(out), resume=resume, init_from=init_from, dry_run=dry_run, overwrite=overwrite)
    wanted, config = _model_configs(run, model, pad_vocab_multiple, model_overrides or {})
    _settle_seq_len(cfg, config)
    if run.resume_from is not None:
        _check_resume(run.resume_from, cfg, config, wanted, objective, data, run.info.is_main, teacher)
    task = get_objective(objective, run.tokenizer, config)  # before any work: a wrong pairing is a one-line error
    if dry_run:
        return _dry_run(run, config, task, objective, memory_budget, world_size)
    net = _build(run, config, verify)
    task, distilled = _distilling(run, task, net, teacher)
    train_batches, valid_batches = _windows(run, config)
    _announce(run, config, net)
    meta = {"objective": objective, "tokenizer_sha256": run.tokenizer.sha256, "data": str(data), **distilled}
    try:
        return train_loop(
            net,
            task,
            train_batches,
            valid_batches,
            cfg,
            run.out,
            device=run.device,
            dist=run.info,
            tokenizer=run.tokenizer,
            meta=meta,
            resume_from=run.resume_from,
            desc="pretrain",
            overwrite=overwrite,
        )
    finally:
        dist_mod.teardown(run.info)


def _settle_seq_len(cfg: TrainConfig, config: ModelConfig) -> None:
    """``cfg.seq_len``: as given (at most the model's block_size), else the block size."""
    cfg.seq_len = cfg.seq_len or config.block_size
    if cfg.seq_len > config.block_size:
        raise LmlabError(f"seq_len {cfg.seq_len} exceeds the model's block_size {config.block_size}", params="seq_len")


def _distilling(run: _Started, task, net, teacher: Teacher | None) -> tuple[Any, dict[str, Any]]:
    """With a ``teacher``: the objective that distils from it, LoRA adapters on a new student (a resumed run's come
    with its weights), and what config.json records of it. Without: the objective as it is."""
    if teacher is None:
        return task, {}
    if teacher.lora is not None and run.resume_from is None:
        apply_lora(net, teacher.lora)
    return teacher.wrap(task, run.device, run.info.is_main), teacher.meta()


def _check_pad_vocab_multiple(pad_vocab_multiple: Any) -> None:
    if isinstance(pad_vocab_multiple, bool) or not isinstance(pad_vocab_multiple, int) or pad_vocab_multiple < 1:
        raise LmlabError(
            f"pad_vocab_multiple is {pad_vocab_multiple!r}: expected a positive integer (1: no padding; 64 or 128 "
            "on GPUs)",
            params="pad_vocab_multiple",
        )


@dataclass
class _Started:
    """What :func:`pretrain` settled before building anything: settings, processes, data, where it resumes from."""

    cfg: TrainConfig
    data: str | Path
    out: Path
    info: dist_mod.DistInfo
    device: torch.device
    tokenizer: Any
    train_tokens: Any
    resume_from: Path | None
    init_from: Path | None


def _start(
    cfg: TrainConfig, data: str | Path, out: Path, *, resume: bool, init_from, dry_run: bool, overwrite: bool
) -> _Started:
    """The device and process group, the data's tokenizer, the checked output folder and the checkpoint to resume."""
    from lmlab.data.pack import PackedTokens, data_tokenizer

    if dry_run:  # no process group: the prediction is per process (DDP's buckets are added when under torchrun)
        info, device = dist_mod.DistInfo(), dist_mod.pick_device(cfg.device, dist_mod.DistInfo(), present=False)
    else:
        info, device = dist_mod.setup(cfg.device, cfg.strategy)
    tokenizer = data_tokenizer(data)  # the tokenizer that made the shards (a clear error for anything else)
    if not dry_run:  # before any work: never a folder that is not lmlab's, nor one inside what the run reads
        check_run_output(out, overwrite=overwrite, sources=(data, init_from))
    train_tokens = PackedTokens(data, "train")
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(out)
        if resume_from is None and info.is_main:
            print(f"lmlab: no checkpoint to resume in {out}; starting from scratch", file=sys.stderr)
    elif list_checkpoints(out):
        raise LmlabError(
            f"{out} already holds checkpoints: pass resume to continue that run, or write to another out",
            params="resume out",
        )
    init_from = resolve_checkpoint(init_from) if init_from is not None else None
    return _Started(cfg, data, out, info, device, tokenizer, train_tokens, resume_from, init_from)


def _model_configs(
    run: _Started, model, pad_vocab_multiple: int, overrides: dict[str, Any]
) -> tuple[ModelConfig, ModelConfig]:
    """(the model this command describes, the model that trains): they differ when a resumed run has its own."""
    tokenizer = run.tokenizer
    if run.init_from is not None:
        wanted = load_config(run.init_from)  # an lmlab checkpoint or a Hugging Face folder
        if wanted.quantization:
            raise LmlabError(
                f"init_from {run.init_from} is quantized: start from the checkpoint it came from", params="init_from"
            )
        _check_same_tokenizer(run.init_from, tokenizer, "init_from")
    else:
        vocab_size = -(-tokenizer.vocab_size // pad_vocab_multiple) * pad_vocab_multiple
        wanted = _model_config(model, vocab_size, overrides)
    config = wanted
    if run.resume_from is not None:
        config = ModelConfig.load(run.resume_from / "config.json")
        _check_same_tokenizer(run.resume_from, tokenizer, "resume")
    data_vocab = max(
        tokenizer.vocab_size, run.train_tokens.vocab_size
    )  # the tokenizer's and the manifest's: equal unless edited
    if config.vocab_size < data_vocab:
        raise LmlabError(
            f"model vocab_size {config.vocab_size} is smaller than the data's {data_vocab} (data {run.data})"
        )
    return wanted, config


def _windows(run: _Started, config: ModelConfig) -> tuple[EpochWindows, list[torch.Tensor]]:
    """This rank's training windows (a pure function of the step) and the fixed validation windows."""
    cfg = run.cfg
    train = EpochWindows(
        run.train_tokens,
        cfg.seq_len,
        cfg.micro_batch_size,
        cfg.seed,
        run.info.rank,
        source=f"{run.data} (train split)",
        vocab_size=config.vocab_size,
        grad_accum_steps=cfg.grad_accum_steps,
        world_size=run.info.world_size,
    )
    return train, _valid_windows(run.data, cfg.seq_len, cfg, run.info, config.vocab_size)


def _build(run: _Started, config: ModelConfig, verify: bool):
    """The model that trains: the resumed checkpoint's, ``init_from``'s weights, or new ones seeded by ``seed``
    (on the CPU when it is to be sharded: FSDP2 moves each rank's shards to its device)."""
    torch.manual_seed(run.cfg.seed)
    device = torch.device("cpu") if run.info.sharded else run.device
    if run.resume_from is not None:
        return load_model(run.resume_from, device=device).train()
    if run.init_from is not None:  # a LoRA checkpoint starts as its merged weights
        return load_model(run.init_from, device=device, merge_lora=True, verify=verify).train()
    return build_model(config).to(device)


def _dry_run(
    run: _Started, config: ModelConfig, task, objective: str, memory_budget: float | None, world_size: int | None
) -> DryRun:
    """``pretrain(dry_run=True)``: the predicted peak memory of a step on the run's first batch."""
    cfg = run.cfg
    source = f"{run.data} (train split)"
    train_batches = EpochWindows(
        run.train_tokens, cfg.seq_len, cfg.micro_batch_size, cfg.seed, source=source, vocab_size=config.vocab_size
    )
    windows = train_batches(0, 0)  # (micro_batch_size, seq_len + 1): the run's first batch

    def make_batch(settings: Settings) -> dict[str, torch.Tensor]:
        return task.batch(
            windows[: settings.micro_batch_size, : settings.seq_len + 1], torch.Generator().manual_seed(cfg.seed)
        )

    # a resumed LoRA run keeps its adapters
    saved_lora = LoraSpec.from_dict(config.lora) if run.resume_from is not None and config.lora else None
    plain = dataclasses.replace(config, lora={})
    return memory.plan(
        lambda: build_model(plain),
        task,
        make_batch,
        cfg,
        run.device,
        seq_len=cfg.seq_len,
        lora=saved_lora,
        memory_budget=memory_budget,
        world_size=world_size,
        title=f"{config.name or 'custom'} ({config.arch}), vocabulary {config.vocab_size:,}; objective {objective}",
        vocab_size=config.vocab_size,
    )


def _announce(run: _Started, config: ModelConfig, net) -> None:
    """The model's size and cost, and the run's shape, on stderr (by the first process only)."""
    cfg, info = run.cfg, run.info
    if not info.is_main:
        return
    _, precision = autocast_for(cfg.precision, run.device)
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * cfg.seq_len * info.world_size
    print(
        f"lmlab: {config.name or 'custom'} model, {net.num_params():,} parameters "
        f"({net.num_params(include_embeddings=False):,} without embeddings), "
        f"{config.flops_per_token(cfg.seq_len) / 1e9:.3f} GFLOPs/token (train)\n"
        f"lmlab: {len(run.train_tokens):,} training tokens, {tokens_per_step:,} tokens/step, {cfg.max_steps} steps "
        f"on {run.device} ({precision}, {info.world_size} process{'es' if info.world_size > 1 else ''})",
        file=sys.stderr,
    )


def _train_config(args: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise LmlabError(
            f"unknown training option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
        )
    return TrainConfig(**args)


def _model_config(model: str | ModelConfig, vocab_size: int, overrides: dict[str, Any]) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return dataclasses.replace(model, vocab_size=vocab_size, **overrides)
    return preset(model, vocab_size=vocab_size, **overrides)


def _check_resume(
    resume_from: Path,
    cfg: TrainConfig,
    config: ModelConfig,
    wanted: ModelConfig,
    objective: str,
    data,
    announce: bool,
    teacher: Teacher | None = None,
) -> None:
    """Refuse to resume with another model, data folder or objective than the run started with, or with
    training settings that change its course (:func:`~lmlab.train.loop.check_resume`)."""
    meta = read_meta(resume_from)
    started = {**_model_changes(config, wanted), "objective": (meta.get("objective", objective), objective)}
    if not same_source(meta.get("data"), data):
        started["data"] = (meta["data"], data)
    if teacher is not None or "distilled_from" in meta:
        started.update(teacher.started(meta) if teacher is not None else {"teacher": (meta["distilled_from"], None)})
    check_resume(resume_from, cfg, started, announce=announce)


MODEL_FLAGS = {"dropout": "dropout", "block_size": "block_size", "vocab_size": "vocab_size (pad_vocab_multiple)"}


def _model_changes(saved: ModelConfig, now: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """How the model a run has differs from the one the command describes, as ``{parameter: (saved, now)}``: the preset
    when it differs, else each field (``name`` is for humans; a run's LoRA adapters come from its checkpoint)."""
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("name", "lora")]
    differ = [name for name in fields if getattr(saved, name) != getattr(now, name)]
    if differ and saved.name != now.name:
        return {"model": (saved.name or "a custom model", now.name or "a custom model")}
    return {MODEL_FLAGS.get(name, f"model {name}"): (getattr(saved, name), getattr(now, name)) for name in differ}


def _check_same_tokenizer(checkpoint: Path, tokenizer, param: str) -> None:
    expected = read_meta(checkpoint).get("tokenizer_sha256")
    if expected is None and has_tokenizer(checkpoint):  # a Hugging Face folder or GGUF file: its own tokenizer
        expected = load_tokenizer(checkpoint).sha256
    if expected and expected != tokenizer.sha256:
        raise LmlabError(
            f"{param} {checkpoint} was trained with a different tokenizer than the data's (tokenizer hash differs)",
            params=param,
        )


def _valid_windows(data: str | Path, seq_len: int, cfg: TrainConfig, info, vocab_size: int) -> list[torch.Tensor]:
    from lmlab.data.pack import PackedTokens, load_manifest

    if "valid" not in load_manifest(data)["splits"]:
        return []
    valid = PackedTokens(data, "valid")
    windows = fixed_windows(
        valid, seq_len, cfg.micro_batch_size, cfg.eval_batches, vocab_size, source=f"{data} (valid split)"
    )
    if not windows and info.is_main:
        print(
            f"lmlab: the validation split of {data} holds {len(valid)} tokens, fewer than one window of {seq_len + 1}: "
            "validation is skipped (raise --valid-fraction in `lmlab prepare`)",
            file=sys.stderr,
        )
    # each rank evaluates its share, and the loop averages across ranks: the shares must be as many batches each (a
    # rank without any would not join the average; sharded ranks compute every forward pass together), so when the
    # batches do not split evenly every rank evaluates all of them
    if not info.enabled or len(windows) % info.world_size:
        return windows
    return windows[info.rank :: info.world_size]


__all__ = ["pretrain", "TrainConfig", "TrainResult"]
