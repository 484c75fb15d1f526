"""The efficiency lens: sizes equal the model's and the file's, latencies are positive and consistent
with the throughputs, the energy arithmetic matches a hand computation on a synthetic run log, a
checkpoint outside a run is told so, and the training loop's elapsed_s survives a resume."""

from __future__ import annotations

import io
import json
import os

import matplotlib.image
import pytest
import torch
from conftest import TINY_TRAIN

from lmlab.config import preset
from lmlab.critique.core import load_subject
from lmlab.critique.efficiency import CPU_WATTS_PER_CORE, PUE, efficiency
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import train_tokenizer

TEXTS = ["the film was great and the plot was fine", "the film was awful and the acting was poor"] * 20


def is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n") and matplotlib.image.imread(io.BytesIO(data), format="png").ndim == 3


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, kind="bpe", vocab_size=280)


def checkpoint(path, family, tok, **overrides):
    torch.manual_seed(0)
    return save_checkpoint(path, build_model(preset(family, vocab_size=tok.vocab_size, **overrides)), tokenizer=tok)


def test_decoder_sizes_latency_and_throughput(tok, tmp_path):
    subject = load_subject(checkpoint(tmp_path / "lm", "gpt2-tiny", tok))
    section = efficiency(subject, batch_size=2, prompt_tokens=12, new_tokens=6, repeats=2)
    m, model = section.metrics, subject.model
    assert m["params"] == model.num_params() and m["params_non_embedding"] == model.num_params(include_embeddings=False)
    assert m["checkpoint_bytes"] == (subject.path / "model.safetensors").stat().st_size
    assert m["bytes_per_param"] == pytest.approx(m["checkpoint_bytes"] / m["params"], abs=1e-4)
    assert m["stored_dtype"] == "F32" and 4 <= m["bytes_per_param"] < 4.1  # fp32 weights plus the header
    assert m["flops_per_token_train"] == subject.config.flops_per_token(subject.config.block_size)
    assert m["flops_per_token_inference"] == pytest.approx(m["flops_per_token_train"] / 3)
    assert m["time_to_first_token_ms"] > 0 and m["decode_ms_per_token"] > 0
    assert m["decode_tokens_per_s"] == pytest.approx(2 / (m["decode_ms_per_token"] / 1e3), rel=1e-3)
    assert m["generation_tokens_per_s"] > 0
    kv = (
        2 * 2 * subject.config.n_kv_heads * subject.config.head_dim * 4 * 2 * (12 + 6)
    )  # k,v × layers × heads × dim × fp32 × batch × tokens
    assert m["memory_kv_cache_bytes"] == kv
    assert m["memory_weights_bytes"] == sum(p.numel() * 4 for p in model.parameters())  # gpt2 has no buffers
    assert m["process_peak_rss_bytes"] > m["memory_weights_bytes"]
    assert set(m) <= set(section.explain)
    assert [f.title for f in section.figures] == ["Generation latency"] and is_png(section.figures[0].png)
    # outside a run folder: no energy, and a note saying what to provide
    assert "energy_kwh" not in m and "Training energy was not estimated" in section.method
    assert any("not inside a training run folder" in f.text for f in section.findings)


def test_encoder_classifier_forward_latency(tok, tmp_path):
    subject = load_subject(
        checkpoint(tmp_path / "cls", "bert-tiny", tok, task="classify", num_labels=2, labels=["neg", "pos"])
    )
    section = efficiency(subject, batch_size=3, prompt_tokens=10, repeats=2)
    m = section.metrics
    assert m["forward_ms"] > 0 and m["input_tokens"] == 10
    assert m["examples_per_s"] == pytest.approx(3 / (m["forward_ms"] / 1e3), rel=1e-3)
    assert m["tokens_per_s"] == pytest.approx(10 * m["examples_per_s"], rel=1e-3)
    assert m["memory_kv_cache_bytes"] == 0 and m["params"] == subject.model.num_params()
    assert is_png(section.figures[0].png)


