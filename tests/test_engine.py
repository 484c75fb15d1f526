"""Continuous batching (lmlab.generate.engine): requests join and leave a running batch, each row decoding
exactly as it would alone, with its own rules, seed and stop conditions."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.generate.engine import Engine, QueueFull, RaggedCache, Request, prefill_groups
from lmlab.generate.loop import decode
from lmlab.generate.processors import LogitsProcessorList, RepetitionPenalty
from lmlab.model import build_model


def tiny(name: str):
    torch.manual_seed(0)
    return build_model(preset(name)).eval()


def work(vocab: int, count: int, seed: int = 1) -> list[tuple[list[int], int]]:
    """``count`` prompts of 1–19 tokens, each with 1–29 tokens to make."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (count,), generator=g).tolist()
    news = torch.randint(1, 30, (count,), generator=g).tolist()
    return [(torch.randint(0, vocab, (n,), generator=g).tolist(), new) for n, new in zip(lengths, news)]


def alone(model, prompt: list[int], new: int, **kw) -> list[int]:
    return [int(step.tokens[0]) for step in decode(model, [prompt], max_new_tokens=new, **kw) if bool(step.active[0])]


def run(engine: Engine, requests: list[Request]) -> None:
    for request in requests:
        engine.submit(request)
    while not engine.idle():
        engine.step()


class Recorder:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.events = []

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.token is not None:
            self.tokens.append(event.token)
        if event.finish_reason is not None:
            self.finish = event.finish_reason


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_greedy_rows_joining_and_leaving_a_batch_decode_as_they_would_alone(name):
    model = tiny(name)
    jobs = work(model.config.vocab_size, 12)
    recorders = [Recorder() for _ in jobs]
    engine = Engine(model, max_batch_size=4)  # 12 requests through 4 rows: joins and leaves at every size
    run(engine, [Request(p, new, emit=r) for (p, new), r in zip(jobs, recorders)])
    for (prompt, new), r in zip(jobs, recorders):
        assert r.tokens == alone(model, prompt, new) and r.finish == "length"
    assert engine.running == 0 and engine.logits is None


def test_a_request_gives_the_same_tokens_alone_and_in_a_batch_of_16():
    model = tiny("llama-tiny")
    jobs = work(model.config.vocab_size, 16, seed=3)
    by_itself = []
    for prompt, new in jobs:
        r = Recorder()
        run(Engine(model, max_batch_size=16), [Request(prompt, new, emit=r)])
        by_itself.append(r.tokens)
    recorders = [Recorder() for _ in jobs]
    run(Engine(model, max_batch_size=16), [Request(p, n, emit=r) for (p, n), r in zip(jobs, recorders)])
    assert [r.tokens for r in recorders] == by_itself


BURST = [1, 3, 17, 40, 2, 16]  # prompt lengths arriving together, in this order


def burst(vocab: int, new: int = 8) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in BURST]


def count_prefills(model, monkeypatch) -> list[int]:
    """Record the rows of every forward pass that is a prefill (not a decode step's ragged cache)."""
    rows: list[int] = []
    forward = model.forward

    def counted(idx, **kw):
        if not isinstance(kw.get("kv_cache"), RaggedCache):
            rows.append(idx.shape[0])
        return forward(idx, **kw)

    monkeypatch.setattr(model, "forward", counted)
    return rows


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_a_burst_is_prefilled_in_fewer_passes_than_requests_with_the_tokens_each_gives_alone(name, monkeypatch):
    model = tiny(name)
    prompts = burst(model.config.vocab_size)
    expected = [alone(model, prompt, 8) for prompt in prompts]  # the one-prompt path: decode() of it alone
    one_at_a_time = []
    for prompt in prompts:
        r = Recorder()
        run(Engine(model), [Request(prompt, 8, emit=r)])
        one_at_a_time.append(r.tokens)
    passes = count_prefills(model, monkeypatch)
    recorders = [Recorder() for _ in prompts]
    run(Engine(model, max_batch_size=8), [Request(p, 8, emit=r) for p, r in zip(prompts, recorders)])
    assert [r.tokens for r in recorders] == expected == one_at_a_time
    assert all(r.finish == "length" for r in recorders)
    assert 1 <= len(passes) < len(prompts) and sum(passes) == len(prompts)


