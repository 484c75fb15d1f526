"""Weight-only quantization's storage and compute: :class:`QuantizedLinear` and the formats it stores.

Only the Linear layers inside the Transformer blocks are quantized (attention ``qkv``/``q``/``kv``/``proj``,
the MLP's ``fc``/``proj``); embeddings, norms, the LM head and task heads keep their dtype. Two formats:

- **int8**: per output channel, symmetric: ``scale = max|w_row| / 127.5``, ``q = clamp(round(w / scale), -128,
  127)`` — torchao's ``Int8WeightOnlyConfig`` convention, so the dequantized weights agree with it. Stored as
  ``qweight`` (int8, out × in) and ``scales`` (fp32, out).
- **int8-dynamic**: the int8 weights above, and activations quantized too, per row (token) as each forward pass
  sees them (``scale = max|x_row| / 127.5``, torchao's ``Int8DynamicActivationInt8WeightConfig`` convention): the
  matmul runs on int8 × int8 with int32 accumulation (``torch._int_mm``).
- **int4**: grouped along the input dimension, asymmetric: each run of ``group_size`` input columns of a row
  has ``scale = (max - min) / 15`` and an integer zero-point ``z`` in [0, 15], ``q = clamp(round(w / scale) + z,
  0, 15)``, ``w ≈ (q - z)·scale``. Stored as ``qweight`` (uint8, two values a byte: the even column in the low
  nibble), ``scales`` (fp32, out × groups) and ``zeros`` (uint8, out × groups). A width that the group size
  does not divide gets a shorter last group.

Every tensor is a plain buffer, so a checkpoint stays a safetensors file of integers and floats (no tensor
subclass is pickled); ``config.quantization`` names the method, group size and modules, and
:func:`install_quantized` puts empty :class:`QuantizedLinear` modules in their place before the weights load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.config import GROUP_SIZES, INT8_METHODS, QUANT_METHODS
from lmlab.errors import LmlabError

BLOCK_PARTS = ("blocks", "enc_blocks", "dec_blocks")  # the stacks whose Linear layers are quantized
INT8_LEVELS = 127.5  # max|w| maps to ±127.5, then clamps to [-128, 127] (torchao's symmetric int8)
INT4_MAX = 15


def check_method(method: str, group_size: int) -> None:
    """One-line errors for a method or group size lmlab does not have."""
    if method not in QUANT_METHODS:
        raise LmlabError(f"method is {method!r}: expected {', '.join(QUANT_METHODS)}", params="method")
    if method not in INT8_METHODS and group_size not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES[:-1])) + f" or {GROUP_SIZES[-1]}"
        raise LmlabError(f"group_size is {group_size}: expected {sizes}", params="group_size")


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: ``(qweight int8 (out, in), scales fp32 (out,))``."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / INT8_LEVELS).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(w * (1.0 / scales[:, None])), -128, 127).to(torch.int8)  # as torchao rounds
    return q, scales


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 of activations (rows, in), as the weights are (:func:`quantize_int8`, torchao's
    ``Int8DynamicActivationInt8WeightConfig`` per-token convention): ``(int8 values, fp32 scales (rows,))``."""
    return quantize_int8(x)


def dequantize_int8(qweight: Tensor, scales: Tensor) -> Tensor:
    return qweight.float() * scales.float()[:, None]


def int4_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and integer zero-point of each row of ``w`` (out, columns): min..max mapped onto 0..15, 0 kept exact."""
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    scale = ((hi - lo) / INT4_MAX).clamp(min=torch.finfo(torch.float32).eps)
    zero = torch.clamp(torch.round(-lo / scale), 0, INT4_MAX)
    return scale, zero


def quantize_columns(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``w`` (out, k) as int4 values 0..15 under per-row ``scale`` and ``zero``."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, INT4_MAX)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest grouped int4: ``(values uint8 0..15 (out, in), scales (out, groups), zeros (out, groups))``."""
    w = w.detach().float()
    q, scales, zeros = torch.empty_like(w, dtype=torch.uint8), [], []
    for start in range(0, w.shape[1], group_size):
        cols = w[:, start : start + group_size]
        scale, zero = int4_params(cols)
        q[:, start : start + group_size] = quantize_columns(cols, scale, zero).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return q, torch.stack(scales, 1), torch.stack(zeros, 1).to(torch.uint8)


