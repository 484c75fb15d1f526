"""Cross-entropy through the LM head in chunks of rows: the full (tokens × vocab) logits never exist at once.

The plain way to train a language model materialises, for one micro-batch of N tokens and a
vocabulary of V, the logits (N × V, in the autocast dtype), their fp32 copy, the log-softmax that
cross-entropy saves for backward, and in backward the gradient of each: about 14 bytes per logit.
For GPT-2's vocabulary (50,257) and a micro-batch of 4 × 512 tokens that is 1.4 GB — more than the
activations of all twelve blocks. :func:`linear_cross_entropy` computes the same loss over chunks of
rows, so only one chunk's logits are alive at a time, in forward and in backward.

How: as Liger-Kernel's fused linear cross-entropy does, a custom autograd function computes the
gradients with respect to the hidden states and to the head's weight chunk by chunk *during the
forward pass* (softmax − one-hot is the gradient of cross-entropy with respect to its logits, so each
chunk's logits are used for the loss and for both gradients, then freed), keeps the two gradients,
and in backward only scales them by the incoming gradient. The cost is the memory of those two
gradients (N × n_embd and V × n_embd, the size of a weight gradient) instead of N × V logits.

Why not :func:`torch.utils.checkpoint` per chunk: it would save only each chunk's hidden rows and
recompute the chunk's logits in backward — the same memory bound, but one more (N × n_embd × V)
matmul, the largest one of a small model. Measured on a 2-core CPU (one thread, fp32, 2,048 tokens,
n_embd 256, vocabulary 50,257; forward + backward of the head and the loss, best of 4, peak from the
profiler's allocation events): the plain path 6.4 s and 1.24 GB; checkpointed chunks 9.5 s and 0.25 GB;
this function 6.0 s and 0.19 GB. So it is chosen: no slower than the plain path, a sixth of its memory.

When: chunking pays only when the vocabulary is large. ``chunk_size=None`` (the default of
``TrainConfig.ce_chunk_size``) chunks when the vocabulary has at least :data:`AUTO_VOCAB` (32,768)
entries, in chunks of about :data:`CHUNK_BYTES` (64 MiB) of fp32 logits; smaller vocabularies (and
batches that fit in one chunk) keep the plain path, unchanged. ``chunk_size=0`` never chunks;
a positive number is the rows (tokens) per chunk.

Equivalence: the loss and the gradients equal ``F.cross_entropy(F.linear(h, W, b).float(), y,
ignore_index=-100)`` (mean over the labelled tokens) to fp32 rounding; under autocast the matmuls run
in the autocast dtype, as the plain path's do, and the logits are upcast to fp32 before the softmax.
The gradients are kept from forward to backward, so a graph through this function can be
differentiated once (no ``retain_graph`` second pass).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
AUTO_VOCAB = (
    32_768  # chunk by default from this vocabulary size up (LLaMA-2's 32,000 stays plain; GPT-2's 50,257 chunks)
)
CHUNK_BYTES = 64 * 2**20  # auto chunks hold about this many bytes of fp32 logits


def ce_chunk_rows(chunk_size: int | None, vocab_size: int, rows: int) -> int:
    """Rows per chunk for a ``chunk_size`` setting (None: auto, 0: off, n: n rows) with this vocabulary
    and this many rows in all; 0 means the plain path (no chunking, or everything fits in one chunk)."""
    if chunk_size is None:
        if vocab_size < AUTO_VOCAB:
            return 0
        chunk_size = max(1, CHUNK_BYTES // (4 * vocab_size))
    if chunk_size <= 0 or chunk_size >= rows:
        return 0
    return chunk_size


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself under its training wrappers (``torch.compile``'s ``_orig_mod``, DDP's ``module``)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None
        )
        if inner is None:
            return model
        model = inner


def lm_loss(
    model: nn.Module, labels: Tensor, forward: Callable[[bool], Tensor], chunk_size: int | None = None
) -> Tensor:
    """Next-token cross-entropy of a model with an LM head (``model.lm_head``), mean over the labels that are
    not ignored. ``forward(hidden_only)`` runs the model: the logits (…, V) when False, the final hidden states
    (…, d) when True. Chunked (``forward(True)`` + :func:`linear_cross_entropy`) when :func:`ce_chunk_rows`
    says so for ``chunk_size``; otherwise the model's own head and ``F.cross_entropy`` on fp32 logits."""
    head = unwrap_model(model).lm_head
    if ce_chunk_rows(chunk_size, head.weight.shape[0], labels.numel()):
        return linear_cross_entropy(forward(True), head.weight, labels, bias=head.bias, chunk_size=chunk_size)
    logits = forward(False)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T (+ bias)`` against ``labels``, over the labels
    that are not ``ignore_index``; ``hidden`` (…, d) and ``labels`` (…) are flattened. ``chunk_size``: see
    :func:`ce_chunk_rows`. All labels ignored gives NaN, as :func:`torch.nn.functional.cross_entropy` does."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    rows = ce_chunk_rows(chunk_size, weight.shape[0], h.shape[0])
    if rows == 0:
        return F.cross_entropy(F.linear(h, weight, bias).float(), y, ignore_index=ignore_index)
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    needs = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and any(needs)):
        with torch.autocast(device_type, enabled=False):
            total, count = _chunks(h, weight, bias, y, rows, ignore_index, dtype, (False, False, False))[:2]
        return total / count
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, y, rows, ignore_index, dtype, needs)