def test_a_burst_gives_each_first_token_the_logprobs_of_its_prompt_alone():
    model = tiny("gpt2-tiny")
    prompts = burst(model.config.vocab_size)
    recorders = [Recorder() for _ in prompts]
    run(Engine(model), [Request(p, 2, emit=r, logprobs=3) for p, r in zip(prompts, recorders)])
    for prompt, r in zip(prompts, recorders):
        with torch.inference_mode():
            logprobs = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
        first = r.events[0]
        assert first.token == int(logprobs.argmax())
        assert first.logprob == pytest.approx(float(logprobs[first.token]), abs=1e-5)
        top = logprobs.topk(3)
        assert [i for i, _ in first.top] == top.indices.tolist()
        assert [v for _, v in first.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_seeded_draws_in_a_burst_do_not_depend_on_the_prompts_prefilled_with_them():
    model = tiny("llama-tiny")
    prompts = burst(model.config.vocab_size)

    def sampled(requests_of: list[int]) -> dict[int, list[int]]:
        recorders = {i: Recorder() for i in requests_of}
        gens = {i: torch.Generator().manual_seed(100 + i) for i in requests_of}
        run(
            Engine(model),
            [Request(prompts[i], 12, emit=recorders[i], sample=True, generator=gens[i]) for i in requests_of],
        )
        return {i: r.tokens for i, r in recorders.items()}

    together = sampled(list(range(len(prompts))))
    for i in range(len(prompts)):
        assert sampled([i]) == {i: together[i]}


def test_prefill_groups_keep_padding_and_tokens_per_pass_bounded():
    assert prefill_groups([], 4096, 0.25, 32) == []
    assert prefill_groups([7], 4096, 0.25, 32) == [(0, 1)]
    # prompts of similar length go together; 1, 2, 3 padded to 16 would be 42 pads (> 32 and > 25% of 64)
    assert prefill_groups([1, 2, 3, 16, 17, 40], 4096, 0.25, 32) == [(0, 3), (3, 5), (5, 6)]
    assert prefill_groups([1, 3, 17], 4096, 0.25, 32) == [(0, 3)]  # 30 pads: fewer than a pass costs
    assert prefill_groups([100, 100, 200], 4096, 0.25, 32) == [(0, 2), (2, 3)]  # 200 pads > 25% of 600
    assert prefill_groups([100, 110, 120], 4096, 0.25, 32) == [(0, 3)]  # 30 pads
    assert prefill_groups([64] * 10, 256, 0.25, 32) == [(0, 4), (4, 8), (8, 10)]  # 256 tokens a pass at most
    assert prefill_groups([500], 256, 0.25, 32) == [(0, 1)]  # a prompt over the cap runs alone


def test_each_row_keeps_its_own_rules_and_seeded_draws():
    model = tiny("gpt2-tiny")
    prompt = [5, 6, 7]

    def sampled(seed: int, others: int) -> list[int]:
        r = Recorder()
        requests = [Request(prompt, 20, emit=r, sample=True, generator=torch.Generator().manual_seed(seed))]
        requests += [Request([1 + i], 25, emit=Recorder(), sample=True) for i in range(others)]
        run(Engine(model, max_batch_size=8), requests)
        return r.tokens

    assert sampled(7, 0) == sampled(7, 5)  # a seed's draws do not depend on the company
    assert sampled(7, 0) != sampled(8, 0)
    penalised = Recorder()
    rules = LogitsProcessorList([RepetitionPenalty(1.5)])
    run(Engine(model), [Request(prompt, 15, emit=penalised, processors=rules), Request(prompt, 15, emit=Recorder())])
    expected = alone(model, prompt, 15, processors=[RepetitionPenalty(1.5)])
    assert penalised.tokens == expected


def test_stop_ids_stop_rules_cancellation_and_deadlines_end_a_request_with_its_reason():
    model = tiny("gpt2-tiny")
    reference = alone(model, [3, 4], 10)
    stop_id = reference[4]
    first = reference.index(stop_id)
    by_id, by_rule, cancelled, late = Recorder(), Recorder(), Recorder(), Recorder()
    requests = [
        Request([3, 4], 10, emit=by_id, stop_ids=frozenset({stop_id})),
        Request([3, 4], 10, emit=by_rule, stop_rules=[lambda generated: len(generated) == 3]),
        Request([3, 4], 10, emit=cancelled, cancelled=True),
        Request([3, 4], 10, emit=late, deadline=time.monotonic() - 1),
    ]
    run(Engine(model), requests)
    assert by_id.tokens == reference[:first] and by_id.finish == "stop"  # the stop id itself is not emitted
    assert by_rule.tokens == reference[:3] and by_rule.finish == "stop"
    assert cancelled.tokens == [] and cancelled.finish == "cancelled"
    assert late.tokens == reference[:1] and late.finish == "timeout"


def test_logprobs_are_the_models_and_a_cancelled_row_frees_its_place_at_the_next_step():
    model = tiny("gpt2-tiny")
    r = Recorder()
    engine = Engine(model, max_batch_size=2)
    engine.submit(Request([1, 2, 3], 10, emit=r, logprobs=2))
    engine.step()
    with torch.inference_mode():
        logprobs = model(torch.tensor([[1, 2, 3]]))[0, -1].log_softmax(-1)
    event = r.events[0]
    assert event.logprob == pytest.approx(float(logprobs[event.token]), abs=1e-5)
    assert [i for i, _ in event.top] == logprobs.topk(2).indices.tolist()
    other = Recorder()
    engine.submit(Request([9], 20, emit=other))
    engine.step()
    assert engine.running == 2
    engine.rows[1].cancelled = True
    engine.step()
    assert engine.running == 1 and other.finish == "cancelled"


def test_limits_are_one_line_errors_and_a_full_queue_is_refused():
    model = tiny("gpt2-tiny")
    engine = Engine(model, max_queue=1)
    with pytest.raises(LmlabError, match="exceeds the model's context window of 128 tokens"):
        engine.submit(Request(list(range(100)), 29, emit=Recorder()))
    with pytest.raises(LmlabError, match="at least one prompt token"):
        engine.submit(Request([], 5, emit=Recorder()))
    engine.submit(Request([1], 5, emit=Recorder()))
    with pytest.raises(QueueFull, match="the queue is full"):
        engine.submit(Request([1], 5, emit=Recorder()))
    with pytest.raises(LmlabError, match="decoder-only"):
        Engine(tiny("bert-tiny"))


def test_the_loop_thread_serves_requests_and_stop_cancels_what_is_left():
    model = tiny("gpt2-tiny")
    engine = Engine(model, max_batch_size=2)
    engine.start()
    done = threading.Event()
    r = Recorder()
    engine.submit(Request([1, 2], 5, emit=lambda e: (r(e), e.finish_reason and done.set())))
    assert done.wait(10) and r.finish == "length" and len(r.tokens) == 5
    long_one = Recorder()
    engine.submit(Request([1], 120, emit=long_one))
    time.sleep(0.05)
    engine.stop(timeout=10)
    assert long_one.finish == "cancelled" and engine.running == 0


def test_an_encoder_decoder_runs_one_request_at_a_time_as_generate_seq2seq_decodes_it():
    from lmlab.generate.engine import SerialEngine
    from lmlab.generate.seq2seq import generate_seq2seq

    torch.manual_seed(0)
    model = build_model(preset("t5-tiny")).eval()
    jobs = work(model.config.vocab_size, 4, seed=5)
    recorders = [Recorder() for _ in jobs]
    engine = SerialEngine(model)
    run(engine, [Request(p, n, emit=r) for (p, n), r in zip(jobs, recorders)])
    for (source, new), r in zip(jobs, recorders):
        with torch.inference_mode():
            expected = [int(s.tokens[0]) for s in generate_seq2seq(model, [source], max_new_tokens=new)]
        assert r.tokens == expected and r.finish == "length"
    with pytest.raises(LmlabError, match="must each fit the model's context window of 128"):
        engine.submit(Request([1], 128, emit=Recorder()))
    with pytest.raises(LmlabError, match="encoder–decoder"):
        SerialEngine(tiny("gpt2-tiny"))


@pytest.mark.slow
def test_the_compiled_step_decodes_as_the_eager_one_across_batch_buckets():
    model = tiny("llama-tiny")
    jobs = work(model.config.vocab_size, 6, seed=9)
    eager, compiled = [Recorder() for _ in jobs], [Recorder() for _ in jobs]
    run(Engine(model, max_batch_size=4), [Request(p, n, emit=r) for (p, n), r in zip(jobs, eager)])
    run(Engine(model, max_batch_size=4, compile=True), [Request(p, n, emit=r) for (p, n), r in zip(jobs, compiled)])
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_graph_step_decodes_as_the_eager_one_on_a_gpu():
    model = tiny("llama-tiny").cuda()
    jobs = work(model.config.vocab_size, 6, seed=9)
    eager, graphed = [Recorder() for _ in jobs], [Recorder() for _ in jobs]
    run(Engine(model, max_batch_size=4), [Request(p, n, emit=r) for (p, n), r in zip(jobs, eager)])
    run(Engine(model, max_batch_size=4, compile=True), [Request(p, n, emit=r) for (p, n), r in zip(jobs, graphed)])
    assert [r.tokens for r in graphed] == [r.tokens for r in eager]


def test_a_speculative_engine_gives_each_request_the_tokens_it_gives_alone():
    from lmlab.generate.engine import SpeculativeEngine
    from lmlab.generate.speculative import DraftModel, PromptLookup

    model = tiny("llama-tiny")
    torch.manual_seed(1)
    draft = build_model(preset("llama-tiny", n_layer=1)).eval()
    vocab = model.config.vocab_size
    jobs = work(vocab, 4, seed=3)
    for make in (lambda n: DraftModel(draft, n, vocab), lambda n: PromptLookup()):
        recorders = [Recorder() for _ in jobs]
        engine = SpeculativeEngine(model, make, num_draft_tokens=3)
        run(engine, [Request(p, n, emit=r) for (p, n), r in zip(jobs, recorders)])
        for (prompt, new), r in zip(jobs, recorders):
            assert r.tokens == alone(model, prompt, new) and r.finish == "length"
        reference = alone(model, [3, 4], 10)
        by_id, by_rule = Recorder(), Recorder()
        stop_id = reference[4]
        requests = [
            Request([3, 4], 10, emit=by_id, stop_ids=frozenset({stop_id})),
            Request([3, 4], 10, emit=by_rule, stop_rules=[lambda generated: len(generated) == 3]),
        ]
        run(engine, requests)
        assert by_id.tokens == reference[: reference.index(stop_id)] and by_id.finish == "stop"
        assert by_rule.tokens == reference[:3] and by_rule.finish == "stop"
    with pytest.raises(LmlabError, match="context window of 128"):
        engine.submit(Request([1] * 100, 29, emit=Recorder()))


# -- speculative decoding inside continuous batching (lmlab.generate.speculative_engine) ----------------------


def echoing(model, count: int = 5) -> list[list[int]]:
    """Prompts that prompt lookup can draft from: a text, the model's own greedy continuation of it, the text again
    (the model tends to continue it the same way, not always: drafts are accepted and rejected)."""
    g = torch.Generator().manual_seed(5)
    bases = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (1, 3, 6, 9, 2)[:count]]
    return [base + alone(model, base, 12) + base for base in bases]


