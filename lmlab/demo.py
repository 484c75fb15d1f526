"""``lmlab demo``: the whole pipeline on text every Python install already has, offline, in minutes.

corpus (Python's own documentation) → byte-level BPE tokenizer → packed shards → pretraining →
generation. Later stages (fine-tuning, evaluation, critique) join the demo as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_PROMPTS = ("The for statement", "A dictionary is", "Return the number of", "Exceptions are")


def run_demo(
    out: str | Path = "lmlab-demo",
    *,
    max_steps: int = 300,
    model: str = "gpt2-mini",
    max_chars: int = 3_000_000,
    vocab_size: int = 4096,
    seq_len: int = 128,
    micro_batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Run every stage into ``out`` and print where each result is; returns those paths and figures."""
    from lmlab.api import load
    from lmlab.data import builtin_corpus
    from lmlab.data.pack import prepare
    from lmlab.tokenizer import train_tokenizer
    from lmlab.train.pretrain import pretrain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def stage(title: str) -> None:
        print(f"\n== {title} ({time.perf_counter() - started:.0f}s)", flush=True)

    stage("1/5 corpus: Python's own documentation (pydoc topics and module docstrings)")
    docs = builtin_corpus(max_chars=max_chars)
    corpus = out / "corpus.jsonl"
    tmp = corpus.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    tmp.replace(corpus)
    print(f"{len(docs):,} documents, {sum(map(len, docs)):,} characters → {corpus}")

    stage(f"2/5 tokenizer: byte-level BPE, {vocab_size} tokens")
    tokenizer = train_tokenizer(docs, kind="bpe", vocab_size=vocab_size)
    tokenizer.save(out / "tokenizer")
    print(f"→ {out / 'tokenizer' / 'tokenizer.json'}")

    stage("3/5 packing into token shards")
    manifest = prepare(corpus, out / "tokenizer", out / "data", show_progress=progress)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['tokens']:,} tokens")

    stage(f"4/5 pretraining {model}, {max_steps} steps")
    result = pretrain(
        model, out / "data", out / "run", resume=True, max_steps=max_steps, seq_len=seq_len,
        micro_batch_size=micro_batch_size, lr=2e-3, warmup_steps=max(1, max_steps // 20),
        eval_interval=max(1, max_steps // 4), eval_batches=8, log_interval=10, progress=progress,
    )
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.3f} (perplexity {2.718281828 ** result.val_loss:.1f})")

    stage("5/5 generation: greedy, beam search and nucleus sampling")
    lm = load(out / "run", device="cpu")
    lines = []
    for prompt in DEMO_PROMPTS:
        # a small model loops on its likeliest tokens (blank lines here): forbid repeated trigrams
        greedy = lm.generate(prompt, max_new_tokens=40, strategy="greedy", no_repeat_ngram_size=3)
        beam = lm.generate(prompt, max_new_tokens=40, strategy="beam", num_beams=4, no_repeat_ngram_size=3)
        sampled = lm.generate(prompt, max_new_tokens=40, strategy="sample", temperature=0.8, top_p=0.95, repetition_penalty=1.2, seed=0)
        lines += [f"[greedy] {prompt}{greedy}", f"[beam×4] {prompt}{beam}", f"[sample] {prompt}{sampled}", ""]
    samples = out / "samples.txt"
    samples.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))

    stage("done")
    made = {
        "corpus": corpus, "tokenizer": out / "tokenizer", "data": out / "data", "checkpoint": lm.path,
        "log": result.log_file, "loss_curve": out / "run" / "loss.png", "samples": samples,
    }
    for what, path in made.items():
        print(f"{what:>11}: {path}")
    return {**{k: str(v) for k, v in made.items()}, "val_loss": result.val_loss, "seconds": time.perf_counter() - started}
