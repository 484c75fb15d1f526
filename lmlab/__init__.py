"""lmlab: train, generate, evaluate and critique Transformer language models.

The public surface, in the order a pipeline uses it::

    import lmlab
    docs = lmlab.read_corpus("corpus/")                       # text files, folders, globs
    tok = lmlab.train_tokenizer(docs, kind="bpe", vocab_size=8000)
    tok.save("tok/")
    lmlab.prepare("corpus/", "tok/", "data/")                 # token shards + manifest
    lmlab.pretrain("gpt2-tiny", "data/", "runs/a", max_steps=2000)
    lm = lmlab.load("runs/a")                                 # best checkpoint of the run
    print(lm.generate("Once", max_new_tokens=50))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imports are lazy so that `lmlab --help` and light uses do not pay for torch up front.
_EXPORTS = {
    "LmlabError": "lmlab.errors",
    "ModelConfig": "lmlab.config",
    "PRESETS": "lmlab.config",
    "preset": "lmlab.config",
    "build_model": "lmlab.model",
    "read_corpus": "lmlab.data",
    "builtin_corpus": "lmlab.data",
    "prepare": "lmlab.data",
    "Tokenizer": "lmlab.tokenizer",
    "train_tokenizer": "lmlab.tokenizer",
    "pretrain": "lmlab.train.pretrain",
    "TrainConfig": "lmlab.train.loop",
    "load": "lmlab.api",
    "LM": "lmlab.api",
    "Completion": "lmlab.api",
    "Score": "lmlab.api",
    "GenerationConfig": "lmlab.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab' has no attribute '{name}'")


if TYPE_CHECKING:  # for editors and type checkers
    from lmlab.api import LM, load
    from lmlab.config import PRESETS, ModelConfig, preset
    from lmlab.data import builtin_corpus, prepare, read_corpus
    from lmlab.errors import LmlabError
    from lmlab.model import build_model
    from lmlab.tokenizer import Tokenizer, train_tokenizer
    from lmlab.train.loop import TrainConfig
    from lmlab.train.pretrain import pretrain
