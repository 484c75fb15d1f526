"""Speculative decoding: greedy output is the target's token for token (any draft, prompt lookup), sampled output
has the target's distribution (a chi-square test on a tiny vocabulary), rolled-back caches equal fresh ones, stop
ids / rules / lengths end where plain decoding ends, and the errors name the parameter."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from lmlab.api import LM
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, NoRepeatNGram, RepetitionPenalty, Temperature, TopK, decode
from lmlab.generate.processors import LogitsProcessorList
from lmlab.generate.speculative import CachedRun, DraftModel, PromptLookup, SpeculationStats, speculative_decode
from lmlab.io.checkpoint import save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import Tokenizer

PROMPT = [5, 17, 3, 99, 42, 5, 17, 3, 8]


def tiny(family: str, seed: int, **fields):
    torch.manual_seed(seed)
    return build_model(preset(family, **{"vocab_size": 101, **fields})).eval()


def tokens(steps) -> list[int]:
    return [int(step.tokens[0]) for step in steps]


def plain(model, prompt, n, **kw) -> list[int]:
    return tokens(decode(model, [prompt], max_new_tokens=n, **kw))


def speculative(model, drafter, prompt, n, k=4, **kw) -> list[int]:
    return tokens(speculative_decode(model, drafter, [prompt], num_draft_tokens=k, max_new_tokens=n, **kw))


# -- greedy: the target's output, token for token ---------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("draft", ["other", "itself", "prompt-lookup"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_speculative_output_is_the_target_greedy_output(family, draft, k):
    target = tiny(family, 0)
    if draft == "prompt-lookup":
        drafter = PromptLookup()
    else:
        drafter = DraftModel(target if draft == "itself" else tiny(family, 1, n_layer=1), 64, 101)
    stats = SpeculationStats()
    assert speculative(target, drafter, PROMPT, 40, k, stats=stats) == plain(target, PROMPT, 40)
    assert stats.emitted == 40 and stats.rounds < 40 or draft == "other"
    if draft == "itself":  # the target drafting for itself: every draft token is kept
        assert stats.accepted == stats.drafted > 0


def test_greedy_with_penalties_applies_them_to_draft_and_target_alike():
    target, draft = tiny("llama-tiny", 0), tiny("llama-tiny", 1, n_layer=1)
    procs = [RepetitionPenalty(1.5), NoRepeatNGram(2)]
    want = plain(target, PROMPT, 30, processors=procs)
    assert want != plain(target, PROMPT, 30)  # the penalties matter here
    assert speculative(target, DraftModel(draft, 64, 101), PROMPT, 30, 3, processors=procs) == want
    assert speculative(target, PromptLookup(), PROMPT, 30, 3, processors=procs) == want


def test_a_one_token_prompt_and_max_new_tokens_of_one():
    target = tiny("gpt2-tiny", 0)
    assert speculative(target, DraftModel(target, 64, 101), [7], 20) == plain(target, [7], 20)
    assert speculative(target, PromptLookup(), PROMPT, 1) == plain(target, PROMPT, 1)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    seq = torch.tensor([1, 2, 3, 9, 1, 2, 4, 5, 6, 1, 2, 0, 0])
    proposed, q = PromptLookup(max_ngram=3).propose(seq, 11, 3, LogitsProcessorList(), False, None)
    assert proposed.tolist() == [4, 5, 6] and q is None  # the bigram [1, 2]'s latest match, not the first
    assert PromptLookup().propose(torch.tensor([1, 2, 3]), 3, 4, LogitsProcessorList(), False, None)[0].numel() == 0


# -- stop ids, stop rules and lengths end where plain decoding ends ------------------------------------


def test_stop_ids_and_stop_rules_end_at_the_same_token_as_plain_decoding():
    target, draft = tiny("gpt2-tiny", 0), tiny("gpt2-tiny", 1, n_layer=1)
    free = plain(target, PROMPT, 30)
    stop_id = free[12]
    rule = lambda generated: len(generated) >= 9  # noqa: E731

    def steps(kw):
        ref = [(int(s.tokens[0]), bool(s.finished[0])) for s in decode(target, [PROMPT], max_new_tokens=30, **kw)]
        got = speculative_decode(
            target, DraftModel(draft, 64, 101), [PROMPT], num_draft_tokens=5, max_new_tokens=30, **kw
        )
        return [(int(s.tokens[0]), bool(s.finished[0])) for s in got], ref

    for kw in (dict(stop_ids=[stop_id]), dict(stop_rules=[rule])):
        got, ref = steps(kw)
        assert got == ref and ref[-1][1] and len(ref) < 30


def test_logprobs_are_the_target_model_logprobs():
    target = tiny("llama-tiny", 0)
    ref = list(decode(target, [PROMPT], max_new_tokens=12, logprobs=3))
    got = list(speculative_decode(target, PromptLookup(), [PROMPT], num_draft_tokens=4, max_new_tokens=12, logprobs=3))
    torch.testing.assert_close(
        torch.cat([s.logprobs for s in got]), torch.cat([s.logprobs for s in ref]), atol=1e-4, rtol=0
    )
    assert torch.equal(torch.cat([s.top_ids for s in got]), torch.cat([s.top_ids for s in ref]))


# -- sampling: the target's distribution --------------------------------------------------------------

V = 8


def peaked(seed: int):
    """A one-layer model over 8 tokens with a sharp, seed-specific next-token distribution."""
    torch.manual_seed(seed)
    config = preset("gpt2-tiny", vocab_size=V, n_layer=1, n_embd=16, n_head=2, block_size=16, tie_embeddings=False)
    model = build_model(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def two_token_distribution(model, prompt, processors) -> torch.Tensor:
    """The exact probability (V·V,) of every first two generated tokens, after ``processors``."""

    def next_probs(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[:, -1].float()
        return LogitsProcessorList(processors)(torch.tensor([seq]), logits).softmax(-1)[0]

    first = next_probs(prompt)
    return torch.stack([first[a] * next_probs(prompt + [a]) for a in range(V)]).flatten()


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The chi-square goodness-of-fit p-value, outcomes expected fewer than 5 times pooled into one."""
    counts, probs = counts.double().numpy(), probs.double().numpy()
    n, rare = counts.sum(), probs * counts.sum() < 5
    observed = [*counts[~rare], counts[rare].sum()]
    expected = [*probs[~rare], probs[rare].sum()]
    return float(chisquare(observed, [e * n / sum(expected) for e in expected]).pvalue)


