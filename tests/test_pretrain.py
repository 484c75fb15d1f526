"""Pretraining end to end through the Python API: resume exactness, NaN stop, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, crash_windows_at

from lmlab import objectives
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import list_checkpoints, load_model
from lmlab.train.optim import lr_at
from lmlab.train.pretrain import pretrain


def losses(run) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r] + [
        (r["step"], r["val_loss"]) for r in records if "val_loss" in r
    ]


@pytest.mark.parametrize("family", ["gpt2-tiny", "llama-tiny"])
def test_killed_and_resumed_run_reproduces_the_uninterrupted_losses_exactly(family, data_dir, tmp_path, monkeypatch):
    args = dict(TINY_TRAIN, max_steps=12, eval_interval=4, log_interval=1, seed=3)
    overrides = {"dropout": 0.1}  # dropout makes the RNG state part of what must be restored
    pretrain(family, data_dir, tmp_path / "whole", model_overrides=overrides, **args)

    crash_windows_at(monkeypatch, 6)  # the process dies mid-run, after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain(family, data_dir, tmp_path / "killed", model_overrides=overrides, **args)
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [4]
    monkeypatch.undo()

    pretrain(family, data_dir, tmp_path / "killed", resume=True, model_overrides=overrides, **args)
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")  # exact float equality
    whole = load_model(tmp_path / "whole" / "step-00000012")
    resumed = load_model(tmp_path / "killed" / "step-00000012")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_log_torn_by_the_kill_does_not_stop_the_resume(data_dir, tmp_path, monkeypatch, caplog):
    """A kill mid-write leaves log.jsonl's last line cut off, or its tail NUL bytes: --resume drops that
    tail with a warning and the resumed run logs what the uninterrupted one does."""
    args = dict(TINY_TRAIN, max_steps=6, eval_interval=2, log_interval=1, seed=5)
    pretrain("gpt2-tiny", data_dir, tmp_path / "whole", **args)
    crash_windows_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        pretrain("gpt2-tiny", data_dir, tmp_path / "killed", **args)
    monkeypatch.undo()
    with (tmp_path / "killed" / "log.jsonl").open("ab") as f:
        f.write(b'{"step": 5, "loss": 4.1' + b"\0" * 100)
    pretrain("gpt2-tiny", data_dir, tmp_path / "killed", resume=True, **args)
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    assert any("torn last line" in r.getMessage() for r in caplog.records)


def test_run_writes_checkpoints_best_log_and_loss_curve(trained_run):
    assert [s for s, _ in list_checkpoints(trained_run)] == [10, 20, 30]  # keep_last=3
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_state.pt"):
        assert (trained_run / "step-00000030" / name).is_file()
    assert (trained_run / "best" / "model.safetensors").is_file()
    assert (trained_run / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in valid] == [10, 20, 30]
    assert valid[-1]["val_ppl"] == pytest.approx(math.exp(valid[-1]["val_loss"]))
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert not list(trained_run.glob(".tmp-*"))  # no half-written checkpoint left


def test_keep_last_prunes_old_checkpoints(data_dir, tmp_path):
    pretrain("gpt2-tiny", data_dir, tmp_path / "r", max_steps=6, eval_interval=2, keep_last=2, **TINY_TRAIN)
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [4, 6]


def test_nan_loss_stops_with_a_clear_error_and_the_last_checkpoint_stays_usable(data_dir, tmp_path, monkeypatch):
    real_loss = objectives.CausalLM.loss
    calls = {"n": 0}

    def nan_after_5_steps(self, model, batch):
        loss = real_loss(self, model, batch)
        if not model.training:
            return loss  # validation stays finite: the training loss is what breaks
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(objectives.CausalLM, "loss", nan_after_5_steps)
    with pytest.raises(LmlabError, match=r"training loss is nan at step 6.*last good checkpoint: .*step-00000004"):
        pretrain("gpt2-tiny", data_dir, tmp_path / "r", max_steps=10, eval_interval=2, log_interval=1, **TINY_TRAIN)
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [2, 4]
    model = load_model(tmp_path / "r" / "step-00000004")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_existing_run_without_resume_is_refused(trained_run, data_dir):
    with pytest.raises(LmlabError, match="already holds checkpoints: pass resume"):
        pretrain("gpt2-tiny", data_dir, trained_run, max_steps=2, **TINY_TRAIN)


def test_corpus_shorter_than_one_context_window_is_an_error(tokenizer_dir, tmp_path):
    from lmlab.data.pack import prepare

    (tmp_path / "small.txt").write_text("A corpus of a few words.", encoding="utf-8")
    prepare(tmp_path / "small.txt", tokenizer_dir, tmp_path / "data", valid_fraction=0.0, show_progress=False)
    with pytest.raises(LmlabError, match=r"holds \d+ tokens, fewer than one context window \(33 = seq_len \+ 1\)"):
        pretrain("gpt2-tiny", tmp_path / "data", tmp_path / "r", max_steps=2, **TINY_TRAIN)
    assert not list_checkpoints(tmp_path / "r")


def test_a_single_document_corpus_trains_and_validates(tokenizer_dir, tmp_path, capsys):
    """One text file (tiny-shakespeare's shape) gets a validation split of token ranges, and pretraining on it
    reports a validation loss instead of failing for want of training tokens or skipping validation."""
    from lmlab.data import builtin_corpus
    from lmlab.data.pack import prepare

    (tmp_path / "book.txt").write_text("\n\n".join(builtin_corpus(max_chars=20_000)), encoding="utf-8")
    manifest = prepare(tmp_path / "book.txt", tokenizer_dir, tmp_path / "data", valid_fraction=0.1, show_progress=False)
    assert manifest["split_by"] == "tokens" and manifest["splits"]["valid"]["tokens"] > 2 * 33
    result = pretrain("gpt2-tiny", tmp_path / "data", tmp_path / "r", max_steps=4, eval_interval=4, **TINY_TRAIN)
    assert math.isfinite(result.val_loss)
    assert "validation is skipped" not in capsys.readouterr().err


def test_unknown_preset_and_bad_options_are_errors(data_dir, tmp_path):
    with pytest.raises(LmlabError, match="unknown model preset"):
        pretrain("gpt9", data_dir, tmp_path / "r", **TINY_TRAIN)
    with pytest.raises(LmlabError, match="schedule"):
        pretrain("gpt2-tiny", data_dir, tmp_path / "r", schedule="exp", **TINY_TRAIN)
    with pytest.raises(LmlabError, match="not a prepared data folder"):
        pretrain("gpt2-tiny", tmp_path, tmp_path / "r", **TINY_TRAIN)
    assert not (tmp_path / "r").exists()


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    from lmlab.train.optim import lr_at

    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_at(100, schedule="constant", **kw) == 1.0


@pytest.mark.slow
def test_torchrun_ddp_on_cpu_trains_and_only_rank_0_writes(data_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "lmlab.cli",
        "pretrain",
        "--model",
        "gpt2-tiny",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--eval-interval",
        "2",
        "--micro-batch-size",
        "2",
        "--seq-len",
        "32",
        "--eval-batches",
        "2",
        "--no-progress",
        "--no-tensorboard",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("last checkpoint") == 1  # rank 0 reports
    assert "2 processes" in proc.stderr and "128 tokens/step" in proc.stderr  # 2 sequences × 32 tokens × 2 ranks
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(4) == 2  # one train and one validation record, written once
    # the ranks split each step's windows: one process with the same global batch (2 × 2) trains the same
    args = dict(micro_batch_size=4, seq_len=32, eval_batches=2, progress=False, tensorboard=False)
    one = pretrain("gpt2-tiny", data_dir, tmp_path / "one", max_steps=4, eval_interval=2, **args)
    train = {r["step"]: r["loss"] for r in one.history if "loss" in r}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == pytest.approx(train, rel=1e-5)


def test_activation_checkpointing_trains_exactly_as_without_and_resumes(data_dir, tmp_path, monkeypatch):
    """With dropout, a checkpointed run's losses equal the plain run's bit for bit (the recomputation replays
    the dropout masks), and a checkpointed run killed mid-way resumes to the same losses."""
    args = dict(TINY_TRAIN, max_steps=8, eval_interval=4, log_interval=1, seed=3)
    overrides = {"dropout": 0.1}
    pretrain("llama-tiny", data_dir, tmp_path / "plain", model_overrides=overrides, **args)
    crash_windows_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        pretrain(
            "llama-tiny", data_dir, tmp_path / "ckpt", model_overrides=overrides, activation_checkpointing=True, **args
        )
    monkeypatch.undo()
    pretrain(
        "llama-tiny",
        data_dir,
        tmp_path / "ckpt",
        resume=True,
        model_overrides=overrides,
        activation_checkpointing=True,
        **args,
    )
    assert losses(tmp_path / "ckpt") == losses(tmp_path / "plain")


def test_chunked_cross_entropy_trains_as_the_plain_one(data_dir, tmp_path):
    args = dict(TINY_TRAIN, max_steps=6, eval_interval=3, log_interval=1, seed=1)
    pretrain("gpt2-tiny", data_dir, tmp_path / "plain", ce_chunk_size=0, **args)
    pretrain(
        "gpt2-tiny", data_dir, tmp_path / "chunked", ce_chunk_size=24, **args
    )  # 128 tokens per micro-batch: 6 chunks
    for (step, a), (step_b, b) in zip(losses(tmp_path / "plain"), losses(tmp_path / "chunked")):
        assert step == step_b and b == pytest.approx(a, rel=1e-4)


def test_pad_vocab_multiple_rounds_the_vocabulary_and_generation_never_emits_a_padding_row(data_dir, tmp_path):
    import lmlab

    run = tmp_path / "padded"
    pretrain(
        "gpt2-tiny", data_dir, run, max_steps=2, pad_vocab_multiple=100, **TINY_TRAIN
    )  # 100: no power of two divides it
    lm = lmlab.load(run)
    n_tok, n_model = lm.tokenizer.vocab_size, lm.model.config.vocab_size
    assert n_model % 100 == 0 and n_tok <= n_model < n_tok + 100
    if n_model == n_tok:
        pytest.skip("the test tokenizer's vocabulary is already a multiple of 100")
    with torch.no_grad():  # make the padding rows the likeliest tokens: without suppression every step would pick one
        lm.model.lm_head.weight[n_tok:] = lm.model.lm_head.weight[:n_tok].abs().max() * 50
    lm.model.tok_emb.weight.data = lm.model.tok_emb.weight.data.clone()  # untie: inputs keep their embeddings
    for options in ({}, {"strategy": "sample", "seed": 0}, {"strategy": "beam", "num_beams": 2}):
        ids = lm.generate("The ", max_new_tokens=8, ignore_eos=True, return_ids=True, **options)
        assert ids and max(ids) < n_tok, options
    with pytest.raises(LmlabError, match="pad_vocab_multiple is 0: expected a positive integer"):
        pretrain("gpt2-tiny", data_dir, tmp_path / "bad", max_steps=2, pad_vocab_multiple=0, **TINY_TRAIN)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_run_in_bf16_with_pinned_batches_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """The GPU path of the loop (bf16 autocast, fused AdamW, pinned non-blocking batch copies, padded vocabulary):
    a run killed after its first checkpoint and resumed gives the losses of one run straight through."""
    args = dict(
        TINY_TRAIN,
        max_steps=8,
        eval_interval=4,
        log_interval=1,
        seed=1,
        device="cuda",
        precision="bf16",
        pad_vocab_multiple=64,
    )
    pretrain("llama-tiny", data_dir, tmp_path / "whole", **args)
    crash_windows_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        pretrain("llama-tiny", data_dir, tmp_path / "killed", **args)
    monkeypatch.undo()
    pretrain("llama-tiny", data_dir, tmp_path / "killed", resume=True, **args)
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    # CUDA's embedding backward adds with atomics (not bit-reproducible), so equal up to float noise, not bit for bit
    assert [s for s, _ in resumed] == [s for s, _ in whole] and all(math.isfinite(v) for _, v in whole)
    assert [v for _, v in resumed] == pytest.approx([v for _, v in whole], rel=1e-3)


# -- a data folder must hold ids of its own tokenizer, within the model's vocabulary --------------------------------
def test_a_data_folder_with_a_swapped_tokenizer_is_an_error_not_an_index_error(data_dir, other_tokenizer_dir, tmp_path):
    data = shutil.copytree(data_dir, tmp_path / "data")
    shutil.copy(other_tokenizer_dir / "tokenizer.json", data / "tokenizer.json")  # fewer ids than the shards hold
    with pytest.raises(
        LmlabError, match=r"data/tokenizer\.json does not match the tokenizer that made the folder's token ids"
    ):
        pretrain("gpt2-tiny", data, tmp_path / "r", max_steps=2, **TINY_TRAIN)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("split", ["train", "valid"])
def test_token_ids_past_the_model_vocabulary_are_an_error_naming_the_data_folder(split, data_dir, tmp_path):
    data = shutil.copytree(data_dir, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    vocab = manifest["vocab_size"]
    ids = np.memmap(data / manifest["splits"][split]["shards"][0]["file"], dtype=manifest["dtype"], mode="r+")
    ids[::50] = vocab  # an id the tokenizer does not have, as in shards another tokenizer made
    ids.flush()
    del ids
    with pytest.raises(
        LmlabError, match=rf"data \({split} split\) holds token id {vocab}, past the model's vocabulary \({vocab} ids\)"
    ):
        pretrain("gpt2-tiny", data, tmp_path / "r", max_steps=2, **TINY_TRAIN)


def test_a_manifest_vocabulary_larger_than_the_model_is_an_error(data_dir, tmp_path):
    data = shutil.copytree(data_dir, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 100_000}))
    with pytest.raises(LmlabError, match=r"model vocab_size \d+ is smaller than the data's 100000"):
        pretrain("gpt2-tiny", data, tmp_path / "r", max_steps=2, **TINY_TRAIN)


# -- --resume continues the run as it was started, or refuses ------------------------------------------------------
TRAINED_RUN = dict(TINY_TRAIN, max_steps=30, eval_interval=10, log_interval=5)  # conftest's trained_run


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"model": "llama-tiny"}, "model gpt2-tiny (now llama-tiny)"),
        ({"micro_batch_size": 2}, "micro_batch_size 4 (now 2)"),
        ({"seq_len": 16}, "seq_len 32 (now 16)"),
        ({"lr": 1e-3, "seed": 1}, "lr 0.003 (now 0.001), min_lr 0.0003 (now 0.0001), seed 0 (now 1)"),
        ({"schedule": "linear"}, "schedule cosine (now linear)"),
        ({"model_overrides": {"dropout": 0.1}}, "dropout 0 (now 0.1)"),
        ({"pad_vocab_multiple": 1000}, "vocab_size (pad_vocab_multiple)"),
        ({"objective": "mlm", "model": "bert-tiny"}, "model gpt2-tiny (now bert-tiny), objective clm (now mlm)"),
    ],
)
def test_resume_with_settings_that_change_the_run_is_refused_naming_them(change, expected, trained_run, data_dir):
    args = {"model": "gpt2-tiny", **TRAINED_RUN, **change}
    before = sorted(p.name for p in trained_run.iterdir())
    with pytest.raises(LmlabError) as err:
        pretrain(args.pop("model"), data_dir, trained_run, resume=True, **args)
    message = str(err.value)
    assert message.startswith(f"resume: {trained_run} was started with different settings: ") and expected in message, (
        message
    )
    assert message.endswith("rerun with the original settings or write to a new out") and "\n" not in message
    assert sorted(p.name for p in trained_run.iterdir()) == before  # refused before anything was written


def test_resume_with_another_data_folder_is_refused_and_the_same_one_by_another_path_is_not(
    trained_run, data_dir, corpus_file, tokenizer_dir, tmp_path
):
    from lmlab.data.pack import prepare

    prepare(corpus_file, tokenizer_dir, tmp_path / "other", valid_fraction=0.2, show_progress=False)
    with pytest.raises(LmlabError, match=rf"data {data_dir} \(now {tmp_path / 'other'}\)"):
        pretrain("gpt2-tiny", tmp_path / "other", trained_run, resume=True, **TRAINED_RUN)
    (tmp_path / "link").symlink_to(data_dir)  # the same folder: resuming the finished run does nothing
    assert pretrain("gpt2-tiny", tmp_path / "link", trained_run, resume=True, **TRAINED_RUN).step == 30


def test_resume_accepts_a_longer_run_and_new_intervals_and_says_the_schedule_changed(data_dir, tmp_path, capsys):
    args = dict(TINY_TRAIN, max_steps=4, eval_interval=2, log_interval=1)
    pretrain("gpt2-tiny", data_dir, tmp_path / "r", **args)
    capsys.readouterr()
    result = pretrain("gpt2-tiny", data_dir, tmp_path / "r", resume=True, **dict(args, max_steps=6, eval_interval=3))
    err = capsys.readouterr().err
    assert result.step == 6 and [s for s, _ in list_checkpoints(tmp_path / "r")][-1] == 6
    assert (
        "lmlab: resume accepted changed settings: max_steps 4 (now 6), eval_interval 2 (now 3), "
        "save_interval 2 (now 3); the cosine learning-rate schedule now ends at step 6, so the learning rate after "
        "step 4 differs from the run's as started"
    ) in err
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines() if "lr" in line]
    assert lrs[4] == lr_at(
        4, lr=3e-3, min_lr=3e-3 / 10, warmup_steps=2, max_steps=6, schedule="cosine"
    )  # the new schedule, from step 5
    pretrain("gpt2-tiny", data_dir, tmp_path / "r", resume=True, **dict(args, max_steps=6, eval_interval=3))
    assert "resume accepted" not in capsys.readouterr().err  # nothing changed: nothing to say
