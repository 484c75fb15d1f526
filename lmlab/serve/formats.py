"""OpenAI's response objects: completions and chat completions, whole or as stream chunks, with ``usage``,
``finish_reason`` and log-probabilities in the shapes OpenAI's API reference gives (the legacy
``logprobs`` object for completions, ``logprobs.content`` for chat)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from lmlab.serve.jobs import Sequence_


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompts: list[list[int]], sequences: list[Sequence_]) -> dict[str, int]:
    """Prompt tokens (each prompt once, however many sequences it has) and generated tokens."""
    prompt, completion = sum(len(p) for p in prompts), sum(len(s.tokens) for s in sequences)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def head(kind: str, response_id: str, model: str) -> dict[str, Any]:
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model}


# -- log-probabilities --------------------------------------------------------------------------------


def completion_logprobs(tokenizer, seq: Sequence_, start: int = 0, offset: int = 0) -> dict[str, Any] | None:
    """The legacy ``logprobs`` object of ``seq``'s tokens from ``start`` (``offset``: the text before them)."""
    if not seq.logprobs:
        return None
    tokens = [tokenizer.decode([t]) for t in seq.tokens[start : len(seq.logprobs)]]
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    tops = [{tokenizer.decode([i]): lp for i, lp in top} for top in seq.tops[start:]]
    return {
        "tokens": tokens,
        "token_logprobs": seq.logprobs[start:],
        "top_logprobs": tops if any(seq.tops) else None,
        "text_offset": offsets,
    }


def _entry(tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    token = tokenizer.decode([token_id])
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(tokenizer, seq: Sequence_, start: int = 0) -> dict[str, Any] | None:
    """``logprobs.content`` of ``seq``'s tokens from ``start``: each token with its ``top_logprobs``."""
    if not seq.logprobs:
        return None
    content = []
    for token_id, logprob, top in zip(seq.tokens[start:], seq.logprobs[start:], seq.tops[start:]):
        entry = _entry(tokenizer, token_id, logprob)
        entry["top_logprobs"] = [_entry(tokenizer, i, lp) for i, lp in top]
        content.append(entry)
    return {"content": content}


# -- whole responses ---------------------------------------------------------------------------------


def completion(model: str, tokenizer, prompts, sequences, echoes: list[str]) -> dict[str, Any]:
    """A ``text_completion`` object; ``echoes[i]``: the text put before sequence i's (its prompt, or '')."""
    choices = [
        {
            "index": s.index,
            "text": echoes[s.index] + s.text.text,
            "logprobs": completion_logprobs(tokenizer, s),
            "finish_reason": s.finish_reason,
        }
        for s in sequences
    ]
    return {**head("text_completion", new_id("cmpl"), model), "choices": choices, "usage": usage(prompts, sequences)}


def chat_completion(model: str, tokenizer, prompt: list[int], sequences: list[Sequence_]) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    choices = [
        {
            "index": s.index,
            "message": {"role": "assistant", "content": s.text.text},
            "logprobs": chat_logprobs(tokenizer, s),
            "finish_reason": s.finish_reason,
        }
        for s in sequences
    ]
    body = {**head("chat.completion", new_id("chatcmpl"), model), "choices": choices}
    return {**body, "usage": usage([prompt], sequences)}
