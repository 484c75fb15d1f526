"""The LM head of a CPU decode step: lmlab's ``cpu_decode_head`` vs ``F.linear`` (what HF's ``lm_head`` calls),
side by side.

    python bench/lm_head.py [--rows 1 2 4 8 16 64] [--n-embd 128] [--vocab 32000 50257] [--threads 1] [--json out.json]

One decode step multiplies each row's final hidden state (n_embd) by the (vocab, n_embd) head weight;
for a small model it is half the step. For every (vocab, rows) pair this times, in one process on the
same fp32 tensors, under ``torch.inference_mode``:

    F.linear       torch.nn.functional.linear(x, weight)            (HF's nn.Linear, MKL's GEMM)
    lmlab          lmlab.kernels.cpu_decode_head(weight, x)   (one row: a contiguous transposed copy;
                                                                    2+ rows on x86-64: oneDNN, pre-packed weight)

and prints the median milliseconds over ``--repeats`` calls after a warm-up (which also builds
lmlab's cached copy), GFLOP/s (2·rows·n_embd·vocab per call) and the ratio. The outputs must agree
to fp32 rounding; a larger difference is printed as a warning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmlab.kernels import cpu_decode_head  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64], help="rows per call (batch × beams)")
    p.add_argument("--n-embd", type=int, default=128, help="hidden size (the weight's columns)")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 50257], help="vocabulary sizes (the weight's rows)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per cell (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"LM head, fp32 CPU | torch {torch.__version__}, threads={torch.get_num_threads()}, n_embd={args.n_embd}")
    print(
        f"{'vocab':>7} {'rows':>5} {'F.linear ms':>12} {'lmlab ms':>9} {'F.linear GF/s':>14} {'lmlab GF/s':>11} "
        f"{'ratio':>7}"
    )
    out = []
    for vocab in args.vocab:
        weight = torch.randn(vocab, args.n_embd) * 0.02
        for rows in args.rows:
            x = torch.randn(rows, args.n_embd)
            with torch.inference_mode():
                diff = (cpu_decode_head(weight, x) - F.linear(x, weight)).abs().max().item()
                ref = median_ms(lambda: F.linear(x, weight), args.repeats)
                ours = median_ms(lambda: cpu_decode_head(weight, x), args.repeats)
            flop = 2 * rows * args.n_embd * vocab
            print(
                f"{vocab:>7} {rows:>5} {ref:>12.3f} {ours:>9.3f} {flop / ref / 1e6:>14.1f} {flop / ours / 1e6:>11.1f} "
                f"{ref / ours:>6.2f}x"
            )
            if diff > 1e-4:
                print(f"warning: outputs differ by {diff:.2e}")
            out.append(
                {
                    "vocab": vocab,
                    "rows": rows,
                    "n_embd": args.n_embd,
                    "f_linear_ms": ref,
                    "lmlab_ms": ours,
                    "ratio": ref / ours,
                    "max_abs_diff": diff,
                }
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"bench": "lm_head", "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": out},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
