"""Generation throughput: lmlab's decoding loop vs HF Transformers ``generate()``, the same weights, side by side in one process.

    python bench/generate_throughput.py --model gpt2-mini --batch-sizes 1 8 --prompt-len 16 --new-tokens 128 \
        --strategies greedy top-p --top-p 0.9 --repeats 3 --device cpu --dtype fp32 [--threads 1] [--json out.json]

One generation, the same work on both sides: a batch of B prompts of ``--prompt-len`` random token ids
(the same ids for both), one prefill, then exactly ``--new-tokens`` decode steps with a KV cache.

    lmlab:  torch.stack([step.tokens for step in lmlab.generate.decode(model, prompts, max_new_tokens=N,
                         processors=[TopP(p)] | [], sample=bool, generator=g)], dim=1)
    HF:     hf_model.generate(input_ids, attention_mask=ones, max_new_tokens=N, do_sample=bool, top_p=p,
                              top_k=0, num_beams=1, use_cache=True, eos_token_id=None)

No stop ids on either side (HF gets ``eos_token_id=None``, so it never stops early and adds no
min-length processor); HF's default top-k of 50 is switched off with ``top_k=0`` when sampling, so
both sides filter with top-p alone. The HF model gets lmlab's weights through
``lmlab.io.hf.to_hf_model`` (GPT2LMHeadModel or LlamaForCausalLM, SDPA attention, HF's default
dynamic cache). tokens/s = B·N / median wall time of one whole generation (prefill included), over
``--repeats`` timed generations per side after ``--warmup`` untimed ones; the repeats alternate the
two sides (lmlab first in even repeats, HF first in odd ones). Besides the ratio of medians, the
table gives the paired ratio (median over repeats of HF time ÷ lmlab time, back to back) and the
ratio of the best times, which other load on a shared machine disturbs least. With greedy decoding both sides must
produce the same token ids; the ``greedy ids`` column checks it (a mismatch prints a warning).
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
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmlab.config import PRESETS, preset  # noqa: E402
from lmlab.generate import TopP, decode  # noqa: E402
from lmlab.io.hf import to_hf_model  # noqa: E402
from lmlab.model import build_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STRATEGIES = ("greedy", "top-p")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["gpt2-mini"], choices=list(PRESETS), help="lmlab preset(s), one table row group each")
    p.add_argument("--vocab-size", type=int, default=None, help="override the presets' vocab_size")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes B to run")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (exactly; no stop ids)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES, help="greedy and/or top-p sampling")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for --strategies top-p")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per side and row (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per side and row first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and KV cache of both models (no autocast)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both sides (default: PyTorch's); 1 is steadier on a shared machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1 or args.prompt_len < 1 or min(args.batch_sizes) < 1 or (args.threads is not None and args.threads < 1):
        p.error("--repeats, --new-tokens, --prompt-len, --batch-sizes and --threads must be positive, --warmup non-negative")
    if not 0.0 < args.top_p <= 1.0:
        p.error(f"--top-p is {args.top_p}: expected a number in (0, 1]")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def lmlab_revision() -> str:
    """The git commit of the lmlab being measured, flagged when lmlab/ has uncommitted changes; "unknown" outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # noqa: E731
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "lmlab")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" + uncommitted changes in lmlab/" if dirty else "")


def step_tokens(step) -> torch.Tensor:
    """The (B,) next tokens of one ``decode`` step: older versions yield the tensor itself, newer ones a ``Step`` with ``.tokens``."""
    return step if isinstance(step, torch.Tensor) else step.tokens


def make_runners(ours, theirs, input_ids: torch.Tensor, args: argparse.Namespace, strategy: str, device: torch.device):
    """Two zero-argument callables, one per side, each running one whole generation and returning (B, N) new token ids."""
    sample = strategy == "top-p"
    prompts = input_ids.tolist()  # decode takes token id lists, as lmlab's generate() passes them
    attention_mask = torch.ones_like(input_ids)
    processors = [TopP(args.top_p)] if sample else []
    N = args.new_tokens
    hf_kwargs = dict(
        attention_mask=attention_mask,
        max_new_tokens=N,
        do_sample=sample,
        num_beams=1,
        use_cache=True,
        eos_token_id=None,  # never stop early: exactly N new tokens, as decode() without stop ids
        pad_token_id=None,
    )
    if sample:
        hf_kwargs.update(top_p=args.top_p, top_k=0, temperature=1.0)  # top_k=0: HF would default to 50
    # one seed per generation, the same on both sides (their RNG streams still differ: HF samples from the global RNG)
    calls = {"n": 0}

    def run_lmlab() -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(args.seed + calls["n"])
        steps = decode(ours, prompts, max_new_tokens=N, processors=processors, sample=sample, generator=gen)
        return torch.stack([step_tokens(step) for step in steps], dim=1)  # (B, N)

    def run_hf() -> torch.Tensor:
        torch.manual_seed(args.seed + calls["n"])
        out = theirs.generate(input_ids, **hf_kwargs)
        return out[:, input_ids.shape[1] :]  # (B, N)

    return {"lmlab": run_lmlab, "hf": run_hf}, calls


