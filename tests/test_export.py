"""``export_hf``: an lmlab checkpoint → a folder transformers' Auto classes (and PEFT) load with no warnings
and the same outputs, the tokenizer and generation config included; written atomically, checked."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import TINY_BART  # noqa: E402
from test_hf import LLAMA3, TOL, VOCAB, lmlab_model, max_logit_diff  # noqa: E402

from lmlab.config import ModelConfig, preset  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.io import hf  # noqa: E402
from lmlab.io.checkpoint import load_model, save_checkpoint  # noqa: E402
from lmlab.io.export import export_hf  # noqa: E402
from lmlab.tokenizer import Tokenizer  # noqa: E402

BART = dict(TINY_BART, vocab_size=VOCAB, decoder_start_token_id=2)
HEAD = dict(num_labels=3, labels=["neg", "neu", "pos"])
CASES = {  # an lmlab config → the HF class it exports as
    "gpt2": (dict(name="gpt2-tiny"), "GPT2LMHeadModel"),
    "llama-gqa-llama3": (dict(name="llama-tiny", rope_scaling=LLAMA3), "LlamaForCausalLM"),
    "bert-pretraining": (dict(name="bert-tiny", dropout=0.0), "BertForPreTraining"),
    "bert-mlm-no-segments": (
        dict(name="bert-tiny", dropout=0.0, pooler=False, nsp_head=False, type_vocab_size=0),
        "BertForMaskedLM",
    ),
    "bert-classify": (
        dict(name="bert-tiny", dropout=0.0, task="classify", problem_type="multi", **HEAD),
        "BertForSequenceClassification",
    ),
    "bert-tag": (dict(name="bert-tiny", dropout=0.0, task="tag", **HEAD), "BertForTokenClassification"),
    "bert-qa": (
        dict(name="bert-tiny", dropout=0.0, task="qa", num_labels=2, labels=["start", "end"]),
        "BertForQuestionAnswering",
    ),
    "gpt2-classify": (dict(name="gpt2-tiny", task="classify", **HEAD), "GPT2ForSequenceClassification"),
    "gpt2-tag": (dict(name="gpt2-tiny", task="tag", **HEAD), "GPT2ForTokenClassification"),
    "gpt2-qa": (dict(name="gpt2-tiny", task="qa", num_labels=2), "GPT2ForQuestionAnswering"),
    "llama-regression": (
        dict(name="llama-tiny", task="classify", num_labels=1, problem_type="regression"),
        "LlamaForSequenceClassification",
    ),
    "llama-tag": (dict(name="llama-tiny", task="tag", **HEAD), "LlamaForTokenClassification"),
    "llama-qa": (dict(name="llama-tiny", task="qa", num_labels=2), "LlamaForQuestionAnswering"),
    "bart": (BART, "BartForConditionalGeneration"),
}


def make_config(case: str) -> ModelConfig:
    overrides = dict(CASES[case][0])
    name = overrides.pop("name", None)
    return preset(name, vocab_size=VOCAB, **overrides) if name else ModelConfig(**overrides)


def checkpoint(
    tmp_path: Path, case: str, tokenizer_dir: Path, lora: dict | None = None
) -> tuple[Path, torch.nn.Module]:
    """A random lmlab checkpoint of ``case`` with the test tokenizer; ``lora``: LoRA adapters with non-zero B."""
    model = lmlab_model(make_config(case))
    if lora:
        from lmlab.train.lora import LoraSpec, apply_lora

        apply_lora(model, LoraSpec(**lora))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    path = save_checkpoint(tmp_path / f"ckpt-{case}", model, tokenizer=Tokenizer.load(tokenizer_dir))
    return path, load_model(path, merge_lora=True)


def load_quietly(auto: str, folder: Path):
    """transformers' model of ``folder`` by the Auto class, asserting that loading said nothing: no missing,
    unexpected or mismatched weights, and no warning logged or raised."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = transformers.logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = getattr(transformers, auto).from_pretrained(
                folder, output_loading_info=True, attn_implementation="sdpa"
            )
    finally:
        logger.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert [r.getMessage() for r in records] == [] and [str(w.message) for w in caught] == []
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_an_export_loads_with_its_auto_class_silently_and_gives_the_same_outputs(case, tmp_path, tokenizer_dir):
    path, model = checkpoint(tmp_path, case, tokenizer_dir)
    out = export_hf(path, tmp_path / "out")
    architecture = CASES[case][1]
    hf_model = load_quietly(hf.ARCHITECTURES[architecture].auto, out)
    assert type(hf_model).__name__ == architecture
    assert hf.check_parity(model, hf_model, case) < TOL
    if model.config.task in ("classify", "tag"):
        names = model.config.labels or [f"LABEL_{i}" for i in range(model.config.num_labels)]
        assert hf_model.config.id2label == dict(enumerate(names))
    if case == "bert-classify":
        assert hf_model.config.problem_type == "multi_label_classification"
    names = sorted(p.name for p in out.iterdir())
    generative = model.config.arch == "seq2seq" or (model.config.arch == "decoder" and not model.config.task)
    assert ("generation_config.json" in names) == generative and {
        "model.safetensors",
        "tokenizer.json",
        "special_tokens_map.json",
    } <= set(names)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_the_tokenizer_and_generation_config_round_trip_through_auto_classes(tmp_path, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model = lmlab_model(make_config("gpt2"))
    out = export_hf(save_checkpoint(tmp_path / "ckpt", model, tokenizer=tok), tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["Once upon a time, there was a model.", "  spaces,\ttabs and ünïcödé 🙂"]
    assert hf_tok(texts)["input_ids"] == [tok.encode(t) for t in texts]
    assert hf_tok.decode(tok.encode(texts[1])) == texts[1]
    assert (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<pad>")
    assert hf_tok.chat_template == tok.chat_template and hf_tok.model_max_length == model.config.block_size
    gen = transformers.GenerationConfig.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    expected = (tok.bos_id, tok.eos_id, tok.pad_id)
    assert (
        (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id)
        == expected
        == (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
    )
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<pad>",
    }


@pytest.mark.slow
def test_a_bart_export_generates_as_lmlab_does(tmp_path, tokenizer_dir):
    import lmlab

    path, _ = checkpoint(tmp_path, "bart", tokenizer_dir)
    out = export_hf(path, tmp_path / "out")
    assert transformers.GenerationConfig.from_pretrained(out).decoder_start_token_id == 2
    lm = lmlab.load(path, device="cpu")
    ours = lm.generate("translate this", max_new_tokens=6, min_new_tokens=6, return_ids=True)
    from lmlab.data.tasks import encode_sources

    source = torch.tensor(encode_sources(lm.tokenizer, ["translate this"]))
    bart = transformers.AutoModelForSeq2SeqLM.from_pretrained(out)
    theirs = bart.generate(
        source, attention_mask=torch.ones_like(source), max_new_tokens=6, min_new_tokens=6, do_sample=False
    )
    assert ours == theirs[0, 1:].tolist()
    back = load_model(out)  # an export is an HF folder, so an lmlab checkpoint again
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in lm.model.state_dict().items())


LORA_CASES = [
    ("gpt2", ("qkv", "proj", "mlp.fc")),
    ("llama-gqa-llama3", ("qkv", "mlp.fc", "mlp.proj")),
    ("bert-classify", ("qkv",)),
    ("bart", ("qkv", "kv")),
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft calls it while loading
@pytest.mark.parametrize("case, targets", LORA_CASES)
def test_lora_exports_merged_and_as_a_peft_adapter_with_the_same_outputs(case, targets, tmp_path, tokenizer_dir):
    peft = pytest.importorskip("peft")
    path, merged = checkpoint(tmp_path, case, tokenizer_dir, lora=dict(r=4, alpha=8, dropout=0.0, targets=targets))
    auto = hf.ARCHITECTURES[CASES[case][1]].auto
    merged_out = export_hf(path, tmp_path / "merged")  # lora="merge" is the default
    adapter_out = export_hf(path, tmp_path / "adapter", lora="adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "base"} <= {p.name for p in adapter_out.iterdir()}
    adapter_config = json.loads((adapter_out / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] == (case == "gpt2") and adapter_config["base_model_name_or_path"] == str(
        (adapter_out / "base").resolve()
    )
    with_adapter = peft.PeftModel.from_pretrained(load_quietly(auto, adapter_out / "base"), adapter_out).eval()
    plain = load_quietly(auto, merged_out)
    assert hf.check_parity(merged, with_adapter, "adapter") < TOL and hf.check_parity(merged, plain, "merged") < TOL
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    inputs = dict(input_ids=ids, decoder_input_ids=ids[:, :4]) if case == "bart" else dict(input_ids=ids)
    with torch.no_grad():  # PEFT's adapter on the base is the merged model
        assert (with_adapter(**inputs).logits - plain(**inputs).logits).abs().max() < TOL


def test_a_mismatch_is_refused_with_the_number_and_leaves_nothing(tmp_path, tokenizer_dir, monkeypatch):
    path, _ = checkpoint(tmp_path, "llama-qa", tokenizer_dir)
    mapped = hf.state_dict_to_hf

    def corrupted(state, config):
        out = mapped(state, config)
        out["transformer.layers.0.self_attn.k_proj.weight"] = out["transformer.layers.0.self_attn.k_proj.weight"].flip(
            0
        )
        return out

    monkeypatch.setattr(hf, "state_dict_to_hf", corrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(
        LmlabError,
        match=r"export check of .*out \(nothing was written.*\): .*LlamaForQuestionAnswering disagree: max \|Δ\| = ",
    ):
        export_hf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    export_hf(path, tmp_path / "out", verify=False)  # the check skipped: the (broken) folder is written
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_what_no_hf_class_holds_is_refused_before_writing(tmp_path, tokenizer_dir):
    path, _ = checkpoint(tmp_path, "gpt2-classify", tokenizer_dir)
    t5 = save_checkpoint(tmp_path / "t5", lmlab_model(preset("t5-tiny", vocab_size=VOCAB)))
    with pytest.raises(LmlabError, match="'norm' is 'rmsnorm': HF bart .*lmlab exports encoder–decoders as BART"):
        export_hf(t5, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(LmlabError, match="exists and is not an empty folder"):
        export_hf(path, tmp_path / "full")
    with pytest.raises(LmlabError, match="has no LoRA adapters"):
        export_hf(path, tmp_path / "out", lora="adapter")
    assert not (tmp_path / "out").exists()


def test_an_lmlab_checkpoint_survives_export_and_import(tmp_path, tokenizer_dir):
    path, model = checkpoint(tmp_path, "llama-gqa-llama3", tokenizer_dir)
    back = load_model(export_hf(path, tmp_path / "out"))
    assert dataclasses.replace(back.config, name="") == dataclasses.replace(model.config, name="")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert max_logit_diff(back, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ids) < TOL


@pytest.mark.slow
def test_export_and_an_hf_folder_through_the_cli(tmp_path, tokenizer_dir, data_dir, capsys):
    """`lmlab export` writes a checked folder; `lmlab generate` and `pretrain --init-from` take that folder as a
    checkpoint."""
    from lmlab.cli import main

    path, _ = checkpoint(tmp_path, "gpt2", tokenizer_dir)
    assert main(["export", str(path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    record = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert record["format"] == "hf" and record["source"] == str(path.resolve()) and record["lora"] == "merge"
    assert 0 <= record["max_abs_output_diff"] < 1e-4
    assert (
        main(["generate", str(tmp_path / "hf"), "--prompt", "The", "--max-new-tokens", "5", "--format", "jsonl"]) == 0
    )
    hf_out = json.loads(capsys.readouterr().out)
    assert main(["generate", str(path), "--prompt", "The", "--max-new-tokens", "5", "--format", "jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == hf_out["completion"]  # the same model either way
    assert (
        main(
            [
                "pretrain",
                "--init-from",
                str(tmp_path / "hf"),
                "--data",
                str(data_dir),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "2",
                "--eval-interval",
                "2",
                "--seq-len",
                "32",
                "--micro-batch-size",
                "2",
                "--no-progress",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    assert "last checkpoint" in capsys.readouterr().out
    assert main(["export", str(path), "--format", "tflite", "--out", str(tmp_path / "x")]) == 2  # a usage error
    assert "tflite" in capsys.readouterr().err
    assert main(["export", str(path), "--out", str(tmp_path / "hf")]) == 1  # not empty: refused, nothing overwritten
    assert "is not an empty folder" in capsys.readouterr().err


def test_an_export_is_readable_by_other_users_as_the_umask_says(tmp_path, tokenizer_dir):
    import os
    import stat

    path = save_checkpoint(tmp_path / "ckpt", lmlab_model(make_config("gpt2")), tokenizer=Tokenizer.load(tokenizer_dir))
    old = os.umask(0o022)
    try:
        out = export_hf(path, tmp_path / "out", verify=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes == {name: 0o755 if name == "out" else 0o644 for name in modes}, modes  # not safetensors' 0600
    with pytest.raises(LmlabError, match="which this command reads"):
        export_hf(path, path / "hf")
