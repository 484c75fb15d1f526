"""The encoder–decoder (2017 Transformer / T5 style): causal decoder over a fully seen source, padding
that changes nothing, a KV cache equal to full passes, exact sizes, checkpoints, generation through
lmlab's decoding loop, T5's span corruption, and a tiny model that learns to reverse sequences."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.generate.seq2seq import generate_seq2seq, seq2seq_beam_search
from lmlab.io.checkpoint import load_model, save_checkpoint
from lmlab.model import Seq2SeqLM, build_model
from lmlab.model.seq2seq import shift_right
from lmlab.objectives import IGNORE_INDEX, SpanCorruption, get_objective

VOCAB = 97
# the two families: T5 (pre-norm, RMSNorm, RoPE, no bias) and the 2017 Transformer (post-norm, learned positions)
TINY = {
    "t5": dict(name="t5-tiny"),
    "transformer": dict(
        name="transformer-base", n_layer=2, n_decoder_layer=3, n_head=2, n_embd=64, intermediate_size=128, block_size=64
    ),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads
    contending with other processes made this file 10-40× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(family: str, **overrides) -> Seq2SeqLM:
    args = dict(TINY[family])
    name = args.pop("name")
    torch.manual_seed(0)
    return build_model(preset(name, **{"vocab_size": VOCAB, **args, **overrides})).eval()


def ids(B, T, seed):
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# -- the model ------------------------------------------------------------------------------------


def test_shapes_tied_embedding_and_exact_parameter_counts():
    model = tiny("t5")
    src, tgt = ids(3, 7, 0), ids(3, 5, 1)
    assert isinstance(model, Seq2SeqLM)
    assert model.encode(src).shape == (3, 7, 64)
    assert model(src, tgt).shape == (3, 5, VOCAB)
    assert model.lm_head.weight is model.tok_emb.weight  # one embedding: source, target and output
    assert len(model.enc_blocks) == 2 and len(model.dec_blocks) == 2
    for family in TINY:
        m = tiny(family)
        assert m.num_params() == m.config.num_params()
        assert m.num_params(include_embeddings=False) == m.config.num_params(include_embeddings=False)
    assert tiny("t5", tie_embeddings=False).num_params() == tiny("t5", tie_embeddings=False).config.num_params()
    for name in ("t5-tiny", "t5-mini", "t5-small", "transformer-base"):
        with torch.device("meta"):
            assert build_model(preset(name)).num_params() == preset(name).num_params()
    # T5-small is 60,506,624 with its relative position bias (2 × 32 buckets × 8 heads), which RoPE replaces
    assert preset("t5-small").num_params() == 60_506_624 - 2 * 32 * 8
    assert 60e6 < preset("transformer-base").num_params() < 66e6  # "65M" (Vaswani et al., Table 3)


def test_config_names_the_fields_seq2seq_does_not_build():
    with pytest.raises(LmlabError, match="'pooler'.*seq2seq"):
        preset("t5-tiny", pooler=True)
    with pytest.raises(LmlabError, match="'decoder_start_token_id'"):
        preset("t5-tiny", vocab_size=10, decoder_start_token_id=10)
    assert preset("t5-tiny", n_decoder_layer=None).n_decoder_layer == 2  # None: as many as the encoder


@pytest.mark.parametrize("family", list(TINY))
def test_decoder_is_causal_and_sees_the_whole_source(family):
    model = tiny(family)
    src, tgt = ids(1, 6, 2), ids(1, 5, 3)
    with torch.no_grad():
        base = model(src, tgt)
        for t in range(tgt.shape[1]):
            changed = tgt.clone()
            changed[0, t] = changed[0, t] % (VOCAB - 2) + 2 if changed[0, t] != VOCAB - 1 else 2
            out = model(src, changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)  # earlier positions: unchanged
            assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-4)
        for s in range(src.shape[1]):  # every source token reaches every target position
            changed = src.clone()
            changed[0, s] = 2 if changed[0, s] != 2 else 3
            out = model(changed, tgt)
            assert all(not torch.allclose(out[0, t], base[0, t], atol=1e-5) for t in range(tgt.shape[1]))


@pytest.mark.parametrize("family", list(TINY))
def test_source_padding_with_attention_mask_changes_nothing(family):
    model = tiny(family)
    src, tgt = ids(1, 5, 4), ids(1, 4, 5)
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        alone = model(src, tgt)
        with_pad = model(padded, tgt, attention_mask=mask)
        torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode(padded, mask)[:, :5], model.encode(src), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(TINY))
def test_kv_cached_greedy_decoding_equals_greedy_from_full_passes(family):
    model = tiny(family)
    sources = [ids(1, 6, 6)[0].tolist(), ids(1, 3, 7)[0].tolist()]  # different lengths: a padded batch
    n = 8
    expected = []
    with torch.no_grad():
        for source in sources:  # the reference: one source at a time, the whole target every step
            out = [model.config.decoder_start_token_id]
            for _ in range(n):
                logits = model(torch.tensor([source]), torch.tensor([out]))
                out.append(int(logits[0, -1].argmax()))
            expected.append(out[1:])
    for use_cache in (True, False):
        steps = list(generate_seq2seq(model, sources, max_new_tokens=n, use_cache=use_cache))
        got = torch.stack([s.tokens for s in steps], dim=1).tolist()
        assert got == expected, f"use_cache={use_cache}"

    # step logits through the cache equal a full pass over the same target
    src, tgt = torch.tensor([sources[0]]), torch.tensor([[0] + expected[0]])
    with torch.no_grad():
        full = model(src, tgt)
        memory_kv = model.memory_kv(model.encode(src))
        cache = model.new_kv_cache(1, tgt.shape[1])
        for t in range(tgt.shape[1]):
            step = model.decode(
                tgt[:, t : t + 1], memory_kv=memory_kv, kv_cache=cache, input_pos=torch.tensor([t]), cache_len=t + 1
            )
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)


def test_generation_stops_samples_reproducibly_and_refuses_bad_input():
    model = tiny("t5")
    sources = [[5, 6, 7], [8, 9]]
    greedy = torch.stack([s.tokens for s in generate_seq2seq(model, sources, max_new_tokens=6)], dim=1)
    stop = int(greedy[0, 2])
    steps = list(generate_seq2seq(model, sources[:1], max_new_tokens=6, stop_ids=[stop]))
    assert len(steps) <= 3 and steps[-1].finished.all() and int(steps[-1].tokens[0]) == stop

    def sampled(seed):
        g = torch.Generator().manual_seed(seed)
        return [s.tokens.tolist() for s in generate_seq2seq(model, sources, max_new_tokens=5, sample=True, generator=g)]

    assert sampled(1) == sampled(1)
    with pytest.raises(LmlabError, match="at least one source token"):
        list(generate_seq2seq(model, [[]], max_new_tokens=2))
    with pytest.raises(LmlabError, match="block_size"):
        list(generate_seq2seq(model, [[3] * 200], max_new_tokens=2))


@pytest.mark.parametrize("family", list(TINY))
def test_beam_search_follows_each_source(family):
    model = tiny(family)
    sources = [ids(1, 6, 8)[0].tolist(), ids(1, 4, 9)[0].tolist()]
    greedy = torch.stack([s.tokens for s in generate_seq2seq(model, sources, max_new_tokens=5)], dim=1).tolist()
    one = seq2seq_beam_search(model, sources, num_beams=1, max_new_tokens=5)
    list(one.run())
    assert [r[0].tokens for r in one.results] == greedy
    search = seq2seq_beam_search(
        model, sources, num_beams=3, max_new_tokens=5, num_return_sequences=3, length_penalty=0.0
    )
    list(search.run())
    with torch.no_grad():  # each hypothesis' score is its log-probability given *its own* source
        for source, hyps in zip(sources, search.results):
            for hyp in hyps:
                tgt = torch.tensor([[0] + hyp.tokens])
                logp = model(torch.tensor([source]), tgt[:, :-1]).log_softmax(-1).gather(-1, tgt[:, 1:, None]).sum()
                assert math.isclose(hyp.sum_logprob, float(logp), abs_tol=1e-4)
            assert hyps[0].sum_logprob >= hyps[-1].sum_logprob


@pytest.mark.parametrize("family", list(TINY))
def test_checkpoint_round_trip_gives_identical_logits(family, tmp_path):
    model = tiny(family, tie_embeddings=family == "t5")
    src, tgt = ids(2, 6, 10), ids(2, 4, 11)
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, Seq2SeqLM)
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == (family == "t5")
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, tgt), model(src, tgt), atol=0, rtol=0)


# -- span corruption ------------------------------------------------------------------------------


def sentinel_tokenizer(n_sentinels: int = 40, n_words: int = 300):
    """A word-level tokenizer with T5's special tokens: <pad> </s> <unk> and <extra_id_0> … <extra_id_{n-1}>."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from lmlab.tokenizer import Tokenizer

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": 3 + i for i in range(n_words)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(n_sentinels)])
    return Tokenizer(backend)


