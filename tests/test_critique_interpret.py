"""The interpretability lens: recomputed attention is the attention the model used (probs·V through the
projection gives the module's output; causal; padding masked) for MHA, RoPE + GQA and a post-norm
encoder; integrated gradients are complete and converge; a classifier trained so that one keyword
decides the label attributes most to that keyword; the logit lens's last layer is the model's output."""

from __future__ import annotations

import io
import json
import random

import matplotlib.image
import pytest
import torch
from conftest import TINY_TRAIN

from lmlab.config import preset
from lmlab.critique.core import load_subject
from lmlab.critique.interpret import attention_maps, integrated_gradients, interpret, layer_logits
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import train_tokenizer

FILLER = ["the", "film", "was", "really", "a", "plot", "and", "acting", "quite", "story", "today", "we", "saw"]
KEYWORD = {"pos": "great", "neg": "awful"}  # the one word that decides the label


def sentences(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=6)
        words.insert(rng.randrange(7), KEYWORD[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n") and matplotlib.image.imread(io.BytesIO(data), format="png").ndim == 3


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(
        [r["text"] for r in sentences(300, 0)] + ["the cat sat on the mat"] * 5, kind="bpe", vocab_size=300
    )


def tiny(family, tok, **overrides):
    torch.manual_seed(0)
    # a larger init makes attention far from uniform, so the checks below are not met by chance
    return build_model(preset(family, vocab_size=tok.vocab_size, init_std=0.2, dropout=0.0, **overrides)).eval()


@pytest.mark.parametrize("family", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_recomputed_attention_is_the_attention_the_model_used(family, tok):
    model = tiny(family, tok)
    decoder = model.config.arch == "decoder"
    ids = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    pads = (
        slice(0, 4) if decoder else slice(8, 12)
    )  # decoders pad on the left (as batched generation does), encoders on the right
    mask[1, pads] = 0
    captured = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: captured.append((m, args, out))) for b in model.blocks]
    probs = attention_maps(model, ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    assert (
        len(probs) == len(captured) == model.config.n_layer
    )  # attention_maps ran the model once: the hooks saw that pass
    for p, (attn, (x, rope, m, is_causal, *_), out) in zip(probs, captured):
        B, T, C = x.shape
        assert p.shape == (B, attn.n_head, T, T)
        assert torch.allclose(p.sum(-1), torch.ones(B, attn.n_head, T), atol=1e-6)
        if decoder:
            assert p.triu(diagonal=1).abs().max() == 0  # causal: nothing above the diagonal
            assert p[1, :, 4:, pads].abs().max() == 0  # real queries never see the padding
        else:
            assert p[1, :, :, pads].abs().max() == 0
        assert p.max() > 0.5  # not uniform: the reconstruction below is a real test
        # the oracle: the probabilities times V, heads merged, through the output projection = the module's output
        kv = attn.n_kv_heads * attn.head_dim
        v = attn.qkv(x)[..., C + kv :].view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = v.repeat_interleave(attn.n_head // attn.n_kv_heads, dim=1)
        y = attn.proj((p @ v).transpose(1, 2).reshape(B, T, C))
        assert torch.allclose(y, out, atol=1e-5), (y - out).abs().max()


def test_integrated_gradients_are_complete_and_converge(tok):
    model = tiny("llama-tiny", tok)
    ids = torch.tensor([tok.encode("the film was really great and the plot")])
    baseline = torch.full_like(ids, tok.pad_id)
    target = 7

    def f(x):
        return model(x)[:, -1].log_softmax(-1)[:, target]

    with torch.no_grad():
        gap = float(f(ids) - f(baseline))
    deltas = []
    for steps in (4, 128):
        attributions, delta = integrated_gradients(model, f, ids, baseline, n_steps=steps)
        assert attributions.shape == (ids.shape[1],)
        assert float(attributions.sum()) - gap == pytest.approx(
            delta, abs=1e-5
        )  # the reported delta is the real shortfall
        deltas.append(abs(delta))
    assert deltas[0] > 1e-3 * abs(gap)  # too few steps show an error…
    assert deltas[1] < 0.01 * abs(gap) and deltas[1] < deltas[0]  # …that enough steps remove


def test_logit_lens_last_layer_is_the_models_output(tok):
    ids = torch.tensor([tok.encode("the cat sat on the mat and")])
    for family in ("gpt2-tiny", "bert-tiny"):
        model = tiny(family, tok)
        lens = layer_logits(model, ids)
        with torch.no_grad():
            own = model(ids)[0]
        assert lens.shape == (model.config.n_layer + 1, *own.shape)
        assert torch.allclose(lens[-1], own, atol=1e-5)
        assert torch.equal(lens[-1].argmax(-1), own.argmax(-1))
        assert not torch.allclose(lens[0], own, atol=1e-3)  # the embedding row is read from a different state


@pytest.mark.slow
def test_lm_report_explains_the_models_next_token(tok, tmp_path):
    model = tiny("gpt2-tiny", tok)
    subject = load_subject(save_checkpoint(tmp_path / "lm", model, tokenizer=tok))
    text = (
        "the film was really great and the plot was quite a story that we saw today and the acting was really "
        "quite great"
    )
    section = interpret(subject, text=text, ig_steps=16)
    m = section.metrics
    ids = tok.encode(text)[:24]
    with torch.no_grad():
        predicted = int(model(torch.tensor([ids]))[0, -1].argmax())
    assert m["input_tokens"] == 24 and m["input_truncated"]
    assert m["logit_lens_final_token"] == tok.decode([predicted]).strip() == m["ig_target"]
    assert m["logit_lens_rank_per_layer"][-1] == 1 and len(m["logit_lens_rank_per_layer"]) == 3
    assert len(m["attention_entropy_per_layer"]) == 2
    assert set(m) <= set(section.explain)  # every metric explained
    assert [f.title for f in section.figures] == [
        "Attention per layer and head",
        "Token attributions (integrated gradients)",
        "Logit lens",
    ]
    assert all(is_png(f.png) for f in section.figures)
    named = interpret(subject, text="we saw the", target=" film", ig_steps=8)
    assert named.metrics["ig_target"] == "film"
    with pytest.raises(LmlabError, match="layers"):
        interpret(subject, text="the cat", layers=[5])
    with pytest.raises(LmlabError, match="tokens; give one token"):
        interpret(subject, text="the cat", target="the cat sat")


@pytest.mark.slow
def test_classifier_attributes_its_label_to_the_deciding_keyword(tok, tmp_path):
    from lmlab.train.finetune import finetune

    base = save_checkpoint(
        tmp_path / "base", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, dropout=0.0)), tokenizer=tok
    )
    train = write_jsonl(tmp_path / "train.jsonl", sentences(400, 1))
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "we saw a film and great acting today", "label": "pos"}])
    args = dict(
        TINY_TRAIN, micro_batch_size=16, lr=2e-3, warmup_steps=5, eval_interval=80, log_interval=20, keep_last=1, seed=0
    )
    result = finetune(
        base,
        "classify",
        train,
        tmp_path / "run",
        valid=write_jsonl(tmp_path / "valid.jsonl", sentences(60, 2)),
        max_length=16,
        max_steps=80,
        **args,
    )
    assert result.val_scores["accuracy"] >= 0.9, result.val_scores
    subject = load_subject(result.best_checkpoint, data=test)
    first = interpret(subject)  # the first example of the test file
    assert "first example" in first.method
    assert first.metrics["ig_target"] == "pos" and first.metrics["ig_top_token"] == "great"
    assert first.metrics["ig_relative_delta"] < 0.05
    assert first.metrics["classifier_lens_per_layer"][-1] > 0.9  # the last layer is the model's own confident output
    other = interpret(subject, text="the story was awful and the plot today", target="neg")
    assert other.metrics["ig_top_token"] == "awful"
    with pytest.raises(LmlabError, match="not one of the model's labels"):
        interpret(subject, target="meh")
    assert all(is_png(f.png) for f in first.figures + other.figures)
    assert [f.title for f in first.figures][-1] == "Classifier lens"


def test_encoder_decoder_skips_attributions_with_a_note(tok, tmp_path):
    subject = load_subject(save_checkpoint(tmp_path / "t5", tiny("t5-tiny", tok), tokenizer=tok))
    section = interpret(subject, text="the cat sat on the mat")
    assert "Integrated gradients were not run" in section.method
    assert "ig_target" not in section.metrics and section.metrics["logit_lens_rank_per_layer"][-1] == 1
    assert len(section.metrics["attention_entropy_per_layer"]) == subject.config.n_layer
