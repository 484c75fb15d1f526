"""The one training loop. Every objective and task runs through :func:`train_loop`.

Per optimizer step: set the learning rate from the schedule, run ``grad_accum_steps`` micro-batches
(forward under autocast, loss / accum, backward), clip, step. Host syncs happen only at log, eval
and save boundaries, never per step. Only rank 0 writes (logs, checkpoints, plots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmlab.config import check_seed, option, read_jsonl_log
from lmlab.device import check_device
from lmlab.errors import LmlabError
from lmlab.io import dcp
from lmlab.io.checkpoint import (
    load_train_state,
    prune_checkpoints,
    save_checkpoint,
    save_sharded_checkpoint,
    step_dir_name,
)
from lmlab.io.outputs import write_jsonl_atomic, write_marker
from lmlab.objectives import Objective, evaluate_loss
from lmlab.plots import plot_loss
from lmlab.train.data import hash_position
from lmlab.train.dist import STRATEGIES, DistInfo, all_reduce_mean, shard_model
from lmlab.train.optim import SCHEDULES, lr_at, make_optimizer

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train. Every field is a ``lmlab pretrain`` flag of the same name (``--max-steps`` …)."""

    max_steps: int = option(1000, "optimizer steps in the whole run")
    micro_batch_size: int = option(8, "sequences per forward pass")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    seq_len: int | None = option(None, "tokens per sequence; None: the model's block_size")
    lr: float = option(6e-4, "peak learning rate")
    min_lr: float | None = option(None, "floor of the decay; None: lr / 10")
    warmup_steps: int = option(100, "linear warm-up from 0 to lr")
    schedule: str = option("cosine", "after warm-up: cosine, linear (to min_lr) or constant")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay, on matrices only")
    beta1: float = option(0.9, "AdamW β1")
    beta2: float = option(0.95, "AdamW β2")
    adam_eps: float = option(1e-8, "AdamW ε (added to the denominator)")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables clipping")
    eval_interval: int = option(200, "validate every N steps (and at the end)")
    eval_batches: int = option(20, "validation batches per evaluation")
    save_interval: int | None = option(None, "checkpoint every N steps; None: = eval_interval")
    keep_last: int = option(3, "step checkpoints kept (best/ is kept apart)")
    log_interval: int = option(10, "log and update the progress bar every N steps")
    seed: int = option(0, "weights, data order and dropout all follow it")
    precision: str = option("auto", "auto (bf16 on GPUs that have it, fp16 on older, fp32 on CPU), fp32, bf16, fp16")
    compile: bool = option(False, "torch.compile the model for training")
    activation_checkpointing: bool = option(
        False,
        "recompute each Transformer block's activations in backward instead of keeping them: less memory, about a "
        "third more compute",
    )
    ce_chunk_size: int | None = option(
        None,
        "tokens per chunk of the LM cross-entropy, so the whole batch's logits never exist at once; "
        "None: chunks of ~64 MiB of logits when the vocabulary has 32,768+ entries, else none; 0: never chunk",
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:1, …")
    strategy: str = option(
        "auto",
        "how the processes of a torchrun launch hold the model: ddp (a whole copy each), fsdp (FSDP2: parameters, "
        "gradients and optimizer state sharded across them; sharded DCP checkpoints); auto: ddp",
    )
    cpu_offload: bool = option(False, "fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory")
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool = option(True, "also log to TensorBoard when it is installed")

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "micro_batch_size",
            "grad_accum_steps",
            "eval_interval",
            "eval_batches",
            "keep_last",
            "log_interval",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise LmlabError(f"{name} is {getattr(self, name)}: expected a positive integer", params=name)
        if self.save_interval is None:
            self.save_interval = self.eval_interval
        for name in ("save_interval", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LmlabError(f"{name} is {getattr(self, name)}: expected a positive integer", params=name)
        check_seed(self.seed)
        check_device(self.device)
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.schedule not in SCHEDULES:
            raise LmlabError(
                f"schedule is '{self.schedule}': expected one of {', '.join(SCHEDULES)}", params="schedule"
            )
        if self.precision not in PRECISIONS:
            raise LmlabError(
                f"precision is '{self.precision}': expected one of {', '.join(PRECISIONS)}", params="precision"
            )
        if self.lr <= 0:
            raise LmlabError(f"lr is {self.lr}: expected a positive number", params="lr")
        if self.warmup_steps < 0:
            raise LmlabError(f"warmup_steps is {self.warmup_steps}: expected 0 or more", params="warmup_steps")
        if self.ce_chunk_size is not None and self.ce_chunk_size < 0:
            raise LmlabError(
                f"ce_chunk_size is {self.ce_chunk_size}: expected 0 (no chunking), a positive number of tokens, or "
                "None (auto)",
                params="ce_chunk_size",
            )
        self._check_optimizer()
        if self.strategy not in STRATEGIES:
            raise LmlabError(
                f"strategy is '{self.strategy}': expected one of {', '.join(STRATEGIES)}", params="strategy"
            )
        if self.cpu_offload and self.strategy != "fsdp":
            raise LmlabError("cpu_offload shards onto the CPU: it needs strategy fsdp", params="cpu_offload strategy")

    def _check_optimizer(self) -> None:
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LmlabError(f"{name} is {getattr(self, name)}: expected a number in [0, 1)", params=name)
        for name in ("weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                raise LmlabError(f"{name} is {getattr(self, name)}: expected 0 or more", params=name)
        if self.adam_eps <= 0:
            raise LmlabError(f"adam_eps is {self.adam_eps}: expected a positive number", params="adam_eps")


# TrainConfig fields a resumed run may change: they say how the run is watched, saved and computed, not what it
# computes (max_steps moves the end of a decaying schedule, and precision and chunking round differently: the note
# says so)
RESUMABLE = (
    "max_steps",
    "eval_interval",
    "eval_batches",
    "save_interval",
    "keep_last",
    "log_interval",
    "precision",
    "compile",
    "activation_checkpointing",
    "ce_chunk_size",
    "device",
    "strategy",
    "cpu_offload",
    "progress",
    "tensorboard",
)
BATCH_SHAPE = ("micro_batch_size", "grad_accum_steps")  # free to change when the global batch stays the same


def check_resume(
    resume_from: Path,
    cfg: TrainConfig,
    started: dict[str, tuple[Any, Any]],
    flags: dict[str, str] | None = None,
    announce: bool = True,
) -> None:
    """Refuse, in one error listing them all, to resume ``resume_from`` with settings that change what the run
    computes: ``cfg``'s fields against the ``train_config`` its train_state.pt saved, and the caller's own
    ``started`` settings, ``{parameter: (as the run started, now)}`` (model, data, objective). The changes in
    :data:`RESUMABLE` are accepted, and ``announce`` prints one note naming them. ``flags`` names the
    parameter that sets a field when it is not the field's name (fine-tuning's seq_len is max_length)."""

    def change(name: str, was: Any, now: Any) -> str:
        show = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731 (lr / 10 is 0.00030000000000000003)
        return f"{name} {show(was)} (now {show(now)})"

    state = load_train_state(resume_from)
    saved = state.get("train_config", {})
    changed = {
        f.name: change((flags or {}).get(f.name, f.name), saved[f.name], getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
        if f.name in saved and saved[f.name] != getattr(cfg, f.name)
    }
    refused = [change(name, was, now) for name, (was, now) in started.items() if was != now]
    refused += _global_batch_change(cfg, saved, state, changed)
    refused += [text for name, text in changed.items() if name not in RESUMABLE]
    if refused:
        named = [*started, *((flags or {}).get(name, name) for name in changed), "resume", "out"]
        raise LmlabError(
            f"resume: {resume_from.parent} was started with different settings: {', '.join(refused)}; "
            "rerun with the original settings or write to a new out",
            params=" ".join(word for text in named for word in text.split() if word.isidentifier()),
        )
    if changed and announce:
        notes = [", ".join(changed.values())]
        if "max_steps" in changed and cfg.schedule != "constant":
            notes.append(
                f"the {cfg.schedule} learning-rate schedule now ends at step {cfg.max_steps}, so the learning rate "
                f"after step {max(state['step'], cfg.warmup_steps)} differs from the run's as started"
            )
        if "precision" in changed or "ce_chunk_size" in changed:
            notes.append(
                "another precision or cross-entropy chunking rounds differently: losses match the run's as started "
                "only approximately"
            )
        print(f"lmlab: resume accepted changed settings: {'; '.join(notes)}", file=sys.stderr)


def _global_batch_change(
    cfg: TrainConfig, saved: dict[str, Any], state: dict[str, Any], changed: dict[str, str]
) -> list[str]:
    """A resume may change the world size (torchrun's processes), ``micro_batch_size`` and ``grad_accum_steps``
    as long as the global batch (their product) stays the run's: then the steps read the same data and the
    losses continue as they would have. Drops those accepted from ``changed``; the refusal, if any, in words."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "world_size" not in state:  # saved before lmlab recorded it: the batch shape must not change
        return []
    shape = [saved.get(name, getattr(cfg, name)) for name in BATCH_SHAPE]
    was, now = shape[0] * shape[1] * state["world_size"], cfg.micro_batch_size * cfg.grad_accum_steps * world
    if was == now:
        for name in BATCH_SHAPE:
            changed.pop(name, None)
        return []
    return [
        f"global batch {was} sequences ({shape[0]} × {shape[1]} accumulated × {state['world_size']} processes; "
        f"now {cfg.micro_batch_size} × {cfg.grad_accum_steps} × {world}: keep micro_batch_size × grad_accum_steps "
        "× processes the same)"
    ]


def same_source(saved: str | None, now: str | Path) -> bool:
    """Whether a run's recorded input (data folder, task file, base checkpoint) is ``now``: the same path, the
    same file or folder by another path, or a file with the same bytes. None (not recorded): taken as the same."""
    if saved is None or str(saved) == str(now):
        return True
    a, b = Path(saved), Path(now)
    if not (a.exists() and b.exists()):
        return False
    return os.path.samefile(a, b) or (a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False))


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    log_file: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    val_scores: dict[str, float] = field(default_factory=dict)  # the last evaluation's task metrics
    stopped_early: bool = False

    def summary(self, finetuned: bool = False) -> str:
        """What the run ended with, a line each: the last validation figures (a fine-tune's task metrics, else
        the validation loss), the checkpoints and, for pretraining, the log and the loss curve."""
        lines = []
        if finetuned and self.val_scores:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in self.val_scores.items())
            lines.append(f"validation {scores}" + (" (stopped early)" if self.stopped_early else ""))
        elif not finetuned and self.val_loss is not None:
            lines.append(f"step {self.step}, validation loss {self.val_loss:.4f}")
        best = f", best {self.best_checkpoint}" if self.best_checkpoint else ""
        lines.append(f"last checkpoint {self.last_checkpoint}{best}")
        if not finetuned:
            lines.append(f"log {self.log_file}, loss curve {Path(self.log_file).with_name('loss.png')}")
        return "\n".join(lines)


def autocast_for(precision: str, device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager], str]:
    """The autocast context for a precision name, and the precision actually used."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


class JsonlLog:
    """Append-only JSON-lines log; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():  # a torn last line or NUL tail left by the crash is dropped (with a warning)
            keep = [r for r in read_jsonl_log(path) if not isinstance(r.get("step"), int) or r["step"] <= resume_step]
            write_jsonl_atomic(path, keep)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _tensorboard(out_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: pip install 'lmlab[tensorboard]'
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def apply_memory_options(model: nn.Module, objective: Objective, cfg: TrainConfig) -> None:
    """What ``cfg`` says about memory, onto the model and the objective: activation checkpointing (the
    models' ``gradient_checkpointing``) and the cross-entropy's chunking (the LM objectives' ``ce_chunk_size``)."""
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.activation_checkpointing
    elif cfg.activation_checkpointing:
        raise LmlabError(
            f"activation_checkpointing: a {type(model).__name__} has no checkpointable blocks",
            params="activation_checkpointing",
        )
    if hasattr(objective, "ce_chunk_size"):
        objective.ce_chunk_size = cfg.ce_chunk_size


def _batch_generator(*position: int) -> torch.Generator:
    """The random stream an objective draws a batch's masks from: a pure function of its position."""
    return torch.Generator().manual_seed(hash_position(0x6D61736B, *(p & 0x7FFFFFFF for p in position)))


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The batch on ``device``. To a GPU through pinned memory: a copy from pageable memory synchronises the
    stream first, which would make the host wait for the previous step every micro-batch; from pinned memory
    it is asynchronous, so the host prepares the next batch while the GPU computes."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def train_loop(
    model: nn.Module,
    objective: Objective,
    train_batches: Callable[[int, int], Tensor],
    valid_batches: list[Tensor],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    dist: DistInfo = DistInfo(),
    tokenizer: Any | None = None,
    meta: dict[str, Any] | None = None,
    resume_from: Path | None = None,
    desc: str = "train",
    score_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    select: str | None = None,
    patience: int | None = None,
    overwrite: bool = False,
    higher_is_better: bool = True,
) -> TrainResult:
    """Train ``model`` (already on ``device``) for ``cfg.max_steps`` optimizer steps.

    ``train_batches(step, micro_step)`` returns the token batch for that position (a pure function,
    which makes resuming exact); ``valid_batches`` are fixed. Checkpoints go to ``out_dir``.

    ``score_fn(model)`` adds task metrics at every evaluation (logged as ``val_<name>``); with
    ``select`` the best checkpoint is the one with the highest ``select`` metric (the lowest, with
    ``higher_is_better`` False) instead of the lowest validation loss, and ``patience`` stops training after
    that many evaluations without improvement (early stopping; the last state is still saved, so nothing is
    lost). ``overwrite``: ``out_dir`` was not lmlab's, and checkpoints may be written into its folders of the same names
    (:func:`~lmlab.io.checkpoint.save_checkpoint`).
    """
    if select is not None and score_fn is None:
        raise LmlabError(f"select={select!r} needs a score_fn that computes it")
    run = _Run(model, objective, cfg, Path(out_dir), device, dist, tokenizer, meta, overwrite)
    run.train_batches = train_batches
    run.start(resume_from, valid_batches)
    bar = tqdm(
        total=cfg.max_steps,
        initial=run.start_step,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=not (cfg.progress and dist.is_main),
    )
    run.bar = bar
    for step in range(run.start_step, cfg.max_steps):
        lr = run.train_step(step, train_batches)
        done = step + 1
        bar.update(1)
        at_end = done == cfg.max_steps
        do_eval = done % cfg.eval_interval == 0 or at_end
        do_save = done % cfg.save_interval == 0 or at_end
        if done % cfg.log_interval == 0 or do_eval or do_save:
            run.log_train(done, lr)
        val_loss, stopping = (
            run.evaluate(done, at_end, score_fn, (select, higher_is_better), patience) if do_eval else (None, False)
        )
        if (do_save or stopping) and (dist.is_main or dist.sharded):  # a sharded checkpoint: every rank writes
            run.save_step(done, val_loss, stopping)
        run.result.step = done
        if stopping:
            run.result.stopped_early = True
            break
    bar.close()
    run.finish()
    return run.result


class _Run:
    """What one run of :func:`train_loop` carries from step to step: the model (as written and as trained),
    optimizer, grad scaler, logs, the best criterion so far and the result. Each method is one stage of a step."""

    def __init__(self, model, objective, cfg, out_dir, device, dist, tokenizer, meta, overwrite) -> None:
        self.raw_model, self.objective, self.cfg, self.out_dir = model, objective, cfg, out_dir
        self.device, self.dist, self.tokenizer, self.meta, self.overwrite = (
            device,
            dist,
            tokenizer,
            meta or {},
            overwrite,
        )
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_marker(out_dir, "run")  # lmlab's proof that this folder is its run (lmlab.io.outputs)
        apply_memory_options(model, objective, cfg)
        self.autocast, precision = autocast_for(cfg.precision, device)
        if dist.sharded:  # before the optimizer: FSDP2 replaces the parameters by their shards
            shard_model(model, device, precision, cfg.cpu_offload, cfg.compile)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, device)
        self.train_batches: Any = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.start_step, self.best_val, self.since_best = (
            0,
            math.inf,
            0,
        )  # best_val: the lowest criterion (val loss, or −metric)
        self.elapsed_before = 0.0  # training seconds of earlier processes of this run: the logged clock survives resume
        self.last_good: Path | None = None
        self.bar: Any = None
        self.tokens: int | None = 0  # real tokens trained on, across resumes
        # what trained, for the critique's energy estimate: "cpu", or the GPU's name and how many ran
        self.train_device = (
            "cpu" if device.type != "cuda" else f"{dist.world_size} × {torch.cuda.get_device_name(device)}"
        )

    def start(self, resume_from: Path | None, valid_batches: list[Tensor]) -> None:
        """Restore a resumed run's state, wrap the model (DDP, compile), open the logs, build the validation set."""
        cfg, device, dist = self.cfg, self.device, self.dist
        if resume_from is not None:
            self._resume(resume_from)
        self.model = self.raw_model  # sharded in place (FSDP2), or wrapped for DDP
        if dist.enabled and not dist.sharded:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.fwd_model = torch.compile(self.model) if cfg.compile and not dist.sharded else self.model
        self.log = JsonlLog(
            self.out_dir / "log.jsonl", dist.is_main, self.start_step if resume_from is not None else None
        )
        self.tb = _tensorboard(self.out_dir, cfg.tensorboard and dist.is_main)
        # masks and pairs (mlm, nsp) are drawn from a generator seeded by the batch's position, like the windows
        make_valid = getattr(
            self.objective, "valid_batch", self.objective.batch
        )  # a task objective reads its validation set
        self.valid = [
            _to(make_valid(t, _batch_generator(cfg.seed, -1, 0, i)), device) for i, t in enumerate(valid_batches)
        ]
        # tokens trained on: an objective that pads its batches counts their real tokens (count_tokens), else every
        # batch is micro_batch_size full windows of seq_len
        self.count_tokens = getattr(self.objective, "count_tokens", None)
        self.tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * (cfg.seq_len or 0) * dist.world_size
        self.tokens_since = 0  # this rank's real tokens since the last log (count_tokens)
        self.history: list[dict[str, Any]] = []
        best_dir = self.out_dir / "best"
        self.result = TrainResult(
            self.start_step,
            None,
            None,
            self.best_val if self.best_val < math.inf else None,
            self.last_good,
            best_dir if resume_from is not None and best_dir.is_dir() else None,
            self.out_dir / "log.jsonl",
            self.history,
        )
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count, self.t_last, self.step_last = 0, time.perf_counter(), self.start_step
        self.t_start = self.t_last
        self.grad_norm = torch.zeros((), device=device)
        self.model.train()

    def _resume(self, resume_from: Path) -> None:
        state = load_train_state(resume_from)
        self.last_good = resume_from
        self.since_best = state.get("since_best", 0)  # a run that stopped early resumes as finished
        rng = self._load_states(resume_from, state)
        if "scaler" in state and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.start_step = self.cfg.max_steps if state.get("stopped_early") else state["step"]
        self.best_val = state["best_val_loss"]
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.tokens = state.get("tokens")  # None: a run saved before lmlab counted them
        position = state.get("data_position")
        if position is not None and hasattr(self.train_batches, "start_at"):
            self.train_batches.start_at(state["step"], position["examples"])
        if rng is None:  # a rank the run that wrote the checkpoint did not have: a stream of its own
            torch.manual_seed(hash_position(self.cfg.seed, state["step"], self.dist.rank))
            return
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _load_states(self, resume_from: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        """The optimizer's state (and a sharded checkpoint's model state, resharded onto this world) from
        ``resume_from``; returns this rank's RNG states (None: the run that wrote it had no such rank)."""
        if dcp.is_complete(resume_from):
            dcp.load_train_states(resume_from, self.raw_model, self.optimizer)
            return dcp.load_rng(resume_from, self.dist.rank)
        if self.dist.sharded:
            raise LmlabError(
                f"resume: {resume_from} is not a sharded checkpoint (the run wrote it without strategy fsdp): "
                "resume it with strategy ddp (fsdp resumes only from the sharded checkpoints an fsdp run writes)",
                params="strategy resume",
            )
        self.optimizer.load_state_dict(state["optimizer"])
        return state["rng"]

    def train_step(self, step: int, train_batches: Callable[[int, int], Tensor]) -> float:
        """One optimizer step: the scheduled learning rate, ``grad_accum_steps`` micro-batches, clipping, the update."""
        cfg, dist = self.cfg, self.dist
        lr = lr_at(
            step,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            schedule=cfg.schedule,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum_steps):
            batch = self.objective.batch(train_batches(step, micro), _batch_generator(cfg.seed, dist.rank, step, micro))
            if self.count_tokens is not None:
                self.tokens_since += self.count_tokens(batch)  # on the host's copy: no device sync
            batch = _to(batch, self.device)
            last_micro = micro == cfg.grad_accum_steps - 1
            if dist.sharded:  # FSDP2: reduce-scatter the gradients after the last micro-batch only
                self.model.set_requires_gradient_sync(last_micro)
            ddp_skip = dist.enabled and not dist.sharded and not last_micro
            sync = self.model.no_sync() if ddp_skip else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    loss = self.objective.loss(self.fwd_model, batch) / cfg.grad_accum_steps
                self.scaler.scale(loss).backward()
            self.loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_count += 1
        return lr

    def _stop_if_not_finite(self, value: float, what: str, step: int) -> None:
        if not math.isfinite(value):
            where = f"last good checkpoint: {self.last_good}" if self.last_good else "no checkpoint was written yet"
            raise LmlabError(
                f"{what} is {value} at step {step}: training stopped ({where}); lower lr or check the data", params="lr"
            )

    def _record(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        self.history.append(record)

    def _say(self, text: str) -> None:
        if self.cfg.progress and self.dist.is_main:
            self.bar.write(text)

    def log_train(self, done: int, lr: float) -> None:
        """The mean training loss since the last log (the one host sync, at boundaries only), speed and clock."""
        train_loss = all_reduce_mean(self.loss_sum / self.loss_count, self.dist).item()
        self._stop_if_not_finite(train_loss, "the training loss", done)
        now = time.perf_counter()
        tokens = self._tokens_since_log(done)
        tok_s = tokens / max(now - self.t_last, 1e-9)
        if self.tokens is not None:
            self.tokens += tokens
        record = {
            "step": done,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": float(getattr(self.grad_norm, "full_tensor", lambda: self.grad_norm)()),  # FSDP: a DTensor
            "tokens_per_s": tok_s,  # real tokens (not padding), all ranks together
            "elapsed_s": self.elapsed_before + now - self.t_start,  # wall-clock training seconds, across resumes
            **({"tokens": self.tokens} if self.tokens is not None else {}),  # real tokens trained on so far
            **self._peak_memory(),
        }
        self._record(record)
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.tb.add_scalar(f"train/{key}", record[key], done)
        self.bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        self.result.train_loss = train_loss
        self.loss_sum.zero_()
        self.loss_count, self.t_last, self.step_last = 0, now, done

    def _peak_memory(self) -> dict[str, float]:
        """On a GPU, this process's peak of allocated memory so far, in GiB (what ``--dry-run`` predicts)."""
        if self.device.type != "cuda":
            return {}
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def _tokens_since_log(self, done: int) -> int:
        """The tokens all ranks trained on since the last log: the real ones counted, else the full windows."""
        if self.count_tokens is None:
            return self.tokens_per_step * (done - self.step_last)
        count = self.tokens_since
        if self.dist.enabled:
            total = torch.tensor(float(count), device=self.device, dtype=torch.float64)
            count = round(all_reduce_mean(total, self.dist).item() * self.dist.world_size)
        self.tokens_since = 0
        return count

    def evaluate(
        self, done: int, at_end: bool, score_fn, selection: tuple[str | None, bool], patience: int | None
    ) -> tuple[float | None, bool]:
        """Validation loss and task scores; a better criterion writes best/. Returns (val_loss, stop early)."""
        select, higher_is_better = selection
        val_loss = self._validation_loss(done) if self.valid else None
        if not (self.valid or score_fn is not None):
            return val_loss, False
        scores = dict(score_fn(self.raw_model)) if score_fn is not None else {}
        if scores:
            self._record({"step": done, **{f"val_{k}": v for k, v in scores.items()}})
            self._say(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            self.result.val_scores = scores
        if select is not None and select not in scores:
            raise LmlabError(
                f"the metric to select by, {select!r}, is not among the computed ones: {', '.join(scores)}"
            )
        criterion = (-scores[select] if higher_is_better else scores[select]) if select is not None else val_loss
        if criterion is not None and criterion < self.best_val:
            self.best_val, self.since_best = criterion, 0
            self.result.best_val_loss = val_loss
            if self.dist.is_main or self.dist.sharded:
                meta = {
                    **self.meta,
                    "step": done,
                    "val_loss": val_loss,
                    "train_device": self.train_device,
                    **{f"val_{k}": v for k, v in scores.items()},
                }
                self.result.best_checkpoint = self._save(self.out_dir / "best", None, meta)
        elif criterion is not None:
            self.since_best += 1
            if patience is not None and self.since_best >= patience and not at_end:
                self._say(f"step {done}: no improvement in {patience} evaluations: early stop")
                return val_loss, True
        return val_loss, False

    def _validation_loss(self, done: int) -> float:
        val_loss = all_reduce_mean(
            evaluate_loss(self.raw_model, self.objective, self.valid, self.autocast), self.dist
        ).item()
        self._stop_if_not_finite(val_loss, "the validation loss", done)
        record = {"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        self._record(record)
        if self.tb is not None:
            self.tb.add_scalar("valid/loss", val_loss, done)
        self._say(f"step {done}: val loss {val_loss:.4f}, perplexity {record['val_ppl']:.2f}")
        self.result.val_loss = val_loss
        return val_loss

    def _save(self, path: Path, train_state: dict[str, Any] | None, meta: dict[str, Any]) -> Path:
        """A checkpoint of the model (and ``train_state``): sharded, every rank writing its part, when the model
        is (:func:`~lmlab.io.checkpoint.save_sharded_checkpoint`), else rank 0 writes it whole."""
        kw = dict(tokenizer=self.tokenizer, train_state=train_state, overwrite=self.overwrite, meta=meta)
        if not self.dist.sharded:
            return save_checkpoint(path, self.raw_model, **kw)
        rng = train_state.pop("rng") if train_state is not None else None
        optimizer = self.optimizer if train_state is not None else None
        return save_sharded_checkpoint(path, self.raw_model, optimizer, rng=rng, **kw)

    def save_step(self, done: int, val_loss: float | None, stopping: bool) -> None:
        """A step checkpoint with everything an exact resume needs; older ones pruned to ``keep_last``."""
        cfg, device = self.cfg, self.device
        position = getattr(self.train_batches, "position", None)
        state = {
            "step": done,
            "world_size": self.dist.world_size,
            **({"data_position": {"examples": position(done)}} if position is not None else {}),
            **({} if self.dist.sharded else {"optimizer": self.optimizer.state_dict()}),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "best_val_loss": self.best_val,
            "since_best": self.since_best,
            "stopped_early": stopping,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "train_config": dataclasses.asdict(cfg),
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.t_start,
            "tokens": self.tokens,
            "objective": self.objective.name,
        }
        meta = {**self.meta, "step": done, "val_loss": val_loss, "train_device": self.train_device}
        self.last_good = self._save(self.out_dir / step_dir_name(done), state, meta)
        self.result.last_checkpoint = self.last_good
        if self.dist.is_main:
            prune_checkpoints(self.out_dir, cfg.keep_last)

    def finish(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.dist.is_main and self.history:
            plot_loss(self.out_dir / "log.jsonl", self.out_dir / "loss.png")
