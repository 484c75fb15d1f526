"""``lm``: a decoder's perplexity on plain text (``lmlab evaluate --task lm``); evaluation only.

Each document is scored in non-overlapping context windows, after an end-of-text token when the tokenizer has
one; the perplexity is exp of the mean negative log-likelihood per predicted token. A prepared data folder
(``lmlab prepare``) is scored on its validation tokens (its training tokens when it has no validation split), as
one document.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import ModelConfig
from lmlab.data import read_corpus
from lmlab.data.pack import PackedTokens, is_data_folder, load_manifest
from lmlab.errors import LmlabError
from lmlab.metrics import bootstrap_ci
from lmlab.tasks.base import Task, TaskData, TaskFields


class LM(Task):
    name = "lm"
    uses = ("evaluate",)
    generates = True
    archs = ("decoder",)

    def check_model(self, config: ModelConfig) -> None:
        if config.arch != "decoder":
            raise LmlabError("task lm measures a decoder's perplexity; this checkpoint is an encoder", params="task")

    def read(
        self,
        path: str | Path,
        tokenizer,
        fields: TaskFields,
        *,
        arch: str = "decoder",
        labels: list[str] | None = None,
        problem_type: str | None = None,
    ) -> TaskData:
        if is_data_folder(path):  # a prepared folder: its validation tokens (its training tokens if it has none)
            return _prepared(path, tokenizer)
        docs = read_corpus(path, text_field=fields.text_field)
        eos = tokenizer.eos_id
        ids = [([eos] if eos is not None else []) + tokenizer.encode(doc) for doc in docs]
        if not any(len(row) > 1 for row in ids):  # a token predicted needs one before it
            raise LmlabError(f"{path}: no text to score")
        return TaskData("lm", {"input_ids": ids}, 0, raw=docs)

    @torch.no_grad()
    def predict(
        self, model, tokenizer, data, *, batch_size, device, pad_id=0, max_new_tokens=128, num_beams=1
    ) -> list[list[tuple[float, int]]]:
        """Each document's windows: the summed negative log-likelihood and the number of tokens each predicts."""
        T = model.config.block_size
        out = []
        for ids in data.features["input_ids"]:
            windows = []
            for start in range(0, len(ids) - 1, T):
                window = torch.tensor([ids[start : start + T + 1]], device=device)
                if window.shape[1] < 2:
                    break
                logits = model(window[:, :-1]).float()
                nll = torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
                windows.append((nll, window.shape[1] - 1))
            out.append(windows)
        return out

    def evaluate(
        self, data: TaskData, predictions: list[list[tuple[float, int]]], n_resamples: int
    ) -> tuple[dict[str, Any], list[dict]]:
        """The perplexity, with a 95% confidence interval from resampling the context windows (a block
        bootstrap: a prepared folder is one long document), and a row per document."""
        rows = []
        for i, windows in enumerate(predictions):
            nll, n = sum(w[0] for w in windows), sum(w[1] for w in windows)
            if n:
                rows.append({"index": i, "tokens": n, "nll": nll, "perplexity": math.exp(nll / n)})
        total_nll, total_tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
        nlls, counts = (np.array([w[i] for doc in predictions for w in doc], dtype=float) for i in (0, 1))
        ci = bootstrap_ci(lambda a, b: math.exp(a.sum() / b.sum()), nlls, counts, n_resamples=n_resamples)
        result = {
            "perplexity": math.exp(total_nll / total_tokens),
            "nll_per_token": total_nll / total_tokens,
            "tokens": total_tokens,
            "documents": len(rows),
            "ci": {"perplexity": {"low": ci["low"], "high": ci["high"]}},
        }
        return result, rows


def _prepared(path: str | Path, tokenizer) -> TaskData:
    """The tokens of a prepared data folder's valid split (else train) as one document."""
    splits = load_manifest(path).get("splits", {})
    tokens = PackedTokens(path, "valid" if splits.get("valid", {}).get("shards") else "train")
    if tokens.tokenizer_sha256 != tokenizer.sha256:
        raise LmlabError(f"{path} was prepared with another tokenizer than the checkpoint's")
    ids = tokens.window(0, len(tokens)).tolist()
    if len(ids) < 2:
        raise LmlabError(f"{path}: no tokens to score")
    return TaskData("lm", {"input_ids": [ids]}, 0, raw=[f"{path} ({tokens.split})"])
