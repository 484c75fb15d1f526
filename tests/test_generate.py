"""The decoding paths: greedy equals argmax, sampling rules hold, beams beat greedy, batches are independent,
the cache changes nothing, stop strings cut exactly, log-probs add up, streaming is UTF-8 safe."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import lmlab
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.generate import (
    BeamSearch,
    GenerationConfig,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    decode,
)
from lmlab.generate.stopping import cut_at_stop, held_back
from lmlab.model import build_model


@pytest.fixture(params=["gpt2-tiny", "llama-tiny"])
def model(request):
    torch.manual_seed(0)
    return build_model(preset(request.param, vocab_size=101)).eval()


def run(model, prompts, n, **kw):
    """(B, steps) tokens of :func:`decode`."""
    return torch.stack([step.tokens for step in decode(model, prompts, max_new_tokens=n, **kw)], dim=1)


def sum_logprob(model, prompt, new):
    with torch.no_grad():
        logp = model(torch.tensor([prompt + new]))[0].float().log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(new))


def beam(model, prompts, n, **kw):
    search = BeamSearch(model, prompts, max_new_tokens=n, **kw)
    committed = list(search.run())
    return search, committed


# -- greedy, cache, batches -----------------------------------------------------------------------


def test_greedy_equals_argmax_of_a_full_forward_at_every_step(model):
    prompt = [5, 17, 3, 99, 42]
    out = run(model, [prompt], 12)[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt) :]


def test_kv_cache_decode_equals_no_cache_decode(model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [50]]
    kw = dict(processors=[RepetitionPenalty(1.3), NoRepeatNGram(2)])
    assert torch.equal(run(model, prompts, 10, **kw), run(model, prompts, 10, use_cache=False, **kw))
    cached = [step.logprobs for step in decode(model, prompts, max_new_tokens=6, logprobs=0)]
    uncached = [step.logprobs for step in decode(model, prompts, max_new_tokens=6, logprobs=0, use_cache=False)]
    torch.testing.assert_close(torch.stack(cached), torch.stack(uncached), atol=1e-4, rtol=0)


@pytest.mark.parametrize("penalised", [False, True])
def test_a_prompt_output_does_not_depend_on_its_batch(model, penalised):
    # penalties read the token buffer, whose left padding must count for nothing
    processors = [RepetitionPenalty(1.5), PresenceFrequencyPenalty(0.5, 0.5), NoRepeatNGram(2)] if penalised else []
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [50]]
    batched = run(model, prompts, 8, processors=processors)
    for row, prompt in enumerate(prompts):
        assert batched[row].tolist() == run(model, [prompt], 8, processors=processors)[0].tolist()


def test_stop_ids_end_a_row_and_finished_rows_are_inactive(model):
    first = run(model, [[4, 5, 6]], 1)[0, 0].item()
    steps = list(decode(model, [[4, 5, 6], [9, 9]], max_new_tokens=6, stop_ids=[first], pad_id=0))
    assert steps[0].finished[0] and steps[0].active[0]
    assert all(not s.active[0] and s.tokens[0] == 0 for s in steps[1:])
    assert len(list(decode(model, [[4, 5, 6]], max_new_tokens=10, stop_ids=[first]))) == 1  # all done: the loop ends


def test_stop_rules_finish_a_row(model):
    steps = list(decode(model, [[4, 5, 6]], max_new_tokens=10, stop_rules=[lambda generated: len(generated) == 3]))
    assert len(steps) == 3 and steps[-1].finished.all()


# -- sampling ---------------------------------------------------------------------------------


def test_top_k_never_keeps_a_token_outside_the_k_most_likely():
    torch.manual_seed(0)
    scores = torch.randn(4, 50)
    kept = TopK(5)(None, scores).isfinite()
    assert kept.sum(-1).tolist() == [5, 5, 5, 5]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, scores.topk(5).indices, True))


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert TopP(0.7)(None, scores).isfinite().tolist() == [[True, True, False, False]]
    assert TopP(0.8)(None, scores).isfinite().tolist() == [[True, True, False, False]]
    assert TopP(0.81)(None, scores).isfinite().tolist() == [[True, True, True, False]]
    assert TopP(0.1)(None, scores).isfinite().tolist() == [[True, False, False, False]]
    tied = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert TopP(0.5)(None, tied).isfinite().all()  # the boundary falls among equal tokens: all of them stay


def test_top_p_keeps_what_a_full_sort_keeps():
    """TopP bins the scores instead of sorting them; on 50k-token vocabularies, flat to peaked, with
    removed tokens, it keeps exactly the sort-based rule's set (in float64, where rounding cannot move
    the boundary; in float32 the two differ only there, by a token or so)."""

    def by_sort(p, scores):
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= p
        return drop.scatter(-1, order, drop)

    g = torch.Generator().manual_seed(0)
    for scale in (0.05, 1.0, 8.0):
        scores = torch.randn(4, 50_000, generator=g, dtype=torch.float64) * scale
        scores[1, ::3] = float("-inf")
        for p in (0.05, 0.5, 0.9, 0.99):
            assert torch.equal(TopP(p)(None, scores).isinf(), by_sort(p, scores)), (scale, p)
    assert TopP(1.0)(None, scores) is scores


def test_min_p_and_typical_p_keep_what_they_say():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert MinP(0.3)(None, scores).isfinite().tolist() == [[True, True, True, False]]  # ≥ 0.15
    assert MinP(0.7)(None, scores).isfinite().tolist() == [[True, False, False, False]]
    uniform = torch.zeros(1, 8)
    assert TypicalP(0.5)(None, uniform).isfinite().sum() == 4  # every token is typical: the first half by mass


@pytest.mark.parametrize("warper", ["top_p", "top_k"])
def test_sampled_tokens_stay_inside_top_k_and_the_nucleus(model, warper):
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
    if warper == "top_k":
        processor, allowed = TopK(5), set(logits.topk(5).indices.tolist())
    else:
        processor = TopP(0.5)
        allowed = set(torch.nonzero(processor(None, logits[None]).isfinite()[0]).flatten().tolist())
        assert 1 < len(allowed) < 101
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        step = next(decode(model, [prompt], max_new_tokens=1, processors=[processor], sample=True, generator=g))
        seen.add(int(step.tokens[0]))
    assert seen <= allowed and len(seen) > 1


def test_temperature_near_zero_equals_greedy(model):
    prompt = [[9, 8, 7]]
    g = torch.Generator().manual_seed(1)
    cold = run(model, prompt, 10, processors=[Temperature(1e-4)], sample=True, generator=g)
    assert torch.equal(cold, run(model, prompt, 10))


def test_same_seed_same_sample_and_another_seed_another(model):
    kw = dict(processors=[Temperature(1.5)], sample=True)
    a = run(model, [[1, 2]], 16, generator=torch.Generator().manual_seed(7), **kw)
    b = run(model, [[1, 2]], 16, generator=torch.Generator().manual_seed(7), **kw)
    c = run(model, [[1, 2]], 16, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_follows_the_distribution():
    """Inverse-CDF sampling draws each token with its probability (a χ² test over 200k draws), never a
    zero-probability token, every row from its own distribution, and a seed repeats the draws."""
    from lmlab.generate.loop import _sample

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(50, generator=g) ** 2 + 0.01
    probs[::7] = 0.0
    probs /= probs.sum()
    n = 200_000
    rows = probs.expand(n, 50).contiguous()  # one draw per row: all rows share one flattened cumulative sum
    draws = _sample(rows, torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=50).double()
    assert counts[probs == 0].sum() == 0
    expected = probs[probs > 0].double() * n
    chi2 = ((counts[probs > 0] - expected) ** 2 / expected).sum()
    assert chi2 < 74.7  # 41 degrees of freedom: a correct sampler exceeds this once in 1000 seeds
    assert torch.equal(draws, _sample(rows, torch.Generator().manual_seed(1)))

    one_hot = torch.zeros(1000, 7).scatter_(1, torch.randint(0, 7, (1000, 1), generator=g), 1.0)
    assert torch.equal(_sample(one_hot, g), one_hot.argmax(-1))


# -- penalties ------------------------------------------------------------------------------------


def test_penalties_count_only_real_tokens():
    ids = torch.tensor([[-1, -1, 3, 3, 5]])
    scores = torch.tensor([[1.0, 2.0, -2.0, 4.0, 0.5, -1.0]])
    rep = RepetitionPenalty(2.0)(ids, scores)
    assert rep.tolist() == [[1.0, 2.0, -2.0, 2.0, 0.5, -2.0]]  # only tokens 3 and 5; token 0 (padding slot) untouched
    pf = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)
    pf.begin(prompt_len=3)  # the generated tokens are [3, 5]
    assert pf(ids, scores).tolist() == [[1.0, 2.0, -2.0, 3.25, 0.5, -1.75]]


def test_no_repeat_ngram_bans_exactly_the_completing_tokens():
    ids = torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2]])  # seen after (1, 2): 3 and 4
    out = NoRepeatNGram(3)(ids, torch.zeros(1, 6))
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [3, 4]
    padded = torch.tensor([[-1, -1, 7, 8]])
    assert NoRepeatNGram(3)(padded, torch.zeros(1, 9)).isfinite().all()


def test_min_new_tokens_forbids_the_end_until_then():
    p = MinNewTokens(2, eos_ids=[0])
    p.begin(prompt_len=3)
    assert p(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5))[0, 0] == float("-inf")
    assert p(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5))[0, 0] == 0


def test_processors_agree_with_hugging_face():
    tf = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (3, 12), generator=g)
    scores = torch.randn(3, 40, generator=g) * 3
    pairs = [
        (RepetitionPenalty(1.7), tf.RepetitionPenaltyLogitsProcessor(1.7)),
        (NoRepeatNGram(2), tf.NoRepeatNGramLogitsProcessor(2)),
        (Temperature(0.7), tf.TemperatureLogitsWarper(0.7)),
        (TopK(7), tf.TopKLogitsWarper(7)),
        (TopP(0.8), tf.TopPLogitsWarper(0.8)),
        (MinP(0.2), tf.MinPLogitsWarper(0.2)),
        (TypicalP(0.6), tf.TypicalLogitsWarper(0.6)),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours(ids, scores.clone()), theirs(ids, scores.clone()), msg=type(ours).__name__)


# -- beam search ----------------------------------------------------------------------------------


def test_one_beam_equals_greedy(model):
    search, _ = beam(model, [[5, 6, 7]], 10, num_beams=1)
    assert search.results[0][0].tokens == run(model, [[5, 6, 7]], 10)[0].tolist()


@pytest.mark.parametrize("num_beams", [2, 4])
def test_more_beams_score_at_least_greedy(trained_run, num_beams):
    # not a theorem (a beam can drop greedy's path), but it holds on a trained model's peaked distributions;
    # an untrained model's near-uniform ones make ties of 1e-3 that say nothing about the search
    lm = lmlab.load(trained_run)
    for text in ("The ", "A list", "Return the"):
        prompt = lm.tokenizer.encode(text)
        greedy = run(lm.model, [prompt], 8)[0].tolist()
        search, _ = beam(lm.model, [prompt], 8, num_beams=num_beams)
        best = search.results[0][0]
        assert len(best.tokens) == 8
        assert best.sum_logprob == pytest.approx(sum_logprob(lm.model, prompt, best.tokens), abs=1e-3)
        assert best.sum_logprob >= sum_logprob(lm.model, prompt, greedy) - 1e-4


def test_beam_search_as_wide_as_the_vocabulary_finds_the_best_two_tokens():
    torch.manual_seed(1)
    model = build_model(preset("gpt2-tiny", vocab_size=12)).eval()
    prompt = [3, 4]
    search, _ = beam(model, [prompt], 2, num_beams=12, num_return_sequences=3)
    exhaustive = sorted(
        ((sum_logprob(model, prompt, [a, b]), [a, b]) for a, b in itertools.product(range(12), repeat=2)), reverse=True
    )
    assert [h.tokens for h in search.results[0]] == [seq for _, seq in exhaustive[:3]]


def test_beam_batches_stops_and_committed_prefixes(model):
    prompts = [[5, 6, 7], [40, 2, 9, 9, 1]]
    stop = run(model, [prompts[0]], 3)[0, 2].item()  # greedy's third token ends some hypotheses
    kw = dict(num_beams=3, num_return_sequences=3, stop_ids=[stop], length_penalty=1.0)
    search, committed = beam(model, prompts, 8, **kw)
    for i, prompt in enumerate(prompts):
        alone, _ = beam(model, [prompt], 8, **kw)
        assert [h.tokens for h in search.results[i]] == [h.tokens for h in alone.results[0]]
        scores = [h.score for h in search.results[i]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        for h in search.results[i]:
            assert (h.finish_reason == "stop") == (h.tokens[-1] == stop) and stop not in h.tokens[:-1]
        # what a stream shows only grows, and ends as a prefix of the best result
        shown = [c[i] for c in committed]
        assert all(a == b[: len(a)] for a, b in zip(shown, shown[1:]))
        assert search.results[i][0].tokens[: len(shown[-1])] == shown[-1]


# -- the API --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(trained_run):
    return lmlab.load(trained_run)


def test_load_generate_and_stream_from_a_checkpoint(lm):
    text = lm.generate("The ", max_new_tokens=12, ignore_eos=True)
    assert isinstance(text, str) and text
    assert lm.generate(["The ", "A list"], max_new_tokens=12, ignore_eos=True)[0] == text
    ids = lm.generate("The ", max_new_tokens=12, return_ids=True, ignore_eos=True)
    assert len(ids) == 12 and lm.tokenizer.decode(ids) == text
    assert "".join(lm.stream("The ", max_new_tokens=12, ignore_eos=True)) == text
    s1 = lm.generate("The ", max_new_tokens=12, strategy="sample", temperature=0.9, top_k=20, seed=3)
    assert s1 == lm.generate("The ", max_new_tokens=12, strategy="sample", temperature=0.9, top_k=20, seed=3)
    assert lm.generate("The ", max_new_tokens=12, strategy="sample", temperature=0, ignore_eos=True) == text


def test_n_samples_per_prompt_and_the_shapes_returned(lm):
    one = lm.generate("The ", max_new_tokens=6, strategy="sample", num_return_sequences=3, seed=0)
    assert isinstance(one, list) and len(one) == 3 and all(isinstance(t, str) for t in one)
    two = lm.generate(["The ", "A"], max_new_tokens=6, strategy="beam", num_beams=3, num_return_sequences=2)
    assert [len(r) for r in two] == [2, 2]
    c = lm.generate("The ", max_new_tokens=6, strategy="beam", num_beams=3, details=True)
    assert isinstance(c, lmlab.Completion) and c.score is not None and c.finish_reason in ("stop", "length")


def test_generate_records_batches_prompts_into_one_record_per_output(lm):
    prompts = ["The ", "A list", "大语言"]
    options = dict(max_new_tokens=4, strategy="sample", seed=1, num_return_sequences=2)
    records = lm.generate_records(prompts, batch_size=2, logprobs=2, **options)
    assert [(r["prompt"], r["index"]) for r in records] == [(p, i) for p in prompts for i in (0, 1)]
    assert all(len(r["logprobs"]) == len(r["token_ids"]) == len(r["tokens"]) == len(r["top_logprobs"]) for r in records)
    assert all(
        len(alts) == 2 and {"id", "token", "logprob"} == set(alts[0]) for r in records for alts in r["top_logprobs"]
    )
    one_by_one, together = (lm.generate_records(prompts, batch_size=n, max_new_tokens=4) for n in (1, 8))
    assert one_by_one == together  # the batch size changes nothing
    assert len(together) == 3 and "logprobs" not in together[0]
    beams = lm.generate_records(["The "], max_new_tokens=4, strategy="beam", num_beams=2, logprobs=0)
    assert beams[0]["score"] is not None and "top_logprobs" not in beams[0]
    assert len(beams[0]["logprobs"]) == len(beams[0]["token_ids"])
    with pytest.raises(LmlabError, match="batch_size is 0"):
        lm.generate_records(prompts, batch_size=0)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_stop_strings_cut_exactly(lm, strategy):
    options = dict(max_new_tokens=24, ignore_eos=True, strategy=strategy, no_repeat_ngram_size=2)
    if strategy == "beam":
        options["num_beams"] = 2
    full = lm.generate("The ", **options)
    # 3 characters (they may span tokens) from the 6th on, not all blank, that do not open the text
    start = next(i for i in range(5, len(full) - 3) if full[i : i + 3].strip() and full.index(full[i : i + 3]) > 0)
    stop = full[start : start + 3]
    cut = full[: full.index(stop)]
    assert stop.strip() and 0 < len(cut) < len(full), full
    c = lm.generate("The ", stop=[stop], details=True, **options)
    decoded = lm.tokenizer.decode(c.token_ids)
    assert c.finish_reason == "stop" and stop not in c.text and decoded.startswith(c.text + stop)
    if strategy == "greedy":
        assert c.text == cut  # the same tokens as without the stop string, cut where it begins
    # (a beam that trips a stop string finishes and competes under the length penalty, so it may win earlier)
    assert "".join(lm.stream("The ", stop=[stop], **options)) == c.text
    assert lm.generate("The ", stop=["never in the text \u2603"], **options) == full


def test_stop_string_helpers():
    assert cut_at_stop("abc<end>def<x>", ["<x>", "<end>"]) == ("abc", True)
    assert cut_at_stop("abc", ["<x>"]) == ("abc", False)
    assert held_back("hello <e", ["<end>"]) == 2 and held_back("hello", ["<end>"]) == 0


# -- the text stream: incremental decoding -----------------------------------------------------------

STREAM_WORDS = "The| list| is| sorted|.|\n| é|té| 日本|語| 🙂|👍🏽| a<b>|<end>| ok".split("|")  # multi-byte: split ids


@pytest.fixture(scope="module")
def stream_tokenizers(tokenizer_dir, corpus_file):
    """A byte-level BPE (the session's) and a SentencePiece-style Unigram with byte fallback."""
    from lmlab.data import read_corpus
    from lmlab.tokenizer import Tokenizer, train_tokenizer

    texts = list(itertools.islice(read_corpus(corpus_file), 40))
    return {"bpe": Tokenizer.load(tokenizer_dir), "unigram": train_tokenizer(texts, kind="unigram", vocab_size=400)}


def redecode_pieces(decode, stop, pushes):
    """The pieces of the stream as it was made before: every id decoded again on every push (the oracle)."""
    pieces, shown, text, hit = [], 0, "", False
    for tokens in pushes:
        text, hit = cut_at_stop(decode(list(tokens)), stop)
        if hit:
            limit = len(text)
        elif text.endswith("\ufffd"):
            pieces.append("")
            continue
        else:
            limit = len(text) - held_back(text, stop)
        pieces.append(text[shown:limit] if limit > shown else "")
        shown = max(shown, limit)
        if hit:
            break
    return pieces, text[shown:], hit


def random_case(rng, tokenizer):
    """Ids (of words with multi-byte characters, or any ids at all), stop strings, the growing prefixes pushed
    and whether the ids are those of a text."""
    text = rng.random() < 0.7
    if text:
        ids = tokenizer.encode("".join(rng.choice(STREAM_WORDS) for _ in range(rng.randint(1, 40))))
    else:  # any ids: UTF-8 sequences cut anywhere, stray continuation bytes, special tokens
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 60))]
    full = tokenizer.decode(ids)
    stop = [s for s in ["<end>", "é", " 日本語", "🙂👍", "\n\n"] if rng.random() < 0.3]
    for _ in range(rng.randint(0, 2)):  # pieces of the text itself, so stops are found (and prefixes held)
        i = rng.randrange(len(full) + 1)
        stop.append(full[i : i + rng.randint(1, 6)] or "zz")
    stop = [s for s in stop if "\ufffd" not in s]  # a stop on U+FFFD also matches a character not yet whole
    ends, n = [], 0
    while n < len(ids):
        n = min(len(ids), n + (1 if rng.random() < 0.7 else rng.randint(2, 5)))
        ends.append(n)
    return ids, stop, [ids[:n] for n in ends], text


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_text_stream_pieces_join_to_the_whole_decode_cut_at_the_first_stop(stream_tokenizers, kind):
    """Random ids, stop strings and push sizes: the pieces are those of decoding every id on every push, and
    with flush() they join to the whole decode cut at the first stop string (of the ids pushed when one is
    found: a stop string that ends first wins over one that began before it and is not yet whole)."""
    import random

    from lmlab.generate.stopping import TextStream

    tokenizer, rng = stream_tokenizers[kind], random.Random(0)
    assert len(tokenizer.encode("日本🙂")) > 3  # characters split across tokens
    hits = 0
    for _ in range(300):
        ids, stop, pushes, text = random_case(rng, tokenizer)
        stream = TextStream(tokenizer.decode, stop)
        pieces = []
        for tokens in pushes:
            pieces.append(stream.push(tokens))
            if stream.hit:  # generation ends here: the text is that of these tokens
                break
        rest = stream.flush()
        assert (pieces, rest, stream.hit) == redecode_pieces(tokenizer.decode, stop, pushes), (ids, stop)
        if kind == "unigram" and not text:
            continue  # byte fallback makes a whole run of byte ids U+FFFD once one is invalid: no stream can join
        expected, hit = cut_at_stop(tokenizer.decode(tokens), stop)
        assert "".join(pieces) + rest == expected == stream.text and stream.hit == hit, (ids, stop)
        assert hit == cut_at_stop(tokenizer.decode(ids), stop)[1]
        hits += hit
    assert 30 < hits < 270  # both kinds of case were drawn