def expand(inputs: list[int], target: list[int], sentinels: list[int], eos: int) -> list[int]:
    """Undo span corruption: put back, for every sentinel in the input, the span that follows it in the target."""
    assert inputs[-1] == eos and target[-1] == eos
    spans, current = {}, None
    for t in target[:-1]:
        if t in sentinels:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1]:
        out += spans[t] if t in sentinels else [t]
    return out


def test_span_corruption_reconstructs_the_window_at_15_percent_noise():
    tok = sentinel_tokenizer()
    objective = get_objective("span", tok, preset("t5-tiny"))
    assert isinstance(objective, SpanCorruption) and objective.arch == "seq2seq"
    windows = torch.randint(3, 303, (256, 129), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    batch = objective.batch(windows, torch.Generator().manual_seed(1))
    n, noise, spans = objective.plan(128)
    assert batch["input_ids"].shape == (256, n - noise + spans + 1) and batch["input_ids"].shape[1] <= 128
    assert batch["labels"].shape == (256, noise + spans + 1)
    sentinels = objective.sentinels.tolist()
    assert sentinels[0] == tok.token_to_id("<extra_id_0>")
    is_sentinel = torch.isin(batch["labels"], objective.sentinels)
    dropped = (batch["labels"] != tok.eos_id) & ~is_sentinel
    assert abs(dropped.sum().item() / (256 * n) - 0.15) < 0.01  # noise density
    assert abs(dropped.sum().item() / is_sentinel.sum().item() - 3.0) < 0.2  # mean span length
    for row in range(256):
        inputs, target = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert [t for t in inputs if t in sentinels] == sentinels[:spans]  # <extra_id_0>, <extra_id_1>, … in order
        assert expand(inputs, target, sentinels, tok.eos_id) == windows[row, :n].tolist()
    again = objective.batch(windows, torch.Generator().manual_seed(1))
    other = objective.batch(windows, torch.Generator().manual_seed(2))
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # same generator seed, same batch
    assert not torch.equal(batch["labels"], other["labels"])


def test_span_corruption_loss_trains_a_seq2seq_model():
    tok = sentinel_tokenizer()
    objective = SpanCorruption(tok)
    model = build_model(preset("t5-tiny", vocab_size=tok.vocab_size, dropout=0.0)).train()
    batch = objective.batch(torch.randint(3, 303, (4, 33)), torch.Generator().manual_seed(0))
    loss = objective.loss(model, batch)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and abs(loss.item() - math.log(tok.vocab_size)) < 1.0
    loss.backward()
    assert model.dec_blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0


def test_span_corruption_refuses_missing_sentinels_and_the_wrong_family():
    with pytest.raises(LmlabError, match="<extra_id_0>"):
        SpanCorruption(sentinel_tokenizer(n_sentinels=0))
    with pytest.raises(LmlabError, match="3 sentinels"):
        SpanCorruption(sentinel_tokenizer(n_sentinels=3)).batch(torch.randint(3, 303, (2, 129)))
    with pytest.raises(LmlabError, match="span trains seq2seq models; the model is a decoder"):
        get_objective("span", sentinel_tokenizer(), preset("gpt2-tiny"))


@pytest.mark.slow
def test_pretrain_with_span_corruption_learns_and_checkpoints(tmp_path):
    import json

    from lmlab.data import builtin_corpus, read_corpus
    from lmlab.data.pack import prepare
    from lmlab.tokenizer import train_tokenizer
    from lmlab.train.pretrain import pretrain

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in builtin_corpus(max_chars=40_000)), encoding="utf-8"
    )
    train_tokenizer(read_corpus(corpus), kind="bpe", vocab_size=400, sentinels=20).save(tmp_path / "tok")
    prepare(corpus, tmp_path / "tok", tmp_path / "data", valid_fraction=0.1, show_progress=False)
    result = pretrain(
        "t5-tiny",
        tmp_path / "data",
        tmp_path / "run",
        objective="span",
        max_steps=12,
        eval_interval=12,
        log_interval=4,
        micro_batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=2,
        eval_batches=2,
        progress=False,
        tensorboard=False,
    )
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0] and math.isfinite(result.val_loss)
    assert isinstance(load_model(tmp_path / "run"), Seq2SeqLM)