def count_forwards(model, monkeypatch) -> list[tuple[int, int, bool]]:
    """Record the (rows, tokens, whether it decodes rather than prefills) of every forward pass of ``model``."""
    calls: list[tuple[int, int, bool]] = []
    forward = model.forward

    def counted(idx, **kw):
        calls.append((*idx.shape, isinstance(kw.get("kv_cache"), RaggedCache)))
        return forward(idx, **kw)

    monkeypatch.setattr(model, "forward", counted)
    return calls


def test_batched_prompt_lookup_gives_each_greedy_request_its_tokens_in_fewer_passes_than_plain(monkeypatch):
    from lmlab.generate.speculative_engine import BatchedSpeculativeEngine

    model = tiny("gpt2-tiny")
    prompts, news = echoing(model), [20, 7, 30, 12, 25]
    expected = [alone(model, prompt, new) for prompt, new in zip(prompts, news)]
    calls = count_forwards(model, monkeypatch)
    run(Engine(model, max_batch_size=8), [Request(p, n, emit=Recorder()) for p, n in zip(prompts, news)])
    plain = len(calls)
    calls.clear()
    recorders = [Recorder() for _ in prompts]
    engine = BatchedSpeculativeEngine(model, num_draft_tokens=4, max_batch_size=8)
    run(engine, [Request(p, n, emit=r) for p, n, r in zip(prompts, news, recorders)])
    assert [r.tokens for r in recorders] == expected and all(r.finish == "length" for r in recorders)
    rounds = [(rows, tokens) for rows, tokens, decodes in calls if decodes]
    assert len(calls) < plain and engine.stats.rounds == len(rounds) and len(calls) - len(rounds) <= 2  # prefills
    assert 0 < engine.stats.accepted < engine.stats.drafted  # drafts were kept and rejected
    assert rounds[0] == (len(prompts), 5)  # every row in one pass, at most k + 1 tokens each
    assert engine.running == 0 and engine.logits is None


