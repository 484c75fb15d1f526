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

__all__ = [
    "HEADLINES", "bootstrap_ci", "calibration", "classification_metrics", "multilabel_metrics", "perplexity",
    "regression_metrics", "reliability_diagram", "seq2seq_metrics", "squad_metrics", "tagging_metrics", "with_cis",
]
