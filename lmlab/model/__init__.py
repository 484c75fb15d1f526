"""Models built from one set of blocks; :func:`build_model` picks the class for ``config.arch``."""

from __future__ import annotations

from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.blocks import KVCache
from lmlab.model.decoder import DecoderLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {"decoder": DecoderLM}


def build_model(config: ModelConfig) -> nn.Module:
    return MODEL_CLASSES[config.arch](config)


__all__ = ["DecoderLM", "KVCache", "ModelConfig", "build_model"]
