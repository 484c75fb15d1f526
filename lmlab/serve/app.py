"""The FastAPI application ``lmlab serve`` runs: OpenAI's routes, errors as OpenAI error objects, bearer
keys, a request-size limit, Prometheus metrics and the playground page.

One :class:`~lmlab.generate.engine.Engine` owns a decoder and batches every request continuously; an
encoder serves ``/v1/embeddings`` only. Routes: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /health``, ``GET /metrics``, ``GET /``.
"""

from __future__ import annotations

import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmlab.errors import LmlabError
from lmlab.generate.engine import Engine, QueueFull, SerialEngine
from lmlab.serve import formats
from lmlab.serve.embed import embed
from lmlab.serve.jobs import BadRequest, Job, Limits, check_prompt, generation_config, new_tokens
from lmlab.serve.metrics import ServeMetrics
from lmlab.serve.schema import ChatRequest, CompletionRequest, EmbeddingRequest
from lmlab.templates import chat_template, end_of_turn, render

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings")


@dataclass
class Settings:
    """What ``lmlab serve``'s flags set: the model's name in the API, the key, the limits."""

    model_id: str
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 4 << 20


class APIError(Exception):
    """An OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def error_response(status: int, message: str, kind: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(lm, settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The application serving ``lm`` (an :class:`lmlab.api.LM`); ``engine``: the decoder's (made here when
    None; started and stopped with the application)."""
    metrics = ServeMetrics()
    if engine is None and lm.model.config.arch == "decoder":
        engine = Engine(lm.model)
    elif engine is None and lm.is_seq2seq:
        engine = SerialEngine(lm.model)
    if engine is not None and engine.on_step is None:
        engine.on_step = metrics.engine_step

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if engine is not None:
            engine.start()
        yield
        if engine is not None:
            engine.stop(timeout=10)

    app = FastAPI(title="lmlab", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lm, app.state.engine, app.state.settings, app.state.metrics = lm, engine, settings, metrics
    _errors(app)
    _middleware(app, settings, metrics)
    _routes(app, lm, engine, settings, metrics)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            why = first.get("ctx", {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON ({why})", "invalid_request_error")
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return error_response(
            400, f"{where}: {first['msg']}" if where else first["msg"], "invalid_request_error", where or None
        )

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return error_response(exc.status, str(exc), exc.kind, exc.param, exc.code, headers)

    @app.exception_handler(BadRequest)
    async def bad_request(_request, exc: BadRequest):
        return error_response(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(LmlabError)
    async def lmlab_error(_request, exc: LmlabError):  # a chat template that fails, a stop string that is empty …
        return error_response(400, str(exc), "invalid_request_error", exc.params[0] if exc.params else None)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


def _middleware(app: FastAPI, settings: Settings, metrics: ServeMetrics) -> None:
    @app.middleware("http")
    async def limit_and_count(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response = error_response(
                400,
                f"the request body is {length} bytes: this server takes at most {settings.max_body_bytes}",
                "invalid_request_error",
                code="request_too_large",
            )
        else:
            response = await call_next(request)
        path = request.url.path if request.url.path in ROUTES else "other"  # bounded label values
        metrics.requests.labels(path, str(response.status_code)).inc()
        return response


def _authorizer(settings: Settings):
    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401,
                "a valid API key is needed: send Authorization: Bearer KEY",
                "authentication_error",
                code="invalid_api_key",
            )

    return authorize


def _routes(app: FastAPI, lm, engine: Engine | None, settings: Settings, metrics: ServeMetrics) -> None:
    auth = [Depends(_authorizer(settings))]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("lmlab.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/v1/models", dependencies=auth)
    async def models():
        card = {"id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "lmlab"}
        return {"object": "list", "data": [{**card, "max_model_len": lm.block_size}]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest):
        return await _complete(lm, engine, settings, metrics, body)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest):
        return await _chat(lm, engine, settings, metrics, body)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingRequest):
        return _embeddings(lm, settings, body)


# -- completions ----------------------------------------------------------------------------------------


def _needs_decoder(lm, engine: Engine | None) -> Engine:
    if engine is None:
        raise APIError(
            400,
            "this model is an encoder: it does not generate (it serves /v1/embeddings)",
            "invalid_request_error",
            "model",
        )
    return engine


def _prompts(lm, body: CompletionRequest) -> list[list[int]]:
    """The prompts of a completion request as token ids: text is encoded as ``lmlab generate`` encodes it."""
    prompt = body.prompt
    encode = lm.tokenizer.encode_batch
    if lm.is_seq2seq:  # a source, encoded as fine-tuning encodes it (with its end-of-text id)
        from lmlab.data.tasks import encode_sources

        def encode(texts):
            return encode_sources(lm.tokenizer, texts)

    if isinstance(prompt, str):
        ids = encode([prompt])
    elif prompt and all(isinstance(p, int) for p in prompt):
        ids = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        ids = encode(list(prompt))
    else:
        ids = [list(p) for p in prompt]
    if not ids:
        raise BadRequest("the prompt list is empty", "prompt")
    return ids


def _job(lm, engine, settings, metrics, prompts, body, requested, logprobs, stop, extra_stop_ids=()) -> Job:
    """A :class:`Job` of ``body.n`` sequences per prompt, checked against the limits and queued."""
    limits, config = settings.limits, lm.model.config
    job = Job(lm, engine, metrics, limits, logprobs)
    for i, ids in enumerate(prompts):
        param = "messages" if isinstance(body, ChatRequest) else "prompt"
        longest = lm.block_size if lm.is_seq2seq else lm.block_size - 1
        check_prompt(ids, config.vocab_size, longest, limits, param)
        room = lm.block_size - 1 if lm.is_seq2seq else lm.block_size - len(ids)  # a target starts with its start id
        max_new = new_tokens(requested, len(ids), lm.block_size, limits, "max_tokens", room)
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + i * body.n + j) % 2**63
            cfg = generation_config(body, max_new, seed, stop)
            if extra_stop_ids:
                cfg = cfg.replace(stop_token_ids=sorted(set(extra_stop_ids)))
            job.add(ids, cfg)
    try:
        job.submit()
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
    return job


async def _complete(lm, engine, settings, metrics, body: CompletionRequest):
    engine = _needs_decoder(lm, engine)
    if body.echo and body.logprobs is not None:
        raise BadRequest("echo with logprobs (the prompt's log-probabilities) is not supported", "echo")
    prompts = _prompts(lm, body)
    job = _job(lm, engine, settings, metrics, prompts, body, body.max_tokens, body.logprobs, body.stop_strings())
    echoes = [lm.tokenizer.decode(s.prompt) if body.echo else "" for s in job.sequences]
    if body.stream:
        return _sse(_completion_chunks(lm, settings, job, prompts, body, echoes), job)
    sequences = await _finished(job)
    return formats.completion(settings.model_id, lm.tokenizer, prompts, sequences, echoes)


async def _finished(job: Job):
    try:
        return await job.run()
    except LmlabError as e:
        raise APIError(503, str(e), "server_error") from None
    finally:
        job.cancel()


async def _completion_chunks(lm, settings, job, prompts, body, echoes) -> AsyncIterator[dict[str, Any]]:
    response_id, reported = formats.new_id("cmpl"), {}
    base = formats.head("text_completion", response_id, settings.model_id)
    for seq in job.sequences:
        if echoes[seq.index]:
            yield {
                **base,
                "choices": [{"index": seq.index, "text": echoes[seq.index], "logprobs": None, "finish_reason": None}],
            }
    async for seq, piece in job.pieces():
        start = reported.get(seq.index, 0)
        reported[seq.index] = len(seq.logprobs)
        logprobs = formats.completion_logprobs(lm.tokenizer, seq, start) if start < len(seq.logprobs) else None
        if piece or logprobs or seq.finish_reason:
            choice = {"index": seq.index, "text": piece, "logprobs": logprobs, "finish_reason": seq.finish_reason}
            yield {**base, "choices": [choice]}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": formats.usage(prompts, job.sequences)}


# -- chat ------------------------------------------------------------------------------------------------


def _chat_prompt(lm, body: ChatRequest) -> tuple[list[int], list[int], list[str]]:
    """The conversation rendered with the model's chat template as token ids, and the end-of-turn marker as a
    stop id (one token) or a stop string, as ``lmlab chat`` stops."""
    template = chat_template(lm.tokenizer)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    text = render(lm.tokenizer, messages, add_generation_prompt=True, template=template)
    marker = end_of_turn(lm.tokenizer, template)
    marker_ids = lm.tokenizer.encode(marker) if marker else []
    stop_ids = marker_ids if len(marker_ids) == 1 else []
    stop = body.stop_strings() + ([marker] if marker and len(marker_ids) != 1 else [])
    return lm.tokenizer.encode(text), stop_ids, stop


async def _chat(lm, engine, settings, metrics, body: ChatRequest):
    engine = _needs_decoder(lm, engine)
    if lm.is_seq2seq:
        raise BadRequest("chat needs a decoder; an encoder–decoder answers /v1/completions", "model")
    ids, stop_ids, stop = _chat_prompt(lm, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requested = body.max_completion_tokens or body.max_tokens
    job = _job(lm, engine, settings, metrics, [ids], body, requested, logprobs, stop, stop_ids)
    if body.stream:
        return _sse(_chat_chunks(lm, settings, job, ids, body), job)
    sequences = await _finished(job)
    return formats.chat_completion(settings.model_id, lm.tokenizer, ids, sequences)


async def _chat_chunks(lm, settings, job, ids, body) -> AsyncIterator[dict[str, Any]]:
    base = formats.head("chat.completion.chunk", formats.new_id("chatcmpl"), settings.model_id)
    reported: dict[int, int] = {}

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**base, "choices": [choice]}

    for seq in job.sequences:
        yield chunk(seq.index, {"role": "assistant", "content": ""})
    async for seq, piece in job.pieces():
        start = reported.get(seq.index, 0)
        reported[seq.index] = len(seq.logprobs)
        logprobs = formats.chat_logprobs(lm.tokenizer, seq, start) if start < len(seq.logprobs) else None
        if piece or logprobs:
            yield chunk(seq.index, {"content": piece}, logprobs)
        if seq.finish_reason:
            yield chunk(seq.index, {}, finish_reason=seq.finish_reason)
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": formats.usage([ids], job.sequences)}


def _sse(chunks: AsyncIterator[dict[str, Any]], job: Job) -> StreamingResponse:
    """Server-sent events, as OpenAI streams: ``data: {json}`` per chunk, then ``data: [DONE]``. A client
    that goes away cancels the job, freeing its rows at the engine's next step."""

    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        except LmlabError as e:
            error = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- embeddings ----------------------------------------------------------------------------------------


def _embeddings(lm, settings: Settings, body: EmbeddingRequest) -> dict[str, Any]:
    if lm.model.config.arch != "encoder":
        raise BadRequest("this model is not an encoder: embeddings come from encoder (BERT-style) models", "model")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or any(not t for t in texts):
        raise BadRequest("input: expected one or more non-empty strings", "input")
    if body.encoding_format != "float":
        raise BadRequest("encoding_format: only float is supported", "encoding_format")
    vectors, tokens = embed(lm, texts)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": settings.model_id, "usage": usage}