def test_text_stream_decodes_each_id_a_bounded_number_of_times(stream_tokenizers):
    """Streaming T tokens decodes O(T) ids in all (decoding every id on every push is T²/2)."""
    from lmlab.generate.stopping import TextStream

    tokenizer = stream_tokenizers["bpe"]
    ids = tokenizer.encode(" ".join(STREAM_WORDS) * 200)[:2000]
    assert len(ids) == 2000
    decoded = []

    def counting(tokens):
        decoded.append(len(tokens))
        return tokenizer.decode(tokens)

    stream = TextStream(counting, ["never in the text", "<stop>"])
    text = "".join(stream.push(ids[:n]) for n in range(1, len(ids) + 1)) + stream.flush()
    assert text == tokenizer.decode(ids) and not stream.hit
    assert sum(decoded) < 20 * len(ids) and max(decoded) <= 40


def test_text_stream_reads_again_when_new_ids_change_earlier_text():
    """A decoder that rewrites text across tokens (as clean-ups do), or ids that do not extend the last push's:
    the stream decodes every id again and stays what decoding them all on every push gives."""
    from lmlab.generate.stopping import TextStream

    words = "I do not know what to say , so no ! I will say no more .".split()

    def decode(ids):
        return " ".join(words[i] for i in ids).replace(" ,", ",").replace(" no !", " NO!").replace(" .", ".")

    ids = list(range(len(words)))
    pushes = [ids[:n] for n in range(1, len(ids) + 1)]
    pushes += [ids[:-3] + [2, 12, 3, 15], ids[:-3] + [2, 12, 3, 15, 1]]  # not the last push's ids and more
    for stop in ([], ["NO"], ["say no more"], ["not", "know"]):
        calls = []
        stream = TextStream(lambda t: calls.append(len(t)) or decode(t), stop)
        pieces = [stream.push(p) for p in pushes if not stream.hit]
        assert (pieces, stream.flush(), stream.hit) == redecode_pieces(decode, stop, pushes)
        assert stream.hit or len([n for n in calls if n >= len(words) - 3]) >= 2  # it did read everything again


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_log_probs_sum_to_the_scored_log_likelihood(lm, strategy):
    options = dict(strategy=strategy, max_new_tokens=10, ignore_eos=True)
    options.update(seed=1) if strategy == "sample" else options.update(num_beams=2)
    c = lm.generate("The ", logprobs=3, **options)
    assert len(c.logprobs) == len(c.token_ids) == len(c.top_logprobs) == len(c.tokens) == 10
    score = lm.score("The ", c.token_ids)
    assert score.logprob == pytest.approx(sum(c.logprobs), abs=1e-3)
    for lp, alternatives in zip(c.logprobs, c.top_logprobs):
        values = [v for _, v in alternatives]
        assert values == sorted(values, reverse=True) and values[0] >= lp - 1e-5


