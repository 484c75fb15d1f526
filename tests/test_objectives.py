"""Training objectives: BERT's masking statistics, whole-word masking, NSP pairs, family checks, and an
encoder pretraining run (mlm+nsp) that learns and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TRAIN

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import list_checkpoints, load_model
from lmlab.objectives import IGNORE_INDEX, CausalLM, MaskedLM, get_objective
from lmlab.train.data import EpochWindows
from lmlab.train.pretrain import pretrain


@pytest.fixture(scope="module")
def wordpiece(corpus_file):
    from lmlab.data import read_corpus
    from lmlab.tokenizer import train_tokenizer

    return train_tokenizer(read_corpus(corpus_file), kind="wordpiece", vocab_size=600)


@pytest.fixture(scope="module")
def wordpiece_data(corpus_file, wordpiece, tmp_path_factory):
    from lmlab.data.pack import prepare

    folder = tmp_path_factory.mktemp("wp")
    wordpiece.save(folder / "tok")
    prepare(corpus_file, folder / "tok", folder / "data", valid_fraction=0.1, show_progress=False)
    return folder / "data"


def windows(tokenizer, n=64, T=65, seed=0):
    text = " ".join(["the list is sorted in place and returns none"] * 40)
    ids = torch.tensor(tokenizer.encode(text))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - T, (n,), generator=g)
    return torch.stack([ids[s : s + T] for s in starts.tolist()])


def test_masking_statistics_follow_bert(wordpiece):
    objective = MaskedLM(wordpiece)
    tokens = windows(wordpiece, n=256)
    batch = objective.batch(tokens, torch.Generator().manual_seed(0))
    ids = torch.cat(
        [torch.full((256, 1), wordpiece.bos_id), tokens[:, :-1][:, :62], torch.full((256, 1), wordpiece.eos_id)], 1
    )
    assert batch["input_ids"].shape == ids.shape == batch["labels"].shape
    chosen = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][chosen], ids[chosen])  # labels are the original tokens
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS] and [SEP] are never chosen
    rate = chosen.float().mean().item() * ids.shape[1] / (ids.shape[1] - 2)
    assert rate == pytest.approx(0.15, abs=0.01)
    inputs = batch["input_ids"][chosen]
    masked = (inputs == wordpiece.mask_id).float().mean().item()
    kept = (inputs == ids[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1 + 0.1 / wordpiece.vocab_size, abs=0.03)  # 10% kept (+ random picks of itself)
    assert torch.equal(batch["input_ids"][~chosen], ids[~chosen])
    again = objective.batch(tokens, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], batch["input_ids"])  # the same position gives the same masks
    other = objective.batch(tokens, torch.Generator().manual_seed(1))
    assert not torch.equal(other["labels"], batch["labels"])  # another step, other masks (dynamic masking)


def test_whole_word_masking_chooses_every_piece_of_a_word(wordpiece):
    objective = get_objective("wwm", wordpiece)
    tokens = windows(wordpiece, n=128)
    batch = objective.batch(tokens, torch.Generator().manual_seed(2))
    chosen = batch["labels"] != IGNORE_INDEX
    ids = torch.where(chosen, batch["labels"], batch["input_ids"])
    continues = objective.continues[ids]
    assert continues.any(), "the test text must contain words split into pieces"
    # a piece that continues a word is chosen exactly when the piece before it is
    # (unless the window cut the word: then the piece before is [CLS])
    inside = continues[:, 1:] & ~objective.special[ids[:, :-1]]
    assert torch.equal(chosen[:, 1:][inside], chosen[:, :-1][inside])
    assert chosen[:, 1:][inside].any()


def test_nsp_pairs_are_cls_a_sep_b_sep_with_half_random(wordpiece):
    objective = MaskedLM(wordpiece, nsp=True, mask_prob=0.01)
    tokens = windows(wordpiece, n=200, seed=3)
    batch = objective.batch(tokens, torch.Generator().manual_seed(0))
    ids = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])
    types, labels = batch["token_type_ids"], batch["nsp_labels"]
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.1)
    for row in range(200):
        seps = (ids[row] == wordpiece.eos_id).nonzero().flatten().tolist()
        assert ids[row, 0] == wordpiece.bos_id and len(seps) == 2 and seps[1] == ids.shape[1] - 1
        a = seps[0]
        assert types[row, : a + 1].eq(0).all() and types[row, a + 1 :].eq(1).all()
        if labels[row] == 0:  # B is what followed A in the same window
            assert torch.equal(ids[row, 1 : seps[1]][torch.arange(seps[1] - 1) != a - 1], tokens[row, : seps[1] - 2])


def test_objectives_refuse_the_wrong_family_or_tokenizer(wordpiece, tokenizer_dir):
    from lmlab.tokenizer import Tokenizer

    with pytest.raises(LmlabError, match="mlm trains encoder models; the model is a decoder"):
        get_objective("mlm", wordpiece, preset("gpt2-tiny"))
    with pytest.raises(LmlabError, match="clm trains decoder models"):
        get_objective("clm", wordpiece, preset("bert-tiny"))
    with pytest.raises(LmlabError, match="needs a tokenizer with a mask token"):
        get_objective("mlm", Tokenizer.load(tokenizer_dir))  # byte-level BPE: no [MASK]
    with pytest.raises(LmlabError, match="unknown objective 'bogus'"):
        get_objective("bogus", wordpiece)
    assert isinstance(get_objective("clm"), CausalLM)


def losses(run):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r] + [
        (r["step"], r["val_loss"]) for r in records if "val_loss" in r
    ]


def test_bert_pretraining_learns_and_resumes_exactly(wordpiece_data, tmp_path, monkeypatch):
    args = dict(TINY_TRAIN, max_steps=12, eval_interval=4, log_interval=1, seed=3, lr=2e-3)
    pretrain("bert-tiny", wordpiece_data, tmp_path / "whole", objective="mlm+nsp", **args)
    curve = losses(tmp_path / "whole")
    train = [loss for step, loss in curve[:12]]
    assert sum(train[-3:]) < sum(train[:3])  # it learns

    real_call = EpochWindows.__call__

    def crash(self, step, micro_step):
        if step == 6:
            raise KeyboardInterrupt
        return real_call(self, step, micro_step)

    monkeypatch.setattr(EpochWindows, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain("bert-tiny", wordpiece_data, tmp_path / "killed", objective="mlm+nsp", **args)
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [4]
    monkeypatch.setattr(EpochWindows, "__call__", real_call)
    pretrain("bert-tiny", wordpiece_data, tmp_path / "killed", objective="mlm+nsp", resume=True, **args)
    assert losses(tmp_path / "killed") == curve  # masks, pairs and dropout all replay exactly
    model = load_model(tmp_path / "killed" / "step-00000012")
    assert model.config.arch == "encoder" and model.config.nsp_head


def test_an_encoder_checkpoint_refuses_to_generate(wordpiece, tmp_path):
    import lmlab
    from lmlab.io.checkpoint import save_checkpoint
    from lmlab.model import build_model

    save_checkpoint(
        tmp_path / "bert", build_model(preset("bert-tiny", vocab_size=wordpiece.vocab_size)), tokenizer=wordpiece
    )
    lm = lmlab.load(tmp_path / "bert")
    with pytest.raises(LmlabError, match="is an encoder .* does not generate it"):
        lm.generate("the list")
