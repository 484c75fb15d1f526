"""``export_gguf``: GPT-2 and LLaMA decoders → one GGUF file, named and laid out as llama.cpp's converter writes
them, the tokenizer inside; read back with ``gguf.GGUFReader`` and rebuilt into an lmlab model whose logits match.
The llama.cpp tests (``llama_cpp.Llama`` loads the file, tokenizes and continues as lmlab does) run only where
``scripts/setup.sh --llama-cpp`` installed llama-cpp-python."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from test_hf import LLAMA3, lmlab_model  # noqa: E402

from lmlab.config import preset  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.io.checkpoint import load_model, save_checkpoint  # noqa: E402
from lmlab.io.export.to_gguf import (  # noqa: E402
    TOLERANCES,
    check_gguf,
    export_gguf,
    model_from_gguf,
    permute,
    read_tensors,
    unpermute,
)
from lmlab.tokenizer import Tokenizer  # noqa: E402

CASES = {  # preset and overrides; all with a vocabulary padded past the tokenizer's (pad_vocab_multiple)
    "gpt2": ("gpt2-tiny", {}),
    "gpt2-untied": ("gpt2-tiny", dict(tie_embeddings=False)),
    "llama-gqa-llama3": ("llama-tiny", dict(rope_scaling=LLAMA3, tie_embeddings=True)),
    "llama-untied-linear": (
        "llama-tiny",
        dict(tie_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
}
VOCAB = 520  # the test tokenizer has 512 tokens: 8 padding ids


def checkpoint(tmp_path: Path, case: str, tokenizer_dir: Path) -> Path:
    name, overrides = CASES[case]
    tokenizer = Tokenizer.load(tokenizer_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return save_checkpoint(
        tmp_path / case, lmlab_model(preset(name, vocab_size=VOCAB, **overrides)), tokenizer=tokenizer
    )


def field(reader, key):
    return reader.fields[key].contents()


def test_permute_is_llamas_and_unpermute_undoes_it():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8
    p = permute(w, 2)
    # llama.cpp's order within a head: rows 0, 4, 1, 5, 2, 6, 3, 7 (x_i paired with x_{i+d/2})
    assert p[:8, 0].tolist() == [w[i, 0].item() for i in (0, 4, 1, 5, 2, 6, 3, 7)]
    assert torch.equal(unpermute(p, 2), w)


@pytest.mark.parametrize("case", list(CASES))
def test_f32_file_has_llama_cpp_names_metadata_and_vocabulary_and_round_trips_exactly(tmp_path, tokenizer_dir, case):
    src = checkpoint(tmp_path, case, tokenizer_dir)
    out = export_gguf(src, tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [case, "model.gguf", "model.gguf.export.json"]
    )  # no temporary
    reader = gguf.GGUFReader(str(out))
    model, tokenizer = load_model(src), Tokenizer.load(src)
    arch = "gpt2" if case.startswith("gpt2") else "llama"
    assert field(reader, "general.architecture") == arch
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_norm.weight", "blk.1.ffn_down.weight"} <= names
    assert ("output.weight" in names) == (
        not model.config.tie_embeddings
    )  # a tied head is token_embd alone, as llama.cpp reads it
    if arch == "gpt2":
        assert {"position_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias"} <= names
        assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    else:
        assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight"} <= names
        assert field(reader, "llama.attention.head_count_kv") == 2 and field(reader, "llama.attention.head_count") == 4
        assert ("rope_freqs.weight" in names) == ("llama3" in case)
        if "linear" in case:
            assert field(reader, "llama.rope.scaling.type") == "linear"
            assert field(reader, "llama.rope.scaling.factor") == 2.0
    k = next(
        t for t in reader.tensors if t.name == ("blk.0.attn_qkv.weight" if arch == "gpt2" else "blk.0.attn_k.weight")
    )
    assert list(k.shape) == [64, 3 * 64 if arch == "gpt2" else 32]  # ggml's order: (in, out)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[:512] == [tokenizer.id_to_token(i) for i in range(512)]
    assert tokens[512:] == [f"[PAD{i}]" for i in range(512, VOCAB)]
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert len(field(reader, "tokenizer.ggml.merges")) > 100
    rebuilt = model_from_gguf(read_tensors(reader), model.config, arch)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (rebuilt(ids) - model(ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_f16_and_q8_0_store_matrices_as_that_type_norms_f32_and_round_trip_within_tolerance(
    tmp_path, tokenizer_dir, outtype
):
    src = checkpoint(tmp_path, "llama-gqa-llama3", tokenizer_dir)
    out = export_gguf(src, tmp_path / "model.gguf", outtype=outtype)
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == outtype.upper() and types["token_embd.weight"] == outtype.upper()
    assert types["blk.0.attn_norm.weight"] == "F32" and types["rope_freqs.weight"] == "F32"
    gap = check_gguf(out, load_model(src), Tokenizer.load(src), outtype, "test")
    assert 0 < gap <= TOLERANCES[outtype]


def test_a_lora_run_is_exported_merged(tmp_path, tokenizer_dir):
    from lmlab.train.lora import LoraSpec, apply_lora

    model = lmlab_model(preset("llama-tiny", vocab_size=VOCAB))
    apply_lora(model, LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    src = save_checkpoint(tmp_path / "lora", model, tokenizer=Tokenizer.load(tokenizer_dir))
    out = export_gguf(src, tmp_path / "model.gguf")
    merged = load_model(src, merge_lora=True)
    rebuilt = model_from_gguf(read_tensors(gguf.GGUFReader(str(out))), merged.config, "llama")
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert (rebuilt(ids) - merged(ids)).abs().max().item() <= 1e-5
        assert (rebuilt(ids) - load_model(src, merge_lora=False)(ids)).abs().max().item() <= 1e-5  # B ≠ 0 counted


def test_a_bad_file_fails_the_check_and_nothing_is_moved_into_place(tmp_path, tokenizer_dir, monkeypatch):
    from lmlab.io.export import to_gguf

    src = checkpoint(tmp_path, "llama-gqa-llama3", tokenizer_dir)
    real = to_gguf.gguf_tensors

    def without_permutation(state, config, arch):  # what a converter that forgot LlamaModel.permute writes
        tensors = real(state, config, arch)
        tensors["blk.0.attn_q.weight"] = unpermute(tensors["blk.0.attn_q.weight"], config.n_head)
        return tensors

    monkeypatch.setattr(to_gguf, "gguf_tensors", without_permutation)
    with pytest.raises(LmlabError, match="export check of .*model.gguf.* differs by"):
        export_gguf(src, tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-gqa-llama3"]


def test_unsupported_models_and_options_are_one_line_errors(tmp_path, tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    bert = save_checkpoint(tmp_path / "bert", lmlab_model(preset("bert-tiny", vocab_size=VOCAB)), tokenizer=tokenizer)
    with pytest.raises(LmlabError, match="writes decoder language models of the GPT-2 and LLaMA.*is an encoder$"):
        export_gguf(bert, tmp_path / "b.gguf")
    config = dataclasses.replace(
        preset("gpt2-tiny", vocab_size=VOCAB), task="classify", num_labels=2, labels=["a", "b"]
    )
    head = save_checkpoint(tmp_path / "head", lmlab_model(config), tokenizer=tokenizer)
    with pytest.raises(LmlabError, match="is a decoder with a classify head"):
        export_gguf(head, tmp_path / "h.gguf")
    src = checkpoint(tmp_path, "gpt2", tokenizer_dir)
    with pytest.raises(LmlabError, match="outtype is 'q4': expected f32, f16, q8_0") as e:
        export_gguf(src, tmp_path / "g.gguf", outtype="q4")
    assert e.value.params == ("outtype",)
    (tmp_path / "g.gguf").write_text("mine")
    with pytest.raises(LmlabError, match="exists"):
        export_gguf(src, tmp_path / "g.gguf")
    assert (tmp_path / "g.gguf").read_text() == "mine"


def test_cli_writes_gguf_with_outtype(tmp_path, tokenizer_dir, capsys):
    from lmlab.cli import main

    src = checkpoint(tmp_path, "gpt2", tokenizer_dir)
    assert main(["export", str(src), "--format", "gguf", "--outtype", "f16", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "exported" in capsys.readouterr().out
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() == 1  # MOSTLY_F16
    record = json.loads((tmp_path / "m.gguf.export.json").read_text())
    assert record["format"] == "gguf" and record["dtype"] == "f16" and record["source"] == str(src.resolve())
    assert 0 < record["logit_gap_relative"] < 5e-3
    (tmp_path / "n.gguf.export.json").write_text("mine")  # the record's name is taken: refused, nothing replaced
    assert main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "n.gguf")]) == 1
    assert "n.gguf.export.json exists" in capsys.readouterr().err and not (tmp_path / "n.gguf").exists()
    assert main(["export", str(src), "--format", "gguf", "--outtype", "q2", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "--outtype is 'q2': expected f32, f16, q8_0" in capsys.readouterr().err


# -- llama.cpp itself (llama-cpp-python: `scripts/setup.sh --llama-cpp`) ----------------------------------------

PROMPTS = [
    "The quick brown fox",
    "def f(x):\n    return x * 2",
    "Numbers 1234 and 56.7, spaces   here!",
    "naïve café 😀",
]


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (it compiles llama.cpp: scripts/setup.sh --llama-cpp)")
    return llama_cpp


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-llama3", "llama-untied-linear"])
def test_llama_cpp_loads_the_file_tokenizes_and_continues_as_lmlab(tmp_path, tokenizer_dir, case):
    lib = llama_cpp()
    from lmlab.api import load

    src = checkpoint(tmp_path, case, tokenizer_dir)
    out = export_gguf(src, tmp_path / "model.gguf")
    llm = lib.Llama(model_path=str(out), n_ctx=128, n_threads=1, logits_all=False, verbose=False)
    lm = load(src)
    for text in PROMPTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == lm.tokenizer.encode(text), text
    for text in PROMPTS[:2]:
        ids = lm.tokenizer.encode(text)
        theirs = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            theirs.append(token)
            if len(theirs) == 12:
                break
        with torch.no_grad():
            ours = ids[:]
            for _ in range(12):
                ours.append(int(lm.model(torch.tensor([ours]))[0, -1].argmax()))
        assert theirs == ours[len(ids) :], text


def _llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-llama3", "llama-untied-linear"])
def test_llama_cpp_continues_f16_and_q8_0_exports_as_lmlab_for_8_tokens_on_most_prompts(
    tmp_path, tokenizer_dir, case, outtype
):
    import numpy as np

    lib = llama_cpp()
    from lmlab.api import load

    src = checkpoint(tmp_path, case, tokenizer_dir)
    out = export_gguf(src, tmp_path / "model.gguf", outtype=outtype)
    llm = lib.Llama(model_path=str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    lm, same, gaps = load(src), 0, []
    for text in PROMPTS:
        ids = lm.tokenizer.encode(text)
        with torch.no_grad():
            ours = ids[:]
            for _ in range(8):
                ours.append(int(lm.model(torch.tensor([ours]))[0, -1].argmax()))
            want = lm.model(torch.tensor([ids]))[0]
        same += _llama_cpp_greedy(llm, ids, 8) == ours[len(ids) :]
        llm.reset()
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[: len(ids)]))[:, : want.shape[-1]]
        gaps.append(((got - want).abs().max() / want.abs().max()).item())
    print(f"{case} {outtype}: 8 tokens equal on {same}/{len(PROMPTS)} prompts; logit gap {max(gaps):.1e}")
    assert same > len(PROMPTS) / 2 and max(gaps) <= TOLERANCES[outtype], (same, gaps)
