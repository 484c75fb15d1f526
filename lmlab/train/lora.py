"""LoRA for users and the ``merge-lora`` verb: the settings (:class:`~lmlab.config.LoraSpec`,
:func:`~lmlab.config.parse_lora`), the adapters on a model (:mod:`lmlab.model.lora`: :func:`apply_lora`,
:func:`merge_lora`, :func:`adapter_state`, :func:`trainable_summary`) and :func:`merge_checkpoint`, which
writes a LoRA checkpoint's adapters merged into a plain checkpoint."""

from __future__ import annotations

from pathlib import Path

from lmlab.config import LoraSpec, parse_lora
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import (
    check_checkpoint_target,
    load_config,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.model.lora import adapter_state, apply_lora, merge_lora, trainable_summary

__all__ = [
    "LoraSpec",
    "parse_lora",
    "apply_lora",
    "merge_lora",
    "adapter_state",
    "trainable_summary",
    "merge_checkpoint",
]


def merge_checkpoint(
    src: str | Path, out: str | Path, tokenizer: bool = True, verify: bool = True, overwrite: bool = False
) -> Path:
    """Write the LoRA checkpoint ``src`` with its adapters merged into ``out`` (atomically): a plain
    checkpoint with ``src``'s config.json fields (plus ``merged_from``), its tokenizer when
    ``tokenizer`` (which must be the one it was trained with; ``verify=False``: a warning), and no
    ``train_state.pt``. Returns ``out``. ``out`` must be new, empty or an lmlab checkpoint outside
    ``src`` (``overwrite``: any folder; lmlab's files are written into it, nothing else is touched).

    Args:
        src: a LoRA checkpoint (or run folder: its best checkpoint)
        out: folder for the merged checkpoint (written atomically)
        tokenizer: copy the checkpoint's tokenizer
        verify: refuse a checkpoint whose tokenizer.json does not match the tokenizer_sha256 in its config.json
            (False: a warning instead of an error)
        overwrite: write into any folder
    """
    given, src = src, resolve_checkpoint(src)
    check_checkpoint_target(out, overwrite=overwrite, sources=(given, src))
    if not load_config(src).lora:
        raise LmlabError(f"{src}: not a LoRA checkpoint (its config has no lora settings); nothing to merge")
    saved_tokenizer = load_tokenizer(src, verify=verify) if tokenizer else None
    model = load_model(src, merge_lora=True)
    meta = {k: v for k, v in read_meta(src).items() if k != "lmlab_model_config"}
    return save_checkpoint(
        out, model, tokenizer=saved_tokenizer, meta={**meta, "merged_from": str(src)}, overwrite=overwrite
    )
