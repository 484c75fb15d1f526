"""Generation throughput: lmlab's decoding loop vs HF Transformers ``generate()``, the same weights, side by side
in one process.

    python bench/generate_throughput.py --model gpt2-mini --batch-sizes 1 8 --prompt-len 16 --new-tokens 128 \
        --strategies greedy top-p --top-p 0.9 --repeats 3 --device cpu --dtype fp32 [--compile] [--threads 1] \
        [--json out.json]

One generation, the same work on every side: a batch of B prompts of ``--prompt-len`` random token ids
(the same ids for all), one prefill, then exactly ``--new-tokens`` decode steps with a KV cache.

    lmlab          torch.stack([step.tokens for step in lmlab.generate.decode(model, prompts, max_new_tokens=N,
                               processors=[TopP(p)] | [], sample=bool, generator=g)], dim=1)
    lmlab-compile  the same with compile=True: a static KV cache and the one-token step through torch.compile
                   (a CUDA graph on GPU)
    hf             hf_model.generate(input_ids, attention_mask=ones, max_new_tokens=N, do_sample=bool, top_p=p,
                                     top_k=0, num_beams=1, use_cache=True, eos_token_id=None)   (dynamic cache, eager)
    hf-compile     the same with cache_implementation="static" and a CompileConfig: HF's static cache + compiled
                   forward ("reduce-overhead" mode, which is CUDA graphs on GPU)

``--compile`` adds the two compiled sides to the default pair (lmlab, hf); ``--sides`` picks any set.
No stop ids on any side (HF gets ``eos_token_id=None``, so it never stops early and adds no
min-length processor); HF's default top-k of 50 is switched off with ``top_k=0`` when sampling, so
every side filters with top-p alone. The HF model gets lmlab's weights through
``lmlab.io.hf.to_hf_model`` (GPT2LMHeadModel or LlamaForCausalLM, SDPA attention). tokens/s = B·N /
median wall time of one whole generation (prefill included), over ``--repeats`` timed generations per
side after ``--warmup`` untimed ones (the compiled sides compile during warm-up); the repeats rotate
the order of the sides. Every ratio is against ``hf`` (eager ``generate()``): the ratio of medians, the
paired ratio (median over repeats of HF time ÷ the side's time, run back to back) and the ratio of
the best times, which other load on a shared machine disturbs least. With greedy decoding every side
must produce the same token ids as ``hf``; the ``ids`` column checks it (a mismatch prints a warning).

Roofline: bytes a decode step must read (every weight matrix once — the token embedding only when it
is also the LM head — plus each row's keys and values at the mean cache length, P + N/2) ÷ the
measured time per step, as a fraction of the memory bandwidth a large device-to-device copy reaches
(measured at start, or ``--bandwidth`` in GB/s). Peak MiB (CUDA): ``max_memory_allocated`` during the
side's timed generations, all models resident.
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
SIDES = ("lmlab", "lmlab-compile", "hf", "hf-compile")


def parse_args(argv: list[str] | None = None, defaults: dict | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=["gpt2-mini"],
        choices=list(PRESETS),
        help="lmlab preset(s), one table row group each",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="override the presets' vocab_size")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes B to run")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (exactly; no stop ids)")
    p.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES, help="greedy and/or top-p sampling"
    )
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for --strategies top-p")
    p.add_argument(
        "--sides",
        nargs="+",
        default=None,
        choices=SIDES,
        help="what to run (default: lmlab hf; with --compile all four); hf always runs, as the reference",
    )
    p.add_argument("--compile", action="store_true", help="also run lmlab-compile and hf-compile")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per side and row (the median is reported)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed generations per side and row first (compiling happens here)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default="fp32", choices=list(DTYPES), help="weights and KV cache of both models (no autocast)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for all sides (default: PyTorch's); 1 is steadier on a shared machine",
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help="memory bandwidth in GB/s for the roofline column (default: measured with a large copy)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    if defaults:
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if (
        args.repeats < 1
        or args.warmup < 0
        or args.new_tokens < 1
        or args.prompt_len < 1
        or min(args.batch_sizes) < 1
        or (args.threads is not None and args.threads < 1)
    ):
        p.error(
            "--repeats, --new-tokens, --prompt-len, --batch-sizes and --threads must be positive, --warmup non-negative"
        )
    if not 0.0 < args.top_p <= 1.0:
        p.error(f"--top-p is {args.top_p}: expected a number in (0, 1]")
    if args.sides is None:
        args.sides = list(SIDES) if args.compile else ["lmlab", "hf"]
    args.sides = [side for side in SIDES if side in args.sides or side == "hf"]  # a fixed order; hf is the reference
    if any(side.endswith("compile") for side in args.sides) and args.warmup < 1:
        p.error("the compiled sides compile on their first generation: use --warmup 1 or more")
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
    """The git commit of the lmlab being measured, flagged when lmlab/ has uncommitted changes; "unknown" outside
    a checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "lmlab")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" + uncommitted changes in lmlab/" if dirty else "")


