"""Compression: make a checkpoint smaller and say, with numbers, what it cost.

- :mod:`lmlab.compress.quantization` — ``lmlab quantize``: weight-only int8 / int4 / int4-gptq checkpoints, with
  compression.json (the original and the quantized model measured in the same run);
- :mod:`lmlab.compress.gptq` — GPTQ (Frantar et al., 2022), the calibrated int4 method;
- :mod:`lmlab.compress.pruning` — ``lmlab prune``: magnitude and 2:4 zeros, or attention heads and MLP neurons
  removed (a smaller config), with optional recovery training;
- :mod:`lmlab.compress.distillation` — ``lmlab distill``: a smaller student trained on a teacher's softened
  distributions (Hinton et al., 2015) by the one training loop, teacher and student measured side by side;
- :mod:`lmlab.compress.measure` — what every compression verb measures before and after (size, FLOPs/token,
  the task metric with its 95% CI, tokens/s, peak memory), compression.json and the table it prints.

The storage and the quantized layer itself live below, in :mod:`lmlab.model.quant`, so that every verb that loads
a checkpoint (through :mod:`lmlab.io.checkpoint`) rebuilds a quantized model without importing this package.
"""

from lmlab.compress.measure import Compression, summary
from lmlab.compress.pruning import prune, prune_model
from lmlab.compress.quantization import quantize, quantize_model

__all__ = ["Compression", "prune", "prune_model", "quantize", "quantize_model", "summary"]