def test_score_a_text_and_a_continuation(lm):
    s = lm.score("The list is sorted")
    n = len(lm.tokenizer.encode("The list is sorted"))
    assert lm.tokenizer.bos_id is not None and s.num_tokens == n  # after <|endoftext|>, every token is scored
    lm_no_bos = lmlab.LM(lm.model, lm.tokenizer)
    lm_no_bos.tokenizer = type("NoBos", (), {"bos_id": None, "encode": lm.tokenizer.encode})()
    assert lm_no_bos.score("The list is sorted").num_tokens == n - 1  # without one, the first token is given
    assert s.perplexity == pytest.approx(torch.tensor(-s.logprob / s.num_tokens).exp().item())
    pair = lm.score("The list", " is sorted")
    assert pair.token_ids == lm.tokenizer.encode("The list is sorted")[len(lm.tokenizer.encode("The list")) :]
    both = lm.score(["The list", "A"], [" is sorted", " b"])
    assert both[0].logprob == pytest.approx(pair.logprob, abs=1e-5)


def test_max_length_and_min_new_tokens(lm):
    ids = lm.tokenizer.encode("The ")
    assert len(lm.generate("The ", max_length=len(ids) + 4, max_new_tokens=50, return_ids=True, ignore_eos=True)) == 4
    assert len(lm.generate("The ", max_new_tokens=5, min_new_tokens=5, return_ids=True)) == 5


