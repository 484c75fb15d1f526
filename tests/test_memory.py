"""The memory estimate (lmlab.train.memory) and ``--dry-run``: exact parameter, gradient and optimizer bytes;
the predicted peak of a step against real CPU steps (the profiler's allocation events); CUDA's attention
as CUDA runs it; the advice; the flags. A CUDA-only test compares with torch.cuda.max_memory_allocated."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import cpu_peak_bytes

from lmlab.cli import main
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.model import build_model
from lmlab.objectives import IGNORE_INDEX, CausalLM, MaskedLM
from lmlab.tasks import task_objective as TaskObjective
from lmlab.train.loop import TrainConfig, apply_memory_options, autocast_for
from lmlab.train.lora import apply_lora, parse_lora
from lmlab.train.memory import Settings, measure_step
from lmlab.train.optim import make_optimizer


def real_step_peak(model, objective, batch, cfg) -> tuple[int, torch.optim.Optimizer]:
    """The peak bytes of one real steady-state training step on the CPU, as train_loop runs it: what lives
    before the step (weights, buffers, optimizer state, the batch) plus the highest point of the
    allocations the profiler records during it (an oracle independent of MemTracker and fake tensors)."""
    apply_memory_options(model, objective, cfg)
    optimizer = make_optimizer(
        model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, torch.device("cpu")
    )
    autocast, _ = autocast_for(cfg.precision, torch.device("cpu"))

    def step():
        for _ in range(min(cfg.grad_accum_steps, 2)):
            with autocast():
                loss = objective.loss(model, batch) / cfg.grad_accum_steps
            loss.backward()
            del loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state now exists
    top = cpu_peak_bytes(step)
    before = sum(t.nbytes for t in [*model.parameters(), *model.buffers(), *batch.values()])
    before += sum(t.nbytes for state in optimizer.state.values() for t in state.values())
    return before + top, optimizer


@pytest.fixture(scope="module")
def wordpiece():
    from lmlab.tokenizer import train_tokenizer

    texts = ["the list is sorted in place and returns none", "a tuple is an immutable sequence of values"] * 20
    return train_tokenizer(texts, kind="wordpiece", vocab_size=120)


def clm_case(name, vocab=512, B=4, T=64, **overrides):
    config = preset(name, vocab_size=vocab, **overrides)
    objective = CausalLM()
    batch = objective.batch(torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(0)))
    return config, objective, batch


def seq2seq_case():
    config = preset("t5-tiny", vocab_size=300)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 300, (4, 24), generator=g)
    labels[:, 20:] = IGNORE_INDEX
    batch = {
        "input_ids": torch.randint(0, 300, (4, 48), generator=g),
        "attention_mask": torch.ones(4, 48, dtype=torch.long),
        "labels": labels,
    }
    return config, TaskObjective("seq2seq", {}, 0, model_arch="seq2seq"), batch


def classify_case():
    config = preset("gpt2-tiny", vocab_size=300, task="classify", num_labels=3)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 300, (8, 40), generator=g),
        "token_type_ids": torch.zeros(8, 40, dtype=torch.long),
        "attention_mask": torch.ones(8, 40, dtype=torch.long),
        "labels": torch.randint(0, 3, (8,), generator=g),
    }
    return config, TaskObjective("classify", {}, 0), batch


def mlm_case(tokenizer):
    config = preset("bert-tiny", vocab_size=tokenizer.vocab_size)
    objective = MaskedLM(tokenizer, nsp=True)
    batch = objective.batch(
        torch.randint(5, tokenizer.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0)),
        torch.Generator().manual_seed(1),
    )
    return config, objective, batch


CASES = {
    "gpt2 fp32": (lambda tok: clm_case("gpt2-tiny"), dict(precision="fp32"), None),
    "llama bf16, checkpointing, accumulation, dropout": (
        lambda tok: clm_case("llama-tiny", dropout=0.1),
        dict(precision="bf16", activation_checkpointing=True, grad_accum_steps=2),
        None,
    ),
    "llama 40k vocabulary, chunked cross-entropy, bf16": (
        lambda tok: clm_case("llama-tiny", vocab=40_000),
        dict(precision="bf16", ce_chunk_size=64),
        None,
    ),
    "gpt2 40k vocabulary, plain cross-entropy": (
        lambda tok: clm_case("gpt2-tiny", vocab=40_000),
        dict(precision="fp32", ce_chunk_size=0),
        None,
    ),
    "bert mlm+nsp": (mlm_case, dict(precision="fp32"), None),
    "t5 seq2seq, checkpointing": (
        lambda tok: seq2seq_case(),
        dict(precision="fp32", activation_checkpointing=True),
        None,
    ),
    "gpt2 classify, LoRA": (lambda tok: classify_case(), dict(precision="fp32"), "r=4,targets=qkv,mlp.fc"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_the_predicted_peak_is_that_of_a_real_cpu_step(case, wordpiece):
    make, options, lora = CASES[case]
    config, objective, batch = make(wordpiece)
    cfg = TrainConfig(micro_batch_size=batch["input_ids"].shape[0], seq_len=batch["input_ids"].shape[1], **options)
    spec = parse_lora(lora) if lora else None
    settings = Settings(
        cfg.micro_batch_size,
        cfg.grad_accum_steps,
        cfg.seq_len,
        cfg.precision,
        cfg.activation_checkpointing,
        cfg.ce_chunk_size,
        spec,
    )
    predicted = measure_step(lambda: build_model(config), objective, batch, cfg, "cpu", settings)

    torch.manual_seed(0)
    model = build_model(config)
    if spec is not None:
        apply_lora(model, spec)
    measured, optimizer = real_step_peak(model, objective, batch, cfg)
    assert abs(predicted.peak - measured) <= 0.15 * measured, (predicted, measured)

    # parameters, gradients and optimizer state: exact
    assert predicted.parameters == sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert predicted.gradients == sum(p.nbytes for p in model.parameters() if p.requires_grad)
    assert predicted.optimizer == sum(t.nbytes for state in optimizer.state.values() for t in state.values())
    assert predicted.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if spec is not None:
        assert predicted.trainable_params < predicted.num_params / 10  # the adapters and the task head only


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_activations_are_what_a_real_forward_saves_for_backward(name):
    """Without checkpointing, what the blocks hold at the end of the forward pass is what autograd saved
    (counted once per storage, weights aside) plus the final hidden states."""
    config, objective, batch = clm_case(name)
    predicted = measure_step(
        lambda: build_model(config), objective, batch, TrainConfig(), "cpu", Settings(4, 1, 64, "fp32")
    )
    model = build_model(config)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(batch["input_ids"], hidden_only=True)
    measured = sum(saved.values()) + hidden.nbytes
    assert abs(predicted.activations - measured) <= 0.15 * measured, (predicted.activations, measured)


def test_checkpointing_and_chunking_lower_what_they_should():
    config, objective, batch = clm_case("gpt2-tiny", vocab=40_000, T=64)
    base = Settings(4, 1, 64, "fp32", ce_chunk_size=0)
    plain = measure_step(lambda: build_model(config), objective, batch, TrainConfig(), "cpu", base)
    checkpointed = measure_step(
        lambda: build_model(config),
        objective,
        batch,
        TrainConfig(),
        "cpu",
        dataclasses.replace(base, activation_checkpointing=True),
    )
    chunked = measure_step(
        lambda: build_model(config), objective, batch, TrainConfig(), "cpu", dataclasses.replace(base, ce_chunk_size=64)
    )
    assert checkpointed.activations < plain.activations / 3
    assert chunked.logits < plain.logits / 3 and chunked.ce_rows == 64 and plain.ce_rows == 0
    assert plain.peak_phase == "loss"
    assert objective.ce_chunk_size is None  # the estimate leaves the objective as it found it


@pytest.mark.slow
def test_for_cuda_attention_keeps_what_cudas_kernels_keep():
    """The fake step runs on the CPU; for a CUDA run, attention saves what flash / memory-efficient attention
    save (the output and a log-sum-exp per row), never the T×T scores the CPU's math kernel keeps."""
    config, objective, batch = clm_case("gpt2-tiny", T=128)
    run = lambda device, precision, **kw: measure_step(  # noqa: E731
        lambda: build_model(dataclasses.replace(config, **kw)),
        objective,
        batch,
        TrainConfig(),
        device,
        Settings(4, 1, 128, precision),
    )
    assert run("cuda", "bf16").attention == "flash"
    assert run("cuda", "fp32").attention == "memory-efficient"
    llama = preset("llama-tiny", vocab_size=512)
    gqa = measure_step(lambda: build_model(llama), objective, batch, TrainConfig(), "cuda", Settings(4, 1, 128, "fp32"))
    assert gqa.attention == "math"  # grouped-query heads in fp32: neither fused kernel takes them
    scores = 4 * config.n_head * 128 * 128 * 4 * config.n_layer  # B × heads × T × T fp32, every layer
    with_dropout = run("cpu", "fp32", dropout=0.1)  # the CPU's math kernel: scores and a dropout mask per layer
    assert with_dropout.activations - run("cuda", "fp32", dropout=0.1).activations > scores
    checkpointed = measure_step(
        lambda: build_model(llama), objective, batch, TrainConfig(), "cuda", Settings(4, 1, 128, "bf16", True)
    )
    assert checkpointed.attention == "flash"  # recomputed in backward the same way