def test_batched_prompt_lookup_keeps_each_rows_rules_and_logprobs():
    from lmlab.generate.speculative_engine import BatchedSpeculativeEngine

    model = tiny("llama-tiny")
    prompts = echoing(model, 3)
    penalised, plain, with_logprobs, reference = Recorder(), Recorder(), Recorder(), Recorder()
    rules = LogitsProcessorList([RepetitionPenalty(1.5)])
    run(
        BatchedSpeculativeEngine(model, num_draft_tokens=3),
        [
            Request(prompts[0], 15, emit=penalised, processors=rules),
            Request(prompts[1], 15, emit=plain),
            Request(prompts[2], 9, emit=with_logprobs, logprobs=2),
        ],
    )
    assert penalised.tokens == alone(model, prompts[0], 15, processors=[RepetitionPenalty(1.5)])
    assert plain.tokens == alone(model, prompts[1], 15)
    run(Engine(model), [Request(prompts[2], 9, emit=reference, logprobs=2)])
    assert with_logprobs.tokens == reference.tokens
    for got, want in zip(with_logprobs.events, reference.events):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [i for i, _ in got.top] == [i for i, _ in want.top]
    sampled = Recorder()
    seeded = torch.Generator().manual_seed(3)
    run(BatchedSpeculativeEngine(model), [Request(prompts[0], 12, emit=sampled, sample=True, generator=seeded)])
    assert len(sampled.tokens) == 12 and sampled.finish == "length"


