"""Checkpoint folders: safetensors round trip, atomic replace, clear errors on folders that are not checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import is_checkpoint, load_model, resolve_checkpoint, save_checkpoint
from lmlab.model import build_model


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_save_load_gives_identical_logits_and_a_plain_safetensors_file(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(preset(name, vocab_size=64)).eval()
    save_checkpoint(tmp_path / "ck", model, meta={"step": 1})
    weights = load_file(tmp_path / "ck" / "model.safetensors")
    assert ("lm_head.weight" in weights) == (not model.config.tie_embeddings)  # a tied head is stored once
    loaded = load_model(tmp_path / "ck")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == model.config.tie_embeddings


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    a = build_model(preset("gpt2-tiny", vocab_size=64))
    b = build_model(preset("gpt2-tiny", vocab_size=64))
    save_checkpoint(tmp_path / "ck", a)
    save_checkpoint(tmp_path / "ck", b)
    assert torch.equal(load_model(tmp_path / "ck").tok_emb.weight, b.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_failed_write_leaves_no_partial_folder(tmp_path):
    class Broken:
        def write_files(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", build_model(preset("gpt2-tiny", vocab_size=64)), tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(LmlabError, match="is not a checkpoint: expected a folder with config.json"):
        load_model(tmp_path)
    with pytest.raises(LmlabError, match="no such checkpoint folder"):
        resolve_checkpoint(tmp_path / "missing")


def test_mismatched_weights_name_the_tensor(tmp_path):
    save_checkpoint(tmp_path / "ck", build_model(preset("gpt2-tiny", vocab_size=64)))
    other = preset("gpt2-tiny", vocab_size=64, n_layer=3)
    other.save(tmp_path / "ck" / "config.json")
    with pytest.raises(LmlabError, match=r"missing blocks\.2\."):
        load_model(tmp_path / "ck")


def test_a_run_folder_resolves_to_its_best_checkpoint(trained_run):
    assert resolve_checkpoint(trained_run) == trained_run / "best"
    assert is_checkpoint(trained_run / "step-00000030")
