"""Decoding latency at batch 1: lmlab vs HF Transformers ``generate()``, eager and compiled, with the HBM roofline.

    python bench/decode_latency.py --model llama-1b --dtype bf16 --device cuda [--json out.json]
    python bench/decode_latency.py --model llama-mini --device cpu --dtype fp32 --threads 1

The performance issue's decoding target: batch 1, greedy, 128 new tokens after a 16-token prompt;
lmlab eager and compiled (static KV cache + CUDA graph) against HF eager ``generate()`` and HF with its
static cache + ``torch.compile``. Each row prints tokens/s, ms per token, the fraction of the memory
roofline (bytes a step must read ÷ time ÷ the measured copy bandwidth), peak memory and the ratios
against HF eager. It is ``generate_throughput.py`` with these defaults (every flag of that script
works here too, e.g. ``--batch-sizes 1 8``, ``--bandwidth 3000``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_throughput import main  # noqa: E402

DEFAULTS = dict(model=["llama-mini"], batch_sizes=[1], strategies=["greedy"], compile=True, repeats=5, warmup=2)

if __name__ == "__main__":
    main(defaults=DEFAULTS, bench="decode_latency")
