"""Speculative decoding at batch 1 on CPU: lmlab against HF's assisted generation, the same pair of models.

    python bench/speculative.py --target RUN_OR_CKPT --draft CKPT [--new-tokens 128] [--k 4] [--json out.json]
    python bench/speculative.py --target RUN --draft first:1     # the draft: the target's first layer(s)
    python bench/speculative.py --target RUN --draft distill:1:300   # … then 300 steps distilled from the target
    python bench/speculative.py --target SmolLM2.gguf --prompt-style rewrite   # no draft model: prompt lookup only

Both libraries decode the same prompt ids greedily for exactly ``--new-tokens`` tokens (no end-of-text stop):
plain greedy, speculative with the draft model (k tokens a round) and prompt lookup (k tokens a round). HF runs
``model.generate(do_sample=False)``, with ``assistant_model=`` (``num_assistant_tokens=k``, constant schedule)
and with ``prompt_lookup_num_tokens=k``, on the folders ``lmlab export`` writes (checked by logits). Printed per
method: tokens/s (the best of ``--repeats`` passes over the prompts, the methods taking turns), lmlab's
acceptance rate (drafted tokens the target kept), the speedup over the same library's plain greedy, and
lmlab ÷ HF. Every speculative output is checked to be its library's plain greedy output token for token. The
prompts are the first ``--prompt-tokens`` tokens of held-out documents (``--prompts-file``: JSON Lines with a
``text`` field, e.g. the demo's heldout.jsonl; default: documents spread over the embedded corpus).
``--prompt-style rewrite`` wraps that text in the target's chat template as an editing request ("Rewrite the
following text, fixing any typos"), the work prompt lookup is for. Both libraries suppress the end of text
until ``--new-tokens`` (``min_new_tokens``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="the target checkpoint or run folder")
    p.add_argument(
        "--draft",
        default=None,
        help="a draft checkpoint with the same tokenizer, first:N (layers) or distill:N:STEPS (default: none, "
        "greedy and prompt lookup only)",
    )
    p.add_argument(
        "--prompt-style",
        choices=("continue", "rewrite"),
        default="continue",
        help="continue: the text itself; rewrite: the text in the chat template with a request to rewrite it",
    )
    p.add_argument("--prompts-file", default=None, help="JSON Lines with 'text' (default: the embedded corpus)")
    p.add_argument("--prompts", type=int, default=4, help="prompts to decode")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens of each prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--k", type=int, default=4, help="draft tokens per round")
    p.add_argument("--repeats", type=int, default=2, help="timed passes (the best counts), after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-hf", action="store_true", help="lmlab only")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def first_layers(target: Path, n: int, out: Path) -> Path:
    """A draft made of the target's embedding, first ``n`` blocks, final norm and head (no training)."""
    from lmlab.io.checkpoint import load_model, load_tokenizer, save_checkpoint
    from lmlab.model import build_model

    model = load_model(target, device="cpu")
    draft = build_model(dataclasses.replace(model.config, n_layer=n))
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if k in draft.state_dict()})
    return save_checkpoint(out, draft, tokenizer=load_tokenizer(target))


def distilled(target: Path, n: int, steps: int, out: Path) -> Path:
    """The draft ``first_layers(target, n)`` trained ``steps`` steps to match the target's next-token distributions
    (KL divergence, 8 × 128-token windows of the embedded corpus): a cheap stand-in for `lmlab distill`."""
    from lmlab.data import builtin_corpus
    from lmlab.io.checkpoint import load_model, load_tokenizer, save_checkpoint

    first_layers(target, n, out)
    teacher, student, tokenizer = (
        load_model(target, device="cpu"),
        load_model(out, device="cpu"),
        load_tokenizer(target),
    )
    ids = torch.tensor([t for row in tokenizer.encode_batch(builtin_corpus(max_chars=1_000_000)) for t in row])
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    student.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 129, (8,), generator=generator)
        x = torch.stack([ids[s : s + 128] for s in starts])
        with torch.no_grad():
            teacher_logprobs = teacher(x).float().log_softmax(-1)
        loss = torch.nn.functional.kl_div(
            student(x).float().log_softmax(-1), teacher_logprobs, log_target=True, reduction="batchmean"
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"distilling the draft: step {step}, KL {loss.item() / 128:.3f} per token", file=sys.stderr)
    return save_checkpoint(out, student.eval(), tokenizer=tokenizer, overwrite=True)


def prompts(tokenizer, args) -> list[list[int]]:
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)["text"] for line in lines if line.strip()]
    else:
        from lmlab.data import builtin_corpus

        texts = builtin_corpus(max_chars=1_000_000)
    ids = [row[: args.prompt_tokens] for row in tokenizer.encode_batch(texts)]
    ids = [row for row in ids if len(row) == args.prompt_tokens]
    ids = [ids[i * len(ids) // args.prompts] for i in range(min(args.prompts, len(ids)))]  # spread over the texts
    if args.prompt_style == "rewrite":
        from lmlab.templates import render

        request = "Rewrite the following text, fixing any typos:\n\n"
        chats = [[{"role": "user", "content": request + tokenizer.decode(row)}] for row in ids]
        ids = [tokenizer.encode(render(tokenizer, chat, add_generation_prompt=True)) for chat in chats]
    return ids


def measure(runners: dict, ids: list[list[int]], repeats: int) -> dict:
    """Per runner ``run(prompt_ids) -> new ids``: (the best seconds of ``repeats`` passes over the prompts, after a
    warm-up pass, its outputs). The runners take turns pass by pass, so a change in the machine's load hits all."""
    outputs = {name: [run(row) for row in ids] for name, run in runners.items()}
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            for row in ids:
                run(row)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], outputs[name]) for name in runners}


