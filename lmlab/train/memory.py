"""How much memory one training step takes, predicted without allocating it (``--dry-run``).

What is measured: one optimizer step of the run as :func:`lmlab.train.loop.train_loop` runs it, in its
steady state (the optimizer state already exists): the forward pass under the run's autocast, the
objective's loss, backward, gradient clipping, ``optimizer.step()`` and ``zero_grad`` — two
micro-batches when the run accumulates gradients, so the second one runs with the gradients of the
first alive. The peak of that step is what a GPU must hold (``torch.cuda.max_memory_allocated``).

How: PyTorch measures it, lmlab does not count by hand. The model, the optimizer and one batch of the
run's shape are built under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` — tensors with
shapes, dtypes and storages but no memory behind them — and the step runs under PyTorch's own
:class:`~torch.distributed._tools.mem_tracker.MemTracker`, which follows every storage as operators
create and free it (what autograd saves, the temporaries of each kernel, the optimizer's state). A
step of GPT-2 124M takes seconds and no memory. lmlab adds only where each phase begins (forward
through the blocks, then the head and the loss, backward, the optimizer), to say where the memory goes.

The device. Fake tensors are made on the CPU, whatever the run's ``--device``: a CPU-only PyTorch
cannot even make fake CUDA tensors, and one estimate path means one tested path. Training code is the
same on both devices except where kernels differ in what they keep, and those places are handled
explicitly for a CUDA run:

- attention (:func:`torch.nn.functional.scaled_dot_product_attention`): on the CPU the fake step runs
  PyTorch's own CPU dispatch, as the real step would. For CUDA, lmlab applies the CUDA backend choice
  — flash attention for fp16/bf16 without a mask (GQA included), memory-efficient attention otherwise
  unless grouped-query heads rule it out, then the math fallback — and what each saves for backward:
  flash the output and a log-sum-exp per row (B × heads × T, fp32), memory-efficient also its additive
  mask (padded to a multiple of 16 keys), math the full T × T scores. Left to the CPU's kernels, a
  fake step would keep the T × T scores whenever dropout or a mask rules out the CPU's own flash
  kernel: the one large error a naive fake step on the CPU makes for a GPU run.
- the optimizer: AdamW is fused on CUDA and CPUs (:func:`lmlab.train.optim.make_optimizer`): one kernel, no
  temporaries the size of a weight (which PyTorch's per-parameter loop would allocate).
- autocast: the CPU's autocast stands in for CUDA's. Both run the matmuls and attention in the low
  precision; CUDA's also forces a few operators to fp32 (layer norm, exp, log, pow…), which these
  models apply to fp32 tensors anyway (the residual stream, the upcast logits) — except the norm of
  BERT's MLM head, on the masked positions only, which the estimate keeps in bf16.

How well: against real CPU steps, measured independently from the profiler's allocation events
(``tests/test_memory.py``: decoders, an encoder with MLM + NSP, an encoder–decoder, bf16 autocast,
activation checkpointing, gradient accumulation, dropout, LoRA, plain and chunked cross-entropy),
the predicted peak is within 0.3%; parameter, gradient and optimizer bytes are exact. What fake
tensors cannot see is scratch memory a kernel allocates inside itself (the CPU's ``torch.logsumexp``
copies its input twice, which is why :mod:`lmlab.objectives.losses` does not call it).

Not modelled: the CUDA context and cuBLAS workspaces (outside PyTorch's counters, or a few MiB), the
caching allocator's fragmentation (``memory_reserved`` above ``memory_allocated``), fp16's gradient
scaler (a few scalars) and ``torch.compile`` (which usually lowers activation memory). DDP's gradient
buckets are added as a second copy of the gradients; FSDP's share per process is arithmetic on the measured
step (:func:`_sharded`: the states divided by the world size, what is gathered whole added), not measured.
Whether a run fits is judged against 90% of the budget (:data:`HEADROOM`).

Two details of MemTracker are worked around: it hooks every parameter's gradient, which a frozen
(LoRA) parameter refuses, and it keeps per-module peaks with a pass over all modules per operator,
which lmlab does not read and skips (a GPT-2 124M step: 3 s instead of 9 s). Objectives must avoid
data-dependent shapes (a boolean mask as an index), which fake tensors cannot follow: the masked LM
hands its loss the chosen positions as an index made with the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.config import LoraSpec
from lmlab.errors import LmlabError
from lmlab.model.lora import apply_lora
from lmlab.objectives.losses import CHUNK_BYTES, ce_chunk_rows
from lmlab.train.loop import apply_memory_options, autocast_for
from lmlab.train.optim import make_optimizer

HEADROOM = 0.10  # a run "fits" when its predicted peak is within 90% of the budget
PHASES = {
    "forward": "in the forward pass through the blocks",
    "loss": "in the LM head and the loss (logits)",
    "backward": "in backward through the blocks",
    "optimizer": "in the optimizer step",
}


@dataclass
class Settings:
    """The knobs of a run that change its memory: what the advice changes, one flag at a time."""

    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int  # tokens per sequence (fine-tuning: --max-length, + --max-target-length for seq2seq)
    precision: str  # resolved: fp32, bf16 or fp16
    activation_checkpointing: bool = False
    ce_chunk_size: int | None = None  # as TrainConfig.ce_chunk_size
    lora: Any = None  # a LoraSpec, or None: every weight trains
    world_size: int = 1  # processes (torchrun), each on its own device
    strategy: str = "ddp"  # ddp (a whole copy per process) or fsdp (sharded across them)
    cpu_offload: bool = False  # fsdp: the shards, their gradients and the optimizer state in CPU memory


@dataclass
class StepMemory:
    """One training step's predicted memory, in bytes. ``peak`` is not the sum of the parts: gradients
    grow in backward as activations are freed, and the logits live only around the loss."""

    device: str  # the device the prediction is for: "cuda" or "cpu"
    settings: Settings
    attention: str  # the attention kernel(s) it assumes
    ce_rows: int  # tokens per cross-entropy chunk; 0: the plain (whole batch) cross-entropy, or no LM loss
    num_params: int
    trainable_params: int
    parameters: int  # weights and buffers
    gradients: int  # one per trainable parameter (all of them exist at the end of backward)
    optimizer: int  # AdamW: exp_avg and exp_avg_sq per trainable parameter, and its step count
    activations: int  # held at the end of the forward pass through the blocks: what backward needs
    logits: int  # the LM head and the loss at their largest, on top of the activations
    ddp_buckets: int  # DDP's gradient buckets (a second copy of the gradients) when run under torchrun
    peak: int
    peak_phase: str  # a key of PHASES
    gathered: int = 0  # fsdp: the unsharded parameters (root, and two blocks) and one block's unsharded gradients


def fmt_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


# -- the fake step ---------------------------------------------------------------------------------


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class PhaseTracker(MemTracker):
        """MemTracker, plus the peak of each phase of the step (lmlab sets ``phase`` as the step goes)."""

        def __init__(self) -> None:
            super().__init__()
            self.phase = "forward"
            self.peaks: dict[str, int] = {}  # phase -> its peak
            self.window = 0  # the peak since lmlab last reset it

        def current(self) -> int:
            return sum(snap["Total"] for snap in self._curr_mem_snap.values())

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # MemTracker hooks every parameter's gradient, and a frozen one (LoRA) refuses a hook: mark those as hooked
            for p in module.parameters():
                if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state) -> None:
            pass  # MemTracker's per-module peaks (a pass over every module per operator) are not read: the phases' are

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            now = self.current()
            if now > self.peaks.get(self.phase, -1):
                self.peaks[self.phase] = now
            self.window = max(self.window, now)
            return out

    return PhaseTracker


class _CudaAttention:
    """Within ``with``: :func:`torch.nn.functional.scaled_dot_product_attention` runs as CUDA would run it (see the
    module docstring); ``used`` names the kernels it chose. The function itself is swapped for the duration,
    not hooked by a ``TorchFunctionMode``: such a mode does not reach into backward, where activation
    checkpointing recomputes the blocks, and the recomputation must save what the forward saved."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self._original = None

    def __enter__(self) -> "_CudaAttention":
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._attention
        return self

    def __exit__(self, *exc) -> None:
        F.scaled_dot_product_attention = self._original

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if torch.is_autocast_enabled("cpu"):  # attention is on autocast's low-precision list, on CUDA too
            dtype = torch.get_autocast_dtype("cpu")
            q, k, v = (t.to(dtype) for t in (q, k, v))
        gqa = enable_gqa and k.shape[-3] != q.shape[-3]
        if q.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and q.shape[-1] <= 256:
            kind = "flash"
        elif not gqa:
            kind = "memory-efficient"
        else:
            kind = "math"
        self.used.add(kind)
        with torch.autocast("cpu", enabled=False):
            if kind == "math":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.MATH):
                    return self._original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
            bias = None
            if (
                attn_mask is not None
            ):  # memory-efficient attention takes an additive mask, keys padded to a multiple of 16
                S = attn_mask.shape[-1]
                bias = attn_mask.new_empty((*attn_mask.shape[:-1], -(-S // 16) * 16), dtype=q.dtype)
            return _SavedLikeCuda.apply(q, k, v, bias, kind)


class _SavedLikeCuda(torch.autograd.Function):
    """An attention output with exactly what the CUDA kernel saves for backward (fake tensors: no values)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, kind):  # type: ignore[override]
        B, H, T, _ = q.shape
        out = q.new_empty((B, T, H, v.shape[-1])).transpose(1, 2)  # the kernels write (B, T, heads, d)
        rows = T if kind == "flash" else -(-T // 32) * 32
        lse = q.new_empty((B, H, rows), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([bias] if bias is not None else []))
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v = ctx.saved_tensors[:3]
        accum = q.new_empty(q.shape, dtype=torch.float32)  # the backward kernels' fp32 accumulator for dq
        delta = q.new_empty(q.shape[:-1], dtype=torch.float32)
        temporaries = [accum, delta]
        if k.shape[1] != q.shape[1]:  # grouped-query: dk, dv per query head first, then summed per key/value head
            temporaries += [q.new_empty(q.shape), q.new_empty(q.shape)]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        temporaries.clear()
        return dq, dk, dv, None, None


def _final_hidden(model: nn.Module) -> nn.Module:
    """The module whose output is the last hidden state before the head (where the "loss" phase begins)."""
    for name in ("dec_norm_f", "norm_f"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise LmlabError(f"the memory estimate does not know where a {type(model).__name__}'s blocks end")


def measure_step(
    build: Callable[[], nn.Module],
    objective: Any,
    batch: dict[str, Tensor],
    cfg: Any,
    device: torch.device | str,
    settings: Settings,
    *,
    world_size: int = 1,
) -> StepMemory:
    """Predict the memory of one steady-state training step (see the module docstring).

    ``build()`` makes the model as the run would, without weights to load (they do not matter): it is
    called on the meta device, ``settings.lora`` adds adapters. ``batch`` is one real batch of the run's shape, as
    ``objective.batch`` makes it; ``cfg`` the run's :class:`~lmlab.train.loop.TrainConfig` (optimizer
    settings, clipping); ``settings`` override its memory knobs. ``device``: the device the run would use.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device(device)
    cfg = dataclasses.replace(
        cfg,
        micro_batch_size=settings.micro_batch_size,
        grad_accum_steps=settings.grad_accum_steps,
        seq_len=settings.seq_len,
        activation_checkpointing=settings.activation_checkpointing,
        ce_chunk_size=settings.ce_chunk_size,
        precision=settings.precision,
    )
    cuda = device.type == "cuda"
    probe = _StepProbe(_tracker_class()(), _CudaAttention() if cuda else contextlib.nullcontext())
    with torch.device("meta"):  # built without memory, then given fake storage (peft cannot move fake tensors itself)
        model = build().train()
    if settings.lora is not None:
        apply_lora(model, settings.lora)
    chunking = getattr(objective, "ce_chunk_size", None)  # apply_memory_options sets it: put back afterwards
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model.to_empty(device="cpu")
        model.tie_weights()
        apply_memory_options(model, objective, cfg)
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, device)
        fake_batch = {k: mode.from_tensor(v) for k, v in batch.items()}
        try:
            probe.run(model, objective, fake_batch, optimizer, cfg)
        finally:
            if hasattr(objective, "ce_chunk_size"):
                objective.ce_chunk_size = chunking
        sizes = _sizes(model, optimizer)
    if cuda and not probe.attention.used:  # the blocks no longer call F.scaled_dot_product_attention
        raise RuntimeError(
            "the memory estimate for CUDA saw no call of torch.nn.functional.scaled_dot_product_attention"
        )
    return _step_memory(probe, sizes, objective, batch, device, settings, world_size)


class _StepProbe:
    """Runs one fake training step under a memory tracker, with hooks that mark where its memory goes: the
    blocks' activations (forward up to the final hidden states), the head and the loss (logits), backward."""

    def __init__(self, tracker: Any, attention: Any) -> None:
        self.tracker, self.attention = tracker, attention
        self.marks: dict[str, int] = {}

    def _on_hidden(self, module, inputs, output) -> None:  # the blocks are done: the head and the loss begin
        self.marks["body_end"] = self.tracker.window = self.tracker.current()
        self.tracker.phase = "loss"
        if output.requires_grad:
            output.register_hook(self._on_hidden_grad)

    def _on_hidden_grad(self, grad) -> None:  # backward through the head and the loss is done
        self._end_of_loss()
        self.tracker.phase = "backward"

    def _end_of_loss(self) -> None:
        if self.tracker.phase == "loss":
            self.marks["logits"] = max(self.marks.get("logits", 0), self.tracker.window - self.marks["body_end"])

    def run(self, model: nn.Module, objective: Any, batch: dict[str, Tensor], optimizer, cfg: Any) -> None:
        """A steady-state step: an optimizer step on zero gradients first creates the optimizer's state."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        handle = _final_hidden(model).register_forward_hook(self._on_hidden)
        try:
            for p in trainable:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.tracker.track_external(model, optimizer, *batch.values())
            with self.tracker:
                self._step(model, objective, batch, optimizer, trainable, cfg)
        finally:
            handle.remove()

    def _step(self, model, objective, batch, optimizer, trainable, cfg) -> None:
        tracker, marks = self.tracker, self.marks
        autocast = autocast_for(cfg.precision, torch.device("cpu"))[0]  # the fake step runs on the CPU: its autocast
        for _ in range(min(cfg.grad_accum_steps, 2)):
            tracker.reset_mod_stats()  # MemTracker keeps one forward per module: each micro-batch is a new one
            tracker.phase = "forward"
            marks["start"] = marks["body_end"] = tracker.current()
            with self.attention:
                with autocast():
                    loss = objective.loss(model, batch) / cfg.grad_accum_steps
                loss.backward()
            del loss
            self._end_of_loss()  # (when the hidden states needed no gradient)
            marks["activations"] = max(marks.get("activations", 0), marks["body_end"] - marks["start"])
        tracker.phase = "optimizer"
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _sizes(model: nn.Module, optimizer) -> dict[str, int]:
    """Bytes of the parameters (and buffers), gradients and optimizer state; parameter counts; the LM head's rows."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "parameters": sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers()),
        "gradients": sum(p.nbytes for p in trainable),
        "optimizer": sum(
            t.nbytes for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor)
        ),
        "num_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "vocab": model.lm_head.weight.shape[0] if isinstance(getattr(model, "lm_head", None), nn.Linear) else 0,
        **_block_sizes(model),
    }