def _chunks(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    y: Tensor,
    rows: int,
    ignore_index: int,
    dtype: torch.dtype,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(sum of the row losses, labelled rows, and — where ``needs`` says — the gradients of the *sum* with
    respect to h, weight and bias), one chunk of ``rows`` rows at a time."""
    valid = y != ignore_index
    target = torch.where(valid, y, 0)[:, None]
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if needs[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] else None
    for start in range(0, h.shape[0], rows):
        stop = min(start + rows, h.shape[0])
        hc = h[start:stop].to(dtype)
        logits = F.linear(hc, w, b).float()  # (rows, V): the only logits alive; every step below is in place
        logits.sub_(logits.amax(dim=-1, keepdim=True))  # shifted by the row max (torch.logsumexp would copy them twice)
        ok = valid[start:stop]
        picked = logits.gather(1, target[start:stop]).squeeze(1)
        sums = logits.exp_().sum(dim=-1)
        total += torch.where(ok, sums.log() - picked, 0.0).sum()  # log Σ exp − the target's logit, both shifted
        if not any(needs):
            continue
        # d(sum of losses)/d logits = softmax − one-hot on labelled rows, 0 on ignored ones
        grad = logits.div_(sums[:, None])
        grad.scatter_add_(1, target[start:stop], torch.full_like(picked, -1.0)[:, None])
        grad.mul_(ok[:, None])
        grad = grad.to(dtype)
        if grad_h is not None:
            grad_h[start:stop] = grad @ w
        if grad_w is not None:
            grad_w.add_(grad.t() @ hc)  # a (V, d) product in the compute dtype, added into the fp32 sum: no fp32 copy
        if grad_b is not None:
            grad_b.add_(grad.sum(0))
    return total, valid.sum(), grad_h, grad_w, grad_b


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y, rows, ignore_index, dtype, needs):  # type: ignore[override]
        with torch.autocast(h.device.type, enabled=False):
            total, count, grad_h, grad_w, grad_b = _chunks(h, weight, bias, y, rows, ignore_index, dtype, needs)
            scale = 1.0 / count.clamp(min=1)  # nothing labelled: zero gradients and a NaN loss, as F.cross_entropy
            for g in (grad_h, grad_w, grad_b):
                if g is not None:
                    g.mul_(scale.to(g.dtype))
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grads = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            grads.append(None if g is None else g.mul_(grad_out.to(g.dtype)).to(dtype))
        ctx.grads = None  # freed as soon as autograd takes them
        return grads[0], grads[1], grads[2], None, None, None, None, None
