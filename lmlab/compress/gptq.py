"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): int4 weights chosen column by column so that each column's rounding error is compensated
by the columns not yet quantized, using the inverse Hessian of the layer's squared output error.

For a Linear layer with inputs X (tokens × in) the Hessian is H = 2·XᵀX / n, damped by ``damp`` × its mean
diagonal; its inverse's upper Cholesky factor U gives, for column i, ``err = (w_i - q_i) / U_ii`` and the update
``W[:, i+1:] -= err · U[i, i+1:]``. Columns go in blocks of 128 (lazy batch updates); each group's scale and
zero-point are chosen from the updated weights when the group starts. Blocks are quantized in order: the
calibration sequences run through the model with the earlier blocks already quantized, so a block's Hessians
see the inputs it will really get. Storage is :mod:`lmlab.model.quant`'s int4.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lmlab.model.quant import BLOCK_PARTS, QuantizedLinear, int4_params, quantizable, quantize_columns

logger = logging.getLogger(__name__)
COLUMN_BLOCK = 128  # columns updated together; a multiple of every group size


def gptq_int4(weight: Tensor, hessian: Tensor, group_size: int, damp: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of one weight (out, in) under ``hessian`` (in, in): ``(values 0..15, scales, zeros)`` as
    :func:`lmlab.model.quant.quantize_int4` returns them."""
    W = weight.detach().float().cpu().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    n = W.shape[1]
    values = torch.zeros_like(W, dtype=torch.uint8)
    scales, zeros = [], []
    for b0 in range(0, n, COLUMN_BLOCK):
        b1 = min(b0 + COLUMN_BLOCK, n)
        W1, E1, U1 = W[:, b0:b1].clone(), torch.zeros_like(W[:, b0:b1]), U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            if (b0 + i) % group_size == 0:  # a new group: its parameters from the weights as updated so far
                scale, zero = int4_params(W1[:, i : i + group_size])
                scales.append(scale)
                zeros.append(zero)
            q = quantize_columns(W1[:, i : i + 1], scale, zero)[:, 0]
            values[:, b0 + i] = q.to(torch.uint8)
            err = (W1[:, i] - (q - zero) * scale) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return values, torch.stack(scales, 1), torch.stack(zeros, 1).to(torch.uint8)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (f"{part}.{i}", block)
        for part in BLOCK_PARTS
        if hasattr(model, part)
        for i, block in enumerate(getattr(model, part))
    ]


def _hessians(model: nn.Module, names: list[str], run, batches: list[Tensor]) -> dict[str, Tensor]:
    """H = 2·XᵀX/n of each named Linear's inputs over the calibration batches."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for batch in batches:
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: 2 * sums[n] / counts[n] for n in names}


def gptq_quantize_model(model: nn.Module, run, batches: list[Tensor], group_size: int, damp: float = 0.01) -> None:
    """Quantize every block Linear of ``model`` with GPTQ, block by block, in place. ``run(model, batch)`` feeds one
    calibration batch through the model."""
    linears = set(quantizable(model))
    for prefix, _ in _blocks(model):
        names = [n for n in linears if n.startswith(prefix + ".")]
        hessians = _hessians(model, names, run, batches)
        for name in names:
            linear = model.get_submodule(name)
            parts = gptq_int4(linear.weight, hessians[name].cpu(), group_size, damp)
            model.set_submodule(name, QuantizedLinear.from_linear(linear, "int4-gptq", group_size, parts))
        logger.info("gptq: %s quantized (%d layers)", prefix, len(names))
