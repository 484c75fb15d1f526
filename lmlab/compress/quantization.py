"""``lmlab quantize``: a checkpoint's block Linear layers as int8 or int4 integers, measured before and after.

The quantized checkpoint is an ordinary lmlab checkpoint whose ``config.quantization`` names the method, group
size and modules; every verb loads it (:func:`lmlab.io.checkpoint.load_model` rebuilds the
:class:`~lmlab.model.quant.QuantizedLinear` modules). ``compression.json`` beside it (and the table the verb
prints) holds, for the original and the quantized model measured in the same run: parameters, the bytes of
model.safetensors and of the block Linear layers' weights (integers, scales and zero-points; biases aside), and
with ``eval_data`` the perplexity on the same tokens (:mod:`lmlab.tasks.lm`, as ``lmlab evaluate --task lm``
computes it) and decoding speed (tokens/s of a short greedy decode at batch 1 and 8, on the machine named in the
record).
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.api import LM
from lmlab.config import write_json_atomic
from lmlab.data import read_corpus
from lmlab.data.pack import PackedTokens, is_data_folder
from lmlab.device import resolve_device
from lmlab.errors import LmlabError
from lmlab.evaluate.runner import evaluate_model
from lmlab.io.checkpoint import (
    WEIGHTS_FILE,
    check_checkpoint_target,
    is_lmlab_checkpoint,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.model.quant import QuantizedLinear, check_method, quantizable, quantized_bytes

logger = logging.getLogger(__name__)
CALIBRATION_LENGTH = 256  # tokens per calibration sequence (at most the model's context)
SPEED_TOKENS = 32  # new tokens per sequence when decoding speed is measured
SPEED_PROMPT = "The"


class Compression(dict):
    """What compression.json holds; :meth:`summary` is the table ``lmlab quantize`` prints."""

    def summary(self) -> str:
        return summary(self)


def quantize(
    checkpoint: str | Path,
    out: str | Path,
    *,
    method: str = "int8",
    group_size: int = 128,
    calibration_data: str | Path | None = None,
    calibration_samples: int = 128,
    eval_data: str | Path | None = None,
    device: str = "cpu",
    verify: bool = True,
    overwrite: bool = False,
) -> Compression:
    """Quantize the Linear layers of a checkpoint's Transformer blocks (weight-only) and write the result as a new
    checkpoint with compression.json (before/after figures). Embeddings, norms, the LM head and task heads keep
    their dtype. A LoRA checkpoint is merged first; a quantized one is refused.

    Args:
        checkpoint: checkpoint folder (or run folder: its best checkpoint)
        out: folder for the quantized checkpoint and compression.json
        method: int8 (per output channel, symmetric), int4 (grouped input columns, round-to-nearest) or int4-gptq
            (int4 chosen by GPTQ on the calibration data)
        group_size: int4, int4-gptq: input columns sharing one scale and zero-point: 32, 64 or 128
        calibration_data: int4-gptq: a prepared data folder (its training tokens) or text files lmlab reads
        calibration_samples: int4-gptq: calibration sequences of up to 256 tokens each
        eval_data: text files or a prepared data folder (its validation tokens): perplexity (decoders) and decoding
            speed (decoders, encoder–decoders) of the original and the quantized model
        device: auto, cpu, cuda, cuda:1, …
        verify: check the checkpoint's tokenizer
        overwrite: write into a folder that is not an lmlab checkpoint
    """
    check_method(method, group_size)
    if method == "int4-gptq" and calibration_data is None:
        raise LmlabError("method int4-gptq needs calibration_data", params="calibration_data")
    if calibration_samples < 1:
        msg = f"calibration_samples is {calibration_samples}: expected a positive integer"
        raise LmlabError(msg, params="calibration_samples")
    path = resolve_checkpoint(checkpoint)
    meta = read_meta(path)
    done = meta["lmlab_model_config"].get("quantization") if "lmlab_model_config" in meta else None
    if done:
        raise LmlabError(f"{path} is already quantized ({done['method']}): quantize the checkpoint it came from")
    out = check_checkpoint_target(out, overwrite=overwrite, sources=(checkpoint, path))
    device = resolve_device(device)
    tokenizer = load_tokenizer(path, verify=verify)
    original = load_model(path, device=device, merge_lora=True, verify=verify)  # LoRA: adapters folded in
    batches = _calibration(calibration_data, tokenizer, original, calibration_samples) if calibration_data else []
    model = quantize_model(copy.deepcopy(original), method, group_size, batches)
    meta = {k: v for k, v in meta.items() if k != "lmlab_model_config"} if is_lmlab_checkpoint(path) else {}
    save_checkpoint(out, model, tokenizer=tokenizer, meta={**meta, "quantized_from": str(path)}, overwrite=overwrite)
    record = Compression(
        method=method,
        group_size=None if method == "int8" else group_size,
        checkpoint=str(path),
        out=str(out),
        modules=len(model.config.quantization["modules"]),
        original=_measure(original, tokenizer, eval_data, path),
        quantized=_measure(model, tokenizer, eval_data, out),
        machine=_machine(device),
    )
    if method == "int4-gptq":
        record["calibration"] = {"data": str(calibration_data), "sequences": len(batches)}
    write_json_atomic(out / "compression.json", record)
    return record


def quantize_model(model: nn.Module, method: str, group_size: int = 128, batches: list[Tensor] = ()) -> nn.Module:
    """Quantize ``model``'s block Linear layers in place (``batches``: GPTQ's calibration sequences) and record
    the method in ``model.config.quantization``. Returns ``model``."""
    import dataclasses

    from lmlab.compress.gptq import gptq_quantize_model

    check_method(method, group_size)
    names = quantizable(model)
    if method == "int4-gptq" and not batches:
        raise LmlabError("method int4-gptq needs calibration sequences", params="method")
    if method == "int4-gptq":
        gptq_quantize_model(model, run_model, list(batches), group_size)
    else:
        for name in names:
            model.set_submodule(name, QuantizedLinear.from_linear(model.get_submodule(name), method, group_size))
    settings = {"method": method, "group_size": None if method == "int8" else group_size, "modules": names}
    model.config = dataclasses.replace(model.config, quantization=settings)
    return model.eval()


def run_model(model: nn.Module, ids: Tensor) -> Tensor:
    """One forward pass over token ids (B, T), whatever the architecture: an encoder–decoder reads them as both
    source and target."""
    if model.config.arch == "seq2seq":
        return model(ids, ids)
    return model(ids)


def _calibration(data: str | Path, tokenizer, model: nn.Module, n: int) -> list[Tensor]:
    """Up to ``n`` calibration sequences (1, T) from a prepared data folder or a corpus file, evenly spaced."""
    length = min(CALIBRATION_LENGTH, model.config.block_size)
    if is_data_folder(data):
        tokens = PackedTokens(data, "train")
        if tokens.tokenizer_sha256 != tokenizer.sha256:
            raise LmlabError(
                f"calibration_data {data} was prepared with another tokenizer than the checkpoint's",
                params="calibration_data",
            )
        stream = tokens.window(0, len(tokens))
    else:
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        stream = [t for doc in read_corpus(data) for t in eos + tokenizer.encode(doc)]
    stream = torch.as_tensor(stream, dtype=torch.long)
    count = min(n, len(stream) // length)
    if count < 1:
        msg = f"calibration_data {data} holds {len(stream)} tokens: expected at least {length}"
        raise LmlabError(msg, params="calibration_data")
    step = len(stream) // count
    device = next(model.parameters()).device
    return [stream[i * step : i * step + length][None].to(device) for i in range(count)]


def _measure(model: nn.Module, tokenizer, eval_data: str | Path | None, folder: Path) -> dict[str, Any]:
    """Size, and with ``eval_data`` perplexity and decoding speed, of one model (its checkpoint in ``folder``)."""
    files = [folder / WEIGHTS_FILE] if (folder / WEIGHTS_FILE).is_file() else [*folder.glob("*.safetensors")]
    linear = quantized_bytes(model) or sum(
        t.numel() * t.element_size() for t in (model.get_submodule(n).weight for n in quantizable(model))
    )
    row: dict[str, Any] = {
        "parameters": model.num_params(),  # a quantized weight counts its elements
        "weights_file_bytes": sum(f.stat().st_size for f in files or folder.glob("*.bin")),  # an HF folder's too
        "linear_weight_bytes": linear,  # the block Linear layers' weights (integers + scales), biases aside
    }
    if eval_data is not None and model.config.arch == "decoder":
        result, _ = evaluate_model(model, tokenizer, eval_data, task="lm", n_resamples=200)
        row.update(perplexity=result["perplexity"], eval_tokens=result["tokens"])
    if eval_data is not None and model.config.arch != "encoder":
        lm = LM(model, tokenizer)
        row.update({f"tokens_per_s_batch_{b}": _speed(lm, b) for b in (1, 8)})
    return row


def _speed(lm: LM, batch: int) -> float:
    """New tokens per second of a greedy decode of SPEED_TOKENS tokens for ``batch`` prompts."""
    prompts = [SPEED_PROMPT] * batch
    lm.generate(prompts[:1], max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    ids = lm.generate(prompts, max_new_tokens=SPEED_TOKENS, min_new_tokens=SPEED_TOKENS, return_ids=True)
    return sum(len(row) for row in ids) / (time.perf_counter() - start)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )


def summary(record: dict[str, Any]) -> str:
    """The before/after table ``lmlab quantize`` prints."""
    before, after = record["original"], record["quantized"]
    rows = [
        ("parameters", "parameters", "{:,}"),
        ("model.safetensors", "weights_file_bytes", "{:,} B"),
        ("block Linear weights", "linear_weight_bytes", "{:,} B"),
        ("perplexity", "perplexity", "{:.3f}"),
        ("tokens/s, batch 1", "tokens_per_s_batch_1", "{:.1f}"),
        ("tokens/s, batch 8", "tokens_per_s_batch_8", "{:.1f}"),
    ]
    method = record["method"] + (f" (group size {record['group_size']})" if record["group_size"] else "")
    lines = [f"lmlab: {method}: {record['modules']} Linear layers quantized → {record['out']}"]
    lines.append(f"  {'':22}{'original':>18}{'quantized':>18}{'ratio':>9}")
    for label, key, fmt in rows:
        if key in before and key in after:
            ratio = after[key] / before[key] if before[key] else float("nan")
            lines.append(f"  {label:22}{fmt.format(before[key]):>18}{fmt.format(after[key]):>18}{ratio:>8.3f}×")
    lines.append(f"  measured on {record['machine']}; written: {Path(record['out']) / 'compression.json'}")
    return "\n".join(lines)