def test_energy_and_co2_from_the_run_log(tok, tmp_path):
    run = tmp_path / "run"
    best = checkpoint(run / "best", "gpt2-tiny", tok)
    records = [
        {"step": 10, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "elapsed_s": 1800.0},
        {"step": 10, "val_loss": 3.1, "val_ppl": 22.2},
        {"step": 20, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "elapsed_s": 5400.0},
    ]
    torn = '{"step": 30, "loss": 2.1, "elapsed_s": 99' + "\0" * 32  # the run was killed mid-write: a torn tail, dropped
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + torn, encoding="utf-8")
    subject = load_subject(best)
    m = efficiency(subject, prompt_tokens=4, new_tokens=2, repeats=1, power_watts=250, grid_intensity=0.5).metrics
    # 5400 s = 1.5 h; 1.5 h × 250 W × PUE 1.1 = 0.4125 kWh; × 0.5 kg/kWh = 0.20625 kg
    assert PUE == 1.1
    assert m["training_seconds"] == 5400 and m["training_steps"] == 20
    assert m["energy_kwh"] == pytest.approx(0.4125) and m["co2_kg"] == pytest.approx(0.20625)
    # no power given, CPU: the stated per-core assumption, flagged as a rough bound
    section = efficiency(subject, prompt_tokens=4, new_tokens=2, repeats=1)
    watts = CPU_WATTS_PER_CORE * os.cpu_count()
    assert section.metrics["power_watts"] == watts
    assert section.metrics["energy_kwh"] == pytest.approx(1.5 * watts / 1000 * 1.1)
    assert section.metrics["co2_kg"] == pytest.approx(section.metrics["energy_kwh"] * 0.4)
    assert any(f.level == "warn" and "rough bound" in f.text for f in section.findings)
    assert any(t.title.startswith("Training energy") for t in section.tables)
    # a checkpoint that records its training device (as the loop writes it): two H100s at 700 W each
    subject.meta["train_device"] = "2 × NVIDIA H100 80GB HBM3"
    section = efficiency(subject, prompt_tokens=4, new_tokens=2, repeats=1)
    assert section.metrics["power_watts"] == 1400 and section.metrics["energy_kwh"] == pytest.approx(1.5 * 1.4 * 1.1)
    assert not any(f.level == "warn" and "rough bound" in f.text for f in section.findings)
    (run / "log.jsonl").write_text('{"step": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(LmlabError, match="log.jsonl:2"):
        efficiency(subject, prompt_tokens=4, new_tokens=2, repeats=1)
    with pytest.raises(LmlabError, match="new_tokens"):
        efficiency(subject, new_tokens=1)


def test_training_log_elapsed_seconds_survive_a_resume(tok, tmp_path, monkeypatch):
    from lmlab.train.finetune import ExampleBatches, finetune

    base = checkpoint(tmp_path / "base", "gpt2-tiny", tok)
    rows = [{"text": t, "label": "pos" if "great" in t else "neg"} for t in TEXTS]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = dict(TINY_TRAIN, micro_batch_size=8, max_steps=8, eval_interval=4, log_interval=2, keep_last=2, seed=0)
    real = ExampleBatches.__call__

    def crash(self, step, micro):
        if step == 6:
            raise KeyboardInterrupt
        return real(self, step, micro)

    monkeypatch.setattr(ExampleBatches, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(base, "classify", data, tmp_path / "run", valid=data, max_length=16, **args)
    monkeypatch.setattr(ExampleBatches, "__call__", real)
    finetune(base, "classify", data, tmp_path / "run", valid=data, max_length=16, resume=True, **args)
    train = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    elapsed = [r["elapsed_s"] for r in train]
    assert all(
        0 < a < b for a, b in zip(elapsed, elapsed[1:])
    )  # the resumed process continues the clock, not restarts it
    from lmlab.io.checkpoint import read_meta

    assert read_meta(tmp_path / "run" / "best")["train_device"] == "cpu"  # what the energy estimate reads


def test_stored_dtypes_come_from_the_header_and_a_damaged_file_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file

    from lmlab.critique.efficiency import stored_dtypes

    file = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(file))
    assert stored_dtypes(file) == {"F32": 6, "BF16": 4}
    file.write_bytes(b"\xff" * 8 + b"{}")  # a header length of 2**64 - 1: never read, never allocated
    with pytest.raises(LmlabError, match=r"w\.safetensors: damaged or not a safetensors file \(.*header too large"):
        stored_dtypes(file)