def test_shift_right_starts_with_the_start_token():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert shift_right(labels, 0).tolist() == [[0, 5, 6, 7]]
    assert shift_right(torch.tensor([[5, IGNORE_INDEX, IGNORE_INDEX]]), 1).tolist() == [[1, 5, 1]]


# -- it learns ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_seq2seq_learns_to_reverse_random_sequences():
    # the 2017 family: reversal needs absolute positions, which learned embeddings give the encoder at once;
    # a bidirectional RoPE encoder (the T5 presets) sees relative offsets only and learns it far more slowly
    V, T, EOS, steps = 16, 6, 1, 100  # ids: 0 start/pad, 1 eos, 2..15 symbols
    model = tiny("transformer", vocab_size=V, dropout=0.0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def pairs(B):
        src = torch.randint(2, V, (B, T), generator=g)
        return src, torch.cat([src.flip(1), torch.full((B, 1), EOS)], dim=1)

    for _ in range(steps):
        src, tgt = pairs(32)
        logits = model(src, shift_right(tgt, model.config.decoder_start_token_id))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    src, tgt = pairs(64)  # unseen sequences, decoded greedily
    out = torch.stack([s.tokens for s in generate_seq2seq(model, src.tolist(), max_new_tokens=T + 1)], dim=1)
    accuracy = (out == tgt).float().mean().item()
    assert accuracy >= 0.9, f"greedy token accuracy {accuracy:.2f} after {steps} steps (loss {loss.item():.3f})"
