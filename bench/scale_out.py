"""Scaling out: one process against N under torchrun (DDP and FSDP2), the same global batch, side by side.

    python bench/scale_out.py --model gpt2-mini --nproc 2 --global-batch 16 --seq-len 128 --steps 30 \
        --device cpu [--strategies ddp fsdp] [--data DATA] [--json out.json]

Each configuration is a real ``lmlab pretrain`` run (one process, then ``torchrun --standalone --nproc-per-node N``
with ``--micro-batch-size global/N``), on ``--data`` or on a folder prepared from the built-in corpus. Tokens/s is
the median of what the run logs every ``--log-interval`` steps (all ranks together), after the first ``--warmup``
logs; on a GPU the log also holds rank 0's peak allocated memory. It prints each run's tokens/s, its ratio to one
process, and its last training loss (the same global batch trains the same: the losses should agree).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-mini")
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun runs")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, all processes")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="logs left out of the median")
    p.add_argument("--device", default="cpu")
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    p.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the one-process run (torchrun gives each 1)"
    )
    p.add_argument("--extra", default="", help="more pretrain flags for every run (e.g. '--cpu-offload')")
    p.add_argument("--data", default=None, help="a folder made by `lmlab prepare` (default: the built-in corpus)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def builtin_data(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from lmlab.data import builtin_corpus, read_corpus
    from lmlab.data.pack import prepare
    from lmlab.tokenizer import train_tokenizer

    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in builtin_corpus()), encoding="utf-8")
    train_tokenizer(read_corpus(corpus), kind="bpe", vocab_size=4096).save(folder / "tok")
    prepare(corpus, folder / "tok", folder / "data", valid_fraction=0.02, show_progress=False)
    return folder / "data"


def run(args: argparse.Namespace, data: Path, out: Path, nproc: int, strategy: str | None) -> dict:
    flags = ["pretrain", "--model", args.model, "--data", str(data), "--out", str(out), "--device", args.device]
    flags += ["--micro-batch-size", str(args.global_batch // nproc), "--seq-len", str(args.seq_len)]
    flags += ["--max-steps", str(args.steps), "--log-interval", str(args.log_interval), "--warmup-steps", "5"]
    flags += ["--eval-interval", str(args.steps), "--eval-batches", "1", "--no-progress", "--no-tensorboard"]
    flags += args.extra.split() + (["--strategy", strategy] if strategy else [])
    launch = [sys.executable, "-m", "lmlab.cli"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        launch += ["-m", "lmlab.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if nproc == 1 and args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run([*launch, *flags], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(launch + flags)} failed:\n{proc.stderr[-3000:]}")
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    timed = train[args.warmup :] or train
    return {
        "processes": nproc,
        "strategy": strategy or f"one process{f', {args.threads} threads' if args.threads else ''}",
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "last_loss": train[-1]["loss"],
        "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in train), default=0.0) or None,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else builtin_data(Path(tmp))
        results = [run(args, data, Path(tmp) / "one", 1, None)]
        for strategy in args.strategies:
            results.append(run(args, data, Path(tmp) / strategy, args.nproc, strategy))
    base = results[0]["tokens_per_s"]
    print(f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(
        f"{args.model}, global batch {args.global_batch} × {args.seq_len} tokens, {args.steps} steps on {args.device}"
    )
    for r in results:
        memory = f", rank 0 peak {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] else ""
        print(
            f"  {r['processes']} × {r['strategy']:<24} {r['tokens_per_s']:>10,.0f} tokens/s  "
            f"{r['tokens_per_s'] / base:.2f}× one process; last loss {r['last_loss']:.4f}{memory}"
        )
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine()}
        Path(args.json).write_text(json.dumps({**meta, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
