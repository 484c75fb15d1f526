"""Kernels lmlab picks by hand where PyTorch's default is slow: the LM head of a CPU decode step.

Below the model on purpose: :meth:`lmlab.model.decoder.DecoderLM.lm_logits` calls
:func:`cpu_decode_head` when it decodes on a CPU, and the caches here live outside any module (keyed
weakly on the weight), so a model carries none when it is copied or pickled.
"""

from __future__ import annotations

import platform

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# the LM head's weight → {layout: ((storage, version, dtype), derived copy)}; see cpu_decode_head
_HEAD_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()
# whether oneDNN's packed linear is used: measured faster on x86-64 only; None until first tried
_ONEDNN: bool | None = None if platform.machine().lower() in ("x86_64", "amd64") else False


def _head_copy(weight: Tensor, layout: str, make) -> Tensor:
    """A copy of ``weight`` in another layout, cached until the weight's storage, version or dtype
    change (training a step or loading new weights never leaves a stale copy behind). The cache is
    keyed weakly on the parameter, outside the module, so copying or pickling a model carries none."""
    key = (weight.data_ptr(), weight._version, weight.dtype)
    copies = _HEAD_COPIES.setdefault(weight, {})
    if layout not in copies or copies[layout][0] != key:
        copies[layout] = (key, make(weight.detach()))
    return copies[layout][1]


def _onednn_pack(weight: Tensor) -> Tensor:
    """The weight in oneDNN's blocked layout for its linear, packed for a batch of ~8 rows (packing for
    1, 8 or 64 rows measured the same from 2 rows up)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 8)


def cpu_decode_head(weight: Tensor, x: Tensor) -> Tensor:
    """``x @ weight.T`` for a few rows on CPU (decoding), through whichever kernel is fastest for them.

    One row: a matrix-vector product against a cached contiguous (n_embd, vocab) copy, ~2× faster
    than PyTorch's ``F.linear`` with the (vocab, n_embd) weight. Two rows or more (batched decoding,
    beams), fp32 on x86-64: oneDNN's linear on a copy of the weight pre-packed into its blocked
    layout, 1.7–2× faster than MKL's GEMM at 8 rows on one core and ~3× on two (MKL repacks the
    whole weight at every call and does not thread these shapes; figures in docs/benchmarks.md).
    Both give the same products up to float rounding. A weight made under ``torch.inference_mode``
    has no version counter to tell a stale copy by, so it takes the plain product."""
    global _ONEDNN
    if weight.is_inference():
        return torch.nn.functional.linear(x, weight)
    if x.shape[:-1].numel() > 1 and weight.dtype == torch.float32 and _ONEDNN is not False:
        try:
            packed = _head_copy(weight, "onednn", _onednn_pack)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _ONEDNN = True
            return out
        except (RuntimeError, AttributeError, NotImplementedError):  # a build without oneDNN's linear
            if _ONEDNN:
                raise
            _ONEDNN = False
    return x @ _head_copy(weight, "t", lambda w: w.t().contiguous())