def test_batched_prompt_lookup_stops_inside_an_accepted_run_and_frees_a_cancelled_row():
    from lmlab.generate.speculative_engine import BatchedSpeculativeEngine

    model = tiny("gpt2-tiny")
    prompt = echoing(model, 1)[0]
    engine, rounds, full = BatchedSpeculativeEngine(model, num_draft_tokens=4), [], Recorder()
    run(engine, [Request(prompt, 20, emit=lambda e: (full(e), rounds.append(engine.stats.rounds)))])
    assert full.tokens == alone(model, prompt, 20)
    # the tokens that came in the same round as the one before them: accepted drafts (or the model's token after them)
    inside = [i for i in range(3, 20) if rounds[i] == rounds[i - 1] and full.tokens[i] not in full.tokens[:i]]
    assert inside, "no round kept several tokens"
    at = inside[0]
    by_rule, limited, by_id = Recorder(), Recorder(), Recorder()
    requests = [
        Request(prompt, 20, emit=by_rule, stop_rules=[lambda generated: len(generated) == at]),
        Request(prompt, at, emit=limited),
        Request(prompt, 20, emit=by_id, stop_ids=frozenset({full.tokens[at]})),
    ]
    run(BatchedSpeculativeEngine(model, num_draft_tokens=4), requests)
    assert by_rule.tokens == full.tokens[:at] and by_rule.finish == "stop"
    assert limited.tokens == full.tokens[:at] and limited.finish == "length"
    assert by_id.tokens == full.tokens[:at] and by_id.finish == "stop"  # the stop id itself is not emitted
    engine, kept, cancelled = BatchedSpeculativeEngine(model, max_batch_size=2), Recorder(), Recorder()
    leaving = Request([3, 4], 40, emit=cancelled)
    engine.submit(Request(prompt, 40, emit=kept))
    engine.submit(leaving)
    engine.step()
    assert engine.running == 2
    leaving.cancelled = True
    engine.step()
    assert engine.running == 1 and cancelled.finish == "cancelled" and kept.finish is None
    run(engine, [])
    assert kept.tokens == alone(model, prompt, 40) and kept.finish == "length"


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_batched_draft_model_gives_each_request_its_greedy_tokens_rolling_back_per_row(name, monkeypatch):
    from lmlab.generate.speculative_engine import BatchedSpeculativeEngine

    model = tiny(name)
    torch.manual_seed(1)
    other = build_model(preset(name, n_layer=1)).eval()  # random: mostly rejected
    jobs = work(model.config.vocab_size, 6, seed=3)
    expected = [alone(model, prompt, new) for prompt, new in jobs]
    calls = count_forwards(model, monkeypatch)
    run(Engine(model, max_batch_size=4), [Request(p, n, emit=Recorder()) for p, n in jobs])
    plain = sum(1 for *_, decodes in calls if decodes)
    monkeypatch.undo()
    for draft in (model, other):  # the model as its own draft keeps every draft; a random one, few
        recorders = [Recorder() for _ in jobs]
        engine = BatchedSpeculativeEngine(model, num_draft_tokens=3, draft=draft, max_batch_size=4)
        run(engine, [Request(p, n, emit=r) for (p, n), r in zip(jobs, recorders)])
        assert [r.tokens for r in recorders] == expected and all(r.finish == "length" for r in recorders)
        assert engine.running == 0 and engine.stats.drafted > 0
        if draft is model:
            assert engine.stats.accepted == engine.stats.drafted and engine.stats.rounds < plain / 2
        else:
            assert engine.stats.accepted < engine.stats.drafted
    sampled = Recorder()
    seeded = torch.Generator().manual_seed(3)
    engine = BatchedSpeculativeEngine(model, num_draft_tokens=3, draft=other)
    run(
        engine, [Request(jobs[0][0], 12, emit=sampled, sample=True, generator=seeded), Request([5], 9, emit=Recorder())]
    )
    assert len(sampled.tokens) == 12 and sampled.finish == "length"
    short = BatchedSpeculativeEngine(model, draft=build_model(preset(name, n_layer=1, block_size=16)).eval())
    with pytest.raises(LmlabError, match="draft model's context window of 16"):
        short.submit(Request([1] * 10, 7, emit=Recorder()))