def test_the_folders_generation_config_eos_ids_end_generation(lm, trained_run, tmp_path):
    """Like transformers' generate(), generation stops at every eos_token_id of the folder's
    generation_config.json (Llama 3 Instruct lists two), besides the tokenizer's end-of-text."""
    import json
    import shutil

    from lmlab.io.checkpoint import resolve_checkpoint

    free = lm.generate("The ", max_new_tokens=8, return_ids=True, ignore_eos=True)
    assert lm.generate("The ", max_new_tokens=8, return_ids=True) == free  # the tokenizer's end-of-text alone: no stop
    k = next((i for i in range(1, len(free)) if free[i] not in free[:i]), 0)
    stop = free[k]  # a token greedy decoding makes first at step k (after others, if it can)
    folder = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(trained_run), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [lm.tokenizer.eos_id, stop]}))
    with_file = lmlab.load(folder)
    assert with_file.eos_ids == sorted({lm.tokenizer.eos_id, stop})
    cut = with_file.generate("The ", max_new_tokens=8, return_ids=True)
    assert cut == free[:k]  # the stop token ends the output and is not part of it
    assert with_file.generate("The ", max_new_tokens=8, return_ids=True, ignore_eos=True) == free
    for bad in ('{"eos_token_id": "</s>"}', '{"eos_token_id": [1, -3]}', "{not json"):
        (folder / "generation_config.json").write_text(bad)
        with pytest.raises(LmlabError, match="generation_config.json"):
            lmlab.load(folder)


