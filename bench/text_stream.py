"""Streaming detokenization: lmlab's ``TextStream`` against decoding every id on every step and HF's ``TextStreamer``.

    python bench/text_stream.py [--tokens 4000] [--vocab-size 512] [--rounds 3] [--json out.json]

A byte-level BPE tokenizer of ``--vocab-size`` is trained on lmlab's built-in corpus; the first ``--tokens`` ids
of that corpus (documents joined by newlines; a few words of other scripts and emoji mixed in, so characters are
split across ids) are streamed one id at a time, as ``LM.stream`` and the server push them, by

- ``redecode``: what ``TextStream`` did before: decode every id so far on every step, then cut at stop strings
  (O(T²) ids decoded);
- ``hf``: transformers' ``TextStreamer`` (it decodes the ids since the last newline on every step, so its cost
  grows with the length of a line; it knows no stop strings);
- ``lmlab``: ``TextStream`` now (a window of a few ids per step, stop strings looked for in the new text only).

Both lmlab streams look for two stop strings that never occur. Each runs ``--rounds`` times, alternating the
order; the best time of each is reported, with ids decoded per id streamed and the ratios against lmlab
(above 1: lmlab is faster). The texts of all three are checked to be the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STOP = ["<|im_end|>", "\n\nUser:"]
MIXED = " café 日本語 🙂 naïve 👍🏽 "


def corpus_ids(tokenizer, tokens: int) -> list[int]:
    """The first ``tokens`` ids of the built-in corpus, with multi-byte words mixed in every few lines."""
    from lmlab.data import builtin_corpus

    lines = "\n".join(builtin_corpus(max_chars=400_000)).split("\n")
    text = "\n".join(line + (MIXED if i % 3 == 0 else "") for i, line in enumerate(lines))
    ids = tokenizer.encode(text)[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"the corpus has only {len(ids)} ids")
    return ids


def redecode(decode, ids: list[int]) -> str:
    """Every id so far decoded on every step (TextStream before), the same holding back of text."""
    from lmlab.generate.stopping import cut_at_stop, held_back

    shown, pieces = 0, []
    for n in range(1, len(ids) + 1):
        text, _ = cut_at_stop(decode(ids[:n]), STOP)
        if text.endswith("\ufffd"):
            continue
        limit = len(text) - held_back(text, STOP)
        pieces.append(text[shown:limit] if limit > shown else "")
        shown = max(shown, limit)
    return "".join(pieces) + text[shown:]


def lmlab_stream(decode, ids: list[int]) -> str:
    from lmlab.generate.stopping import TextStream

    stream, tokens, pieces = TextStream(decode, STOP), [], []
    for token in ids:  # one growing list, as LM.stream and the server push it
        tokens.append(token)
        pieces.append(stream.push(tokens))
    return "".join(pieces) + stream.flush()


def hf_stream(decode, ids: list[int]) -> str:
    import torch
    from transformers import TextStreamer

    class Collect(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)

    pieces: list[str] = []

    class Decoder:  # TextStreamer calls tokenizer.decode(ids, **decode_kwargs)
        def decode(self, tokens, **kw):
            return decode([tokens] if isinstance(tokens, int) else tokens)  # one id: after a CJK character

    streamer = Collect(Decoder())
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return "".join(pieces)


def run(args) -> dict:
    from lmlab.data import builtin_corpus
    from lmlab.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(builtin_corpus(max_chars=120_000), kind="bpe", vocab_size=args.vocab_size)
    ids = corpus_ids(tokenizer, args.tokens)
    ways = {"redecode": redecode, "hf": hf_stream, "lmlab": lmlab_stream}
    best, decoded, texts = {}, {}, {}
    for r in range(args.rounds):
        for name in ways if r % 2 == 0 else reversed(list(ways)):
            count = [0]

            def decode(tokens, count=count):
                count[0] += len(tokens)
                return tokenizer.decode(tokens)

            start = time.perf_counter()
            texts[name] = ways[name](decode, ids)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            decoded[name] = count[0] / len(ids)
    whole = tokenizer.decode(ids)
    same = {name: text == whole for name, text in texts.items()}
    return dict(tokens=len(ids), vocab_size=args.vocab_size, seconds=best, ids_decoded_per_id=decoded, same=same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args)
    lm = result["seconds"]["lmlab"]
    print(f"{result['tokens']} ids streamed one at a time (BPE, vocabulary {result['vocab_size']})")
    print(f"{'stream':<10}{'ms total':>10}{'µs/id':>9}{'ids decoded/id':>16}{'÷ lmlab':>9}  same text")
    for name, seconds in result["seconds"].items():
        per = result["ids_decoded_per_id"][name]
        ratio = seconds / lm
        print(
            f"{name:<10}{seconds * 1e3:>10.1f}{seconds / result['tokens'] * 1e6:>9.1f}{per:>16.1f}{ratio:>9.2f}  ",
            end="",
        )
        print(result["same"][name])
    if args.json:
        result.update(python=platform.python_version(), command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"))
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