def _block_sizes(model: nn.Module) -> dict[str, int]:
    """For FSDP: the bytes of the largest Transformer block's parameters (and of its trainable ones), and of the
    parameters outside the blocks (the root's: embeddings, head, final norm)."""
    from lmlab.model.blocks import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)] if model.config.arch != "seq2seq" else []
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    return {
        "block": max((sum(p.nbytes for p in b.parameters()) for b in blocks), default=0),
        "block_trainable": max((sum(p.nbytes for p in b.parameters() if p.requires_grad) for b in blocks), default=0),
        "root": sum(p.nbytes for p in model.parameters() if id(p) not in in_blocks),
    }


def _step_memory(
    probe: _StepProbe, sizes: dict[str, int], objective, batch, device, settings, world_size
) -> StepMemory:
    peaks = probe.tracker.peaks
    phase = max(peaks, key=peaks.get)
    world_size = max(world_size, settings.world_size)
    ddp = sizes["gradients"] if world_size > 1 and settings.strategy != "fsdp" else 0
    lm = hasattr(objective, "ce_chunk_size") and "labels" in batch  # an LM loss (task-head objectives have no chunking)
    vocab = sizes["vocab"]
    memory = StepMemory(
        device=device.type,
        settings=settings,
        attention=" and ".join(sorted(probe.attention.used)) if device.type == "cuda" else "PyTorch's CPU kernels",
        ce_rows=ce_chunk_rows(settings.ce_chunk_size, vocab, batch["labels"].numel()) if lm and vocab else 0,
        num_params=sizes["num_params"],
        trainable_params=sizes["trainable_params"],
        parameters=sizes["parameters"],
        gradients=sizes["gradients"],
        optimizer=sizes["optimizer"],
        activations=probe.marks.get("activations", 0),
        logits=probe.marks.get("logits", 0),
        ddp_buckets=ddp,
        peak=peaks[phase] + ddp,
        peak_phase=phase,
    )
    return _sharded(memory, sizes, device, world_size) if settings.strategy == "fsdp" else memory