@pytest.mark.parametrize("drafter", ["model", "prompt-lookup"])
def test_batched_speculative_sampling_has_the_models_distribution(drafter):
    from test_speculative import V, chi_square_p, peaked, two_token_distribution

    from lmlab.generate.processors import Temperature, TopK
    from lmlab.generate.speculative_engine import BatchedSpeculativeEngine

    target, draft = peaked(0), peaked(1)
    prompt, processors, N = [1, 2, 3, 1, 2], LogitsProcessorList([Temperature(0.8), TopK(6)]), 2000
    engine = BatchedSpeculativeEngine(
        target, num_draft_tokens=2, draft=draft if drafter == "model" else None, max_batch_size=16, max_queue=N
    )
    generator, recorders = torch.Generator().manual_seed(0), [Recorder() for _ in range(N)]
    # max_new_tokens 3: the first token comes from the prefill, the second from a verifying round (one draft)
    run(
        engine, [Request(prompt, 3, emit=r, processors=processors, sample=True, generator=generator) for r in recorders]
    )
    counts = torch.zeros(V * V)
    for r in recorders:
        counts[r.tokens[0] * V + r.tokens[1]] += 1
    assert engine.stats.drafted > N / 4 and 0 < engine.stats.accepted < engine.stats.drafted
    assert chi_square_p(counts, two_token_distribution(target, prompt, processors)) > 1e-3
    if drafter == "model":  # the test has power: the draft's own distribution, which acceptance corrects, fails
        assert chi_square_p(counts, two_token_distribution(draft, prompt, processors)) < 1e-6
