"""Speculative decoding under concurrent clients: the serving engines side by side, lmlab only, in process.

    python bench/speculative_serve.py --model gpt2-mini --clients 1 8 [--new-tokens 64] [--k 4] [--json out.json]

Three engines serve the same requests: the plain continuous-batching ``Engine`` (one token per row per
forward pass), ``BatchedSpeculativeEngine`` (``lmlab serve --draft prompt-lookup``: every row drafts by prompt
lookup, one forward pass checks every row's draft) and the one-request-at-a-time ``SpeculativeEngine`` with
prompt lookup (what ``serve --draft prompt-lookup`` ran before). Each engine runs its loop on its own thread;
``--clients`` client threads each submit their next request when the last one ends, ``max(8, 2 × clients)``
requests in all, each making exactly ``--new-tokens`` greedy tokens (no stop ids). The prompts are random
ids with a repeated stretch (``--prompt-tokens`` in all), which prompt lookup can draft from. Reported per
engine and client count: output tokens/s, time to first token (p50, p99), target forward passes, the
acceptance rate, and the speedup over the plain engine. No HTTP: ``bench/serve_throughput.py`` measures
the server around the engine; this one isolates the engines.

The weights are random (``--model`` preset): how often prompt lookup is right depends on the text, and a
random model's greedy output loops more than a trained one's, so the acceptance rate here is the setting, not
a prediction; what carries over is how each engine's cost scales with the clients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-mini", help="lmlab preset (random weights)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--prompt-tokens", type=int, default=48, help="tokens of each prompt")
    p.add_argument("--k", type=int, default=4, help="draft tokens per round")
    p.add_argument("--max-batch-size", type=int, default=8, help="rows of the batching engines")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` ids: a random stretch, then its first half again (repeated n-grams)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        head = torch.randint(0, vocab, (length - length // 3,), generator=g).tolist()
        out.append(head + head[: length // 3])
    return out


def engines(model, args) -> dict:
    from lmlab.generate.engine import Engine, SpeculativeEngine
    from lmlab.generate.speculative import PromptLookup
    from lmlab.generate.speculative_engine import BatchedSpeculativeEngine

    rows = args.max_batch_size
    return {
        "plain Engine": lambda: Engine(model, max_batch_size=rows),
        "batched prompt lookup": lambda: BatchedSpeculativeEngine(model, num_draft_tokens=args.k, max_batch_size=rows),
        "serial prompt lookup": lambda: SpeculativeEngine(model, lambda n: PromptLookup(), num_draft_tokens=args.k),
    }


def serve(engine, work: list[list[int]], clients: int, new_tokens: int) -> dict:
    """Run ``work`` through ``engine`` with ``clients`` closed-loop clients: tokens, wall time, first-token times."""
    from lmlab.generate.engine import Request

    pending, lock, firsts, outputs = list(work), threading.Lock(), [], []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop()
            done, tokens, start = threading.Event(), [], time.perf_counter()

            def emit(event) -> None:
                if event.token is not None:
                    if not tokens:
                        firsts.append(time.perf_counter() - start)
                    tokens.append(event.token)
                if event.finish_reason is not None:
                    done.set()

            engine.submit(Request(prompt, new_tokens, emit=emit))
            done.wait()
            outputs.append((prompt, tokens))

    engine.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    engine.stop()
    return {"wall": wall, "tokens": sum(len(t) for _, t in outputs), "firsts": sorted(firsts), "outputs": outputs}


def count_passes(model) -> list[int]:
    calls = [0]
    forward = model.forward

    def counted(*a, **kw):
        calls[0] += 1
        return forward(*a, **kw)

    model.forward = counted
    return calls


HEADER = "{:<24}{:>8}{:>9}{:>10}{:>10}{:>8}{:>8}{:>9}"


def measure(model, calls: list[int], args, clients: int) -> list[dict]:
    """Every engine at ``clients`` clients, each checked to give the plain engine's tokens."""
    work = prompts(model.config.vocab_size, max(8, 2 * clients), args.prompt_tokens)
    serve(engines(model, args)["plain Engine"](), work[:2], 2, 4)  # warm-up
    rows, reference = [], None
    for name, make in engines(model, args).items():
        engine, calls[0] = make(), 0
        result = serve(engine, work, clients, args.new_tokens)
        outputs = {tuple(p): t for p, t in result["outputs"]}
        reference = reference or outputs
        assert outputs == reference, f"{name} gave other tokens than the plain engine"
        stats, firsts = getattr(engine, "stats", None), result["firsts"]
        rows.append(
            dict(
                engine=name,
                clients=clients,
                tokens_per_s=result["tokens"] / result["wall"],
                ttft_p50=statistics.median(firsts),
                ttft_p99=firsts[int(0.99 * (len(firsts) - 1))],
                passes=calls[0],
                acceptance=stats.acceptance_rate if stats is not None else None,
            )
        )
        rows[-1]["vs_plain"] = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        show(rows[-1])
    return rows


def show(row: dict) -> None:
    accept = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
    ttft = [f"{row[key] * 1e3:.1f}ms" for key in ("ttft_p50", "ttft_p99")]
    tokens = f"{row['tokens_per_s']:.1f}"
    print(HEADER.format(row["engine"], row["clients"], tokens, *ttft, row["passes"], accept, f"{row['vs_plain']:.2f}×"))


def main(argv=None) -> dict:
    import lmlab

    args = parse_args(argv)
    torch.manual_seed(0)
    model = lmlab.build_model(lmlab.preset(args.model)).eval()
    calls = count_passes(model)
    print(f"{args.model}, random weights; {args.new_tokens} new tokens a request, k = {args.k}")
    print(HEADER.format("engine", "clients", "tok/s", "TTFT p50", "TTFT p99", "passes", "accept", "vs plain"))
    rows = [row for clients in args.clients for row in measure(model, calls, args, clients)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return {"rows": rows}


if __name__ == "__main__":
    main()
