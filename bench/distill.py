"""Distillation against plain training: the demo's llama-mini as the teacher, a half-depth student initialised from
its every other block (DistilBERT's recipe) trained the same number of steps with the teacher's distributions
(`lmlab distill`) and without them (`lmlab pretrain --init-from` the same starting student), all three measured
on the same validation tokens: parameters, perplexity with its 95% CI, tokens/s at batch 1 and 8.

    python bench/distill.py --out /tmp/lmlab-distill-bench [--teacher-steps 600 --steps 300 --json out.json]
    python bench/distill.py --out /tmp/kd --teacher lmlab-demo/run --data lmlab-demo/data --steps 150  # a run's own

Everything is lmlab's own public API: prepare, pretrain, distill, and lmlab.compress.measure.measure (the row
compression.json holds). The teacher's recipe is the demo's (`lmlab demo`): the embedded corpus (3M characters),
a 4096-token byte-level BPE, 600 steps of 16 × 128 tokens at 2e-3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmlab  # noqa: E402
from lmlab.data import builtin_corpus  # noqa: E402
from lmlab.io.checkpoint import load_config, read_meta, resolve_checkpoint  # noqa: E402

TRAIN = dict(
    micro_batch_size=16, seq_len=128, lr=2e-3, log_interval=10, eval_batches=40, progress=False, tensorboard=False
)


def teacher_run(out: Path, steps: int) -> Path:
    """The demo's data and language model (made once; later runs reuse them)."""
    corpus = out / "corpus.jsonl"
    if not (out / "data").exists():
        out.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in builtin_corpus(max_chars=3_000_000)))
        lmlab.train_tokenizer(lmlab.read_corpus(corpus), kind="bpe", vocab_size=4096).save(out / "tok")
        lmlab.prepare(corpus, out / "tok", out / "data", show_progress=False)
    run = out / f"teacher-{steps}"
    if not (run / "best").exists():
        args = dict(TRAIN, max_steps=steps, warmup_steps=max(1, steps // 20), eval_interval=max(1, steps // 4))
        lmlab.pretrain("llama-mini", out / "data", run, resume=run.exists(), **args)
    return run


def measured(checkpoint: Path, data: Path) -> dict:
    """A checkpoint's row of compression.json (:func:`lmlab.compress.measure.measure`) on ``data``."""
    from lmlab.compress.measure import measure
    from lmlab.io.checkpoint import load_model, load_tokenizer

    path = resolve_checkpoint(checkpoint)
    return measure(load_model(path, device="cpu"), load_tokenizer(path), path, data, read_meta(path))


def row(name: str, figures: dict, seconds: float | None) -> dict:
    ci = figures["ci"]["perplexity"]
    return {
        "model": name,
        "parameters": figures["parameters"],
        "perplexity": figures["metrics"]["perplexity"],
        "ci": (ci["low"], ci["high"]),
        "tokens_per_s_batch_1": figures["tokens_per_s_batch_1"],
        "tokens_per_s_batch_8": figures["tokens_per_s_batch_8"],
        "train_seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/lmlab-distill-bench")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300, help="the students' optimizer steps")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--teacher", default=None, help="an existing teacher run instead (with --data: its data folder)")
    ap.add_argument("--data", default=None, help="the prepared data folder --teacher was trained on")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = Path(a.out)
    teacher, data = (Path(a.teacher), Path(a.data)) if a.teacher else (teacher_run(out, a.teacher_steps), out / "data")
    config, meta = load_config(teacher), read_meta(resolve_checkpoint(teacher))
    name = f"{config.name}, {config.n_layer} blocks, step {meta.get('step')}"
    student = dict(TRAIN, max_steps=a.steps, warmup_steps=max(1, a.steps // 20), eval_interval=max(1, a.steps // 2))
    kd, plain = out / f"kd-{a.steps}-alpha{a.alpha:g}-T{a.temperature:g}", out / f"plain-{a.steps}"
    started, kd_seconds, plain_seconds = time.perf_counter(), None, None  # None: an earlier run's, not timed
    if not (kd / "best").exists():
        lmlab.distill(
            teacher, data, kd, student_init="teacher-layers", alpha=a.alpha, temperature=a.temperature,
            resume=kd.exists(), **student,
        )  # fmt: skip
        kd_seconds = time.perf_counter() - started
    started = time.perf_counter()
    if not (plain / "best").exists():  # the same starting student, its own loss alone
        lmlab.pretrain(data=data, out=plain, init_from=kd / "student-init", resume=plain.exists(), **student)
        plain_seconds = time.perf_counter() - started
    record = json.loads((kd / "compression.json").read_text())  # the teacher and the distilled student, measured
    kd_name = f"student, distilled (alpha {a.alpha:g}, T {a.temperature:g}), {a.steps} steps"
    rows = [
        row(f"teacher ({name})", record["original"], None),
        row(kd_name, record["compressed"], kd_seconds),
        row(f"student, no teacher, {a.steps} steps", measured(plain, data), plain_seconds),
    ]
    print("| model | parameters | perplexity [95% CI] | tokens/s, batch 1 | tokens/s, batch 8 | training s |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        seconds = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "–"
        print(
            f"| {r['model']} | {r['parameters']:,} | {r['perplexity']:.2f} "
            f"[{r['ci'][0]:.2f}–{r['ci'][1]:.2f}] | {r['tokens_per_s_batch_1']:.0f} | {r['tokens_per_s_batch_8']:.0f} "
            f"| {seconds} |"
        )
    teacher_ppl = rows[0]["perplexity"]
    for r in rows[1:]:
        print(f"{r['model']}: perplexity {r['perplexity'] / teacher_ppl:.3f}× the teacher's")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
