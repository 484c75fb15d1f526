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
    lmlab.finetune("runs/a", "classify", "train.jsonl", "runs/cls", valid="valid.jsonl")
    lmlab.evaluate("runs/cls", "test.jsonl", out="eval/")     # metrics with confidence intervals
    lmlab.critique("runs/cls", "report/", data="test.jsonl")  # report.html, report.json
    lmlab.export_hf("runs/a", "hf/")                          # a transformers folder, checked by logits
    lmlab.quantize("runs/a", "runs/a-int8", method="int8")    # integers + scales, compression.json
    lmlab.prune("runs/a", "runs/a-heads", method="heads", sparsity=0.25, data="data/")  # fewer heads, compression.json
    lmlab.distill("runs/a", "data/", "runs/a-half", student_init="teacher-layers")  # a half-depth student
    lmlab.serve("runs/a", port=8000)                          # OpenAI-compatible HTTP server
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmlab.version import __version__  # noqa: F401  (lmlab.__version__)

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
    "finetune": "lmlab.train.finetune",
    "TrainResult": "lmlab.train.loop",
    "DryRun": "lmlab.train.memory",
    "LoraSpec": "lmlab.config",
    "parse_lora": "lmlab.config",
    "merge_checkpoint": "lmlab.train.lora",
    "export_hf": "lmlab.io.export",
    "export_gguf": "lmlab.io.export.to_gguf",
    "export_onnx": "lmlab.io.export.to_onnx",
    "quantize": "lmlab.compress.quantization",
    "prune": "lmlab.compress.pruning",
    "distill": "lmlab.compress.distillation",
    "run_demo": "lmlab.demo",
}

_PACKAGE_VERBS = ("evaluate", "critique", "serve")  # lmlab.evaluate(...) …: callable packages

__all__ = sorted([*_EXPORTS, *_PACKAGE_VERBS])


def __getattr__(name: str) -> Any:
    import importlib

    # a package that is also its verb (lmlab.verb): the same object whatever is imported first
    if name in _PACKAGE_VERBS:
        return importlib.import_module(f"lmlab.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab' has no attribute '{name}'")


if TYPE_CHECKING:  # for editors and type checkers
    from lmlab.api import LM, Completion, Score, load
    from lmlab.compress.distillation import distill
    from lmlab.compress.pruning import prune
    from lmlab.compress.quantization import quantize
    from lmlab.config import PRESETS, LoraSpec, ModelConfig, parse_lora, preset
    from lmlab.critique import critique
    from lmlab.data import builtin_corpus, prepare, read_corpus
    from lmlab.demo import run_demo
    from lmlab.errors import LmlabError
    from lmlab.evaluate.runner import evaluate
    from lmlab.generate import GenerationConfig
    from lmlab.io.export import export_hf
    from lmlab.io.export.to_gguf import export_gguf
    from lmlab.io.export.to_onnx import export_onnx
    from lmlab.model import build_model
    from lmlab.serve.server import serve
    from lmlab.tokenizer import Tokenizer, train_tokenizer
    from lmlab.train.finetune import finetune
    from lmlab.train.loop import TrainConfig, TrainResult
    from lmlab.train.lora import merge_checkpoint
    from lmlab.train.memory import DryRun
    from lmlab.train.pretrain import pretrain