@pytest.mark.parametrize("drafter", ["model", "prompt-lookup"])
def test_sampled_output_has_the_target_distribution(drafter):
    target, draft = peaked(0), peaked(1)
    prompt, processors, N = [1, 2, 3, 1, 2], [Temperature(0.8), TopK(6)], 2000
    exact = two_token_distribution(target, prompt, processors)
    generator, counts = torch.Generator().manual_seed(0), torch.zeros(V * V)
    for _ in range(N):
        d = DraftModel(draft, 16, V) if drafter == "model" else PromptLookup()
        out = speculative(target, d, prompt, 2, 2, processors=processors, sample=True, generator=generator)
        counts[out[0] * V + out[1]] += 1
    assert chi_square_p(counts, exact) > 1e-3
    # the test has power: the draft's own distribution, which the acceptance rule corrects, is rejected
    assert chi_square_p(counts, two_token_distribution(draft, prompt, processors)) < 1e-6


# -- caches roll back --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2-tiny", "llama-tiny"])
def test_a_rolled_back_cache_equals_a_fresh_one(family):
    model = tiny(family, 0)
    seq = torch.tensor(PROMPT + [11, 12, 13, 14])
    draft = torch.tensor([11, 61, 62, 63])  # its first token is seq[9], the rest are not
    run = CachedRun(model, 32)
    run.feed(seq[:9])
    run.feed(draft)  # a verify pass over a draft …
    run.rollback(10)  # … of which the target kept one token: slots 10-12 hold rejected tokens
    assert run.length == 10
    got = run.feed(seq[10:13], logits_to_keep=3)
    fresh = CachedRun(model, 32)
    want = fresh.feed(seq[:13], logits_to_keep=3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(run.cache.k + run.cache.v, fresh.cache.k + fresh.cache.v):
        torch.testing.assert_close(a[:, :, :13], b[:, :, :13], atol=1e-5, rtol=1e-4)


def test_the_draft_cache_keeps_only_accepted_tokens():
    model = tiny("gpt2-tiny", 0)
    drafter = DraftModel(model, 32, 101)
    buffer = torch.zeros(32, dtype=torch.long)
    buffer[:9] = torch.tensor(PROMPT)
    drafter.propose(buffer, 9, 4, LogitsProcessorList(), False, None)
    assert drafter.run.length == 12  # the prompt and the first three draft tokens went through it
    drafter.keep(10)  # the target kept one of them …
    buffer[10] = (int(buffer[10]) + 1) % 101  # … and replaced the second
    proposed, _ = drafter.propose(buffer, 11, 3, LogitsProcessorList(), False, None)
    fresh = DraftModel(model, 32, 101)
    again, _ = fresh.propose(buffer.clone(), 11, 3, LogitsProcessorList(), False, None)
    assert proposed.tolist() == again.tolist()


# -- through LM: checkpoints, tokenizers, errors -------------------------------------------------------


@pytest.fixture(scope="module")
def lms(tokenizer_dir, other_tokenizer_dir, tmp_path_factory):
    tok, other = Tokenizer.load(tokenizer_dir), Tokenizer.load(other_tokenizer_dir)
    target = LM(tiny("gpt2-tiny", 0, vocab_size=tok.vocab_size), tok)
    folder = tmp_path_factory.mktemp("draft")
    draft = save_checkpoint(folder / "draft", tiny("gpt2-tiny", 1, n_layer=1, vocab_size=tok.vocab_size), tokenizer=tok)
    itself = save_checkpoint(folder / "itself", target.model, tokenizer=tok)
    stranger = LM(tiny("gpt2-tiny", 2, vocab_size=other.vocab_size), other)
    return dict(target=target, draft=draft, itself=itself, stranger=stranger)


def test_lm_generate_with_a_draft_checkpoint_or_prompt_lookup_equals_plain_generate(lms):
    lm, prompt = lms["target"], "The cat sat on the mat. The cat"
    want = lm.generate(prompt, max_new_tokens=25, ignore_eos=True)
    for draft in (str(lms["draft"]), "prompt-lookup"):
        assert lm.generate(prompt, max_new_tokens=25, ignore_eos=True, draft=draft, num_draft_tokens=3) == want
        assert lm.last_speculation.emitted == 25
        assert "".join(lm.stream(prompt, max_new_tokens=25, ignore_eos=True, draft=draft)) == want
    stop = want[len(want) // 2 : len(want) // 2 + 3]
    cut = lm.generate(prompt, max_new_tokens=25, stop=[stop], details=True)
    assert lm.generate(prompt, max_new_tokens=25, stop=[stop], details=True, draft="prompt-lookup") == cut


def test_a_draft_with_another_tokenizer_is_a_one_line_error(lms):
    with pytest.raises(LmlabError, match="another tokenizer") as e:
        lms["target"].generate("Hello", max_new_tokens=4, draft=lms["stranger"])
    assert e.value.params == ("draft",)


def test_speculative_decoding_takes_greedy_or_sampling_only(lms):
    with pytest.raises(LmlabError, match="strategy greedy or sample"):
        GenerationConfig(draft="prompt-lookup", strategy="beam", num_beams=2)
    with pytest.raises(LmlabError, match="num_draft_tokens is 0"):
        GenerationConfig(draft="prompt-lookup", num_draft_tokens=0)


# -- several rows: one BatchedSpeculativeEngine ---------------------------------------------------------------

TEXTS = ("The cat sat on the mat. The cat", "Once", "a b a b a b a b a")


def test_several_prompts_draft_together_and_each_gets_its_plain_greedy_output(lms):
    lm = lms["target"]
    prompts = [lm.tokenizer.encode(text) for text in TEXTS]
    assert len({len(p) for p in prompts}) == 3  # prompts of different lengths
    options = dict(max_new_tokens=20, ignore_eos=True)
    alone = [lm.complete_ids([p], **options)[0][0] for p in prompts]
    stop = alone[0].text[6:9]
    cut = [lm.complete_ids([p], stop=[stop], **options)[0][0] for p in prompts]
    assert cut[0].finish_reason == "stop" and len(cut[0].token_ids) < 20  # the stop string ends the first early
    assert [len(c.token_ids) for c in alone] == [20, 20, 20] and {c.finish_reason for c in alone} == {"length"}
    for draft in ("prompt-lookup", str(lms["draft"]), str(lms["itself"])):
        got = lm.complete_ids(prompts, draft=draft, num_draft_tokens=3, **options)
        assert [row[0] for row in got] == alone, draft
        stats = lm.last_speculation
        assert stats.drafted > 0 and stats.emitted == 60 and stats.rounds < 20  # the rows share each pass
        assert [row[0] for row in lm.complete_ids(prompts, draft=draft, stop=[stop], **options)] == cut
    assert stats.accepted == stats.drafted  # the model drafting for itself: every draft kept
    lm.complete_ids(prompts, draft="prompt-lookup", **options)
    assert lm.last_speculation.accepted > 0


def test_several_prompts_with_a_draft_keep_processors_and_logprobs(lms):
    lm = lms["target"]
    prompts = [lm.tokenizer.encode(text) for text in TEXTS]
    options = dict(max_new_tokens=12, repetition_penalty=1.5, min_new_tokens=4, logprobs=2)
    alone = [lm.complete_ids([p], **options)[0][0] for p in prompts]
    got = [row[0] for row in lm.complete_ids(prompts, draft=str(lms["draft"]), **options)]
    for a, b in zip(alone, got):
        assert (a.token_ids, a.text, a.finish_reason, a.tokens) == (b.token_ids, b.text, b.finish_reason, b.tokens)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert [[i for i, _ in alts] for alts in a.top_logprobs] == [[i for i, _ in alts] for alts in b.top_logprobs]


def test_sampled_return_sequences_with_a_draft_are_reproducible_and_differ(lms):
    lm = lms["target"]
    options = dict(strategy="sample", num_return_sequences=3, max_new_tokens=10, ignore_eos=True, top_k=50)
    first = lm.generate(["The cat sat", "Once"], seed=7, draft="prompt-lookup", return_ids=True, **options)
    assert [len(row) for row in first] == [3, 3] and all(len(ids) == 10 for row in first for ids in row)
    assert lm.generate(["The cat sat", "Once"], seed=7, draft="prompt-lookup", return_ids=True, **options) == first
    assert len({tuple(ids) for ids in first[0]}) > 1  # each row draws with its own generator
    one = lm.generate("The cat sat", seed=7, draft=str(lms["draft"]), **options)
    assert len(one) == 3 and lm.generate("The cat sat", seed=7, draft=str(lms["draft"]), **options) == one
    assert lm.generate("The cat sat", seed=8, draft=str(lms["draft"]), **options) != one


def test_generate_records_with_a_draft_batches_and_equals_plain_records(lms):
    lm, options = lms["target"], dict(max_new_tokens=8, ignore_eos=True, logprobs=0)
    plain = lm.generate_records(list(TEXTS), batch_size=2, **options)
    drafted = lm.generate_records(list(TEXTS), batch_size=2, draft="prompt-lookup", **options)
    assert [(r["prompt"], r["token_ids"], r["completion"]) for r in drafted] == [
        (r["prompt"], r["token_ids"], r["completion"]) for r in plain
    ]
    assert lm.last_speculation.emitted == 8  # the last batch held the third prompt alone


def test_batched_speculation_sizes_its_cache_to_the_rows(lms, monkeypatch):
    """Several rows with a drafter: the engine's KV cache holds the longest prompt + max_new_tokens per row, not
    the model's whole context window."""
    from lmlab.generate import speculative_engine

    sizes = []
    real = speculative_engine.BatchedSpeculativeEngine.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        sizes.append((self.cache.k[0].shape[0], self.cache.k[0].shape[2]))

    monkeypatch.setattr(speculative_engine.BatchedSpeculativeEngine, "__init__", spy)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = lms["target"].complete_ids(prompts, max_new_tokens=6, ignore_eos=True, draft="prompt-lookup")
    assert [len(row[0].token_ids) for row in out] == [6, 6]
    assert sizes == [(2, 5 + 6)] and lms["target"].block_size > 11
