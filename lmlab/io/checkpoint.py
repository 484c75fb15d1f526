"""Checkpoints: one folder each, written atomically, readable by ``safetensors`` alone.

A checkpoint folder holds

- ``config.json`` — the :class:`~lmlab.config.ModelConfig` (under ``lmlab_model_config``) and what
  produced it (step, validation loss, tokenizer hash);
- ``model.safetensors`` — the weights (a tied LM head is stored once, as the token embedding);
- ``tokenizer.json`` + ``tokenizer_config.json`` — the tokenizer, so the folder stands alone;
- ``train_state.pt`` — for resuming only: optimizer state, RNG states, step, data position, best validation loss.

A run trained with ``strategy="fsdp"`` writes sharded checkpoints instead of ``model.safetensors``: ``dcp/``
(PyTorch's distributed checkpoint of the model and optimizer), ``rng/`` and a ``COMPLETE`` marker written
last (:mod:`lmlab.io.dcp`). :func:`load_model` reads them as it reads any other.

A LoRA checkpoint (``config.lora`` set, see :mod:`lmlab.model.lora`) is self-contained too: it holds
the base weights and the adapters, under peft's names (``blocks.0.attn.qkv.base_layer.weight``,
``blocks.0.attn.qkv.lora_A.default.weight``, …). :func:`load_model` injects the same adapters before
loading it strictly; ``load_model(..., merge_lora=True)`` folds them in, giving a plain model.

A quantized checkpoint (``config.quantization`` set, written by :func:`lmlab.compress.quantize`) stores the
block Linear layers as integers and scales (``blocks.0.attn.qkv.qweight``, ``….scales``, ``….zeros``);
:func:`load_model` puts :class:`~lmlab.model.quant.QuantizedLinear` modules in their place first.

An HF model folder is a checkpoint too (:mod:`lmlab.io.hf`): ``config.json`` with a ``model_type``,
weights as (sharded) ``model.safetensors`` or ``pytorch_model.bin``, ``tokenizer.json``; so is a
sentence-transformers folder, through its Transformer module. :func:`load_model` maps its weights
onto the lmlab model and, unless ``verify=False``, checks the result against transformers' model of
the same folder once (the pass is cached beside the weights). :func:`load_config` reads either kind.

A GGUF file (``*.gguf``, llama.cpp's format: :mod:`lmlab.io.gguf_file`) is a checkpoint too: the model (weights
dequantized to fp32) and the tokenizer are both in the file; it has no ``config.json`` (:func:`read_meta` gives {}).

A run folder holds ``step-XXXXXXXX/`` checkpoints (the last K are kept), ``best/`` (lowest
validation loss), ``log.jsonl`` and ``loss.png``. Every checkpoint is written into a hidden temp
folder and renamed into place, so a run killed mid-write never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmlab.config import LoraSpec, ModelConfig, write_json_atomic
from lmlab.errors import LmlabError
from lmlab.io import dcp, gguf_file, hf, outputs
from lmlab.io.weights import read_safetensors, torch_load
from lmlab.model import lora, quant
from lmlab.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
STEP_DIR = re.compile(r"^step-(\d{8})$")
# every file save_checkpoint writes: a folder holding only these (and lmlab's temporaries) is swapped whole
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, "tokenizer.json", "tokenizer_config.json")
CHECKPOINT_ENTRIES = CHECKPOINT_FILES + dcp.DCP_FILES  # and a sharded (DCP) checkpoint's folders and marker

logger = logging.getLogger(__name__)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_checkpoint(path: str | Path) -> bool:
    """An lmlab checkpoint or an HF model folder: config.json and weights (or a complete sharded checkpoint,
    :mod:`lmlab.io.dcp`)."""
    path = Path(path)
    weights = any((path / name).is_file() for name in hf.WEIGHT_FILES)
    return (path / CONFIG_FILE).is_file() and weights or dcp.is_complete(path)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The step checkpoints in a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = STEP_DIR.match(child.name)
        if m and is_checkpoint(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = [c for c in list_checkpoints(run_dir) if (c[1] / STATE_FILE).is_file()]
    return checkpoints[-1][1] if checkpoints else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (lmlab or HF), a GGUF file, a sentence-transformers folder (meaning its Transformer
    module's folder), or a run folder (meaning its ``best/``, else its latest step)."""
    path = Path(path)
    if is_checkpoint(path) or gguf_file.is_gguf_file(path):
        return path
    if not path.exists():
        raise LmlabError(f"{path}: no such checkpoint folder")
    module = hf.sentence_transformers_module(path)
    if module is not None:
        if not is_checkpoint(module):
            raise LmlabError(
                f"{path / 'modules.json'}: its Transformer module {module} is not an HF model folder (config.json and "
                "weights)"
            )
        return module
    if is_checkpoint(path / "best"):
        return path / "best"
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1][1]
    raise LmlabError(
        f"{path} is not a checkpoint: expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE} (an lmlab checkpoint or "
        "HF model folder), a .gguf file, "
        "a sentence-transformers folder, or a run folder holding step-* checkpoints"
    )


