"""``export_onnx``: a decoder → model.onnx (prefill and decode, the KV cache as inputs and outputs) with dynamic
batch, sequence and cache axes, run by onnxruntime: logits within 1e-4 of lmlab's, greedy tokens through the cache
equal; checked before the folder is moved into place."""

from __future__ import annotations

import json

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_hf import lmlab_model  # noqa: E402

from lmlab.config import preset  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.io.checkpoint import load_model, save_checkpoint  # noqa: E402
from lmlab.io.export import to_onnx  # noqa: E402
from lmlab.io.export.to_onnx import empty_cache, export_onnx  # noqa: E402
from lmlab.tokenizer import Tokenizer  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_onnxruntime_gives_lmlabs_logits_for_any_batch_and_length(tmp_path, tokenizer_dir, name):
    src = save_checkpoint(
        tmp_path / "ckpt", lmlab_model(preset(name, vocab_size=512)), tokenizer=Tokenizer.load(tokenizer_dir)
    )
    out = export_onnx(src, tmp_path / "onnx")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "onnx"]  # no temporary left
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "onnx" and record["max_abs_logit_diff"] <= 1e-4 and record["greedy_tokens_equal"] == 8
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "cache_position", "past_keys", "past_values"]
    model = load_model(src)
    for b, t in ((1, 1), (2, 30), (4, 3)):  # other shapes than the check's and the trace's
        ids = torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(b + t))
        cache = empty_cache(model.config, b, t + 5).numpy()
        feed = {"input_ids": ids.numpy(), "cache_position": torch.arange(t).numpy()}
        logits, keys, _ = session.run(None, {**feed, "past_keys": cache, "past_values": cache})
        with torch.no_grad():
            assert (torch.from_numpy(logits) - model(ids)).abs().max().item() <= 1e-4
        assert keys.shape == cache.shape and (keys[:, :, :, t:] == 0).all() and (keys[:, :, :, :t] != 0).any()
    # two decode steps of a batch of 2 through the cache: the last token's logits of the whole sequence
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(9))
    keys = values = empty_cache(model.config, 2, 8).numpy()
    feed = {"input_ids": ids[:, :4].numpy(), "cache_position": torch.arange(4).numpy()}
    _, keys, values = session.run(None, {**feed, "past_keys": keys, "past_values": values})
    for t in (4, 5):
        feed = {"input_ids": ids[:, t : t + 1].numpy(), "cache_position": torch.tensor([t]).numpy()}
        logits, keys, values = session.run(None, {**feed, "past_keys": keys, "past_values": values})
        with torch.no_grad():
            assert (torch.from_numpy(logits[:, 0]) - model(ids[:, : t + 1])[:, -1]).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_a_wrong_graph_fails_the_check_and_nothing_is_moved_into_place(tmp_path, monkeypatch):
    src = save_checkpoint(tmp_path / "ckpt", lmlab_model(preset("llama-tiny", vocab_size=64)))

    class NoMask(to_onnx.CachedLogits):  # attention that sees every slot, the future's too: the logits differ
        def forward(self, input_ids, cache_position, past_keys, past_values):
            cache = to_onnx.GraphCache(past_keys, past_values)
            mask = torch.ones(1, 1, input_ids.shape[1], past_keys.shape[3], dtype=torch.bool)
            logits = self.model(input_ids, kv_cache=cache, input_pos=cache_position, attn_mask=mask)
            return logits, torch.stack(cache.k), torch.stack(cache.v)

    monkeypatch.setattr(to_onnx, "CachedLogits", NoMask)
    with pytest.raises(LmlabError, match="export check of .*onnxruntime's logits differ from lmlab's by"):
        export_onnx(src, tmp_path / "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides, output",
    [
        ("bert-tiny", dict(task="classify", num_labels=3, labels=["a", "b", "c"]), (3, 3)),
        ("bert-tiny", dict(task="qa", num_labels=2, labels=["start", "end"]), (3, 9, 2)),
        ("bert-tiny", dict(type_vocab_size=0), (3, 9, 128)),
        ("llama-tiny", dict(task="tag", num_labels=3, labels=["a", "b", "c"]), (3, 9, 3)),
        ("gpt2-tiny", dict(task="classify", num_labels=3, labels=["a", "b", "c"]), (3, 3)),
    ],
)
def test_encoders_and_task_heads_are_one_graph_with_lmlabs_outputs(tmp_path, name, overrides, output):
    config = preset(name, vocab_size=64, dropout=0.0, **overrides)
    src = save_checkpoint(tmp_path / "ckpt", lmlab_model(config))
    out = export_onnx(src, tmp_path / "onnx")
    assert json.loads((out / "export.json").read_text())["max_abs_output_diff"] <= 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask"] + (["token_type_ids"] if config.type_vocab_size else [])
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    segments = torch.zeros(3, 9, dtype=torch.long)
    segments[:, 4:] = 1
    feed = dict(zip(names, (ids, mask, segments)))
    (theirs,) = session.run(None, {k: v.numpy() for k, v in feed.items()})
    model = load_model(src)
    with torch.no_grad():
        ours = to_onnx.lmlab_outputs(model, *feed.values())
    assert theirs.shape == output
    if not config.task:
        theirs, ours = torch.from_numpy(theirs)[mask.bool()].numpy(), ours[mask.bool()]
    assert (torch.from_numpy(theirs) - ours).abs().max().item() <= 1e-4


def test_encoder_decoders_are_refused_naming_what_is_supported(tmp_path):
    src = save_checkpoint(tmp_path / "t5", lmlab_model(preset("t5-tiny", vocab_size=64)))
    with pytest.raises(LmlabError, match="format onnx writes decoders .* and encoders; .* is an encoder–decoder$") as e:
        export_onnx(src, tmp_path / "onnx")
    assert e.value.params == ("format",)
