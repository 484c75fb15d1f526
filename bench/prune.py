"""Pruning before and after: train a small decoder on the embedded corpus (bench/compress.py's run), prune it with
each method, with and without recovery training, and print perplexity (validation tokens), parameters, FLOPs/token
and decode speed of each beside the original.

    python bench/prune.py --model gpt2-mini --steps 1200 --recovery-steps 200 --out /tmp/lmlab-compress-bench

The control row "original + N steps" trains the unpruned model the same N recovery steps (same data, learning rate
and schedule), so that what recovery buys is not confused with what more training buys any model. Everything is
lmlab's own public API: prepare, pretrain, prune (compression.json of each method).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import trained_run  # noqa: E402

import lmlab  # noqa: E402

CASES = (  # method, sparsity, recovery
    ("magnitude", 0.5, False),
    ("magnitude", 0.5, True),
    ("wanda", 0.5, False),
    ("wanda", 0.5, True),
    ("2:4", 0.5, False),
    ("heads", 0.25, False),
    ("heads", 0.25, True),
    ("neurons", 0.25, False),
    ("neurons", 0.25, True),
    ("heads+neurons", 0.5, False),
    ("heads+neurons", 0.5, True),
)


def control(run: Path, out: Path, steps: int) -> dict:
    """The original trained ``steps`` more steps exactly as recovery trains a pruned model (a 1-head "pruning" that
    removes nothing is not possible, so: the recovery loop on the unpruned weights), measured the same way."""
    import torch

    from lmlab.compress.measure import write_compressed
    from lmlab.compress.pruning import recover
    from lmlab.io.checkpoint import load_model, load_tokenizer, resolve_checkpoint

    path = resolve_checkpoint(run)
    original, tokenizer = load_model(path), load_tokenizer(path)
    model = load_model(path)
    info = recover(model, out / "data", tokenizer, steps, 1e-4, torch.device("cpu"))
    target = out / f"control-{steps}"
    fields = dict(title=f"original + {steps} steps", method="control", sparsity=0.0, recovery=info)
    model.eval()
    return write_compressed(path, target, original, model, tokenizer, eval_data=out / "data", overwrite=True, **fields)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-mini")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the context)")
    ap.add_argument("--recovery-steps", type=int, default=200)
    ap.add_argument("--samples", type=int, default=64, help="sequences that rank heads and neurons")
    ap.add_argument("--out", default="/tmp/lmlab-compress-bench")
    ap.add_argument("--cases", default=None, help="method:sparsity:recovery,… (recovery 0 or 1); default: all")
    ap.add_argument("--no-control", action="store_true", help="skip the original + recovery-steps control")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cases = CASES
    if a.cases:
        cases = [(m, float(s), r == "1") for m, s, r in (c.rsplit(":", 2) for c in a.cases.split(","))]
    out, run = trained_run(a.model, a.steps, a.seq_len, Path(a.out))
    rows = []
    for method, sparsity, recovery in cases:
        steps = a.recovery_steps if recovery else 0
        name = f"{a.model}-{method.replace('+', '-').replace(':', 'of')}-{sparsity}-r{steps}"
        record = lmlab.prune(
            run, out / name, method=method, sparsity=sparsity, data=out / "data", samples=a.samples,
            finetune_steps=steps, eval_data=out / "data", overwrite=True,
        )  # fmt: skip
        rows.append(record)
        print(record.summary(), flush=True)
    if not a.no_control:
        rows.append(control(run, out, a.recovery_steps))
        print(rows[-1].summary(), flush=True)
    table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


def table(rows: list[dict]) -> None:
    """The markdown table docs/benchmarks.md holds."""
    before = rows[0]["original"]
    ppl = before["metrics"]["perplexity"]
    print("\n| method | sparsity | recovery steps | perplexity | Δ vs original | parameters (nonzero) | FLOPs/token "
          "| tok/s b1 | tok/s b8 |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| original | – | – | {ppl:.3f} | – | {before['parameters']:,} | {before['flops_per_token']:,.0f} | "
          f"{before['tokens_per_s_batch_1']:.0f} | {before['tokens_per_s_batch_8']:.0f} |")  # fmt: skip
    for r in rows:
        c = r["compressed"]
        steps = (r.get("recovery") or {}).get("steps", 0)
        params = f"{c['parameters']:,}" + (f" ({c['nonzero_parameters']:,})" if "nonzero_parameters" in c else "")
        gap = c["metrics"]["perplexity"] / ppl - 1
        print(f"| {r['method']} | {r['sparsity']} | {steps} | {c['metrics']['perplexity']:.3f} | {100 * gap:+.1f}% | "
              f"{params} | {c['flops_per_token']:,.0f} | {c['tokens_per_s_batch_1']:.0f} | "
              f"{c['tokens_per_s_batch_8']:.0f} |")  # fmt: skip
    print(f"\nmachine: {rows[0]['machine']}")


if __name__ == "__main__":
    main()
