"""Training-step throughput: lmlab vs HF Transformers, the same weights, side by side in one process.

    python bench/train_throughput.py --model gpt2-tiny --batch-size 8 --seq-len 128 --steps 20 --warmup 3 \
        --device cpu --dtype fp32 [--compile] [--json out.json]

One step, identical for both implementations:
    logits = model(x[:, :-1])                       # (B, T, V); HF with use_cache=False
    loss = F.cross_entropy(logits, x[:, 1:])         # the same call on the same tensors
    loss.backward(); AdamW.step(); zero_grad(set_to_none=True)

The HF model gets lmlab's weights through ``lmlab.io.hf.state_dict_to_hf`` (GPT2LMHeadModel or
LlamaForCausalLM, SDPA attention). Steps run in rounds that alternate the two models (lmlab first in
even rounds, HF first in odd ones), so machine noise and thermal drift hit both alike. ms/step is the
median over the timed steps; tokens/s = B·T / median step time. The paired ratio is the median, over
rounds, of HF time ÷ lmlab time within one round: robust to load that changes from round to round.
MFU uses nanoGPT's formula: ``ModelConfig.flops_per_token(T)`` (6·N + 12·L·d·T) × tokens/s ÷ peak FLOP/s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmlab.config import PRESETS, preset  # noqa: E402
from lmlab.io.hf import to_hf_model  # noqa: E402
from lmlab.model import build_model  # noqa: E402
from lmlab.train.objectives import CausalLM  # noqa: E402

# dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="gpt2-tiny", choices=list(PRESETS), help="lmlab preset")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocab_size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row fed to the model (≤ block_size)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first")
    p.add_argument("--round-steps", type=int, default=5, help="steps per implementation per alternating round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16"], help="bf16 = autocast; default bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (default: known GPUs in bf16)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lmlab-loss",
        default="same",
        choices=["same", "objective"],
        help=(
            "same: both sides run F.cross_entropy on the whole batch's logits; objective: lmlab's side runs its "
            "CausalLM objective as `lmlab pretrain` does (chunked linear cross-entropy when the vocabulary has "
            "32,768+ entries)"
        ),
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, optimizer, forward, device: torch.device, dtype: str, loss_fn=None):
    """One full training step: forward, the same cross-entropy, backward, AdamW, zero_grad. Returns the loss tensor.
    ``loss_fn(inputs, targets)``, when given, replaces forward + cross-entropy (``--lmlab-loss objective``)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def step(x):
        inputs, targets = x[:, :-1], x[:, 1:]
        with autocast:
            if loss_fn is not None:
                loss = loss_fn(inputs, targets)
            else:
                logits = forward(inputs)  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def objective_loss(model):
    """lmlab's side as `lmlab pretrain` trains: the CausalLM objective (chunked linear cross-entropy for a large
    vocabulary)."""
    objective = CausalLM()

    def loss_fn(inputs, targets):
        return objective.loss(model, {"input_ids": inputs, "labels": targets})

    return loss_fn


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_flops:
        return args.peak_flops
    if device.type == "cuda" and args.dtype == "bf16":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16.items() if k in name), None)
    return None


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers

    device = torch.device(args.device)
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    config = preset(args.model, **overrides)
    B, T = args.batch_size, args.seq_len
    if T > config.block_size:
        raise SystemExit(f"--seq-len {T} exceeds {args.model}'s block_size {config.block_size}")

    torch.manual_seed(args.seed)
    ours = build_model(config).to(device).train()
    theirs = to_hf_model(ours).to(device).train()  # same weights, via lmlab.io.hf.state_dict_to_hf
    fused = device.type == "cuda"
    impls = {}
    for impl, model, forward in (
        ("lmlab", ours, lambda m: m),
        ("hf", theirs, lambda m: lambda ids: m(input_ids=ids, use_cache=False).logits),
    ):
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=fused or None)
        run = torch.compile(model) if args.compile else model
        use_objective = impl == "lmlab" and args.lmlab_loss == "objective"
        impls[impl] = make_step(
            model, optimizer, forward(run), device, args.dtype, objective_loss(run) if use_objective else None
        )

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    gen = torch.Generator().manual_seed(args.seed)
    n_batches = args.warmup + args.steps
    batches = [torch.randint(0, config.vocab_size, (B, T + 1), generator=gen).to(device) for _ in range(n_batches)]

    print(
        f"{args.model}: {config.num_params() / 1e6:.2f}M params, vocab {config.vocab_size}, B={B} T={T}, "
        f"device={device_name(device)}, dtype={args.dtype}, compile={args.compile}, lmlab loss={args.lmlab_loss}, "
        f"torch threads={torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )

    # warm-up, alternating; the first step's losses must agree (same weights, same batch)
    first_loss = {}
    for i in range(args.warmup):
        for impl, step in impls.items():
            loss = step(batches[i])
            first_loss.setdefault(impl, loss.item())
    if first_loss:
        print(f"first-step loss: lmlab {first_loss['lmlab']:.6f}, hf {first_loss['hf']:.6f}")

    times: dict[str, list[float]] = {impl: [] for impl in impls}
    round_ratios: list[float] = []  # per round: HF time / lmlab time over the same batches, adjacent in time
    peak_mem: dict[str, int] = {impl: 0 for impl in impls}
    step_mem: dict[str, int] = {impl: 0 for impl in impls}
    done, round_idx = 0, 0
    while done < args.steps:
        n = min(args.round_steps, args.steps - done)
        order = list(impls) if round_idx % 2 == 0 else list(reversed(impls))
        for impl in order:
            if device.type == "cuda":
                sync(device)
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            for j in range(n):
                x = batches[args.warmup + done + j]
                sync(device)
                t0 = time.perf_counter()
                impls[impl](x)
                sync(device)
                times[impl].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                peak_mem[impl] = max(peak_mem[impl], peak)
                step_mem[impl] = max(step_mem[impl], peak - resident)
        round_ratios.append(sum(times["hf"][-n:]) / sum(times["lmlab"][-n:]))
        done += n
        round_idx += 1

    peak = peak_flops(args, device)
    flops_per_token = config.flops_per_token(T)
    rows = {}
    for impl, ts in times.items():
        ms = statistics.median(ts) * 1e3
        tok_s = B * T / (ms / 1e3)
        rows[impl] = {
            "tokens_per_s": tok_s,
            "ms_per_step": ms,
            "ms_per_step_mean": statistics.fmean(ts) * 1e3,
            "ms_per_step_min": min(ts) * 1e3,
            "mfu": flops_per_token * tok_s / peak if peak else None,
            "peak_mem_mib": peak_mem[impl] / 2**20 if device.type == "cuda" else None,
            "step_mem_mib": step_mem[impl] / 2**20 if device.type == "cuda" else None,
        }
    ratio = rows["lmlab"]["tokens_per_s"] / rows["hf"]["tokens_per_s"]
    paired = statistics.median(round_ratios)

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    header = f"{'model':<12} {'impl':<6} {'tokens/s':>10} {'ms/step':>9} {'MFU':>7} {'peak MiB':>9} {'step MiB':>9}"
    print(header)
    print("-" * len(header))
    for impl, r in rows.items():
        mfu = fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else "")
        print(
            f"{args.model:<12} {impl:<6} {r['tokens_per_s']:>10.0f} {r['ms_per_step']:>9.2f} {mfu:>7} "
            f"{fmt(r['peak_mem_mib'], '.0f'):>9} {fmt(r['step_mem_mib'], '.0f'):>9}"
        )
    print(
        f"lmlab/HF tokens/s: {ratio:.3f}x (median over rounds of the paired ratio: {paired:.3f}x, {len(round_ratios)} "
        "rounds)"
    )
    if device.type == "cuda":
        print(
            "peak MiB: max_memory_allocated during the impl's steps, both models resident; step MiB: that peak minus "
            "what was allocated before"
        )

    result = {
        "bench": "train_throughput",
        "model": args.model,
        "config": config.to_dict(),
        "params": config.num_params(),
        "batch_size": B,
        "seq_len": T,
        "steps": args.steps,
        "warmup": args.warmup,
        "round_steps": args.round_steps,
        "compile": args.compile,
        "lmlab_loss": args.lmlab_loss,
        "device": device_name(device),
        "device_type": device.type,
        "dtype": args.dtype,
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "first_step_loss": first_loss,
        "load_average_1m": {"before": load_before and load_before[0], "after": load_before and os.getloadavg()[0]},
        "results": rows,
        "ratio_lmlab_over_hf": ratio,
        "paired_ratio_median": paired,
        "round_ratios": round_ratios,
        "command": " ".join(["python", "bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