def bench_row(ours, theirs, config, args, B: int, strategy: str, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(args.seed + B)
    input_ids = torch.randint(0, config.vocab_size, (B, args.prompt_len), generator=gen).to(device)
    runners, calls = make_runners(ours, theirs, input_ids, args, strategy, device)

    outputs = {}
    for _ in range(args.warmup):
        for impl, run in runners.items():
            outputs[impl] = run()
        calls["n"] += 1
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    paired: list[float] = []
    for r in range(args.repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for impl in order:
            sync(device)
            t0 = time.perf_counter()
            out = runners[impl]()
            sync(device)
            times[impl].append(time.perf_counter() - t0)
            outputs[impl] = out
        paired.append(times["hf"][-1] / times["lmlab"][-1])
        calls["n"] += 1

    N = args.new_tokens
    lengths = {impl: out.shape[1] for impl, out in outputs.items()}
    if any(n != N for n in lengths.values()):
        warnings.warn(f"expected {N} new tokens per sequence, got {lengths}: the sides did different work", stacklevel=1)
    check, first_diff = "n/a", None
    if strategy == "greedy":
        a, b = outputs["lmlab"].cpu(), outputs["hf"].cpu()
        if a.shape == b.shape and torch.equal(a, b):
            check = "same"
        else:
            n = min(a.shape[1], b.shape[1])
            diff = (a[:, :n] != b[:, :n]).any(0).nonzero()
            first_diff = int(diff[0]) if diff.numel() else n
            check = f"DIFF@{first_diff}"
            warnings.warn(
                f"{config.name} B={B} greedy: lmlab and HF token ids differ from new token {first_diff} on "
                f"(same weights; expected to agree in fp32, near-ties can flip in low precision)",
                stacklevel=1,
            )
    row = {"model": config.name, "batch_size": B, "strategy": strategy, "greedy_ids": check, "first_diff": first_diff, "sides": {}}
    for impl, ts in times.items():
        med = statistics.median(ts)
        row["sides"][impl] = {
            "tokens_per_s": B * N / med,
            "s_per_generation": med,
            "ms_per_token_step": med / N * 1e3,
            "s_all": ts,
        }
    row["ratio_lmlab_over_hf"] = row["sides"]["lmlab"]["tokens_per_s"] / row["sides"]["hf"]["tokens_per_s"]
    row["paired_ratio_median"] = statistics.median(paired)
    row["ratio_of_best_times"] = min(times["hf"]) / min(times["lmlab"])
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"lmlab generate vs HF generate() | device={device_name(device)} ({device.type}), dtype={args.dtype}, "
        f"torch threads={torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, date {datetime.date.today().isoformat()}, lmlab {lmlab_revision()}"
    )
    print(
        f"prompt {args.prompt_len} random tokens, {args.new_tokens} new tokens, top-p {args.top_p} (HF top_k=0), "
        f"median of {args.repeats} timed generations after {args.warmup} warm-up, sides alternating"
        + (f", 1-min load average {load_before[0]:.2f}" if load_before else "")
    )
    header = (
        f"{'model':<11} {'params':>8} {'B':>3} {'strategy':<8} {'lmlab tok/s':>11} {'HF tok/s':>9} "
        f"{'lmlab ms/tok':>12} {'HF ms/tok':>9} {'lmlab/HF':>8} {'paired':>7} {'best':>7} {'greedy ids':>10}"
    )
    print(header)
    print("-" * len(header))

    rows, models = [], {}
    for name in args.model:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        config = preset(name, **overrides)
        if args.prompt_len + args.new_tokens > config.block_size:
            print(f"{name:<11} skipped: --prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds block_size {config.block_size}")
            continue
        torch.manual_seed(args.seed)
        ours = build_model(config).eval()
        theirs = to_hf_model(ours)  # same weights (fp32, eval, SDPA)
        ours, theirs = ours.to(device=device, dtype=dtype), theirs.to(device=device, dtype=dtype).eval()
        models[name] = {"params": config.num_params(), "config": config.to_dict()}
        for B in args.batch_sizes:
            for strategy in args.strategies:
                row = bench_row(ours, theirs, config, args, B, strategy, device)
                rows.append(row)
                s, h = row["sides"]["lmlab"], row["sides"]["hf"]
                print(
                    f"{name:<11} {config.num_params() / 1e6:>7.2f}M {B:>3} {strategy:<8} {s['tokens_per_s']:>11.1f} "
                    f"{h['tokens_per_s']:>9.1f} {s['ms_per_token_step']:>12.2f} {h['ms_per_token_step']:>9.2f} "
                    f"{row['ratio_lmlab_over_hf']:>7.3f}x {row['paired_ratio_median']:>6.3f}x {row['ratio_of_best_times']:>6.3f}x "
                    f"{row['greedy_ids']:>10}",
                    flush=True,
                )
        del ours, theirs
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        "tok/s = B·new tokens ÷ median seconds per whole generation (prefill included); ms/tok = that time ÷ new tokens "
        "(one decode step of the whole batch); lmlab/HF = ratio of tok/s, paired = median over repeats of HF time ÷ lmlab "
        "time back to back, best = HF's fastest time ÷ lmlab's fastest (least disturbed by other load); above 1: lmlab is faster"
        + (f"; 1-min load average after: {load_after[0]:.2f}" if load_after else "")
    )

    result = {
        "bench": "generate_throughput",
        "models": models,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "top_p": args.top_p,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "device": device_name(device),
        "device_type": device.type,
        "dtype": args.dtype,
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "lmlab_revision": lmlab_revision(),
        "date": datetime.date.today().isoformat(),
        "load_average_1m": {"before": load_before and load_before[0], "after": load_after and load_after[0]},
        "rows": rows,
        "command": " ".join(["python", "bench/generate_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
