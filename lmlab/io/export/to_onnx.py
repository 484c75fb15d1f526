"""``lmlab export --format onnx``: a decoder checkpoint → a folder onnxruntime runs::

    out/
      model.onnx        input_ids (batch, sequence) int64 → logits (batch, sequence, vocab_size) float32;
                        batch and sequence are dynamic axes (sequence up to the model's block_size)
      tokenizer.json    the checkpoint's tokenizer (when it has one), for the ids in and the text out
      export.json       source checkpoint, format, dtype, opset and the parity figures the check measured

Exported with ``torch.onnx.export(dynamo=True)`` (``torch.export`` then onnxscript; ``pip install 'lmlab[onnx]'``).
The graph computes the whole sequence each call (no KV-cache inputs): a generation loop feeds the tokens so far.
The folder is written beside ``out`` under a temporary name, checked with onnxruntime (:func:`check_onnx`: the
logits of two batches of other shapes than the traced one within :data:`TOL` of lmlab's, and a greedy
continuation driven through onnxruntime equal to lmlab's token for token), and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.config import write_json_atomic
from lmlab.errors import LmlabError
from lmlab.io import outputs
from lmlab.io.checkpoint import load_config, load_model, load_tokenizer, resolve_checkpoint

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
OPSET = 18
TOL = 1e-4  # the largest absolute logit difference the check allows (fp32)
SUPPORTED = "decoder language models (GPT-2 and LLaMA families, no task head)"


def require_onnx() -> Any:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's dynamo exporter writes the graph with it)
    except ImportError:
        raise LmlabError(
            "format onnx needs onnx, onnxscript and onnxruntime, which are not installed: pip install 'lmlab[onnx]'"
        ) from None
    return onnx, onnxruntime


class CausalLogits(nn.Module):
    """``input_ids`` → logits, with the causal mask built from ``arange`` so the exported graph has no Python
    bool that depends on the sequence length (SDPA's ``is_causal`` must be a constant)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.model(input_ids, attn_mask=(pos[None, :] <= pos[:, None])[None, None])


def write_onnx(model: nn.Module, path: Path) -> None:
    """Export ``model``'s logits for ``input_ids`` to ``path`` with dynamic batch and sequence axes."""
    require_onnx()
    config = model.config
    example = (torch.arange(14).reshape(2, 7) % config.vocab_size,)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=config.block_size)},)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            CausalLogits(model).eval(),
            example,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes=dims,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def _greedy(step: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits = step(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def check_onnx(path: Path, model: nn.Module, what: str) -> dict[str, Any]:
    """Run ``path`` with onnxruntime (CPU): logits of two batches of shapes other than the traced one against
    ``model``'s (within :data:`TOL`), and a greedy continuation of 8 tokens against lmlab's. Returns the figures."""
    onnx, ort = require_onnx()
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vocab = model.config.vocab_size

    def ort_logits(ids: Tensor) -> Tensor:
        return torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])

    def lmlab_logits(ids: Tensor) -> Tensor:
        with torch.no_grad():
            return model(ids.to(model.tok_emb.weight.device)).float().cpu()

    gap = 0.0
    for shape in ((1, 5), (3, 11)):
        ids = torch.arange(shape[0] * shape[1]).reshape(shape).mul(7).add(3) % vocab
        gap = max(gap, (ort_logits(ids) - lmlab_logits(ids)).abs().max().item())
    if not gap <= TOL:
        raise LmlabError(f"{what}: onnxruntime's logits differ from lmlab's by {gap:.2e} (tolerance {TOL})")
    prompt = [3 % vocab, 10 % vocab, 4 % vocab]
    theirs, ours = _greedy(ort_logits, prompt, 8), _greedy(lmlab_logits, prompt, 8)
    if theirs != ours:
        raise LmlabError(f"{what}: onnxruntime's greedy continuation {theirs} differs from lmlab's {ours}")
    return {"max_abs_logit_diff": gap, "tolerance": TOL, "greedy_tokens_equal": len(ours)}


def export_onnx(checkpoint: str | Path, out: str | Path, *, verify: bool = True) -> Path:
    """Write ``checkpoint`` (a decoder; a LoRA run merged) as an ONNX folder ``out`` (model.onnx, tokenizer.json,
    export.json) for onnxruntime; returns ``out``.

    Args:
        checkpoint: checkpoint folder (or run folder: its best checkpoint)
        out: the folder to write (new or empty; written atomically)
        verify: run the graph with onnxruntime and compare its logits and greedy tokens with lmlab's (False: skip it)
    """
    require_onnx()
    src, out = resolve_checkpoint(checkpoint), Path(out)
    outputs.check_sources(out, (checkpoint, src))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmlabError(f"out {out} exists and is not an empty folder: choose another or remove it", params="out")
    config = load_config(src)
    if config.arch != "decoder" or config.task:
        kind = {"encoder": "an encoder", "seq2seq": "an encoder–decoder"}.get(config.arch, f"a {config.task} head")
        raise LmlabError(f"format onnx writes {SUPPORTED}; {src} is {kind}", params="format")
    tokenizer = load_tokenizer(src, verify=verify) if (src / "tokenizer.json").is_file() else None
    model = load_model(src, merge_lora=True)
    outputs.check_writable(out)
    outputs.clean_stale(out.parent, out.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / outputs.temp_name(out.name)
    try:
        tmp.mkdir()
        write_onnx(model, tmp / MODEL_FILE)
        figures = check_onnx(tmp / MODEL_FILE, model, f"export check of {out} (nothing was written)") if verify else {}
        if tokenizer is not None:
            tokenizer.backend.save(str(tmp / "tokenizer.json"))
        record = {"source": str(src.resolve()), "format": "onnx", "dtype": "float32", "opset": OPSET, **figures}
        write_json_atomic(tmp / "export.json", record)
        outputs.honour_umask(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["CausalLogits", "check_onnx", "export_onnx", "write_onnx"]
