"""``lmlab serve``: load a checkpoint and serve it over OpenAI's HTTP API with uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lmlab.errors import LmlabError

logger = logging.getLogger(__name__)


def serve(
    checkpoint: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch_size: int = 16,
    max_queue: int = 256,
    max_prompt_tokens: int | None = None,
    max_new_tokens: int | None = None,
    timeout: float | None = 600.0,
    device: str = "auto",
    compile: bool = False,
    draft: str | None = None,
    num_draft_tokens: int = 5,
    verify: bool = True,
) -> int:
    """Serve ``checkpoint`` (an lmlab run or checkpoint, a LoRA run, a Hugging Face folder) until interrupted.

    Args:
        checkpoint: the model to serve
        host: the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
        port: the TCP port
        api_key: require ``Authorization: Bearer KEY`` on every /v1 request (default: $LMLAB_API_KEY, else none)
        model_name: the model's id in the API (default: the checkpoint folder's name)
        max_batch_size: sequences decoded together; more wait in the queue
        max_queue: sequences that may wait for a place in the batch; past that a request gets 429 with Retry-After
        max_prompt_tokens: the longest prompt accepted, in tokens (default: the context window less one)
        max_new_tokens: the most tokens one sequence may generate (default: what the context window leaves)
        timeout: seconds a request may take; then it ends with finish_reason "length" (None: no limit)
        device: where the model runs: auto, cpu, cuda, cuda:N or mps
        compile: torch.compile the decode step (a CUDA graph on GPU), rows and attended length bucketed to powers of
            two: each bucket compiles on first use (seconds to a minute), later steps run faster (decoders)
        draft: speculative decoding: a smaller checkpoint with the same tokenizer, or prompt-lookup (n-gram
            matches in each request's text), drafts tokens for every request in the batch and the model checks
            all of them in one forward pass; same outputs
        num_draft_tokens: tokens drafted per round (with draft)
        verify: check the checkpoint's files against their recorded hashes before loading
    """
    import uvicorn

    from lmlab.api import load
    from lmlab.serve.app import Settings, create_app
    from lmlab.serve.jobs import Limits

    _check(port, max_batch_size, max_queue, max_prompt_tokens, max_new_tokens, timeout)
    lm = load(checkpoint, device=device, verify=verify)
    options = dict(
        num_draft_tokens=num_draft_tokens, max_queue=max_queue, compile=compile, max_batch_size=max_batch_size
    )
    key = api_key if api_key is not None else os.environ.get("LMLAB_API_KEY") or None
    limits = Limits(max_prompt_tokens, max_new_tokens, timeout)
    settings = Settings(model_name or Path(checkpoint).resolve().name, key, limits)
    engine = _engine(lm, max_batch_size, max_queue, compile) if draft is None else _draft_engine(lm, draft, **options)
    app = create_app(lm, settings, engine)
    where = f"http://{host}:{port}"
    logger.warning(
        "serving %s at %s (playground: %s/, API: %s/v1)%s",
        settings.model_id,
        where,
        where,
        where,
        "" if key else "; no API key set",
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    return 0


def _engine(lm, max_batch_size: int, max_queue: int, compile: bool):
    from lmlab.generate.engine import Engine, SerialEngine

    if lm.is_seq2seq:  # one request at a time: each row would carry its own encoded source
        return SerialEngine(lm.model, max_queue=max_queue)
    if lm.model.config.arch == "decoder":
        return Engine(lm.model, max_batch_size=max_batch_size, max_queue=max_queue, compile=compile)
    return None  # an encoder: embeddings only


def _draft_engine(lm, draft: str, num_draft_tokens: int, max_queue: int, compile: bool, max_batch_size: int = 16):
    """The engine of ``serve --draft``: speculative decoding inside continuous batching (every row drafts, by
    prompt lookup or with the draft model, and one forward pass of the model checks every row's draft)."""
    if compile:
        raise LmlabError("draft (speculative decoding) decodes eagerly: drop compile", params="draft compile")
    # the draft checkpoint is loaded and checked now, not at the first request; the engine checks num_draft_tokens
    return lm.speculative_engine(draft, num_draft_tokens, max_batch_size=max_batch_size, max_queue=max_queue)


def _check(port, max_batch_size, max_queue, max_prompt_tokens, max_new_tokens, timeout) -> None:
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise LmlabError(f"port is {port!r}: expected 0 to 65535", params="port")
    for name, value in (
        ("max_batch_size", max_batch_size),
        ("max_queue", max_queue),
        ("max_prompt_tokens", max_prompt_tokens),
        ("max_new_tokens", max_new_tokens),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LmlabError(f"{name} is {value!r}: expected a positive integer", params=name)
    if timeout is not None and not timeout > 0:
        raise LmlabError(f"timeout is {timeout!r}: expected a positive number of seconds", params="timeout")
