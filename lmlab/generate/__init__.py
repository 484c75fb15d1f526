"""Text generation: logits processors and the one decoding loop."""

from lmlab.generate.loop import decode
from lmlab.generate.processors import LogitsProcessor, Temperature, TopK, TopP

__all__ = ["decode", "LogitsProcessor", "Temperature", "TopK", "TopP"]
