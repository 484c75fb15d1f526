"""Distributed set-up through PyTorch's own engine: ``torchrun`` sets the environment, we read it.

Single-process runs see rank 0 of a world of 1; every rank-dependent decision (who writes, which
data a rank reads) goes through :class:`DistInfo`, so DDP on many GPUs is a launch flag. The strategy says
how the ranks hold the model: ``ddp`` (each a whole copy, gradients averaged) or ``fsdp`` (PyTorch's FSDP2,
:func:`shard_model`: parameters, gradients and optimizer state sharded across the ranks). An ``fsdp`` run in
one process joins a process group of its own, so that it shards (trivially) and writes the same checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from lmlab.device import resolve_device

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    sharded: bool = False  # strategy fsdp: the model is sharded across the ranks (FSDP2)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str, strategy: str = "auto") -> tuple[DistInfo, torch.device]:
    """This process's place in the group torchrun described (joining it), and its device. ``strategy`` fsdp in
    a single process: a process group of one (a store in memory), so the model shards as it would on many."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = strategy == "fsdp"
    if world_size <= 1 and not sharded:
        info = DistInfo()
        return info, pick_device(device_name, info)
    if world_size <= 1:
        info = DistInfo(sharded=True)
    else:
        info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size, sharded)
    device = pick_device(device_name, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size <= 1:
            torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
        else:
            torch_dist.init_process_group(backend=backend)
    return info, device


def teardown(info: DistInfo) -> None:
    if (info.enabled or info.sharded) and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def shard_model(model: nn.Module, device: torch.device, precision: str, cpu_offload: bool, compile: bool) -> None:
    """FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) on each Transformer block, then on the whole model, in
    place: each rank keeps 1/world of every parameter, and a block's are gathered only while it computes. On a
    GPU in bf16 the gathered parameters are bf16 and gradients are reduced in fp32 (``MixedPrecisionPolicy``);
    ``cpu_offload`` keeps the shards, their gradients and the optimizer state in CPU memory. ``compile``
    compiles each block before it is sharded (torch.compile per block, as FSDP2 expects). An encoder–decoder
    is sharded as one unit: its decoder blocks' cross-attention is also called outside the block's forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from lmlab.model.blocks import Block

    options: dict = {"mesh": init_device_mesh(device.type, (torch_dist.get_world_size(),))}
    if device.type == "cuda" and precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    blocks = [m for m in model.modules() if isinstance(m, Block)] if model.config.arch != "seq2seq" else []
    for block in blocks:
        if compile:
            block.compile()
        fully_shard(block, **options)
    fully_shard(model, **options)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        torch_dist.all_reduce(
            value, op=torch_dist.ReduceOp.AVG if value.device.type == "cuda" else torch_dist.ReduceOp.SUM
        )
        if value.device.type != "cuda":
            value /= info.world_size  # gloo has no AVG
    return value


def pick_device(name: str, info: DistInfo, present: bool = True) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU; a bare ``cuda`` is this rank's GPU
    (``present=False``: one this machine may lack, for a memory prediction)."""
    return resolve_device(name, info.local_rank, present=present)
