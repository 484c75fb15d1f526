"""Text generation: logits processors, stopping rules, the decoding loops and their options."""

from lmlab.generate.config import STRATEGIES, GenerationConfig
from lmlab.generate.loop import BeamSearch, Hypothesis, Step, decode
from lmlab.generate.processors import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
)
from lmlab.generate.stopping import StopStrings, cut_at_stop

__all__ = [
    "STRATEGIES",
    "GenerationConfig",
    "BeamSearch",
    "Hypothesis",
    "Step",
    "decode",
    "LogitsProcessor",
    "LogitsProcessorList",
    "MinNewTokens",
    "MinP",
    "NoRepeatNGram",
    "PresenceFrequencyPenalty",
    "RepetitionPenalty",
    "Temperature",
    "TopK",
    "TopP",
    "TypicalP",
    "StopStrings",
    "cut_at_stop",
]
