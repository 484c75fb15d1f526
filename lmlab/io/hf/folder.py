"""HF model folders on disk: what makes one (:func:`is_hf_folder`), where its weights are, and its config.

A folder with an HF ``config.json`` (``model_type``, no ``lmlab_model_config``) holds its weights as
``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (sharded or not, read with ``torch.load(weights_only=True)`` only: a pickle
holding anything but tensors is refused). A shard named by an index must be a file inside the folder.
A sentence-transformers folder (``modules.json``) is read through its Transformer module (the folder
itself or ``0_Transformer/``); its pooling modules are not applied. Nothing here imports transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from torch import Tensor

from lmlab.config import ModelConfig, read_json_object
from lmlab.errors import LmlabError
from lmlab.io.hf.config import config_from_hf, with_prefix
from lmlab.io.weights import read_safetensors, safetensors_header, torch_load

VERIFIED_FILE = "lmlab-verified.json"  # where earlier versions recorded a passed check, beside the weights
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)  # in the order they are looked for


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is an HF model folder: a ``config.json`` with ``model_type`` and no
    ``lmlab_model_config``, and weights."""
    path = Path(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES) or not (path / "config.json").is_file():
        return False
    config = read_json_object(path / "config.json")
    return "model_type" in config and "lmlab_model_config" not in config


def sentence_transformers_module(path: str | Path) -> Path | None:
    """The Transformer module's folder of a sentence-transformers folder (``modules.json``): the folder
    itself or a subfolder such as ``0_Transformer/``; None when ``path`` has no ``modules.json``."""
    path = Path(path)
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
        found = [e.get("path", "") for e in entries if str(e.get("type", "")).rsplit(".", 1)[-1] == "Transformer"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as err:
        raise LmlabError(f"{modules}: not a sentence-transformers modules list ({err})") from None
    if not found:
        raise LmlabError(
            f"{modules}: no module of type sentence_transformers.models.Transformer; "
            "lmlab reads that module's HF folder"
        )
    return path / found[0]


def weight_files(folder: Path) -> list[Path]:
    """The files holding the weights: the single file, or an index's shards (with the index)."""
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        weight_map = read_json_object(file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LmlabError(f"{file}: expected a non-empty 'weight_map' of weight name → shard file")
        shards = [folder / _shard_name(file, s) for s in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise LmlabError(f"{file}: shard {shard.name} is missing")
        return [file, *shards]
    raise LmlabError(f"{folder}: no weights; expected one of {', '.join(WEIGHT_FILES)}")


def _shard_name(index: Path, entry: Any) -> str:
    """A shard file named by an index's ``weight_map``: a relative path inside the folder (no ``..``, not absolute)."""
    parts = PurePosixPath(entry).parts if isinstance(entry, str) else ()
    if not parts or parts[0] == "/" or ".." in parts or "\\" in entry:
        raise LmlabError(
            f"{index}: weight_map entry {entry!r}: expected a shard file name inside the folder (no '..', not absolute)"
        )
    return entry


def _torch_load(file: Path) -> dict[str, Tensor]:
    """A pytorch_model.bin's tensors, unpickled with ``weights_only=True``: anything but tensors and plain
    containers is refused."""
    state = torch_load(file)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LmlabError(f"{file}: expected a dict of weight name → tensor")
    return state


def read_hf_weights(folder: str | Path) -> dict[str, Tensor]:
    """All weights of an HF folder on the CPU, from (sharded) safetensors or (sharded) pytorch_model.bin."""
    state: dict[str, Tensor] = {}
    for file in weight_files(Path(folder)):
        if file.name.endswith(".index.json"):
            continue
        state.update(read_safetensors(file) if file.suffix == ".safetensors" else _torch_load(file))
    return state


def weight_names(folder: Path) -> set[str]:
    """The names of a folder's weights, read from the index or the file's header (a pickle is read whole)."""
    files = weight_files(folder)
    if files[0].name.endswith(".index.json"):
        return set(read_json_object(files[0])["weight_map"])
    if files[0].suffix == ".safetensors":
        return set(safetensors_header(files[0]))
    return set(_torch_load(files[0]))


def hf_config_dict(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / "config.json")


def hf_folder_config(folder: str | Path) -> ModelConfig:
    """The lmlab ``ModelConfig`` of an HF folder (reads config.json and the weights' names only)."""
    folder = Path(folder)
    c = hf_config_dict(folder)
    try:
        return config_from_hf(c, keys=with_prefix(weight_names(folder), c))
    except LmlabError as err:
        raise LmlabError(f"{folder}: {err}") from None


def cache_dir() -> Path:
    """lmlab's cache: ``$LMLAB_CACHE``, else ``$XDG_CACHE_HOME/lmlab``, else ``~/.cache/lmlab``."""
    if os.environ.get("LMLAB_CACHE"):
        return Path(os.environ["LMLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmlab"


def verified_record(folder: Path, files: dict[str, list[int]]) -> Path:
    """Where a passed import check of ``folder`` is recorded: in lmlab's cache (never in the user's folder, which
    may be read-only or an installed package), named by a hash of the folder's path and its files' stamp."""
    key = json.dumps({"folder": str(folder.resolve()), "files": files}, sort_keys=True)
    return cache_dir() / "verified" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def stamp(folder: Path) -> dict[str, list[int]]:
    """Size and mtime (ns) of config.json and every weights file: what a cached verification is valid for."""
    files = {}
    for file in (folder / "config.json", *weight_files(folder)):
        st = file.stat()
        files[file.name] = [st.st_size, st.st_mtime_ns]
    return files


__all__ = [
    "VERIFIED_FILE",
    "WEIGHT_FILES",
    "hf_config_dict",
    "hf_folder_config",
    "is_hf_folder",
    "read_hf_weights",
    "sentence_transformers_module",
    "stamp",
    "verified_record",
    "cache_dir",
    "weight_files",
    "weight_names",
]
