"""Sharded checkpoints: PyTorch's distributed checkpoint format (``torch.distributed.checkpoint``, DCP).

A run trained with ``strategy="fsdp"`` writes its checkpoints this way: every rank writes its own shards of
the model and the optimizer state at once, and any number of processes can read them back (DCP reshards on
load), so a run resumes at another world size. The folder is an lmlab checkpoint like any other:

- ``config.json``, ``tokenizer.json`` + ``tokenizer_config.json``: as in :mod:`lmlab.io.checkpoint`;
- ``dcp/``: DCP's files: ``.metadata`` and one ``__R_0.distcp`` per rank, holding ``model`` (the state dict
  under the model's own names) and, in a step checkpoint, ``optimizer`` (FQN-keyed, as
  :func:`torch.distributed.checkpoint.state_dict.get_state_dict` gives it);
- ``rng/rank-R.pt``: each rank's random-number generator states;
- ``train_state.pt``: the rest of what a resume needs (step, data position, best validation loss …);
- ``COMPLETE``: written last, once every rank's files are on disk.

The folder is written under a hidden temporary name, marked ``COMPLETE``, then renamed into place; a folder
without the marker (a run killed while writing) is not a checkpoint: nothing lists, loads or resumes it.
:func:`lmlab.io.checkpoint.load_model` reads the model straight from ``dcp/`` (in one process, no process
group), so ``lmlab.load``, generate, evaluate and export take these folders as they are; ``lmlab consolidate``
writes one ``model.safetensors`` checkpoint from one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from lmlab.config import write_json_atomic
from lmlab.errors import LmlabError
from lmlab.io import outputs
from lmlab.io.weights import torch_load

DCP_DIR = "dcp"
RNG_DIR = "rng"
COMPLETE = "COMPLETE"
DCP_FILES = (DCP_DIR, RNG_DIR, COMPLETE)  # beside config.json, the tokenizer and train_state.pt


def is_complete(path: str | Path) -> bool:
    """A DCP checkpoint whose writing finished: config.json, DCP's metadata and the marker written last."""
    path = Path(path)
    return (path / "config.json").is_file() and (path / DCP_DIR / ".metadata").is_file() and (path / COMPLETE).is_file()


def _group() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _barrier() -> None:
    if _group() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def _shared_temp_name(name: str) -> str:
    """Rank 0's temporary name for the folder being written, the same on every rank."""
    chosen = [outputs.temp_name(name)]
    if _group() and torch_dist.get_world_size() > 1:
        torch_dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def save(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    write_rest,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write a DCP checkpoint at ``path``; every rank of the process group calls it (a collective).

    Every rank writes its shards of the model (and of ``optimizer``'s state, when given) and its ``rng`` states;
    then rank 0 calls ``write_rest(folder)`` for the files only it writes (config.json, tokenizer,
    train_state.pt), writes the ``COMPLETE`` marker last and renames the folder into place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    path = Path(path)
    rank = torch_dist.get_rank() if _group() else 0
    tmp = path.parent / _shared_temp_name(path.name)
    if rank == 0:
        (tmp / RNG_DIR).mkdir(parents=True)
    _barrier()
    if optimizer is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    import torch.distributed.checkpoint as dcp

    with _in_one_process():
        dcp.save(state, checkpoint_id=tmp / DCP_DIR, no_dist=not _group())
    if rng is not None:
        torch.save(rng, tmp / RNG_DIR / f"rank-{rank}.pt")
    _barrier()  # every rank's shards are on disk
    if rank == 0:
        write_rest(tmp)
        _mark_complete(tmp)
        outputs.honour_umask(tmp)
        _put_in_place(tmp, path)
    _barrier()
    return path


def _mark_complete(folder: Path) -> None:
    """The marker written last: without it the folder is not a checkpoint."""
    write_json_atomic(folder / COMPLETE, {"complete": True, "world_size": _world()})


def _world() -> int:
    return torch_dist.get_world_size() if _group() else 1


def _put_in_place(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path``; a previous checkpoint there (lmlab's, see the caller's checks) is swapped whole."""
    if path.is_dir() and outputs.is_empty(path):
        path.rmdir()
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.parent / outputs.temp_name(path.name, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_model_state(path: str | Path, model: nn.Module) -> None:
    """Load a DCP checkpoint's model weights into ``model`` (a plain, unsharded model) in this process alone."""
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    try:
        with _in_one_process():
            dcp.load({"model": state}, checkpoint_id=Path(path) / DCP_DIR, no_dist=True)
    except Exception as err:  # noqa: BLE001 (DCP raises its own CheckpointException, wrapping the cause)
        raise LmlabError(f"{path}: its DCP weights do not load into the model config.json describes: {err}") from None
    model.load_state_dict(state)


def load_train_states(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint's model and optimizer state into this run's (sharded or plain) model and optimizer:
    DCP reshards what the ranks that wrote it hold onto the ranks that read it. A collective in a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with _in_one_process():
        dcp.load(state, checkpoint_id=Path(path) / DCP_DIR, no_dist=not _group())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextlib.contextmanager
def _in_one_process():
    """DCP warns when it runs without a process group, that it assumes one process: what is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def load_rng(path: str | Path, rank: int) -> dict[str, Any] | None:
    """The RNG states rank ``rank`` saved, or None when the run that wrote ``path`` had no such rank."""
    file = Path(path) / RNG_DIR / f"rank-{rank}.pt"
    return torch_load(file) if file.is_file() else None


__all__ = [
    "COMPLETE",
    "DCP_DIR",
    "DCP_FILES",
    "is_complete",
    "load_model_state",
    "load_rng",
    "load_train_states",
    "save",
]
