"""Scaling out: the ranks' data partitions, FSDP2 and DDP under torchrun (CPU, gloo, 2 processes), sharded (DCP)
checkpoints written atomically and resumed at another world size, read by load, generate and consolidate."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, crash_windows_at

from lmlab.io.checkpoint import list_checkpoints, load_model
from lmlab.train.data import EpochWindows, ExampleBatches
from lmlab.train.pretrain import pretrain

TESTS = Path(__file__).parent


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def documented(prefix: str) -> list[str]:
    """The first command line of docs/guide.md that starts with ``prefix``, as its words."""
    lines = (TESTS.parent / "docs" / "guide.md").read_text(encoding="utf-8").splitlines()
    return shlex.split(next(line for line in lines if line.startswith(prefix)))


def launcher(line: list[str], **values: str) -> list[str]:
    """A documented torchrun line up to ``-m lmlab.cli``, with flag values replaced (``nproc_per_node="2"``), run
    as ``python -m torch.distributed.run`` and ending in tests/fault_runner.py: lmlab's CLI, faults if asked."""
    words = line[1 : line.index("-m")]
    for flag, value in values.items():
        words[words.index(f"--{flag.replace('_', '-')}") + 1] = value
    return [sys.executable, "-m", "torch.distributed.run", *words, str(TESTS / "fault_runner.py")]


