"""The decoding path: greedy equals argmax, sampling rules hold, batches are independent, streaming is UTF-8 safe."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.generate import Temperature, TopK, TopP, decode
from lmlab.model import build_model


@pytest.fixture(params=["gpt2-tiny", "llama-tiny"])
def model(request):
    torch.manual_seed(0)
    return build_model(preset(request.param, vocab_size=101)).eval()


def run(model, prompts, n, **kw):
    return torch.stack(list(decode(model, prompts, max_new_tokens=n, **kw)), dim=1)  # (B, n)


def test_greedy_equals_argmax_of_a_full_forward_at_every_step(model):
    prompt = [5, 17, 3, 99, 42]
    out = run(model, [prompt], 12)[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_a_prompt_output_does_not_depend_on_its_batch(model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [50]]
    batched = run(model, prompts, 8)
    for row, prompt in enumerate(prompts):
        assert batched[row].tolist() == run(model, [prompt], 8)[0].tolist()


def test_stop_ids_end_a_row_and_finished_rows_yield_padding(model):
    first = run(model, [[4, 5, 6]], 1)[0, 0].item()
    out = run(model, [[4, 5, 6]], 10, stop_ids=[first], pad_id=0)
    assert out.shape[1] == 1  # every row finished: the loop stops early


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


def test_sampled_tokens_stay_inside_top_k_and_nucleus(model):
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
    top5 = set(logits.topk(5).indices.tolist())
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        first = next(decode(model, [prompt], max_new_tokens=1, processors=[TopK(5)], sample=True, generator=g))
        assert int(first) in top5


def test_temperature_near_zero_equals_greedy(model):
    prompt = [[9, 8, 7]]
    g = torch.Generator().manual_seed(1)
    cold = run(model, prompt, 10, processors=[Temperature(1e-4)], sample=True, generator=g)
    assert torch.equal(cold, run(model, prompt, 10))


def test_same_seed_same_sample(model):
    kw = dict(processors=[Temperature(1.5)], sample=True)
    a = run(model, [[1, 2]], 10, generator=torch.Generator().manual_seed(7), **kw)
    b = run(model, [[1, 2]], 10, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)


def test_too_long_and_empty_prompts_are_errors(model):
    with pytest.raises(LmlabError, match="exceeds the model's block_size 128"):
        run(model, [[1] * 100], 50)
    with pytest.raises(LmlabError, match="at least one token of prompt"):
        run(model, [[]], 5)
    with pytest.raises(LmlabError, match="--top-p"):
        TopP(1.5)


def test_load_generate_and_stream_from_a_checkpoint(trained_run):
    lm = lmlab.load(trained_run)
    text = lm.generate("The ", max_new_tokens=12, stop_at_eos=False)
    assert isinstance(text, str) and text
    assert lm.generate(["The ", "A list"], max_new_tokens=12, stop_at_eos=False)[0] == text
    ids = lm.generate("The ", max_new_tokens=12, return_ids=True, stop_at_eos=False)
    assert len(ids) == 12 and lm.tokenizer.decode(ids) == text
    assert "".join(lm.stream("The ", max_new_tokens=12, stop_at_eos=False)) == text
    s1 = lm.generate("The ", max_new_tokens=12, strategy="sample", temperature=0.9, top_k=20, seed=3)
    assert s1 == lm.generate("The ", max_new_tokens=12, strategy="sample", temperature=0.9, top_k=20, seed=3)


def test_stream_holds_a_character_split_across_byte_tokens_until_whole(trained_run, monkeypatch):
    lm = lmlab.load(trained_run)
    ids = lm.tokenizer.encode("大语言模型")
    assert len(ids) > 5  # byte-level tokens: a Chinese character spans several (vocab of 512)
    monkeypatch.setattr(type(lm), "_tokens", lambda self, *a, **k: (torch.tensor([i]) for i in ids))
    pieces = list(lm.stream("x", max_new_tokens=len(ids)))
    assert "".join(pieces) == "大语言模型"
    assert all("\ufffd" not in p for p in pieces)
