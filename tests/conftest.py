"""Shared fixtures: a small real corpus, tokenizer and prepared data folder, made once per session."""

from __future__ import annotations

import json
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
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    run = top = 0
    for e in events:
        run += e.nbytes()
        top = max(top, run)
    return top


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