def pack_int4(values: Tensor) -> Tensor:
    """Values 0..15 (out, in) → uint8 (out, ⌈in/2⌉): column 2j in the low nibble, 2j+1 in the high one."""
    if values.shape[1] % 2:
        values = F.pad(values, (0, 1))
    values = values.to(torch.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=2).reshape(packed.shape[0], -1)[:, :in_features]


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int, in_features: int) -> Tensor:
    q = unpack_int4(packed, in_features).float()
    expand = lambda t: t.float().repeat_interleave(group_size, dim=1)[:, :in_features]  # noqa: E731
    return (q - expand(zeros)) * expand(scales)


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored as integers and scales (buffers) and used as such.

    int8 on CPU multiplies with PyTorch's ``torch._weight_int8pack_mm`` (int8 weight, per-channel scales);
    elsewhere, and for int4, the weight is dequantized on the fly inside ``forward`` (never kept in fp32)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: str, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        if method in INT8_METHODS:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features))
        else:
            groups = math.ceil(in_features / group_size)
            self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, groups))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int, parts: tuple | None = None):
        """The quantized twin of ``linear``: round-to-nearest, or the integers ``parts`` a calibrated method gave
        (``(values, scales[, zeros])`` as :func:`quantize_int8` / :func:`quantize_int4` return them)."""
        out_f, in_f = linear.weight.shape
        module = cls(in_f, out_f, linear.bias is not None, method, group_size).to(linear.weight.device)
        if parts is None:
            int8 = method in INT8_METHODS
            parts = quantize_int8(linear.weight) if int8 else quantize_int4(linear.weight, group_size)
        with torch.no_grad():
            if method in INT8_METHODS:
                module.qweight.copy_(parts[0])
                module.scales.copy_(parts[1])
            else:
                module.qweight.copy_(pack_int4(parts[0]))
                module.scales.copy_(parts[1])
                module.zeros.copy_(parts[2])
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self) -> Tensor:
        """The weight the integers stand for, in fp32 (out, in)."""
        if self.method in INT8_METHODS:
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.method == "int8-dynamic":
            return self._dynamic(x)
        if self.method == "int8" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def _dynamic(self, x: Tensor) -> Tensor:
        """int8 activations times int8 weights: each row (token) of ``x`` quantized symmetrically on the fly, the
        product accumulated in int32 (``torch._int_mm``), then scaled back by both scales."""
        rows = x.reshape(-1, self.in_features).float()
        xq, x_scales = quantize_activations(rows)
        if rows.shape[0] > 16 or x.device.type == "cpu":  # CUDA's int8 kernel wants more than 16 rows
            acc = torch._int_mm(xq, self.qweight.t()).float()
        else:
            acc = xq.float() @ self.qweight.float().t()  # exact: integer products and sums well inside fp32's 2^24
        y = (acc * x_scales[:, None] * self.scales.float()[None]).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        group = "" if self.method in INT8_METHODS else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{group}"


def quantizable(model: nn.Module) -> list[str]:
    """The names of the Linear layers inside the model's blocks, in module order."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.split(".")[0] in BLOCK_PARTS
    ]


def install_quantized(model: nn.Module, settings: dict) -> nn.Module:
    """Put an empty :class:`QuantizedLinear` where ``settings["modules"]`` (``config.quantization``) names a
    Linear, on the Linear's device (meta while :func:`~lmlab.io.checkpoint.load_model` builds): the stored
    integers and scales then load into them. Returns ``model``."""
    for name in settings["modules"]:
        linear = model.get_submodule(name)
        out_f, in_f = linear.weight.shape
        with torch.device(linear.weight.device):
            module = QuantizedLinear(in_f, out_f, linear.bias is not None, settings["method"], settings["group_size"])
        model.set_submodule(name, module)
    return model


def quantized_weights(model: nn.Module) -> int:
    """The weight elements the quantized layers stand for (``num_params`` counts them: they are buffers)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the quantized layers' weights take as stored: integers, scales and zero-points (biases not counted)."""
    return sum(
        sum(t.numel() * t.element_size() for t in module.buffers())
        for module in model.modules()
        if isinstance(module, QuantizedLinear)
    )