def load_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint (:func:`resolve_checkpoint` resolves ``path``): an lmlab
    checkpoint's, or the lmlab config an HF folder converts to."""
    path = resolve_checkpoint(path)
    if gguf_file.is_gguf_file(path):
        return gguf_file.read_gguf_config(path)
    return hf.hf_folder_config(path) if hf.is_hf_folder(path) else ModelConfig.load(path / CONFIG_FILE)


def weights_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as stored: contiguous CPU tensors, a tied LM head stored once."""
    state = model.state_dict()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def is_lmlab_checkpoint(path: str | Path) -> bool:
    """A folder whose config.json is an lmlab checkpoint's (it holds ``lmlab_model_config``): proof
    that lmlab wrote it."""
    try:
        data = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "lmlab_model_config" in data


def is_run(path: str | Path) -> bool:
    """A run folder lmlab made: its marker, or step checkpoints (runs from before the marker)."""
    return outputs.marker_kind(path) == "run" or bool(list_checkpoints(path))


def check_checkpoint_output(path: str | Path, *, overwrite: bool = False, param: str = "out") -> None:
    """A checkpoint may be written at ``path``: new, empty, or lmlab's own checkpoint; any folder with
    ``overwrite`` (lmlab's files are then written into it, nothing else is touched)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmlabError(f"{param} {path} exists and is not a folder: choose a new or empty folder", params=param)
    if path.is_dir() and not outputs.is_empty(path) and not is_lmlab_checkpoint(path) and not overwrite:
        raise LmlabError(
            f"{param} {path} exists and is not an lmlab checkpoint: choose an empty or new {param}, or pass overwrite "
            "(lmlab then writes its own files there and deletes nothing else)",
            params=f"{param} overwrite",
        )


def check_checkpoint_target(
    path: str | Path, *, overwrite: bool = False, sources: tuple = (), param: str = "out"
) -> Path:
    """Before a verb writes one checkpoint at ``path`` (merge-lora): outside its sources, new, empty or
    lmlab's own plain checkpoint (not a run's training checkpoint, whose train_state.pt would be lost),
    writable. Cleans this path's stale temporaries."""
    path = Path(path)
    outputs.check_sources(path, sources, param)
    check_checkpoint_output(path, overwrite=overwrite, param=param)
    if (path / STATE_FILE).is_file() and not overwrite:
        raise LmlabError(
            f"{param} {path} is a training checkpoint (it holds {STATE_FILE}, needed to resume its run): choose "
            f"another {param}",
            params=param,
        )
    outputs.check_writable(path, param)
    outputs.clean_stale(path.parent, path.name)
    return path


def check_run_output(out: str | Path, *, overwrite: bool = False, sources: tuple = ()) -> Path:
    """Before a training run writes into ``out``: the folder is new, empty or an lmlab run (else
    ``overwrite``), outside what the run reads, writable; its ``best/`` can be replaced."""
    out = outputs.check_output(out, "run", is_run, overwrite=overwrite, sources=sources)
    check_checkpoint_output(out / "best", overwrite=overwrite, param="out")
    return out


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    tokenizer: Any | None = None,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder atomically (temp folder + rename).

    An existing folder is replaced only as :func:`check_checkpoint_output` allows: lmlab's own
    checkpoint holding nothing else is swapped whole; a folder holding other files too (or, with
    ``overwrite``, anyone's folder) receives lmlab's files one by one, config.json last, and keeps
    the others."""
    path = Path(path)
    check_checkpoint_output(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / outputs.temp_name(path.name)
    tmp.mkdir()
    try:
        save_file(weights_for_saving(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_beside_weights(tmp, model.config, tokenizer, train_state, meta)
        outputs.honour_umask(tmp)  # safetensors writes 0600
        _put_in_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_beside_weights(folder: Path, config: ModelConfig, tokenizer, train_state, meta) -> None:
    """What a checkpoint holds beside its weights: the tokenizer, train_state.pt, and config.json (last)."""
    if tokenizer is not None:
        tokenizer.write_files(folder)
    if train_state is not None:
        torch.save(train_state, folder / STATE_FILE)
    write_json_atomic(folder / CONFIG_FILE, {"lmlab_model_config": config.to_dict(), **(meta or {})})


def save_sharded_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    tokenizer: Any | None = None,
    train_state: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a sharded (DCP) checkpoint of ``model`` (sharded by FSDP2, or whole), with ``optimizer``'s state and
    each rank's ``rng`` when given: every rank of the process group calls it (:func:`lmlab.io.dcp.save`)."""
    path = Path(path)
    check_checkpoint_output(path, overwrite=overwrite)
    if path.is_dir() and not outputs.is_empty(path):  # replaced whole: only lmlab's own checkpoint, nothing else
        if not (is_lmlab_checkpoint(path) and outputs.holds_only(path, CHECKPOINT_ENTRIES)):
            raise LmlabError(
                f"out {path}: a sharded checkpoint replaces its folder whole, and this one holds files lmlab did not "
                "write; move them out or choose a new out",
                params="out",
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config

    def write_rest(folder: Path) -> None:
        _write_beside_weights(folder, config, tokenizer, train_state, meta)

    return dcp.save(path, model, optimizer, write_rest=write_rest, rng=rng)


def _put_in_place(tmp: Path, path: Path) -> None:
    """Move the checkpoint written in ``tmp`` to ``path`` (see :func:`save_checkpoint`)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    ours = is_lmlab_checkpoint(path)
    if ours and outputs.holds_only(path, CHECKPOINT_ENTRIES):
        old = path.parent / outputs.temp_name(path.name, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return
    written = sorted(p.name for p in tmp.iterdir())
    for name in sorted(written, key=lambda n: n == CONFIG_FILE):  # config.json last
        os.replace(tmp / name, path / name)
    if ours:  # lmlab's own files of the previous checkpoint that this one lacks (a stale train_state.pt)
        for name in set(CHECKPOINT_FILES) - set(written):
            (path / name).unlink(missing_ok=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint, as a dict ({} for a GGUF file, which has none)."""
    if gguf_file.is_gguf_file(path):
        return {}
    file = Path(path) / CONFIG_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmlabError(f"{Path(path)} is not a checkpoint: expected {CONFIG_FILE}") from None
    except json.JSONDecodeError as e:
        raise LmlabError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_tokenizer(path: str | Path, verify: bool = True) -> Tokenizer:
    """The tokenizer beside a checkpoint's weights, checked against the ``tokenizer_sha256`` its config.json
    records (:attr:`Tokenizer.sha256 <lmlab.tokenizer.Tokenizer.sha256>` of the tokenizer it was trained with):
    another tokenizer's ids mean nothing to the model, so a mismatch is an error — with ``verify=False``
    (``--no-verify``) a logged warning. An HF folder records no hash: its tokenizer is taken as it is."""
    path = resolve_checkpoint(path)
    if gguf_file.is_gguf_file(path):
        return gguf_file.read_gguf_tokenizer(path)
    tokenizer = Tokenizer.load(path)
    expected = read_meta(path).get("tokenizer_sha256")
    if expected is not None and expected != tokenizer.sha256:
        message = (
            f"{path / 'tokenizer.json'} does not match the tokenizer the model was trained with "
            f"({CONFIG_FILE} records another tokenizer_sha256); put back the checkpoint's own tokenizer"
        )
        if verify:
            raise LmlabError(message + " (`verify=False`, `--no-verify` on the command line, loads it anyway)")
        logger.warning("%s; loading it anyway (--no-verify): expect garbage", message)
    return tokenizer


def has_tokenizer(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` (resolved) holds its tokenizer: tokenizer.json beside the weights, or a
    GGUF file's own vocabulary."""
    path = Path(path)
    return gguf_file.is_gguf_file(path) or (path / "tokenizer.json").is_file()


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    merge_lora: bool = False,
    verify: bool = True,
) -> nn.Module:
    """Build the model a checkpoint folder describes and load its weights (strictly).

    A LoRA checkpoint comes back as it was saved: adapters injected, only they (and a task head)
    trainable, parameters in the same order, so a resumed optimizer state fits. ``merge_lora`` folds
    the adapters into the base weights after loading (a plain model, for inference and export); it
    changes nothing for a checkpoint without adapters.

    An HF folder's weights are mapped onto the lmlab model, and ``verify`` checks its outputs against
    transformers' model of the folder (:func:`lmlab.io.hf.verify_hf_folder`: once per folder, cached;
    an LmlabError on a mismatch; skipped with a warning without transformers). The model's ``fresh_weights``
    names the weights an HF folder lacked and lmlab initialised at random (a sentence-transformers folder's
    MLM head): what reads them (the bias lens' pseudo-likelihoods) would read noise.

    A GGUF file's weights are dequantized to fp32 (:func:`lmlab.io.gguf_file.read_gguf_checkpoint`); ``verify``
    does not apply to them.
    """
    from lmlab.model import build_model

    path = resolve_checkpoint(path)
    from_hf, from_gguf, fresh = hf.is_hf_folder(path), gguf_file.is_gguf_file(path), []
    if from_hf:
        config, state, fresh = hf.read_hf_parts(path)
    elif from_gguf:
        config, state = gguf_file.read_gguf_checkpoint(path)
    else:
        config = ModelConfig.load(path / CONFIG_FILE)
    with torch.device("meta"):
        model = build_model(config)
        if config.lora:
            lora.apply_lora(model, LoraSpec.from_dict(config.lora))
        if config.quantization:  # integers and scales load into QuantizedLinear modules (lmlab.model.quant)
            quant.install_quantized(model, config.quantization)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives every parameter its own storage; a tied head must share again
    if from_hf or from_gguf:
        load_weights(model, state, source=str(path))
    elif (path / WEIGHTS_FILE).is_file():
        load_weights(model, read_safetensors(path / WEIGHTS_FILE, device), source=str(path / WEIGHTS_FILE))
    else:  # a sharded checkpoint (lmlab.io.dcp): every shard, read by this process alone
        dcp.load_model_state(path, model)
    rebuild_buffers(model)  # buffers that are not stored (RoPE tables) are recomputed on the device
    if from_hf and verify:
        hf.verify_hf_folder(path, model.eval())
    if merge_lora and config.lora:
        lora.merge_lora(model)
    if dtype is not None:
        model.to(dtype=dtype)
    model.fresh_weights = tuple(fresh)  # what the folder lacked and lmlab initialised at random: no lens may read it
    return model.eval()


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; any missing or unexpected weight is an error naming it."""
    expected = set(weights_for_saving_keys(model))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
        raise LmlabError(f"{source}: weights do not match the config ({'; '.join(parts)})")
    own = model.state_dict()
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise LmlabError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}; the config expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=False)


def weights_for_saving_keys(model: nn.Module) -> list[str]:
    keys = list(model.state_dict().keys())
    if getattr(model.config, "tie_embeddings", False):
        keys.remove("lm_head.weight")
    return keys


def rebuild_buffers(model: nn.Module) -> None:
    """Recompute non-persistent buffers (RoPE tables, scaled as ``config.rope_scaling`` says) that
    ``to_empty`` left uninitialised."""
    from lmlab.model.blocks import rope_cache

    if getattr(model, "rope_cos", None) is not None:
        cos, sin = rope_cache(model.config, device=model.rope_cos.device)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``train_state.pt`` (``torch.load(weights_only=True)``); a missing, damaged or refused
    file is a one-line error that says which earlier step checkpoint of the run could resume instead."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise LmlabError(f"{path}: no {STATE_FILE}; this checkpoint cannot resume training")
    try:
        state = torch_load(file)
    except LmlabError as err:
        raise LmlabError(f"{err}; this checkpoint cannot resume training: {_earlier_resumable(Path(path))}") from None
    if not isinstance(state, dict):
        raise LmlabError(
            f"{file}: expected a dict of training state; this checkpoint cannot resume training: "
            f"{_earlier_resumable(Path(path))}"
        )
    return state


def _earlier_resumable(path: Path) -> str:
    """Which step checkpoint before ``path`` in its run folder could resume instead, in words."""
    m = STEP_DIR.match(path.name)
    earlier = [
        c for step, c in list_checkpoints(path.parent) if m and step < int(m.group(1)) and (c / STATE_FILE).is_file()
    ]
    if not earlier:
        return "the run folder holds no earlier step checkpoint with a train_state.pt; start the run again"
    return f"the earlier checkpoint {earlier[-1]} can (move {path.name} out of {path.parent} and --resume again)"


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (``best/`` is separate and kept); only
    lmlab's own, and only those holding nothing but checkpoint files."""
    checkpoints = [
        c
        for c in list_checkpoints(run_dir)
        if is_lmlab_checkpoint(c[1]) and outputs.holds_only(c[1], CHECKPOINT_ENTRIES)
    ]
    for _, path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


def consolidate(checkpoint: str | Path, out: str | Path, verify: bool = True, overwrite: bool = False) -> Path:
    """Write the sharded checkpoint ``checkpoint`` (what a ``strategy="fsdp"`` run writes, :mod:`lmlab.io.dcp`) as
    one plain checkpoint in ``out``: ``model.safetensors``, config.json, the tokenizer; no training state. Every
    lmlab verb reads the sharded folder as it is; this is for tools that read safetensors. Returns ``out``.

    Args:
        checkpoint: a sharded checkpoint, or a run folder (its best/, else its latest step)
        out: folder for the consolidated checkpoint (written atomically)
        verify: refuse a checkpoint whose tokenizer.json does not match the tokenizer_sha256 in its config.json
        overwrite: write into any folder
    """
    given, src = checkpoint, resolve_checkpoint(checkpoint)
    check_checkpoint_target(out, overwrite=overwrite, sources=(given, src))
    tokenizer = load_tokenizer(src, verify=verify) if (src / "tokenizer.json").is_file() else None
    meta = {k: v for k, v in read_meta(src).items() if k != "lmlab_model_config"}
    model = load_model(src, verify=verify)
    return save_checkpoint(out, model, tokenizer=tokenizer, meta={**meta, "consolidated_from": str(src)})