# -- the dry run ------------------------------------------------------------------------------------


def test_dry_run_reports_and_writes_nothing(data_dir, tmp_path, capsys):
    from lmlab.train.pretrain import pretrain

    result = pretrain("gpt2-tiny", data_dir, tmp_path / "run", dry_run=True, micro_batch_size=4, seq_len=32)
    assert not (tmp_path / "run").exists()
    assert result.fits is None and result.changes == []
    report = result.report()
    for needle in (
        "parameters and buffers",
        "gradients",
        "optimizer state",
        "activations",
        "logits and loss",
        "peak",
        "--memory-budget",
    ):
        assert needle in report
    assert result.memory.settings.micro_batch_size == 4 and result.memory.settings.seq_len == 32

    roomy = pretrain(
        "gpt2-tiny", data_dir, tmp_path / "run", dry_run=True, micro_batch_size=4, seq_len=32, memory_budget=1.0
    )
    assert roomy.fits and "budget: fits" in roomy.report() and roomy.changes == []


def test_dry_run_per_process_by_world_size_and_strategy(data_dir, tmp_path):
    """DDP keeps everything whole and adds its gradient buckets; FSDP divides parameters, gradients and optimizer
    state by the world size and adds what it gathers whole; CPU offload leaves none of them on the device; a run
    that does not fit is told to shard."""
    from lmlab.train.pretrain import pretrain

    def predict(**kw):
        args = dict(dry_run=True, micro_batch_size=4, seq_len=32, device="cuda")
        return pretrain("gpt2-tiny", data_dir, tmp_path / "run", **args, **kw)

    one, ddp = predict().memory, predict(world_size=4).memory
    fsdp, offload = (predict(world_size=4, strategy="fsdp", **kw).memory for kw in ({}, {"cpu_offload": True}))
    assert ddp.ddp_buckets == ddp.gradients == one.gradients and ddp.peak == one.peak + one.gradients
    for part in ("parameters", "gradients", "optimizer"):
        assert getattr(fsdp, part) == -(-getattr(one, part) // 4) and getattr(offload, part) == 0
    assert 0 < fsdp.gathered < one.parameters and fsdp.peak < ddp.peak and offload.peak < fsdp.peak
    report = predict(world_size=4, strategy="fsdp").report()
    assert "4, fsdp; per process" in report and "sharded: 1/4 per process" in report and "FSDP gathered" in report
    tight = predict(world_size=4, memory_budget=ddp.peak / 2**30)
    assert tight.fits is False and any(c.flags == "--strategy fsdp" for c in tight.changes)
    with pytest.raises(LmlabError, match="world_size"):
        pretrain("gpt2-tiny", data_dir, tmp_path / "run", world_size=2)


@pytest.mark.slow
def test_dry_run_advice_names_the_flags_and_their_predictions(data_dir, tmp_path):
    from lmlab.train.pretrain import pretrain

    ask = dict(micro_batch_size=8, seq_len=64, precision="fp32")
    whole = pretrain("gpt2-tiny", data_dir, tmp_path / "run", dry_run=True, **ask).memory
    budget = whole.peak * 0.8 / 2**30  # 80% of what it needs, so 72% after the headroom
    result = pretrain("gpt2-tiny", data_dir, tmp_path / "run", dry_run=True, memory_budget=budget, **ask)
    assert result.fits is False
    flags = {c.flags.split()[0]: c for c in result.changes}
    assert set(flags) >= {"--micro-batch-size", "--activation-checkpointing", "--precision", "--seq-len"}
    batch = flags["--micro-batch-size"]
    assert (
        batch.memory.settings.micro_batch_size * batch.memory.settings.grad_accum_steps == 8
    )  # the same batch per step
    assert batch.memory.peak <= result.limit and batch.memory.peak < whole.peak
    assert flags["--activation-checkpointing"].memory.activations < whole.activations
    assert flags["--seq-len"].flags == "--seq-len 32"
    report = result.report()
    assert (
        "does NOT fit" in report
        and "--micro-batch-size 4 --grad-accum-steps 2" in report
        and "--activation-checkpointing" in report
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_finetune_dry_run_proposes_lora_and_a_shorter_max_length(tmp_path):
    import json

    from lmlab.io.checkpoint import save_checkpoint
    from lmlab.tokenizer import train_tokenizer
    from lmlab.train.finetune import finetune

    texts = [
        f"review {i}: the film was {'great' if i % 2 else 'awful'} and the plot {'worked' if i % 3 else 'dragged'}"
        for i in range(60)
    ]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=300)
    base = save_checkpoint(
        tmp_path / "base", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size)), tokenizer=tok
    )
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"text": t, "label": "pos" if i % 2 else "neg"}) + "\n" for i, t in enumerate(texts))
    )
    result = finetune(
        base,
        "classify",
        train,
        tmp_path / "run",
        max_length=32,
        dry_run=True,
        micro_batch_size=2,
        precision="bf16",
        memory_budget=1e-4,
    )
    assert not (tmp_path / "run").exists() and result.fits is False
    flags = " | ".join(c.flags for c in result.changes)
    assert (
        "--lora default" in flags
        and "--max-length 16" in flags
        and "--micro-batch-size 1 --grad-accum-steps 2" in flags
    )
    lora = next(c for c in result.changes if c.flags == "--lora default")
    assert lora.memory.optimizer < result.memory.optimizer / 10


