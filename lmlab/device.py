"""Device names: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps`` … checked once, with a one-line error.

Every verb that takes ``--device`` goes through :func:`resolve_device`, so a typo (``--device tpu``) or a
GPU that is not there fails before a model loads or a file is written."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch

from lmlab.errors import LmlabError

KINDS = ("cpu", "cuda", "mps", "xpu")


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
    return bool(backend is not None and backend.is_available())


def check_device(name: str, param: str = "device", present: bool = False) -> str:
    """``name`` unchanged when it names a kind of device (or ``auto``), else a one-line error; with
    ``present``, also an error when this machine does not have it."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in KINDS:
        raise LmlabError(
            f"{param} is {name!r}: expected auto, {', '.join(KINDS)} or a numbered one such as cuda:1", params=param
        )
    if not present:
        return name
    if not _available(device.type):
        raise LmlabError(
            f"{param} is {name!r}: this machine has no {device.type} device (use cpu or auto)", params=param
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LmlabError(
            f"{param} is {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0",
            params=param,
        )
    return name


def resolve_device(name: str, local_rank: int = 0, param: str = "device", present: bool = True) -> torch.device:
    """The device to run on: ``auto`` is this rank's GPU when there is one, else the CPU; a bare
    ``cuda`` is this rank's GPU. ``present=False`` accepts a device this machine lacks (a memory
    prediction for a GPU made on a laptop)."""
    check_device(name, param, present)
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """The most bytes ``fn()`` holds allocated at once beyond what was allocated before it: on a GPU from
    ``torch.cuda.max_memory_allocated``, on a CPU from the profiler's allocation events (each a signed size)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints a line to the process's stderr as it starts and stops
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 pointed at /dev/null for the block (C++ code writes there, not to ``sys.stderr``)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(null)
