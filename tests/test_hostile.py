"""A hostile-input sweep over every verb: folders that are not lmlab's, unwritable places, output inside
a source, damaged files and absurd flags. Each case must exit non-zero with one line on stderr that
names the file or flag, no traceback, and leave every file outside lmlab's own output untouched.

Run it alone with ``pytest tests/test_hostile.py``; the guide's "Errors" section lists the guarantees."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from lmlab.cli import main
from lmlab.config import preset
from lmlab.io.checkpoint import save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import Tokenizer
from lmlab.train.lora import LoraSpec, apply_lora

UNWRITABLE = "/sys/lmlab-test-out"  # read-only even for root
# names lmlab writes somewhere: planted in folders lmlab must refuse, they must survive too
LMLAB_NAMES = ("log.jsonl", "loss.png", "best/notes.txt", "manifest.json", "tokenizer.json", "config.json", "metrics.json",
               "report.json", "train_00007.bin", "canaries.json")
OTHER_NAMES = ("notes.txt", "sub/deep.bin", ".hidden")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus_file, tokenizer_dir, data_dir):
    """A tokenizer, a data folder, a tiny pretrained run, a LoRA checkpoint, a classification file."""
    folder = tmp_path_factory.mktemp("world")
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=64))
    run = folder / "run"
    save_checkpoint(run / "step-00000001", model, tokenizer=tok, train_state={"step": 1}, meta={"tokenizer_sha256": tok.sha256})
    save_checkpoint(run / "best", model, tokenizer=tok, meta={"tokenizer_sha256": tok.sha256})
    lora = save_checkpoint(folder / "lora", apply_lora(model, LoraSpec(r=2, targets=("qkv",))), tokenizer=tok)
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(["good", "bad", "film", "plot"], k=5)), "label": rng.choice(["pos", "neg"])} for _ in range(40)]
    cls = folder / "cls.jsonl"
    cls.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"corpus": corpus_file, "tok": tokenizer_dir, "data": data_dir, "run": run, "lora": lora, "cls": cls, "root": folder}


def plant(folder, names):
    planted = {}
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(32) + name.encode())
        planted[path] = path.read_bytes()
    return planted


def assert_intact(planted):
    for path, data in planted.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was changed or deleted"


def run_cli(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code not in (0, None), err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lmlab: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


# each verb that writes a folder: its arguments with OUT where the output goes
WRITERS = {
    "tokenizer train": lambda w: ["tokenizer", "train", "--input", w["corpus"], "--vocab-size", 300, "--out", "OUT"],
    "prepare": lambda w: ["prepare", "--input", w["corpus"], "--tokenizer", w["tok"], "--out", "OUT", "--no-progress"],
    "pretrain": lambda w: ["pretrain", "--model", "gpt2-tiny", "--data", w["data"], "--out", "OUT", "--max-steps", 1, "--seq-len", 16,
                           "--micro-batch-size", 2, "--eval-batches", 1, "--no-progress", "--no-tensorboard", "--block-size", 32],
    "finetune": lambda w: ["finetune", w["run"], "--task", "classify", "--train", w["cls"], "--out", "OUT", "--max-steps", 1,
                           "--micro-batch-size", 4, "--max-length", 16, "--no-progress", "--no-tensorboard"],
    "evaluate": lambda w: ["evaluate", w["run"], "--task", "lm", "--data", w["corpus"], "--out", "OUT", "--max-length", 16, "--n-resamples", 10],
    "critique": lambda w: ["critique", w["run"], "--lenses", "efficiency", "--out", "OUT", "--no-progress"],
    "merge-lora": lambda w: ["merge-lora", w["lora"], "--out", "OUT"],
    "generate": lambda w: ["generate", w["run"], "--prompt", "The", "--max-new-tokens", 2, "--output", "OUT/out.txt"],
}


def argv_for(verb, world, out):
    return [str(out) if a == "OUT" else str(a).replace("OUT", str(out)) if isinstance(a, str) else a for a in WRITERS[verb](world)]


@pytest.mark.parametrize("verb", [v for v in WRITERS if v != "generate"])
def test_a_folder_that_is_not_lmlabs_is_refused_and_left_byte_for_byte(verb, world, tmp_path, capsys):
    out = tmp_path / "mine"
    planted = plant(out, OTHER_NAMES + LMLAB_NAMES)
    code, _, err = run_cli(capsys, argv_for(verb, world, out))
    assert_one_line_error(code, err, str(out))
    assert "--overwrite" in err or "would break it" in err  # a folder holding a tokenizer.json and a manifest.json looks like data
    assert_intact(planted)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(OTHER_NAMES + LMLAB_NAMES)


@pytest.mark.parametrize("verb", [v for v in WRITERS if v != "generate"])
def test_overwrite_writes_lmlabs_files_and_deletes_nothing_else(verb, world, tmp_path, capsys):
    out = tmp_path / "mine"
    planted = plant(out, OTHER_NAMES + ("best/notes.txt",))
    code, _, err = run_cli(capsys, argv_for(verb, world, out) + ["--overwrite"])
    assert code == 0, err
    assert_intact(planted)


def test_generate_output_refuses_a_folder_and_an_existing_file(world, tmp_path, capsys):
    planted = plant(tmp_path, ("out.txt",))
    code, _, err = run_cli(capsys, argv_for("generate", world, tmp_path))
    assert_one_line_error(code, err, "--output", "out.txt", "--overwrite")
    assert_intact(planted)
    code, _, err = run_cli(capsys, ["generate", world["run"], "--prompt", "The", "--output", tmp_path])
    assert_one_line_error(code, err, "--output", "is a folder")
    code, _, err = run_cli(capsys, argv_for("generate", world, tmp_path) + ["--overwrite"])
    assert code == 0 and (tmp_path / "out.txt").read_text().startswith("The")


@pytest.mark.parametrize("verb", list(WRITERS))
def test_an_unwritable_output_is_an_error_before_any_work(verb, world, capsys):
    code, _, err = run_cli(capsys, argv_for(verb, world, UNWRITABLE))
    assert_one_line_error(code, err, UNWRITABLE, "cannot write")


@pytest.mark.parametrize(
    "verb, inside",
    [("merge-lora", "lora"), ("merge-lora", "lora/sub"), ("finetune", "run"), ("finetune", "run/best"), ("evaluate", "run/best/eval"),
     ("critique", "run/report"), ("prepare", "tok"), ("pretrain", "data/run")],
)
def test_output_inside_a_source_is_refused(verb, inside, world, capsys):
    source, _, rest = inside.partition("/")
    out = world[source] / rest if rest else world[source]
    before = {p: p.read_bytes() for p in world[source].rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, argv_for(verb, world, out))
    assert_one_line_error(code, err, "which this command reads")
    assert_intact(before)


def test_merge_lora_into_a_runs_training_checkpoint_is_refused(world, capsys):
    step = world["run"] / "step-00000001"
    before = {p: p.read_bytes() for p in step.iterdir()}
    code, _, err = run_cli(capsys, ["merge-lora", world["lora"], "--out", step])
    assert_one_line_error(code, err, "train_state.pt")
    assert_intact(before)


def test_tokenizer_train_never_replaces_a_checkpoints_or_data_folders_tokenizer(world, capsys):
    for folder in (world["run"] / "best", world["data"]):
        before = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        code, _, err = run_cli(capsys, argv_for("tokenizer train", world, folder) + ["--overwrite"])
        assert_one_line_error(code, err, str(folder), "replacing its tokenizer would break it")
        assert_intact(before)


def test_an_output_path_that_is_a_file_is_an_error(world, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for verb in ("prepare", "pretrain", "evaluate", "critique", "merge-lora", "tokenizer train"):
        code, _, err = run_cli(capsys, argv_for(verb, world, tmp_path / "file"))
        assert_one_line_error(code, err, str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


def test_rerunning_into_lmlabs_own_output_needs_no_flag(world, tmp_path, capsys):
    for verb in ("tokenizer train", "prepare", "evaluate", "critique", "merge-lora"):
        out = tmp_path / verb.replace(" ", "-")
        for _ in range(2):
            code, _, err = run_cli(capsys, argv_for(verb, world, out))
            assert code == 0, f"{verb}: {err}"