@pytest.mark.slow
def test_cli_dry_run_bad_budgets_and_help(data_dir, tmp_path, capsys):
    from lmlab.train.pretrain import pretrain

    out = tmp_path / "run"
    ask = ["--seq-len", "32", "--micro-batch-size", "2", "--precision", "fp32"]
    peak = pretrain(
        "gpt2-tiny", data_dir, out, dry_run=True, seq_len=32, micro_batch_size=2, precision="fp32"
    ).memory.peak
    code = main(
        [
            "pretrain",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            *ask,
            "--dry-run",
            "--memory-budget",
            str(peak * 0.9 / 2**30),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert (
        "does NOT fit" in printed
        and "--activation-checkpointing" in printed
        and "--micro-batch-size 1 --grad-accum-steps 2" in printed
    )
    for argv, needle in (
        (["--dry-run", "--memory-budget", "-1"], "--memory-budget is -1.0: expected a positive number of GiB"),
        (["--dry-run", "--memory-budget", "0"], "--memory-budget is 0.0"),
        (["--memory-budget", "8"], "add --dry-run"),
        (["--dry-run", "--ce-chunk-size", "-3"], "--ce-chunk-size is -3"),
    ):
        code = main(["pretrain", "--data", str(data_dir), "--out", str(out), *argv])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("lmlab: error:")]
        assert code == 1 and len(errors) == 1 and needle in errors[0], err
    assert not out.exists()
    for verb in (["pretrain"], ["finetune"]):
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        text = capsys.readouterr().out
        for flag in ("--dry-run", "--memory-budget", "--activation-checkpointing", "--ce-chunk-size"):
            assert flag in text, (verb, flag)


def test_a_bad_budget_is_refused_by_the_python_api_too(data_dir, tmp_path):
    from lmlab.train.pretrain import pretrain

    with pytest.raises(LmlabError, match="memory_budget is nan"):
        pretrain("gpt2-tiny", data_dir, tmp_path / "run", dry_run=True, memory_budget=float("nan"))


# -- on a GPU ---------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: compares with torch.cuda.max_memory_allocated"
)
@pytest.mark.parametrize(
    "name, B, T, options",
    [
        ("gpt2-124m", 4, 512, {}),  # flash attention, GPT-2's 50,257-token vocabulary: chunked cross-entropy
        ("gpt2-124m", 4, 512, {"ce_chunk_size": 0}),  # the whole batch's logits at once
        ("gpt2-124m", 4, 512, {"activation_checkpointing": True}),
        ("llama-1b", 1, 1024, {}),  # grouped-query attention, RoPE, an untied head
    ],
)
def test_the_prediction_matches_a_real_cuda_step(name, B, T, options):
    """One real steady-state step on the GPU, as train_loop runs it (bf16 autocast, fused AdamW, clipping),
    against the prediction made without the GPU (fake tensors on the CPU, CUDA's attention modelled)."""
    device = torch.device("cuda")
    config = preset(name)
    objective = CausalLM()
    batch = objective.batch(torch.randint(0, config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)))
    cfg = TrainConfig(micro_batch_size=B, seq_len=T, precision="bf16", device="cuda", **options)
    settings = Settings(B, 1, T, "bf16", cfg.activation_checkpointing, cfg.ce_chunk_size)
    predicted = measure_step(lambda: build_model(config), objective, batch, cfg, device, settings)

    torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(config).train()
    apply_memory_options(model, objective, cfg)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, device)
    autocast, _ = autocast_for(cfg.precision, device)
    gpu_batch = {k: v.to(device) for k, v in batch.items()}

    def step():
        with autocast():
            loss = objective.loss(model, gpu_batch)
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state (and cuBLAS's workspace) now exist: the measured step is a steady-state one
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated(device)
    assert abs(predicted.peak - measured) <= 0.15 * measured, (
        f"predicted {predicted.peak / 2**30:.3f} GiB, measured {measured / 2**30:.3f} GiB: {predicted}"
    )