def test_an_eos_id_past_the_vocabulary_is_ignored_with_a_warning(trained_run, tmp_path, caplog):
    """Small test models often keep GPT-2's eos 50256 in generation_config.json with a smaller vocabulary:
    transformers runs them, and so does lmlab, leaving out the id no token can have."""
    import json
    import shutil

    from lmlab.io.checkpoint import resolve_checkpoint

    folder = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(trained_run), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 99999999]}))
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        lm = lmlab.load(folder)
    assert 99999999 not in lm.eos_ids and 1 in lm.eos_ids
    assert "eos_token_id 99999999 is past the vocabulary" in caplog.text
    assert isinstance(lm.generate("The ", max_new_tokens=3), str)


def test_a_too_long_prompt_is_cut_from_the_left_with_a_warning(lm, caplog):
    long = "The list is sorted. " * 200
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        assert isinstance(lm.generate(long, max_new_tokens=4), str)
    assert "cut to its last" in caplog.text
    with pytest.raises(LmlabError, match="truncate left"):
        lm.generate(long, max_new_tokens=4, truncate="error")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=-1.0, strategy="sample"), "temperature is -1.0"),
        (dict(top_p=1.5, strategy="sample"), r"top_p is 1.5: expected a number in \(0, 1\]"),
        (dict(top_p=0.0, strategy="sample"), "top_p is 0.0"),
        (dict(top_k=-1, strategy="sample"), "top_k is -1"),
        (dict(num_beams=4, strategy="sample"), "num_beams 4 needs strategy beam"),
        (dict(top_p=0.9), "top_p shape"),
        (dict(strategy="nucleus"), "unknown strategy 'nucleus'"),
        (dict(repetition_penalty=0.0), "repetition_penalty is 0.0"),
        (dict(presence_penalty=3.0), r"presence_penalty is 3.0: expected a number in \[-2, 2\]"),
        (dict(num_return_sequences=5, strategy="beam", num_beams=2), "at most num_beams"),
        (dict(max_new_tokens=0), "max_new_tokens is 0"),
        (dict(colour="red"), "unknown generation option"),
    ],
)
def test_bad_options_are_one_line_errors(lm, options, message):
    with pytest.raises(LmlabError, match=message):
        lm.generate("The ", **options)


