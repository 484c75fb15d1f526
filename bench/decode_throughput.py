"""Batched decoding throughput: lmlab vs HF Transformers ``generate()`` at batch 8 and 64, eager and compiled.

    python bench/decode_throughput.py --model llama-1b --dtype bf16 --device cuda [--json out.json]
    python bench/decode_throughput.py --model llama-mini --device cpu --dtype fp32 --batch-sizes 8

The performance issue's batched target (tokens/s at batch 8 and 64): greedy, 128 new tokens after a
16-token prompt, every side on the same weights — lmlab eager and compiled (static KV cache + CUDA
graph), HF eager ``generate()`` and HF with its static cache + ``torch.compile``. The table gives
tokens/s, ms per step, the roofline fraction, peak memory and the ratios against HF eager. It is
``generate_throughput.py`` with these defaults (every flag of that script works here too).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_throughput import main  # noqa: E402

DEFAULTS = dict(model=["llama-mini"], batch_sizes=[8, 64], strategies=["greedy"], compile=True, repeats=3, warmup=2)

if __name__ == "__main__":
    main(defaults=DEFAULTS, bench="decode_throughput")