def lmlab_runners(target: Path, draft: Path, args) -> tuple[dict, dict]:
    """lmlab's three ways to decode, and the drafted/accepted counts they add to."""
    import lmlab

    lm = lmlab.load(target, device="cpu")
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)  # as HF: no end of text
    methods = {
        "greedy": {},
        "draft model": dict(draft=str(draft), num_draft_tokens=args.k),
        "prompt lookup": dict(draft="prompt-lookup", num_draft_tokens=args.k),
    }
    if draft is None:
        del methods["draft model"]
    counts = {name: [0, 0] for name in methods}

    def runner(name, options):
        def run(row):
            out = lm.complete_ids([row], **common, **options)[0][0].token_ids
            if options:
                counts[name][0] += lm.last_speculation.drafted
                counts[name][1] += lm.last_speculation.accepted
            return out

        return run

    return {name: runner(name, options) for name, options in methods.items()}, counts


def hf_runners(target: Path, draft: Path, args, work: Path) -> dict:
    """transformers' greedy ``generate()``, assisted generation and prompt lookup on the exported folders."""
    from transformers import AutoModelForCausalLM

    import lmlab

    models = {}
    for name, path in (("target", target), ("draft", draft)):
        if path is not None:
            folder = lmlab.export_hf(path, work / f"hf-{name}")
            models[name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model, assistant = models["target"], models.get("draft")
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = args.k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    methods = {
        "greedy": {},
        "draft model": dict(assistant_model=assistant),
        "prompt lookup": dict(prompt_lookup_num_tokens=args.k),
    }
    if assistant is None:
        del methods["draft model"]

    def runner(options):
        @torch.inference_mode()
        def run(row):
            x = torch.tensor([row])
            return model.generate(x, attention_mask=torch.ones_like(x), **common, **options)[0, len(row) :].tolist()

        return run

    return {name: runner(options) for name, options in methods.items()}


def rows_of(results: dict, ids, args, counts: dict | None = None) -> dict:
    reference = results["greedy"][1]
    rows = {}
    for name, (seconds, outputs) in results.items():
        drafted, accepted = counts[name] if counts else (0, 0)
        rows[name] = {
            "tokens_per_s": len(ids) * args.new_tokens / seconds,
            "acceptance": accepted / drafted if drafted else None,
            "same_as_greedy": outputs == reference,
        }
    return rows


def report(ours: dict, theirs: dict | None) -> str:
    head = f"{'method':<14} {'lmlab tok/s':>11} {'accept':>7} {'speedup':>8}"
    lines = [head + (f" {'HF tok/s':>9} {'HF speedup':>10} {'lmlab/HF':>9}" if theirs else "")]
    for name, row in ours.items():
        accept = f"{row['acceptance']:.0%}" if row["acceptance"] is not None else "-"
        speedup = row["tokens_per_s"] / ours["greedy"]["tokens_per_s"]
        line = f"{name:<14} {row['tokens_per_s']:>11.1f} {accept:>7} {speedup:>7.2f}×"
        if theirs:
            hf = theirs[name]["tokens_per_s"]
            line += f" {hf:>9.1f} {hf / theirs['greedy']['tokens_per_s']:>9.2f}× {row['tokens_per_s'] / hf:>8.2f}×"
        lines.append(line + ("" if row["same_as_greedy"] else "   (output differs from greedy!)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmlab.io.checkpoint import load_tokenizer, resolve_checkpoint

    target = resolve_checkpoint(args.target)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.draft:
            draft = None
        elif args.draft.startswith("first:"):
            draft = first_layers(target, int(args.draft.split(":", 1)[1]), work / "draft")
        elif args.draft.startswith("distill:"):
            n, steps = (int(x) for x in args.draft.split(":")[1:3])
            draft = distilled(target, n, steps, work / "draft")
        else:
            draft = resolve_checkpoint(args.draft)
        ids = prompts(load_tokenizer(target), args)
        runners, counts = lmlab_runners(target, draft, args)
        hf = {} if args.skip_hf else hf_runners(target, draft, args, work)
        results = measure({**runners, **{("HF", name): run for name, run in hf.items()}}, ids, args.repeats)
    ours = rows_of({name: results[name] for name in runners}, ids, args, counts)
    theirs = rows_of({name: results[("HF", name)] for name in hf}, ids, args) if hf else None
    mine = results["greedy"][1]
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{len(ids)} prompts × {args.prompt_tokens} tokens ({args.prompt_style}), {args.new_tokens} new tokens, "
        f"k = {args.k}"
    )
    print(report(ours, theirs))
    if theirs:
        same = sum(a == b for a, b in zip(mine, results[("HF", "greedy")][1]))
        print(f"lmlab's greedy output equals HF's on {same} of {len(ids)} prompts")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "lmlab": ours, "hf": theirs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
