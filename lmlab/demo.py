"""``lmlab demo``: the whole pipeline on text every Python install already has, offline, in minutes.

corpus (Python's own documentation) → byte-level BPE tokenizer → packed shards (with a few planted
secrets, "canaries") → pretraining → generation → fine-tuning a classifier (is a passage from the
language reference or from a library docstring?) → its evaluation with confidence intervals → a
critique report of each model (the language model: perplexity, pair bias, safety, memorisation of
the canaries, efficiency; the classifier: metrics, calibration, attributions, counterfactuals,
robustness).
"""

from __future__ import annotations

import inspect
import math
import random
import time
from pathlib import Path

from lmlab.api import load
from lmlab.config import write_jsonl_atomic
from lmlab.critique import critique
from lmlab.data import PackedTokens, builtin_corpus, load_manifest, unigram_perplexity
from lmlab.data.pack import is_data_folder, prepare
from lmlab.evaluate.runner import evaluate
from lmlab.io.checkpoint import latest_checkpoint
from lmlab.io.outputs import check_output, marker_kind, write_marker
from lmlab.tokenizer import train_tokenizer
from lmlab.train.finetune import finetune
from lmlab.train.pretrain import pretrain

DEMO_PROMPTS = ("The for statement", "A dictionary is", "Return the number of", "Exceptions are")