def test_empty_prompt_is_an_error(lm):
    with pytest.raises(LmlabError, match="prompt 0 is empty"):
        lm.generate("")
    with pytest.raises(LmlabError, match="at least one token of prompt"):
        list(decode(lm.model, [[]], max_new_tokens=3))


def test_stream_holds_a_character_split_across_byte_tokens_until_whole(lm, monkeypatch):
    ids = lm.tokenizer.encode("大语言模型")
    assert len(ids) > 5  # byte-level tokens: a Chinese character spans several (vocab of 512)

    def fake(self, prompt_ids, new, config):
        for n in range(1, len(ids) + 1):
            yield ids[:n]

    monkeypatch.setattr(type(lm), "_token_stream", fake)
    pieces = list(lm.stream("x", max_new_tokens=len(ids)))
    assert "".join(pieces) == "大语言模型"
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 1


def test_generation_config_turns_temperature_zero_into_greedy():
    assert not GenerationConfig(strategy="sample", temperature=0).samples
    assert GenerationConfig(strategy="sample").samples
    assert GenerationConfig(strategy="sample", top_k=5, top_p=0.9).processors([]).__len__() == 2


# -- the compiled decode step (torch.compile; a CUDA graph on GPU) ----------------------------------


def _compile_model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return build_model(preset("llama-tiny", vocab_size=101)).eval().to(device=device, dtype=dtype)


