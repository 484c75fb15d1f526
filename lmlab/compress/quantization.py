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
from pathlib import Path

import torch
from torch import Tensor, nn

from lmlab.compress.measure import Compression, load_source, write_compressed
from lmlab.config import INT8_METHODS
from lmlab.data import read_corpus
from lmlab.data.pack import PackedTokens, is_data_folder
from lmlab.errors import LmlabError
from lmlab.model.quant import QuantizedLinear, check_method, quantizable

logger = logging.getLogger(__name__)
CALIBRATION_LENGTH = 256  # tokens per calibration sequence (at most the model's context)


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
        method: int8 (per output channel, symmetric), int8-dynamic (int8 weights, and activations quantized per
            token on the fly: int8 × int8 matmuls), int4 (grouped input columns, round-to-nearest) or int4-gptq
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
    options = dict(device=device, verify=verify, overwrite=overwrite)
    path, out, tokenizer, original = load_source(checkpoint, out, "quantize", **options)  # LoRA: adapters folded in
    batches = []
    if calibration_data:
        batches = calibration_sequences(calibration_data, tokenizer, original, calibration_samples)
    model = quantize_model(copy.deepcopy(original), method, group_size, batches)
    group = None if method in INT8_METHODS else group_size
    layers = len(model.config.quantization["modules"])
    title = f"{method}{f' (group size {group})' if group else ''}: {layers} Linear layers quantized"
    calibration = {"data": str(calibration_data), "sequences": len(batches)} if batches else None
    fields = dict(title=title, method=method, group_size=group, modules=layers, calibration=calibration)
    return write_compressed(path, out, original, model, tokenizer, eval_data=eval_data, overwrite=overwrite, **fields)


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
    settings = {"method": method, "group_size": None if method in INT8_METHODS else group_size, "modules": names}
    model.config = dataclasses.replace(model.config, quantization=settings)
    return model.eval()


def run_model(model: nn.Module, ids: Tensor) -> Tensor:
    """One forward pass over token ids (B, T), whatever the architecture: an encoder–decoder reads them as both
    source and target."""
    if model.config.arch == "seq2seq":
        return model(ids, ids)
    return model(ids)


def calibration_sequences(data: str | Path, tokenizer, model: nn.Module, n: int) -> list[Tensor]:
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