def _pretrain(out: Path, model: str, max_steps: int, seq_len: int, micro_batch_size: int, **flags: bool):
    """The demo's pretraining run (``flags``: progress, overwrite), resumed when an earlier demo left one. Its
    validation reads the whole valid split (non-overlapping windows), the tokens the unigram baseline is scored on."""
    valid_windows = len(PackedTokens(out / "data", "valid")) // seq_len
    return pretrain(
        model,
        out / "data",
        out / "run",
        resume=True,
        max_steps=max_steps,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        lr=2e-3,
        warmup_steps=max(1, max_steps // 20),
        eval_interval=max(1, max_steps // 4),
        eval_batches=max(1, math.ceil(valid_windows / micro_batch_size)),
        log_interval=10,
        **flags,
    )


def run_demo(
    out: str | Path = "lmlab-demo",
    *,
    max_steps: int = 600,
    model: str = "llama-mini",
    max_chars: int = 3_000_000,
    vocab_size: int = 4096,
    seq_len: int = 128,
    micro_batch_size: int = 16,
    finetune_steps: int = 150,
    critique_examples: int = 200,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run every stage into ``out`` and print where each result is; returns those paths and figures.
    ``out`` must be new, empty or an earlier demo's folder (``overwrite``: any folder; lmlab writes its
    files there and deletes nothing else).

    Args:
        out: output folder
        max_steps: pretraining steps
        model: model preset
        max_chars: characters of the embedded corpus to use
        vocab_size: tokenizer vocabulary size
        seq_len: pretraining sequence length
        micro_batch_size: pretraining sequences per step
        finetune_steps: fine-tuning steps of the demo classifier
        critique_examples: examples each critique lens reads at most
        progress: show progress bars and messages
        overwrite: write into any folder
    """
    out = check_output(out, "demo folder", _is_demo, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo")
    stage = _Stages()
    docs, corpus, heldout = _corpus(out, max_chars, stage)
    _tokenizer_and_shards(out, docs, corpus, vocab_size, stage, progress=progress, overwrite=overwrite)
    stage(f"4/9 pretraining {model}, {max_steps} steps")
    result = _pretrain(out, model, max_steps, seq_len, micro_batch_size, progress=progress, overwrite=overwrite)
    perplexity = _print_perplexity(result.val_loss, out / "data")
    stage("5/9 generation: greedy, beam search and nucleus sampling")
    lm = load(out / "run", device="cpu")
    samples = _samples(lm, out / "samples.txt")
    tuned, metrics, test_file = _classifier(out, lm.path, finetune_steps, stage, progress=progress, overwrite=overwrite)
    stage("8/9 critique of the language model")
    common = dict(progress=False, max_examples=critique_examples, seed=0, overwrite=overwrite)
    lm_report = critique(
        lm.path, out / "critique" / "lm", text=heldout, train_data=out / "data", options={"samples": 3}, **common
    )
    _print_findings(lm_report)
    stage("9/9 critique of the classifier")
    cls_report = critique(
        tuned.best_checkpoint, out / "critique" / "classifier", data=test_file, options={"n_resamples": 1000}, **common
    )
    _print_findings(cls_report)
    stage("done")
    made = {
        "corpus": corpus,
        "tokenizer": out / "tokenizer",
        "data": out / "data",
        "checkpoint": lm.path,
        "log": result.log_file,
        "loss_curve": out / "run" / "loss.png",
        "samples": samples,
        "classifier": tuned.best_checkpoint,
        "evaluation": out / "classify" / "eval" / "metrics.json",
        "critique LM": lm_report["_paths"]["html"],
        "critique cls": cls_report["_paths"]["html"],
    }
    for what, path in made.items():
        print(f"{what:>11}: {path}")
    return {
        **{k: str(v) for k, v in made.items()},
        "val_loss": result.val_loss,
        **perplexity,
        "accuracy": metrics["accuracy"],
        "seconds": stage.seconds(),
    }


class _Stages:
    """Prints each stage's title with the seconds since the demo started."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, title: str) -> None:
        print(f"\n== {title} ({self.seconds():.0f}s)", flush=True)


def _corpus(out: Path, max_chars: int, stage: _Stages) -> tuple[list[str], Path, Path]:
    """Stage 1: Python's documentation into corpus.jsonl, every 50th document held out (heldout.jsonl)."""
    stage("1/9 corpus: Python's own documentation (pydoc topics and module docstrings)")
    docs = builtin_corpus(max_chars=max_chars)
    heldout_docs = docs[::50]  # never trained on: the critique's perplexity and robustness text
    docs = [d for i, d in enumerate(docs) if i % 50]
    corpus, heldout = out / "corpus.jsonl", out / "heldout.jsonl"
    write_jsonl_atomic(corpus, ({"text": d} for d in docs))
    write_jsonl_atomic(heldout, ({"text": d} for d in heldout_docs))
    print(
        f"{len(docs):,} documents, {sum(map(len, docs)):,} characters → {corpus} (+ {len(heldout_docs)} held out → "
        f"{heldout})"
    )
    return docs, corpus, heldout


def _tokenizer_and_shards(
    out: Path, docs: list[str], corpus: Path, vocab_size: int, stage: _Stages, *, progress: bool, overwrite: bool
) -> None:
    """Stages 2 and 3: a byte-level BPE tokenizer, then token shards with planted canaries."""
    stage(f"2/9 tokenizer: byte-level BPE, {vocab_size} tokens")
    tokenizer = train_tokenizer(docs, kind="bpe", vocab_size=vocab_size)
    tokenizer.save(out / "tokenizer", overwrite=overwrite)
    print(f"→ {out / 'tokenizer' / 'tokenizer.json'}")
    stage("3/9 packing into token shards, with 4 canaries planted 50 times each")
    # The Secret Sharer's test: random secrets in the training text; the critique measures how far the model memorised
    # them
    canaries = {"n": 4, "repeats": 50, "digits": 4, "template": "my locker code is {}"}
    manifest = prepare(
        corpus, out / "tokenizer", out / "data", show_progress=progress, canaries=canaries, overwrite=overwrite
    )
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['tokens']:,} tokens")


def _print_perplexity(val_loss: float | None, data: Path) -> dict[str, float]:
    """The language model's validation perplexity beside the unigram baseline's on the same split (what a model
    that knows each token's frequency but no context scores) and a uniform guess's (the vocabulary size)."""
    if val_loss is None:
        return {}
    figures = {"val_ppl": math.exp(val_loss), "unigram_ppl": unigram_perplexity(data)}
    print(
        f"validation perplexity {figures['val_ppl']:.1f} (loss {val_loss:.3f}) on {len(PackedTokens(data, 'valid')):,} "
        f"tokens; a unigram model of the train split's token frequencies: {figures['unigram_ppl']:.1f}; a uniform "
        f"guess: {load_manifest(data)['vocab_size']:,}"
    )
    return figures


def _samples(lm, path: Path) -> Path:
    """Stage 5: greedy, beam and sampled continuations of :data:`DEMO_PROMPTS`, printed and written to ``path``."""
    lines = []
    for prompt in DEMO_PROMPTS:
        # a small model loops on its likeliest tokens (blank lines here): forbid repeated trigrams
        greedy = lm.generate(prompt, max_new_tokens=40, strategy="greedy", no_repeat_ngram_size=3)
        beam = lm.generate(prompt, max_new_tokens=40, strategy="beam", num_beams=4, no_repeat_ngram_size=3)
        sampled = lm.generate(
            prompt, max_new_tokens=40, strategy="sample", temperature=0.8, top_p=0.95, repetition_penalty=1.2, seed=0
        )
        lines += [f"[greedy] {prompt}{greedy}", f"[beam×4] {prompt}{beam}", f"[sample] {prompt}{sampled}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return path


def _classifier(out: Path, base: Path, finetune_steps: int, stage: _Stages, *, progress: bool, overwrite: bool):
    """Stages 6 and 7: fine-tune the language model into a classifier, then evaluate it on held-out passages."""
    stage("6/9 fine-tuning a classifier: language reference or library docstring?")
    train_file, test_file = _classification_files(builtin_corpus(), out / "classify")  # the whole corpus: both kinds
    run_dir = out / "classify" / "run"
    tuned = finetune(
        base,
        "classify",
        train_file,
        run_dir,
        valid=test_file,
        max_length=64,
        max_steps=finetune_steps,
        resume=latest_checkpoint(run_dir) is not None,
        micro_batch_size=16,
        lr=1e-3,
        warmup_steps=10,
        eval_interval=max(1, finetune_steps // 3),
        log_interval=10,
        progress=progress,
        tensorboard=False,
        overwrite=overwrite,
    )
    stage("7/9 evaluation of the classifier on held-out passages")
    metrics = evaluate(
        tuned.best_checkpoint,
        test_file,
        out=out / "classify" / "eval",
        max_length=64,
        n_resamples=1000,
        overwrite=overwrite,
    )
    ci = metrics["ci"]["accuracy"]
    print(
        f"accuracy {metrics['accuracy']:.3f} (95% CI {ci['low']:.3f}–{ci['high']:.3f}), macro-F1 "
        f"{metrics['f1_macro']:.3f}, "
        f"ECE {metrics['calibration']['ece']:.3f} on "
        f"{len(metrics['confusion_matrix']) and sum(map(sum, metrics['confusion_matrix']))} passages"
    )
    return tuned, metrics, test_file


def _is_demo(folder: Path) -> bool:
    """A folder an earlier ``lmlab demo`` made: its marker, or (before the marker) its corpus and data folder."""
    return marker_kind(folder) == "demo" or ((folder / "corpus.jsonl").is_file() and is_data_folder(folder / "data"))


def _print_findings(report: dict) -> None:
    """What each lens found worrying (or that it was skipped, and why), one line each."""
    for name, lens in report["lenses"].items():
        if "skipped" in lens:
            print(f"{name:>12}: skipped ({lens['skipped'][:100]}…)")
            continue
        worst = [f for f in lens["findings"] if f["level"] in ("bad", "warn")]
        first = worst[0] if worst else next((f for f in lens["findings"]), None)
        print(
            f"{name:>12}: "
            + (f"{first['level']}: {first['text'][:150]}" if first else "ran")
            + (f" (+{len(worst) - 1} more)" if len(worst) > 1 else "")
        )
    print(f"report: {report['_paths']['html']}")


def _classification_files(docs: list[str], folder: Path) -> tuple[Path, Path]:
    """A labelled set made from the corpus: one passage (up to 300 characters from the middle of a
    document) per document, labelled by where the document comes from; every fifth one held out."""
    from pydoc_data.topics import topics

    reference = {inspect.cleandoc(text) for text in topics.values()}
    rows = []
    for doc in docs:
        middle = max(0, len(doc) // 2 - 150)
        rows.append({"text": doc[middle : middle + 300], "label": "reference" if doc in reference else "library"})
    random.Random(0).shuffle(rows)
    train = write_jsonl_atomic(folder / "train.jsonl", [r for i, r in enumerate(rows) if i % 5])
    return train, write_jsonl_atomic(folder / "test.jsonl", rows[::5])
