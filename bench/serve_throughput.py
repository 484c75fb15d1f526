"""Serving throughput: `lmlab serve` (continuous batching) against a FastAPI endpoint around HF ``generate()``,
the same weights, the same streamed requests, concurrent clients 1, 4, 16 and 64.

    python bench/serve_throughput.py --model gpt2-mini --new-tokens 64 --clients 1 4 16 64 [--json out.json]
    python bench/serve_throughput.py --clients 16 64 --skip-peer    # lmlab serve alone

The peer is what a user would otherwise put up here: HF `transformers serve` needs the model hub and
more packages than this machine has, so the peer is an OpenAI-style ``/v1/completions`` endpoint (this
script, ``--peer FOLDER``) that streams ``AutoModelForCausalLM.generate()`` through a
``TextIteratorStreamer``, one request at a time (``generate()`` batches only what arrives together).

Both servers get the same checkpoint (a ``--model`` preset with random weights and a BPE tokenizer
trained on Python's documentation; the HF folder is ``lmlab export``'s, checked by logits), and run one
after the other on the same machine, never at once. Every request streams ``--new-tokens`` tokens
after one of a few prompts (greedy; ``ignore_eos`` for lmlab and ``min_new_tokens`` for the peer, so
every request makes exactly that many). Per client count: ``2 × clients`` requests (at least 8), each
client sending its next request when the last one ends. Reported: requests/s, output tokens/s, time
to first token (p50, p99) and the mean time between a request's streamed chunks (inter-token latency).
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["The for statement", "A dictionary is", "Return the number of", "Exceptions are", "A module is"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-mini", help="lmlab preset (random weights)")
    p.add_argument("--vocab-size", type=int, default=4096, help="the BPE tokenizer's size")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens streamed per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrent clients")
    p.add_argument("--max-batch-size", type=int, default=64, help="lmlab serve --max-batch-size")
    p.add_argument("--skip-peer", action="store_true", help="measure lmlab serve alone (no HF endpoint)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--peer", default=None, help=argparse.SUPPRESS)  # internal: run the peer server on FOLDER
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the peer: FastAPI around HF generate(), one request at a time ---------------------------------------


def run_peer(folder: str, port: int) -> None:
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    app, lock = FastAPI(), asyncio.Lock()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids = tokenizer(body["prompt"], return_tensors="pt")
        n = int(body.get("max_tokens", 16))

        async def events():
            async with lock:  # generate() serves one request at a time
                streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
                kwargs = dict(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
                thread = threading.Thread(target=model.generate, kwargs=kwargs)
                thread.start()
                pieces = iter(streamer)
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:  # the loop stays free
                    if piece:
                        yield f"data: {json.dumps({'choices': [{'text': piece, 'index': 0}]})}\n\n"
                thread.join()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- the checkpoint, the servers -------------------------------------------------------------------------


def make_checkpoint(model_name: str, vocab_size: int, work: Path) -> tuple[Path, Path]:
    """An lmlab checkpoint (random weights, a BPE tokenizer on Python's docs) and its exported HF folder."""
    import torch

    import lmlab
    from lmlab.io.checkpoint import save_checkpoint

    tokenizer = lmlab.train_tokenizer(lmlab.builtin_corpus(max_chars=300_000), kind="bpe", vocab_size=vocab_size)
    torch.manual_seed(0)
    model = lmlab.build_model(lmlab.preset(model_name, vocab_size=tokenizer.vocab_size))
    ckpt = save_checkpoint(work / "ckpt", model, tokenizer=tokenizer)
    return ckpt, lmlab.export_hf(ckpt, work / "hf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(argv)}")


# -- the clients -----------------------------------------------------------------------------------------


async def one(client, url: str, body: dict) -> tuple[float, list[float], float]:
    """(time to first token, gaps between chunks, total seconds) of one streamed request."""
    sent = time.perf_counter()
    first, stamps = None, []
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    first = first if first is not None else now - sent
                    stamps.append(now)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return first or 0.0, gaps, time.perf_counter() - sent


async def load(url: str, clients: int, new_tokens: int, extra: dict) -> dict:
    import httpx

    total = max(8, 2 * clients)
    queue = list(range(total))
    results = []

    async def worker(client):
        while queue:
            i = queue.pop()
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new_tokens, "temperature": 0, "stream": True}
            results.append(await one(client, url, {**body, **extra}))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start_time = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start_time
    ttft = sorted(r[0] for r in results)
    gaps = [g for r in results for g in r[1]]
    return {
        "clients": clients,
        "requests": total,
        "requests_s": total / wall,
        "tokens_s": total * new_tokens / wall,
        "ttft_p50_ms": 1000 * ttft[len(ttft) // 2],
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "itl_ms": 1000 * statistics.mean(gaps) if gaps else 0.0,
    }


def bench_side(name: str, argv: list[str], port: int, args, extra: dict) -> list[dict]:
    proc = start(argv, port)
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        asyncio.run(load(url, 1, 4, extra))  # warm-up
        rows = []
        for clients in args.clients:
            row = {"side": name, **asyncio.run(load(url, clients, args.new_tokens, extra))}
            print(
                f"{name:12s} {clients:3d} clients  {row['requests_s']:7.2f} req/s  {row['tokens_s']:8.1f} tok/s  "
                f"TTFT p50 {row['ttft_p50_ms']:7.1f} ms  p99 {row['ttft_p99_ms']:7.1f} ms  ITL {row['itl_ms']:6.1f} ms",
                flush=True,
            )
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.peer:
        run_peer(args.peer, args.port)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, hf = make_checkpoint(args.model, args.vocab_size, Path(tmp))
        port = free_port()
        ours = [
            sys.executable,
            "-m",
            "lmlab.cli",
            "serve",
            str(ckpt),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-queue",
            "4096",
        ]
        rows = bench_side("lmlab", ours, port, args, {"ignore_eos": True})
        if not args.skip_peer:
            port = free_port()
            peer = [sys.executable, __file__, "--peer", str(hf), "--port", str(port)]
            rows += bench_side("hf-generate", peer, port, args, {})
    by = {(r["side"], r["clients"]): r for r in rows}
    print("\nlmlab / HF generate() endpoint, output tokens/s:" if not args.skip_peer else "")
    for clients in [] if args.skip_peer else args.clients:
        ours_row, theirs = by[("lmlab", clients)], by[("hf-generate", clients)]
        print(
            f"  {clients:3d} clients: {ours_row['tokens_s'] / theirs['tokens_s']:5.2f}×  "
            f"(TTFT p99 {ours_row['ttft_p99_ms']:.0f} vs {theirs['ttft_p99_ms']:.0f} ms)"
        )
    if 1 in args.clients and 16 in args.clients:
        print(f"lmlab 16 clients / 1 client: {by[('lmlab', 16)]['tokens_s'] / by[('lmlab', 1)]['tokens_s']:.2f}×")
    result = {"model": args.model, "new_tokens": args.new_tokens, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