def test_compiled_decode_step_equals_the_eager_one():
    """One compile (padded batch of 3), then greedy tokens, log-probs and seeded samples all match eager decoding."""
    model = _compile_model()
    prompts = [[5, 17, 3, 99, 42], [7, 8], [1, 2, 3]]
    steps = {c: list(decode(model, prompts, max_new_tokens=12, logprobs=3, compile=c)) for c in (False, True)}
    eager, compiled = steps[False], steps[True]
    assert torch.equal(torch.stack([s.tokens for s in compiled], 1), torch.stack([s.tokens for s in eager], 1))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.top_logprobs, a.top_logprobs, atol=1e-5, rtol=1e-5)
    sampled = [
        run(
            model,
            prompts,
            12,
            processors=[TopK(20)],
            sample=True,
            generator=torch.Generator().manual_seed(3),
            compile=c,
        )
        for c in (False, True)
    ]
    assert torch.equal(sampled[0], sampled[1])


def test_compile_through_the_api_and_its_errors(tmp_path):
    model = _compile_model()
    with pytest.raises(LmlabError, match="compile needs a decoder-only model decoding with its KV cache"):
        list(decode(model, [[1, 2]], max_new_tokens=2, use_cache=False, compile=True))
    seq2seq = build_model(preset("t5-tiny", vocab_size=101)).eval()
    from lmlab.generate.seq2seq import condition_on_sources

    decoder, starts = condition_on_sources(seq2seq, [[4, 5, 6]])
    with pytest.raises(LmlabError, match="encoder–decoders decode eagerly"):
        list(decode(decoder, starts, max_new_tokens=2, compile=True))
    assert GenerationConfig(compile=True).compile


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_graph_decoding_equals_eager_decoding_token_for_token():
    """The compiled step on CUDA runs as a CUDA graph (mode="reduce-overhead") over the static cache; greedy
    tokens and beam search match eager decoding exactly in fp32, and the graph replays across generations."""
    model = _compile_model("cuda")
    prompts = [[5, 17, 3, 99, 42], [7, 8], [1, 2, 3]]
    eager = run(model, prompts, 24)
    assert torch.equal(run(model, prompts, 24, compile=True), eager)
    assert torch.equal(run(model, prompts, 24, compile=True), eager)  # a second generation replays the graph
    searches = [beam(model, [[5, 17, 3]], 10, num_beams=3, compile=c)[0].results for c in (False, True)]
    assert [h.tokens for h in searches[0][0]] == [h.tokens for h in searches[1][0]]


@cuda
def test_compiled_step_logits_match_eager_in_bf16():
    model = _compile_model("cuda", torch.bfloat16)
    prompts = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11]]
    eager = list(decode(model, prompts, max_new_tokens=16, logprobs=0))
    compiled = list(decode(model, prompts, max_new_tokens=16, logprobs=0, compile=True))
    # bf16 keeps 8 bits of mantissa: log-probs of the same tokens agree to bf16 rounding; a near-tie may flip a token,
    # after which the sequences differ, so compare up to the first difference
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=5e-2, rtol=5e-2)
        if not torch.equal(a.tokens, b.tokens):
            break
