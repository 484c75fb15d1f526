"""Distributed set-up through PyTorch's own engine: ``torchrun`` sets the environment, we read it.

Single-process runs see rank 0 of a world of 1; every rank-dependent decision (who writes, which
data a rank reads) goes through :class:`DistInfo`, so DDP on many GPUs is a launch flag.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from lmlab.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> tuple[DistInfo, torch.device]:
    """This process's place in the group torchrun described (joining it), and its device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        info = DistInfo()
        return info, pick_device(device_name, info)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = pick_device(device_name, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown(info: DistInfo) -> None:
    if info.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


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
