"""lm-evaluation-harness on CPU: lmlab's backend (``--model lmlab``) against lm-eval's own ``hf`` model, same weights.

    python bench/harness.py [--model gpt2-mini] [--vocab-size 4096] [--steps 0] [--num-fewshot 3]
        [--batch-size 8] [--rounds 3] [--threads N] [--json out.json]
    python bench/harness.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf    # a trained model instead

Builds a checkpoint of ``--model`` (a BPE tokenizer of ``--vocab-size`` trained on lmlab's built-in corpus;
``--steps`` of pretraining on it, 0: untrained weights, seed 0) — or takes ``--checkpoint`` (a checkpoint, run,
Hugging Face folder or GGUF file) — exports it with ``lmlab.export_hf`` and loads it in both backends. Then, per
request kind, the requests lm-eval builds for the example tasks (examples/harness: ``lmlab_mc`` → loglikelihood,
``lmlab_gen`` → generate_until; ``--num-fewshot`` examples per prompt) are answered by each backend in ``--rounds``
alternating rounds (lmlab first in even rounds); the best time of each is reported, with the ratio hf ÷ lmlab (above
1: lmlab is faster) and a check that both gave the same answers. Model loading and task building are not timed.
Rolling log-likelihoods (``loglikelihood_rolling``) are timed on the test prompts of both tasks joined into long
texts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TASKS = ROOT / "examples" / "harness"


def build(args, folder: Path) -> tuple[Path, Path]:
    """An lmlab checkpoint (or run) of ``args.model``, or ``args.checkpoint``, and its Hugging Face export."""
    import lmlab

    if args.checkpoint:
        return Path(args.checkpoint), lmlab.export_hf(args.checkpoint, folder / "hf")
    from lmlab.config import preset
    from lmlab.data import builtin_corpus
    from lmlab.io.checkpoint import save_checkpoint
    from lmlab.model import build_model
    from lmlab.tokenizer import train_tokenizer

    docs = builtin_corpus()
    tok = train_tokenizer(docs, kind="bpe", vocab_size=args.vocab_size)
    torch.manual_seed(0)
    path = save_checkpoint(folder / "base", build_model(preset(args.model, vocab_size=tok.vocab_size)), tokenizer=tok)
    if args.steps:
        corpus = folder / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        lmlab.prepare(corpus, path, folder / "data", show_progress=False)
        lmlab.pretrain(args.model, folder / "data", folder / "run", max_steps=args.steps, progress=False)
        path = folder / "run"
    return path, lmlab.export_hf(path, folder / "hf")


def requests(num_fewshot: int) -> dict[str, list]:
    """The Instances lm-eval builds for the example tasks, by request kind."""
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = {}
    for name, kind in (("lmlab_mc", "loglikelihood"), ("lmlab_gen", "generate_until")):
        task = get_task_dict([name], manager)[name]
        task.set_config(key="num_fewshot", value=num_fewshot)
        task.build_all_requests(rank=0, world_size=1)
        out[kind] = list(task.instances)
    texts = [r.args[0] for r in out["loglikelihood"][::4]]
    joined = ["\n\n".join(texts[i : i + 6]) for i in range(0, len(texts), 6)]
    out["loglikelihood_rolling"] = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(joined)
    ]
    return out


def timed(lm, kind: str, reqs: list) -> tuple[float, list]:
    start = time.perf_counter()
    answers = getattr(lm, kind)(reqs, disable_tqdm=True)
    return time.perf_counter() - start, answers


def same(kind: str, a: list, b: list) -> bool:
    if kind == "generate_until":
        return a == b
    if kind == "loglikelihood":
        return all(abs(x[0] - y[0]) <= 1e-4 and x[1] == y[1] for x, y in zip(a, b))
    return all(abs(x - y) <= 1e-3 for x, y in zip(a, b))


def run(args) -> dict:
    from lm_eval.models.huggingface import HFLM

    from lmlab.evaluate.harness import LmlabLM

    with tempfile.TemporaryDirectory() as tmp:
        path, hf_folder = build(args, Path(tmp))
        models = {
            "lmlab": LmlabLM(pretrained=str(path), device="cpu", batch_size=args.batch_size),
            "hf": HFLM(pretrained=str(hf_folder), device="cpu", batch_size=args.batch_size),
        }
        reqs = requests(args.num_fewshot)
        rows = {}
        for kind, items in reqs.items():
            best, answers = {"lmlab": float("inf"), "hf": float("inf")}, {}
            for r in range(args.rounds):
                for name in ("lmlab", "hf") if r % 2 == 0 else ("hf", "lmlab"):
                    seconds, answers[name] = timed(models[name], kind, items)
                    best[name] = min(best[name], seconds)
            rows[kind] = dict(
                requests=len(items), **{f"{k}_s": v for k, v in best.items()}, ratio=best["hf"] / best["lmlab"]
            )
            rows[kind]["same_answers"] = same(kind, answers["lmlab"], answers["hf"])
        params, vocab = models["lmlab"].lm.model.num_params(), models["lmlab"].lm.model.config.vocab_size
    return dict(rows=rows, params=params, vocab=vocab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-mini")
    p.add_argument("--checkpoint", default=None, help="a trained model to load instead of building --model")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (0: untrained weights)")
    p.add_argument("--num-fewshot", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    import lm_eval
    import transformers

    print(
        f"{args.checkpoint or args.model}: {result['params']:,} parameters, vocab {result['vocab']}, "
        f"{args.num_fewshot}-shot, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads, best of {args.rounds}"
    )
    print(f"{'request kind':<22} {'requests':>8} {'lmlab s':>9} {'hf s':>9} {'hf/lmlab':>9}  same answers")
    for kind, row in result["rows"].items():
        print(
            f"{kind:<22} {row['requests']:>8} {row['lmlab_s']:>9.3f} {row['hf_s']:>9.3f} {row['ratio']:>8.2f}×  "
            f"{row['same_answers']}"
        )
    if args.json:
        meta = dict(
            date=time.strftime("%Y-%m-%d"),
            machine=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            lm_eval=lm_eval.__version__,
            argv=sys.argv,
            config=vars(args) | {"json": str(args.json)},
        )
        args.json.write_text(json.dumps(dict(meta, **result), indent=2))


if __name__ == "__main__":
    main()
