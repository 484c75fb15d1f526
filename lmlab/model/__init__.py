"""Models built from one set of blocks; :func:`build_model` picks the class for ``config.arch``."""

from __future__ import annotations

from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.blocks import KVCache
from lmlab.model.decoder import DecoderLM
from lmlab.model.encoder import EncoderLM
from lmlab.model.seq2seq import Seq2SeqLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {"decoder": DecoderLM, "encoder": EncoderLM, "seq2seq": Seq2SeqLM}


def build_model(config: ModelConfig) -> nn.Module:
    return MODEL_CLASSES[config.arch](config)


__all__ = ["DecoderLM", "EncoderLM", "KVCache", "ModelConfig", "Seq2SeqLM", "build_model"]
