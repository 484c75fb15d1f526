"""Evaluation: task metrics, perplexity, bootstrap confidence intervals and calibration."""

from lmlab.metrics import (
    HEADLINES,
    bootstrap_ci,
    calibration,
    classification_metrics,
    multilabel_metrics,
    perplexity,
    regression_metrics,
    reliability_diagram,
    seq2seq_metrics,
    squad_metrics,
    tagging_metrics,
    with_cis,
)
from lmlab.verb import make_callable

__all__ = [
    "HEADLINES",
    "bootstrap_ci",
    "calibration",
    "classification_metrics",
    "multilabel_metrics",
    "perplexity",
    "regression_metrics",
    "reliability_diagram",
    "seq2seq_metrics",
    "squad_metrics",
    "tagging_metrics",
    "with_cis",
]

make_callable(__name__, "lmlab.evaluate.runner", "evaluate")  # lmlab.evaluate(checkpoint, data, …) is the verb