def copy_bandwidth(device: torch.device, dtype: torch.dtype) -> float:
    """Bytes per second a large device-to-device copy moves (read + write), the best of 5: the roofline's
    denominator."""
    n_bytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * n_bytes / best


def bytes_per_step(model, config, B: int, mean_len: float, dtype: torch.dtype) -> float:
    """What one decode step must read: every weight once (an untied token embedding is only looked up, so
    it is left out) plus B rows of keys and values over ``mean_len`` positions in every layer."""
    size = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in model.parameters())
    if not config.tie_embeddings:
        weights -= model.tok_emb.weight.numel()
    if getattr(model, "pos_emb", None) is not None:
        weights -= model.pos_emb.weight.numel()
    kv = 2 * config.n_layer * config.n_kv_heads * config.head_dim * mean_len * B
    return (weights + kv) * size


def step_tokens(step) -> torch.Tensor:
    """The (B,) next tokens of one ``decode`` step: older versions yield the tensor itself, newer ones a ``Step``
    with ``.tokens``."""
    return step if isinstance(step, torch.Tensor) else step.tokens


def make_runners(ours, theirs, input_ids: torch.Tensor, args: argparse.Namespace, strategy: str, device: torch.device):
    """Zero-argument callables, one per side, each running one whole generation and returning (B, N) new token ids."""
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
    # one seed per generation, the same on every side (their RNG streams still differ: HF samples from the global RNG)
    calls = {"n": 0}

    def lmlab_side(compile: bool):
        def run() -> torch.Tensor:
            gen = torch.Generator(device=device).manual_seed(args.seed + calls["n"])
            options = (
                {"compile": True} if compile else {}
            )  # no keyword when off: the script also times older lmlab trees
            steps = decode(
                ours, prompts, max_new_tokens=N, processors=processors, sample=sample, generator=gen, **options
            )
            return torch.stack([step_tokens(step) for step in steps], dim=1)  # (B, N)

        return run

    def hf_side(compile: bool):
        kwargs = dict(hf_kwargs)
        if compile:
            from transformers import CompileConfig

            compile_config = CompileConfig()  # mode="reduce-overhead": CUDA graphs on GPU
            compile_config._compile_all_devices = device.type != "cuda"  # HF compiles on GPUs only unless told
            kwargs.update(cache_implementation="static", compile_config=compile_config)

        def run() -> torch.Tensor:
            torch.manual_seed(args.seed + calls["n"])
            out = theirs.generate(input_ids, **kwargs)
            return out[:, input_ids.shape[1] :]  # (B, N)

        return run

    makers = {
        "lmlab": lambda: lmlab_side(False),
        "lmlab-compile": lambda: lmlab_side(True),
        "hf": lambda: hf_side(False),
        "hf-compile": lambda: hf_side(True),
    }
    return {side: makers[side]() for side in args.sides}, calls


def bench_row(ours, theirs, config, args, B: int, strategy: str, device: torch.device, bandwidth: float) -> dict:
    gen = torch.Generator().manual_seed(args.seed + B)
    input_ids = torch.randint(0, config.vocab_size, (B, args.prompt_len), generator=gen).to(device)
    runners, calls = make_runners(ours, theirs, input_ids, args, strategy, device)
    sides = list(runners)

    outputs = {}
    for _ in range(args.warmup):
        for side, run in runners.items():
            outputs[side] = run()
        calls["n"] += 1
    times: dict[str, list[float]] = {side: [] for side in sides}
    peaks: dict[str, int] = {side: 0 for side in sides}
    for r in range(args.repeats):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]  # rotate who goes first
        for side in order:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out = runners[side]()
            sync(device)
            times[side].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated(device))
            outputs[side] = out
        calls["n"] += 1

    N = args.new_tokens
    lengths = {side: out.shape[1] for side, out in outputs.items()}
    if any(n != N for n in lengths.values()):
        warnings.warn(
            f"expected {N} new tokens per sequence, got {lengths}: the sides did different work", stacklevel=1
        )
    step_bytes = bytes_per_step(ours, config, B, args.prompt_len + N / 2, DTYPES[args.dtype])
    row = {"model": config.name, "batch_size": B, "strategy": strategy, "bytes_per_step": step_bytes, "sides": {}}
    for side in sides:
        ts = times[side]
        med = statistics.median(ts)
        check, first_diff = "n/a", None
        if strategy == "greedy" and side != "hf":
            a, b = outputs[side].cpu(), outputs["hf"].cpu()
            if a.shape == b.shape and torch.equal(a, b):
                check = "same"
            else:
                n = min(a.shape[1], b.shape[1])
                diff = (a[:, :n] != b[:, :n]).any(0).nonzero()
                first_diff = int(diff[0]) if diff.numel() else n
                check = f"DIFF@{first_diff}"
                warnings.warn(
                    f"{config.name} B={B} greedy: {side} and hf token ids differ from new token {first_diff} on (same "
                    "weights; expected to agree in fp32, near-ties can flip in low precision or compiled kernels)",
                    stacklevel=1,
                )
        row["sides"][side] = {
            "tokens_per_s": B * N / med,
            "s_per_generation": med,
            "ms_per_token_step": med / N * 1e3,
            "roofline": step_bytes / (med / N) / bandwidth,
            "peak_mem_mib": peaks[side] / 2**20 if device.type == "cuda" else None,
            "vs_hf": statistics.median(times["hf"]) / med,
            "paired_vs_hf": statistics.median(h / t for h, t in zip(times["hf"], ts)),
            "best_vs_hf": min(times["hf"]) / min(ts),
            "greedy_ids": check,
            "first_diff": first_diff,
            "s_all": ts,
        }
    return row


