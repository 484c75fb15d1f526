"""Reading weight files from user paths: a damaged file is a one-line error naming it, never a traceback.

``safetensors`` checks a file's header against its size before it allocates anything, so a truncated,
empty or garbage ``.safetensors`` file fails fast with a ``SafetensorError`` (``incomplete metadata``,
``header too small``, ``header too large``); here that becomes an :class:`LmlabError`. A pickle
(``pytorch_model.bin``, ``train_state.pt``) is read with ``torch.load(weights_only=True)`` only: its
restricted unpickler refuses any global but tensors and plain containers, so a pickle that would run
code (``__reduce__`` → ``os.system``) is refused unrun, and a truncated zip archive is reported as damaged.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from lmlab.errors import LmlabError

#: What torch.load raises for a file it cannot read: a pickle weights_only refuses (or garbage, which the
#: unpickler meets as an unknown opcode), a truncated zip archive, an empty file, a bad header.
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, UnicodeDecodeError)

# Lines of torch's weights_only message that say nothing about this file.
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")


def short_reason(err: BaseException) -> str:
    """The first informative sentence of an error message (torch's are paragraphs of advice), on one line."""
    lines = [
        line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(_BOILERPLATE)
    ]
    return " ".join(lines).split(". ")[0].rstrip(".")[:200] or type(err).__name__


def _damaged_safetensors(file: Path, err: BaseException) -> LmlabError:
    return LmlabError(
        f"{file}: damaged or not a safetensors file ({short_reason(err)}); expected the complete file safetensors "
        "wrote — copy or save it again"
    )


def read_safetensors(file: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file, on ``device``."""
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError) as err:
        raise _damaged_safetensors(Path(file), err) from None


def safetensors_header(file: str | Path) -> dict[str, tuple[str, list[int]]]:
    """Name → (dtype, shape) of every tensor in a ``.safetensors`` file, read from its header alone."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _damaged_safetensors(Path(file), err) from None


def torch_load(file: str | Path) -> Any:
    """``torch.load(file, weights_only=True)`` on the CPU; a refused or damaged file is a one-line error."""
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before it refuses it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise LmlabError(
            f"{file}: refused to load: torch.load(weights_only=True) accepts only tensors and plain containers, and "
            f"this file is damaged or holds more ({short_reason(err)}); lmlab never runs code from a pickle"
        ) from None
    except TORCH_LOAD_ERRORS as err:
        reason = "it ends early" if isinstance(err, EOFError) else short_reason(err)
        raise LmlabError(
            f"{file}: damaged or not a PyTorch file ({reason}); expected the complete file torch.save wrote"
        ) from None