def env_with(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    return {**env, "LMLAB_TEST_FAULT": fault} if fault else env


def torchrun(*args: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``lmlab ARGS`` as the guide's single-node line launches it, in 2 CPU processes; a fault planted if asked."""
    cmd = launcher(documented("torchrun --standalone"), nproc_per_node="2")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env_with(fault))


def two_nodes(*args: str, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``lmlab ARGS`` as the guide's multi-node line launches it, with 2 "nodes" of 1 CPU process on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = launcher(documented("torchrun --nnodes"), nproc_per_node="1", rdzv_endpoint=f"127.0.0.1:{port}")
    nodes = [subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with())
             for _ in range(2)]  # fmt: skip
    return [subprocess.CompletedProcess(n.args, n.wait(timeout), *n.communicate()) for n in nodes]


def test_the_slurm_example_is_bash_and_starts_the_guides_multi_node_line_on_every_node(tmp_path):
    script = TESTS.parent / "examples" / "slurm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "argv"}\n')
    (fake / "scontrol").write_text("#!/bin/sh\necho node0; echo node1\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    slurm = {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "job1", "SLURM_JOB_NODELIST": "node[0-1]"}
    env = {k: v for k, v in os.environ.items() if k != "LMLAB_ARGS"}
    env.update(slurm, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "argv").read_text().splitlines() == documented("torchrun --nnodes")


@pytest.mark.parametrize("world, accum", [(2, 1), (3, 2), (4, 3)])
def test_rank_partitions_are_disjoint_and_cover_every_epoch(world, accum):
    n, batch = 50, 3
    ranks = [ExampleBatches(n, batch, accum, seed=7, rank=r, world_size=world) for r in range(world)]
    steps = 3 * ranks[0].steps_per_epoch()
    example_at: dict[int, int] = {}  # the run's example counter q → the example it is, as each rank reads it
    for r, part in enumerate(ranks):
        for s in range(steps):
            for m in range(accum):
                first = part.first(s, m)
                for q, i in zip(range(first, first + batch), part(s, m).tolist()):
                    assert q not in example_at, f"rank {r} reads q={q} that another rank reads"
                    example_at[q] = i
    assert sorted(example_at) == list(range(steps * batch * accum * world))  # no overlap, no gap
    for epoch in range(len(example_at) // n):  # every epoch: each example exactly once, across the ranks
        assert sorted(example_at[q] for q in range(epoch * n, (epoch + 1) * n)) == list(range(n))
    one = ExampleBatches(n, batch * world, accum, seed=7)  # one process, the same global batch: the same steps
    for s in range(steps):
        expected = sorted(i for part in ranks for m in range(accum) for i in part(s, m).tolist())
        assert sorted(i for m in range(accum) for i in one(s, m).tolist()) == expected


def test_the_data_position_continues_a_run_at_another_world_size():
    two = [ExampleBatches(40, 2, 1, seed=1, rank=r, world_size=2) for r in range(2)]
    assert two[0].position(5) == 20
    one = ExampleBatches(40, 4, 1, seed=1)
    one.start_at(5, two[0].position(5))
    assert sorted(one(6, 0).tolist()) == sorted(two[0](6, 0).tolist() + two[1](6, 0).tolist())


def test_windows_tile_the_split_without_overlap(data_dir):
    from lmlab.data.pack import PackedTokens

    tokens = PackedTokens(data_dir, "train")
    windows = EpochWindows(tokens, 32, 4, seed=0)
    assert windows.n == (len(tokens) - 1) // 32
    starts = [int(i) * 32 for s in range(windows.steps_per_epoch()) for i in ExampleBatches.__call__(windows, s, 0)]
    assert sorted(starts[: windows.n]) == list(range(0, windows.n * 32, 32))


ARGS = dict(TINY_TRAIN, max_steps=8, eval_interval=4, save_interval=2, log_interval=1, seed=3)


def test_fsdp_in_one_process_with_activation_checkpointing_trains_and_resumes_as_the_plain_run(
    data_dir, tmp_path, monkeypatch
):
    """One process, strategy fsdp (a process group of one): with dropout and activation checkpointing, the plain
    run's losses bit for bit; its sharded checkpoint resumes without fsdp too, the data continuing where it was."""
    args, dropout = dict(ARGS, max_steps=6), {"dropout": 0.1}
    whole = pretrain("llama-tiny", data_dir, tmp_path / "whole", model_overrides=dropout, **args)
    crash_windows_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        pretrain("llama-tiny", data_dir, tmp_path / "run", model_overrides=dropout, strategy="fsdp",
                 activation_checkpointing=True, **args)  # fmt: skip
    monkeypatch.undo()
    step4 = tmp_path / "run" / "step-00000004"
    assert (step4 / "COMPLETE").is_file() and not (step4 / "model.safetensors").exists()
    assert torch.load(step4 / "train_state.pt")["data_position"] == {"examples": 4 * 4}
    pretrain("llama-tiny", data_dir, tmp_path / "run", model_overrides=dropout, resume=True, **args)
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "whole")
    assert (tmp_path / "run" / "step-00000006" / "model.safetensors").is_file()  # written as ddp writes
    assert whole.step == 6 and whole.val_loss is not None


def test_a_resume_that_changes_the_global_batch_is_refused_and_one_that_keeps_it_is_not(data_dir, tmp_path):
    from lmlab.errors import LmlabError

    pretrain("gpt2-tiny", data_dir, tmp_path / "run", **dict(ARGS, max_steps=2))
    with pytest.raises(LmlabError, match="global batch 4 sequences"):
        pretrain("gpt2-tiny", data_dir, tmp_path / "run", resume=True, **dict(ARGS, max_steps=3, micro_batch_size=2))
    keep = dict(ARGS, max_steps=3, micro_batch_size=2, grad_accum_steps=2)
    assert pretrain("gpt2-tiny", data_dir, tmp_path / "run", resume=True, **keep).step == 3


def cli_args(data_dir: Path, out: Path, **changes) -> list[str]:
    args = {**ARGS, **changes}
    flags = ["pretrain", "--model", "gpt2-tiny", "--data", str(data_dir), "--out", str(out), "--resume"]
    for key, value in args.items():
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


@pytest.mark.slow
def test_fsdp_killed_mid_run_and_mid_checkpoint_resumes_at_2_and_1_ranks_as_if_never_stopped(
    data_dir, tmp_path, monkeypatch
):
    """1 process (fsdp) killed at step 3 → 2 ranks (fsdp) resume it from step 2 and are killed while writing the
    step-6 checkpoint, after the shards, before the marker → 1 process resumes from step 4 (never the incomplete
    6) and finishes. The train losses are the uninterrupted single-process run's at every step."""
    whole = pretrain("gpt2-tiny", data_dir, tmp_path / "whole", **ARGS)
    run = tmp_path / "run"
    crash_windows_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pretrain("gpt2-tiny", data_dir, run, strategy="fsdp", **ARGS)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run)] == [2]

    proc = torchrun(*cli_args(data_dir, run, micro_batch_size=2, strategy="fsdp"), fault="marker:6")
    assert proc.returncode != 0 and "2 processes" in proc.stderr, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    partial = [p for p in run.iterdir() if p.name.startswith(".tmp-step-00000006")]
    assert len(partial) == 1 and (partial[0] / "dcp" / "__1_0.distcp").is_file()
    assert not (partial[0] / "COMPLETE").exists()  # shards of both ranks, no marker: not a checkpoint

    pretrain("gpt2-tiny", data_dir, run, strategy="fsdp", resume=True, **ARGS)
    expected = {r["step"]: r["loss"] for r in whole.history if "loss" in r}
    assert train_losses(run) == pytest.approx(expected, rel=1e-5)
    assert sorted(p.name for p in (run / "step-00000004" / "dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    check_reading_a_sharded_checkpoint(run, tmp_path / "whole", tmp_path)


def check_reading_a_sharded_checkpoint(run: Path, whole: Path, tmp_path: Path) -> None:
    """A checkpoint 2 ranks wrote loads whole in one process (the weights the unsharded run had), generates, and
    consolidates into one safetensors checkpoint."""
    import lmlab
    from lmlab.io.checkpoint import consolidate

    sharded = load_model(run / "step-00000004")
    plain = load_model(whole / "step-00000004")
    for (name, a), b in zip(plain.state_dict().items(), sharded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    out = consolidate(run / "step-00000004", tmp_path / "one")
    assert (out / "model.safetensors").is_file() and not (out / "dcp").exists()
    for a, b in zip(sharded.state_dict().values(), load_model(out).state_dict().values()):
        assert torch.equal(a, b)
    text = lmlab.load(run / "step-00000004").generate("The", max_new_tokens=8)
    assert text and text == lmlab.load(out).generate("The", max_new_tokens=8)


@pytest.mark.slow
def test_fsdp_on_2_ranks_trains_as_one_process_with_the_same_global_batch(data_dir, tmp_path):
    """Pretraining (launched as the guide's multi-node line: 2 nodes of 1 process), and a LoRA fine-tune of its
    sharded checkpoint (frozen base sharded, adapters trained): 2 FSDP ranks × 2 sequences give the losses of one
    process × 4 (DDP's: tests/test_pretrain.py, the torchrun test)."""
    import random

    from lmlab import finetune

    args = dict(ARGS, max_steps=4, eval_interval=4, save_interval=4)
    pretrain("gpt2-tiny", data_dir, tmp_path / "one", **args)
    for node in two_nodes(
        *cli_args(data_dir, tmp_path / "fsdp", **{**args, "micro_batch_size": 2, "strategy": "fsdp"})
    ):
        assert node.returncode == 0, node.stderr[-3000:]
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    base = tmp_path / "fsdp" / "step-00000004"  # a sharded checkpoint: fine-tuning reads it as it is

    rng = random.Random(0)
    rows = [
        {"text": f"{rng.choice(['good', 'bad'])} film {rng.randrange(100)}", "label": rng.randrange(2)}
        for _ in range(32)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tune = dict(task="classify", lora="r=8,alpha=16,dropout=0", max_steps=3, log_interval=1, max_length=16, seed=1)
    finetune(
        base,
        train=tmp_path / "train.jsonl",
        out=tmp_path / "ft1",
        micro_batch_size=8,
        progress=False,
        tensorboard=False,
        **tune,
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in tune.items()]
    proc = torchrun(
        "finetune",
        str(base),
        f"--train={tmp_path / 'train.jsonl'}",
        f"--out={tmp_path / 'ft2'}",
        "--micro-batch-size=4",
        "--strategy=fsdp",
        "--no-progress",
        "--no-tensorboard",
        *flags,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tmp_path / "ft2") == pytest.approx(train_losses(tmp_path / "ft1"), rel=1e-5)


def test_a_sharded_checkpoint_is_one_only_when_complete_and_never_replaces_files_lmlab_did_not_write(tmp_path):
    from lmlab.config import preset
    from lmlab.errors import LmlabError
    from lmlab.io.checkpoint import is_checkpoint, save_sharded_checkpoint
    from lmlab.model import build_model

    model = build_model(preset("llama-tiny", vocab_size=96))
    path = save_sharded_checkpoint(tmp_path / "ckpt", model, None)  # one process, no process group
    for a, b in zip(model.state_dict().values(), load_model(path).state_dict().values()):
        assert torch.equal(a, b)
    save_sharded_checkpoint(path, model, None)  # lmlab's own: replaced whole
    (path / "notes.txt").write_text("mine")
    with pytest.raises(LmlabError, match="did not write"):
        save_sharded_checkpoint(path, model, None)
    assert (path / "notes.txt").read_text() == "mine" and is_checkpoint(path)
    (path / "COMPLETE").unlink()  # as a run killed before the marker leaves it
    assert not is_checkpoint(path)
    with pytest.raises(LmlabError, match="not a checkpoint"):
        load_model(path)