def main(argv: list[str] | None = None, defaults: dict | None = None, bench: str = "generate_throughput") -> dict:
    args = parse_args(argv, defaults)
    import transformers

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth(device, dtype)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"lmlab generate vs HF generate() | device={device_name(device)} ({device.type}), dtype={args.dtype}, "
        f"torch threads={torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, date {datetime.date.today().isoformat()}, lmlab {lmlab_revision()}"
    )
    print(
        f"prompt {args.prompt_len} random tokens, {args.new_tokens} new tokens, top-p {args.top_p} (HF top_k=0), "
        f"median of {args.repeats} timed generations after {args.warmup} warm-up, order rotating; "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s ({'given' if args.bandwidth else 'measured copy'})"
        + (f", 1-min load average {load_before[0]:.2f}" if load_before else "")
    )
    header = (
        f"{'model':<11} {'params':>8} {'B':>3} {'strategy':<8} {'side':<13} {'tok/s':>9} {'ms/tok':>8} {'roofline':>8} "
        f"{'peak MiB':>8} {'vs hf':>7} {'paired':>7} {'best':>7} {'ids':>8}"
    )
    print(header)
    print("-" * len(header))

    rows, models = [], {}
    for name in args.model:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        config = preset(name, **overrides)
        if args.prompt_len + args.new_tokens > config.block_size:
            print(
                f"{name:<11} skipped: --prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds "
                f"block_size {config.block_size}"
            )
            continue
        torch.manual_seed(args.seed)
        ours = build_model(config).eval()
        theirs = to_hf_model(ours)  # same weights (fp32, eval, SDPA)
        ours, theirs = ours.to(device=device, dtype=dtype), theirs.to(device=device, dtype=dtype).eval()
        models[name] = {"params": config.num_params(), "config": config.to_dict()}
        for B in args.batch_sizes:
            for strategy in args.strategies:
                row = bench_row(ours, theirs, config, args, B, strategy, device, bandwidth)
                rows.append(row)
                for side, r in row["sides"].items():
                    peak = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "n/a"
                    print(
                        f"{name:<11} {config.num_params() / 1e6:>7.2f}M {B:>3} {strategy:<8} {side:<13} "
                        f"{r['tokens_per_s']:>9.1f} {r['ms_per_token_step']:>8.2f} {r['roofline']:>7.1%} {peak:>8} "
                        f"{r['vs_hf']:>6.3f}x {r['paired_vs_hf']:>6.3f}x {r['best_vs_hf']:>6.3f}x {r['greedy_ids']:>8}",
                        flush=True,
                    )
        del ours, theirs
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        (
            "tok/s = B·new tokens ÷ median seconds per whole generation (prefill included); ms/tok = that time ÷ new "
            "tokens (one decode step of the whole batch); roofline = bytes a step must read ÷ ms/tok ÷ bandwidth; vs "
            "hf = ratio of tok/s to eager HF generate(), paired = median over repeats of HF time ÷ the side's time, "
            "best = HF's fastest time ÷ the side's fastest (least disturbed by other load); above 1: faster than HF; "
            "ids: greedy token ids against hf"
        )
        + (f"; 1-min load average after: {load_after[0]:.2f}" if load_after else "")
    )

    result = {
        "bench": bench,
        "models": models,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "top_p": args.top_p,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "sides": args.sides,
        "device": device_name(device),
        "device_type": device.type,
        "dtype": args.dtype,
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_source": "given" if args.bandwidth else "measured copy",
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "lmlab_revision": lmlab_revision(),
        "date": datetime.date.today().isoformat(),
        "load_average_1m": {"before": load_before and load_before[0], "after": load_after and load_after[0]},
        "rows": rows,
        "command": " ".join(["python", f"bench/{bench}.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