def _sharded(memory: StepMemory, sizes: dict[str, int], device: torch.device, world: int) -> StepMemory:
    """One rank's share of a step under FSDP2, from the whole model's measured step: parameters, gradients and
    optimizer state divided by the world size (nothing on the device with ``cpu_offload``), plus what is gathered
    whole while it computes — the root's parameters for the whole step, a block's and the next one's (prefetch),
    in the compute dtype (bf16 on a GPU in bf16), and one block's unsharded gradients (fp32) before they are
    reduce-scattered — plus the step's own transient memory (activations, logits) as measured."""
    m, s = memory, memory.settings
    held = m.parameters + m.optimizer + (m.gradients if m.peak_phase in ("backward", "optimizer") else 0)
    transient = max(m.peak - held, m.activations + m.logits)
    compute = 0.5 if device.type == "cuda" and s.precision == "bf16" else 1.0
    gathered = int(compute * (sizes["root"] + 2 * sizes["block"])) + sizes["block_trainable"]
    share = 0 if s.cpu_offload else 1
    parameters, gradients, optimizer = (share * -(-n // world) for n in (m.parameters, m.gradients, m.optimizer))
    peak = parameters + gradients + optimizer + gathered + transient
    return dataclasses.replace(
        m, parameters=parameters, gradients=gradients, optimizer=optimizer, gathered=gathered, peak=peak
    )


# -- the dry run: the prediction, the budget, and what to change -----------------------------------


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision a run on ``device`` would use, and a note when it had to be assumed."""
    if precision != "auto":
        return precision, ""
    if device.type != "cuda":
        return "fp32", ""
    if torch.cuda.is_available():
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), ""
    return "bf16", " (assumed: no GPU here to ask; --precision fp16 for GPUs older than Ampere)"


def check_budget(memory_budget: float | None, dry_run: bool, world_size: int | None = None) -> None:
    """``--memory-budget`` is a positive number of GiB, and only ``--dry-run`` reads it (``--world-size`` too)."""
    if world_size is not None and not dry_run:
        raise LmlabError(
            "world_size is the processes dry_run predicts for (a launched run has torchrun's): add dry_run",
            params="world_size dry_run",
        )
    if memory_budget is None:
        return
    if (
        isinstance(memory_budget, bool)
        or not isinstance(memory_budget, (int, float))
        or not math.isfinite(memory_budget)
        or memory_budget <= 0
    ):
        raise LmlabError(
            f"memory_budget is {memory_budget}: expected a positive number of GiB (e.g. 24 for a 24 GB GPU)",
            params="memory_budget",
        )
    if not dry_run:
        raise LmlabError(
            "memory_budget is what dry_run checks the predicted peak against: add dry_run",
            params="memory_budget dry_run",
        )


@dataclass
class Change:
    """One thing the advice proposes: the flags, a note, and the prediction with it."""

    flags: str
    note: str
    memory: StepMemory


@dataclass
class DryRun:
    """What ``--dry-run`` found: the prediction for the run as asked, the budget, and (when it does not
    fit) the prediction after each change that could make it fit. ``report()`` is what the CLI prints."""

    memory: StepMemory
    title: str  # the model and the run, for humans
    budget: int | None = None  # bytes
    budget_source: str = ""
    precision_note: str = ""
    up_to: bool = False  # fine-tuning: sequences are at most seq_len tokens (a batch is padded to its longest)
    changes: list[Change] = field(default_factory=list)

    @property
    def limit(self) -> int | None:
        """The most the step may take: the budget less :data:`HEADROOM`."""
        return None if self.budget is None else int(self.budget * (1 - HEADROOM))

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.memory.peak <= self.limit

    def summary(self) -> str:  # what a verb declared with clikit.function_verb prints
        return self.report()

    def report(self) -> str:
        m, s = self.memory, self.memory.settings
        accum = f", {s.grad_accum_steps} micro-batches per optimizer step" if s.grad_accum_steps > 1 else ""
        lines = [
            "lmlab: dry run (nothing trained, nothing written)",
            f"  model          {self.title}",
            (
                f"  step           {s.micro_batch_size} × {'up to ' if self.up_to else ''}{s.seq_len} tokens per "
                f"micro-batch{accum}; {s.precision}"
            )
            + ("" if s.precision == "fp32" else " autocast")
            + self.precision_note
            + f"; on {m.device}",
            "  training       "
            + (
                f"LoRA adapters: {m.trainable_params:,} of {m.num_params:,} parameters"
                if s.lora is not None
                else f"all {m.num_params:,} parameters"
            )
            + ", AdamW"
            + (", activation checkpointing" if s.activation_checkpointing else ""),
            f"  processes      {s.world_size}"
            + (f", {s.strategy}" if s.world_size > 1 or s.strategy == "fsdp" else "")
            + (" with CPU offload" if s.cpu_offload else "")
            + ("; per process" if s.world_size > 1 else ""),
            f"  attention      {m.attention}"
            + (" (CUDA's choice for these shapes and dtypes)" if m.device == "cuda" else ""),
            "  cross-entropy  " + (f"chunked, {m.ce_rows:,} tokens per chunk" if m.ce_rows else "whole batch at once"),
            "predicted memory of one training step:",
        ]
        fsdp = s.strategy == "fsdp"
        shard = ("in CPU memory" if s.cpu_offload else f"1/{s.world_size} per process") if fsdp else ""
        parts = [
            ("parameters and buffers", m.parameters, f"sharded: {shard}" if fsdp else ""),
            ("gradients", m.gradients, f"sharded: {shard}" if fsdp else "all of them, at the end of backward"),
            ("optimizer state", m.optimizer, "AdamW: 2 fp32 values per trainable parameter" + (f"; {shard}" * fsdp)),
            ("activations", m.activations, "kept for backward at the end of the forward pass"),
            ("logits and loss", m.logits, "at their largest, on top of the activations"),
        ]
        if m.ddp_buckets:
            parts.append(("DDP gradient buckets", m.ddp_buckets, "a second copy of the gradients (torchrun)"))
        if fsdp:
            parts.append(("FSDP gathered", m.gathered, "root + 2 blocks unsharded, a block's unsharded gradients"))
        parts.append(("peak", m.peak, PHASES[m.peak_phase]))
        lines += [f"  {name:<24}{fmt_bytes(n):>11}  {note}".rstrip() for name, n, note in parts]
        lines.append("  (the peak is not the sum: gradients grow in backward as activations are freed)")
        if self.budget is None:
            why = "a CPU run" if m.device != "cuda" else "no GPU here to ask"
            lines.append(
                f"budget: unknown ({why}): --memory-budget GIB says whether the run fits, and what to change if not"
            )
            return "\n".join(lines)
        share = f"{m.peak / self.budget:.0%} of {fmt_bytes(self.budget)}"
        if self.fits:
            lines.append(f"budget: fits ({share}, {self.budget_source})")
            return "\n".join(lines)
        lines.append(
            f"budget: does NOT fit: {fmt_bytes(m.peak)} is {share} ({self.budget_source}); a run fits within "
            f"{fmt_bytes(self.limit)} ({1 - HEADROOM:.0%}: the rest is headroom for the allocator and the estimate)"
        )
        if not self.changes:
            lines.append("no change lmlab knows makes it fit: a smaller model, or a GPU with more memory")
            return "\n".join(lines)
        lines.append("what to change (each line on its own; predicted peak after it):")
        width = max(len(c.flags) for c in self.changes)
        for c in self.changes:
            verdict = "fits" if c.memory.peak <= self.limit else "does not fit"
            lines.append(
                f"  {c.flags:<{width}}  {fmt_bytes(c.memory.peak):>10}  {verdict}" + (f" — {c.note}" if c.note else "")
            )
        return "\n".join(lines)


def dry_run(
    measure: Callable[[Settings], StepMemory],
    settings: Settings,
    *,
    title: str,
    device: torch.device,
    memory_budget: float | None = None,
    precision_note: str = "",
    seq_flag: str = "--seq-len",
    lora_flag: bool = False,
    vocab_size: int = 0,
    up_to: bool = False,
) -> DryRun:
    """Predict the run's step (``measure(settings)``, e.g. :func:`measure_step` bound to the run) and, when
    the budget is known and the run does not fit, predict each change that could make it fit.

    The budget is ``memory_budget`` GiB, or else the CUDA device's total memory. ``seq_flag`` names the
    flag that sets the sequence length (``--seq-len``; fine-tuning: ``--max-length``); ``lora_flag``: the
    run can take ``--lora`` (fine-tuning). A change is predicted as a run with that flag would be.
    """
    result = DryRun(measure(settings), title, precision_note=precision_note, up_to=up_to)
    if memory_budget is not None:
        result.budget, result.budget_source = int(memory_budget * 2**30), "--memory-budget"
    elif device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        result.budget = torch.cuda.get_device_properties(index).total_memory
        result.budget_source = f"the memory of cuda:{index}, {torch.cuda.get_device_name(index)}"
    if result.fits is not False:
        return result
    candidates = _candidates(
        settings, result.memory, device, seq_flag=seq_flag, lora_flag=lora_flag, vocab_size=vocab_size
    )
    smaller = _smaller_batches(measure, settings, result.limit)
    if smaller is not None:
        result.changes.append(Change(_batch_flags(smaller[0]), "the same sequences per optimizer step", smaller[1]))
    for flags, note, changed in candidates:
        result.changes.append(Change(flags, note, measure(changed)))
    together = _together(settings, candidates, seq_flag)  # every memory saver at once, for when none is enough alone
    if not any(c.memory.peak <= result.limit for c in result.changes) and together != settings:
        memory = measure(together)
        if memory.peak > result.limit and together.micro_batch_size > 1:
            together, memory = _smaller_batches(measure, together, result.limit)
        flags = [flags for flags, _, changed in candidates if not flags.startswith(seq_flag)]
        if together.micro_batch_size != settings.micro_batch_size:
            flags.insert(0, _batch_flags(together))
        result.changes.append(Change(" ".join(flags), "all together", memory))
    return result


def _smaller_batches(measure, base: Settings, limit: int) -> tuple[Settings, StepMemory] | None:
    """The largest micro-batch (halving) that fits, with accumulation raised to keep the batch; else the smallest."""
    tried = None
    b = base.micro_batch_size
    while b > 1:
        b = max(1, b // 2)
        accum = math.ceil(base.micro_batch_size * base.grad_accum_steps / b)
        changed = dataclasses.replace(base, micro_batch_size=b, grad_accum_steps=accum)
        tried = (changed, measure(changed))
        if tried[1].peak <= limit:
            break
    return tried


def _batch_flags(changed: Settings) -> str:
    return f"--micro-batch-size {changed.micro_batch_size} --grad-accum-steps {changed.grad_accum_steps}"


def _candidates(
    settings: Settings, memory: StepMemory, device: torch.device, *, seq_flag: str, lora_flag: bool, vocab_size: int
) -> list[tuple[str, str, Settings]]:
    """Each memory saver the run does not use yet: (its flags, what it costs, the settings with it)."""
    candidates: list[tuple[str, str, Settings]] = []
    if settings.world_size > 1 and settings.strategy != "fsdp":
        note = f"shards parameters, gradients and optimizer state across the {settings.world_size} processes"
        candidates.append(("--strategy fsdp", note, dataclasses.replace(settings, strategy="fsdp")))
    if settings.strategy == "fsdp" and not settings.cpu_offload:
        note = "keeps the shards, gradients and optimizer state in CPU memory: slower steps"
        candidates.append(("--cpu-offload", note, dataclasses.replace(settings, cpu_offload=True)))
    if not settings.activation_checkpointing:
        note = "recomputes each block in backward: about a third more compute"
        candidates.append(
            ("--activation-checkpointing", note, dataclasses.replace(settings, activation_checkpointing=True))
        )
    if lora_flag and settings.lora is None:
        note = "trains low-rank adapters (r=8 on qkv) instead of every weight"
        candidates.append(("--lora default", note, dataclasses.replace(settings, lora=LoraSpec())))
    if settings.precision == "fp32":
        note = "bf16 autocast" + (" (GPUs from Ampere on; fp16 before)" if device.type == "cuda" else "")
        candidates.append(("--precision bf16", note, dataclasses.replace(settings, precision="bf16")))
    rows = max(64, CHUNK_BYTES // (4 * vocab_size)) if vocab_size else 0
    many_logits = memory.logits > 0.1 * memory.peak and rows < settings.micro_batch_size * settings.seq_len
    if memory.ce_rows == 0 and vocab_size and many_logits:
        note = "the cross-entropy in chunks: one chunk's logits at a time"
        candidates.append((f"--ce-chunk-size {rows}", note, dataclasses.replace(settings, ce_chunk_size=rows)))
    if settings.seq_len >= 16:
        note = "shorter sequences: less context per example"
        candidates.append(
            (f"{seq_flag} {settings.seq_len // 2}", note, dataclasses.replace(settings, seq_len=settings.seq_len // 2))
        )
    return candidates


def _together(settings: Settings, candidates: list[tuple[str, str, Settings]], seq_flag: str) -> Settings:
    """The settings with every candidate but the shorter sequences."""
    together = settings
    for flags, _, changed in candidates:
        if flags.startswith(seq_flag):
            continue
        name = next(
            f.name for f in dataclasses.fields(Settings) if getattr(changed, f.name) != getattr(settings, f.name)
        )
        together = dataclasses.replace(together, **{name: getattr(changed, name)})
    return together


def plan(
    build: Callable[[], nn.Module],
    objective: Any,
    make_batch: Callable[[Settings], dict[str, Tensor]],
    cfg: Any,
    device: torch.device,
    *,
    seq_len: int,
    lora: Any,
    title: str,
    memory_budget: float | None,
    world_size: int | None = None,
    **advice: Any,
) -> DryRun:
    """``--dry-run`` for a run: its :class:`Settings` from ``cfg`` (the precision resolved for ``device``, the
    strategy and CPU offload) in ``world_size`` processes (None: torchrun's ``WORLD_SIZE``, else 1), each
    prediction a :func:`measure_step` of ``build()`` on ``make_batch(settings)``, and :func:`dry_run`'s advice
    (``advice``: its keyword options)."""
    precision, note = resolve_precision(cfg.precision, device)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise LmlabError(f"world_size is {world!r}: expected a positive integer (processes)", params="world_size")
    settings = Settings(
        cfg.micro_batch_size,
        cfg.grad_accum_steps,
        seq_len,
        precision,
        cfg.activation_checkpointing,
        cfg.ce_chunk_size,
        lora,
        world,
        "fsdp" if cfg.strategy == "fsdp" else "ddp",
        cfg.cpu_offload,
    )
    return dry_run(
        lambda s: measure_step(build, objective, make_batch(s), cfg, device, s),
        settings,
        title=title,
        device=device,
        memory_budget=memory_budget,
        precision_note=note,
        **advice,
    )


__all__ = [
    "HEADROOM",
    "Change",
    "DryRun",
    "Settings",
    "StepMemory",
    "check_budget",
    "dry_run",
    "fmt_bytes",
    "measure_step",
    "plan",
    "resolve_precision",
]
