"""Shared fixtures: a small real corpus, tokenizer and prepared data folder, made once per session."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a busy machine extra threads spin against other
# processes (10-40x slower training tests): one thread per test process.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def lmlab_cache(tmp_path_factory):
    """lmlab's cache (parity-check records) in a folder of this session, not the user's ~/.cache."""
    import os

    before = os.environ.get("LMLAB_CACHE")
    os.environ["LMLAB_CACHE"] = str(tmp_path_factory.mktemp("lmlab-cache"))
    yield
    if before is None:
        os.environ.pop("LMLAB_CACHE", None)
    else:
        os.environ["LMLAB_CACHE"] = before


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    from lmlab.data import builtin_corpus

    folder = tmp_path_factory.mktemp("corpus")
    docs = builtin_corpus(max_chars=120_000)
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_file, tmp_path_factory) -> Path:
    from lmlab.data import read_corpus
    from lmlab.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(read_corpus(corpus_file), kind="bpe", vocab_size=512).save(folder)
    return folder


@pytest.fixture(scope="session")
def other_tokenizer_dir(corpus_file, tmp_path_factory) -> Path:
    """A second tokenizer (fewer ids than ``tokenizer_dir``'s): what a swapped tokenizer.json holds."""
    from lmlab.data import read_corpus
    from lmlab.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("other-tok")
    train_tokenizer(read_corpus(corpus_file), kind="bpe", vocab_size=300).save(folder)
    return folder


@pytest.fixture(scope="session")
def data_dir(corpus_file, tokenizer_dir, tmp_path_factory) -> Path:
    from lmlab.data.pack import prepare

    folder = tmp_path_factory.mktemp("data")
    prepare(corpus_file, tokenizer_dir, folder, valid_fraction=0.1, show_progress=False)
    return folder


def cpu_peak_bytes(fn) -> int:
    """The highest point, above where it started, of the CPU memory PyTorch allocates while ``fn()`` runs
    (the profiler's allocation events, in order): an oracle for memory tests that needs no GPU."""
    from lmlab.device import peak_memory

    return peak_memory(fn, torch.device("cpu"))


def crash_windows_at(monkeypatch, step: int) -> None:
    """Make the training data raise KeyboardInterrupt when step ``step`` (0-based) asks for its batch: the process
    dies mid-run. ``monkeypatch.undo()`` restores it."""
    from lmlab.train.data import EpochWindows

    real_call = EpochWindows.__call__

    def crash(self, at, micro_step):
        if at == step:
            raise KeyboardInterrupt
        return real_call(self, at, micro_step)

    monkeypatch.setattr(EpochWindows, "__call__", crash)


TINY_BART = dict(  # a tiny encoder–decoder that HF holds exactly (lmlab exports encoder–decoders as BART)
    arch="seq2seq",
    norm="layernorm",
    norm_eps=1e-5,
    mlp="gelu",
    gelu_approximate="none",
    position="learned",
    bias=True,
    tie_embeddings=True,
    norm_placement="post",
    embedding_norm=True,
    scale_embedding=True,
    n_layer=2,
    n_decoder_layer=2,
    n_head=4,
    n_embd=32,
    intermediate_size=64,
    block_size=64,
)


TINY_TRAIN = dict(
    micro_batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_batches=2, progress=False, tensorboard=False
)


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory) -> Path:
    """A gpt2-tiny run of 30 steps: enough for checkpoints, logs and generation tests."""
    from lmlab.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("run") / "run"
    pretrain("gpt2-tiny", data_dir, out, max_steps=30, eval_interval=10, log_interval=5, **TINY_TRAIN)
    return out


# -- a sentiment classifier (critique tests) ----------------------------------------------------------------

GOOD = ["great", "wonderful", "superb", "lovely"]
BAD = ["awful", "terrible", "boring", "dreadful"]
FILLER = ["the", "film", "was", "really", "a", "plot", "and", "acting", "quite", "story"]


def sentiment(n, seed, *, flip_group=None):
    """Keyword sentiment with a group column; ``flip_group``'s gold labels are inverted (the model cannot
    know), which plants a slice whose accuracy is near 0 and an over-confident model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=5)
        words.insert(rng.randrange(6), rng.choice(GOOD if label == "pos" else BAD))
        group = "a" if i % 2 else "b"
        if group == flip_group:
            label = "neg" if label == "pos" else "pos"
        rows.append({"text": " ".join(words), "label": label, "group": group})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """A tiny gpt2 sentiment classifier fine-tuned on :func:`sentiment` rows, its test files (``flipped``: group b's
    gold labels inverted) and its folder."""
    from lmlab.config import preset
    from lmlab.io.checkpoint import save_checkpoint
    from lmlab.model import build_model
    from lmlab.tokenizer import train_tokenizer
    from lmlab.train.finetune import finetune

    folder = tmp_path_factory.mktemp("crit")
    tok = train_tokenizer([r["text"] for r in sentiment(200, 0)], kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    base = save_checkpoint(folder / "base", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size)), tokenizer=tok)
    train = write_jsonl(folder / "train.jsonl", sentiment(300, 1))
    args = dict(TINY_TRAIN, micro_batch_size=16, lr=2e-3, warmup_steps=5, eval_interval=80, log_interval=20, seed=0)
    result = finetune(base, "classify", train, folder / "run", max_length=24, max_steps=80, **args)
    return {
        "run": folder / "run",
        "ckpt": result.last_checkpoint,
        "test": write_jsonl(folder / "test.jsonl", sentiment(120, 2)),
        "flipped": write_jsonl(folder / "flipped.jsonl", sentiment(120, 2, flip_group="b")),
        "folder": folder,
    }
