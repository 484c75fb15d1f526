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
from test_outputs import UNWRITABLE, assert_intact, plant  # noqa: E402  (the planted-file helpers)

from lmlab.cli import main
from lmlab.config import preset
from lmlab.io.checkpoint import save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import Tokenizer
from lmlab.train.lora import LoraSpec, apply_lora

# names lmlab writes somewhere: planted in folders lmlab must refuse, they must survive too
LMLAB_NAMES = (
    "log.jsonl",
    "loss.png",
    "best/notes.txt",
    "manifest.json",
    "tokenizer.json",
    "config.json",
    "metrics.json",
    "report.json",
    "train_00007.bin",
    "canaries.json",
)
OTHER_NAMES = ("notes.txt", "sub/deep.bin", ".hidden")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus_file, tokenizer_dir, data_dir, other_tokenizer_dir):
    """A tokenizer, a data folder, a tiny pretrained run, a LoRA checkpoint, a classification file."""
    folder = tmp_path_factory.mktemp("world")
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=64))
    run = folder / "run"
    save_checkpoint(
        run / "step-00000001", model, tokenizer=tok, train_state={"step": 1}, meta={"tokenizer_sha256": tok.sha256}
    )
    save_checkpoint(run / "best", model, tokenizer=tok, meta={"tokenizer_sha256": tok.sha256})
    lora = save_checkpoint(folder / "lora", apply_lora(model, LoraSpec(r=2, targets=("qkv",))), tokenizer=tok)
    rng = random.Random(0)
    rows = [
        {"text": " ".join(rng.choices(["good", "bad", "film", "plot"], k=5)), "label": rng.choice(["pos", "neg"])}
        for _ in range(40)
    ]
    cls = folder / "cls.jsonl"
    cls.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {
        "corpus": corpus_file,
        "tok": tokenizer_dir,
        "data": data_dir,
        "run": run,
        "lora": lora,
        "cls": cls,
        "root": folder,
        "other_tok": other_tokenizer_dir,
    }


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
    "pretrain": lambda w: [
        "pretrain",
        "--model",
        "gpt2-tiny",
        "--data",
        w["data"],
        "--out",
        "OUT",
        "--max-steps",
        1,
        "--seq-len",
        16,
        "--micro-batch-size",
        2,
        "--eval-batches",
        1,
        "--no-progress",
        "--no-tensorboard",
        "--block-size",
        32,
    ],
    "finetune": lambda w: [
        "finetune",
        w["run"],
        "--task",
        "classify",
        "--train",
        w["cls"],
        "--out",
        "OUT",
        "--max-steps",
        1,
        "--micro-batch-size",
        4,
        "--max-length",
        16,
        "--no-progress",
        "--no-tensorboard",
    ],
    "evaluate": lambda w: [
        "evaluate",
        w["run"],
        "--task",
        "lm",
        "--data",
        w["corpus"],
        "--out",
        "OUT",
        "--max-length",
        16,
        "--n-resamples",
        10,
    ],
    "critique": lambda w: ["critique", w["run"], "--lenses", "efficiency", "--out", "OUT", "--no-progress"],
    "merge-lora": lambda w: ["merge-lora", w["lora"], "--out", "OUT"],
    "generate": lambda w: ["generate", w["run"], "--prompt", "The", "--max-new-tokens", 2, "--output", "OUT/out.txt"],
}


def argv_for(verb, world, out):
    return [
        str(out) if a == "OUT" else str(a).replace("OUT", str(out)) if isinstance(a, str) else a
        for a in WRITERS[verb](world)
    ]


@pytest.mark.parametrize("verb", [v for v in WRITERS if v != "generate"])
def test_a_folder_that_is_not_lmlabs_is_refused_and_left_byte_for_byte(verb, world, tmp_path, capsys):
    out = tmp_path / "mine"
    planted = plant(out, OTHER_NAMES + LMLAB_NAMES)
    code, _, err = run_cli(capsys, argv_for(verb, world, out))
    assert_one_line_error(code, err, str(out))
    assert (
        "--overwrite" in err or "would break it" in err
    )  # a folder holding a tokenizer.json and a manifest.json looks like data
    assert_intact(planted)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        OTHER_NAMES + LMLAB_NAMES
    )


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
    [
        ("merge-lora", "lora"),
        ("merge-lora", "lora/sub"),
        ("finetune", "run"),
        ("finetune", "run/best"),
        ("evaluate", "run/best/eval"),
        ("critique", "run/report"),
        ("prepare", "tok"),
        ("pretrain", "data/run"),
    ],
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


@pytest.mark.slow
def test_rerunning_into_lmlabs_own_output_needs_no_flag(world, tmp_path, capsys):
    for verb in ("tokenizer train", "prepare", "evaluate", "critique", "merge-lora"):
        out = tmp_path / verb.replace(" ", "-")
        for _ in range(2):
            code, _, err = run_cli(capsys, argv_for(verb, world, out))
            assert code == 0, f"{verb}: {err}"


# -- damaged files, mismatched files, absurd flags ------------------------------------------------------------------
def damaged(world, tmp_path, what):
    """A copy of the run's best checkpoint (or the data folder) with one thing broken; returns its path."""
    import shutil

    if what == "data tokenizer":
        data = shutil.copytree(world["data"], tmp_path / "data")
        shutil.copy(world["other_tok"] / "tokenizer.json", data / "tokenizer.json")
        return data
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    ck = run / "best"
    if what == "truncated weights":
        weights = ck / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif what == "garbage weights":
        (ck / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    elif what == "swapped tokenizer":
        shutil.copy(world["other_tok"] / "tokenizer.json", ck / "tokenizer.json")
    elif what == "absurd config":
        config = json.loads((ck / "config.json").read_text())
        config["lmlab_model_config"]["block_size"] = 10**12
        (ck / "config.json").write_text(json.dumps(config))
    elif what == "truncated train state":
        state = run / "step-00000001" / "train_state.pt"
        state.write_bytes(state.read_bytes()[:40])
    elif what == "poisoned train state":
        import pickle

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'PWNED'}",))

        (run / "step-00000001" / "train_state.pt").write_bytes(pickle.dumps(Payload()))
    return run


BAD_FILES = {
    "truncated weights": (lambda w, p: ["generate", p, "--prompt", "The", "--max-new-tokens", 2], "model.safetensors"),
    "garbage weights": (lambda w, p: ["evaluate", p, "--task", "lm", "--data", w["corpus"]], "model.safetensors"),
    "swapped tokenizer": (lambda w, p: ["generate", p, "--prompt", "The", "--max-new-tokens", 2], "tokenizer.json"),
    "absurd config": (lambda w, p: ["generate", p, "--prompt", "The"], "block_size"),
    "truncated train state": (
        lambda w, p: [*WRITERS["pretrain"](w)[:6], p, *WRITERS["pretrain"](w)[7:], "--resume"],
        "train_state.pt",
    ),
    "poisoned train state": (
        lambda w, p: [*WRITERS["pretrain"](w)[:6], p, *WRITERS["pretrain"](w)[7:], "--resume"],
        "train_state.pt",
    ),
    "data tokenizer": (
        lambda w, p: [*WRITERS["pretrain"](w)[:4], p, "--out", p.parent / "new-run", *WRITERS["pretrain"](w)[7:]],
        "tokenizer.json",
    ),
}


def snapshot(*folders):
    return {p: p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("what", list(BAD_FILES))
def test_a_damaged_or_mismatched_file_is_one_line_naming_it(what, world, tmp_path, capsys):
    path = damaged(world, tmp_path, what)
    argv, needle = BAD_FILES[what]
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, argv(world, path))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "PWNED").exists()  # a pickle's code never runs
    assert snapshot(tmp_path) == before  # nothing touched, nothing half-written


def test_a_binary_config_file_is_one_line(world, tmp_path, capsys):
    (tmp_path / "run.yaml").write_bytes(os.urandom(256) + b"\x00\xff")
    code, _, err = run_cli(
        capsys, ["pretrain", "--config", tmp_path / "run.yaml", "--data", world["data"], "--out", tmp_path / "r"]
    )
    assert_one_line_error(code, err, "run.yaml")
    assert not (tmp_path / "r").exists()


FLAGS = {
    "--save-interval 0": ["pretrain", "--save-interval", 0],
    "--beta1 2": ["pretrain", "--beta1", 2],
    "--device tpu": ["pretrain", "--device", "tpu"],
    "--seed 2**70": ["pretrain", "--seed", 2**70],
    "--seq-len 0": ["pretrain", "--seq-len", 0],
    "--patience 0": ["finetune", "--patience", 0],
    "--max-examples 0": ["critique", "--max-examples", 0],
    "--stop-token-ids": ["generate", "--stop-token-ids", 99999, -5],
    "--vocab-size": ["tokenizer train", "--vocab-size", 10**10],
    "--n-resamples": ["evaluate", "--n-resamples", 10**9],
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_an_absurd_flag_is_one_line_naming_it_before_any_work(case, world, tmp_path, capsys):
    verb, flag, *values = FLAGS[case]
    argv = argv_for(verb, world, tmp_path / "out")
    if flag in argv:  # replace the sweep's own value of that flag
        at = argv.index(flag)
        del argv[at : at + 2]
    before = snapshot(world["root"], world["data"], world["tok"])
    code, _, err = run_cli(capsys, [*argv, flag, *values])
    assert_one_line_error(code, err, flag)
    assert snapshot(world["root"], world["data"], world["tok"]) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_info_with_a_negative_seq_len_is_one_line(capsys):
    code, _, err = run_cli(capsys, ["info", "gpt2-tiny", "--seq-len", -5])
    assert_one_line_error(code, err, "--seq-len")


def test_export_and_demo_refuse_a_folder_that_is_not_theirs_before_any_work(world, tmp_path, capsys):
    out = tmp_path / "mine"
    planted = plant(out, OTHER_NAMES + LMLAB_NAMES)
    code, _, err = run_cli(capsys, ["export", world["run"], "--out", out])
    assert_one_line_error(code, err, str(out), "not an empty folder")
    code, _, err = run_cli(capsys, ["demo", "--out", out, "--no-progress"])
    assert_one_line_error(code, err, str(out), "not an lmlab demo folder", "--overwrite")
    code, _, err = run_cli(capsys, ["export", world["run"], "--out", world["run"] / "hf"])
    assert_one_line_error(code, err, "which this command reads")
    assert_intact(planted)
    assert not (world["run"] / "hf").exists()


def test_a_one_label_classifier_is_refused_before_training(world, tmp_path, capsys):
    """A training file whose every example has one label cannot teach a classifier anything."""
    one = tmp_path / "one.jsonl"
    one.write_text(
        "".join(json.dumps({"text": f"film {i}", "label": "pos"}) + "\n" for i in range(20)), encoding="utf-8"
    )
    argv = argv_for("finetune", world, tmp_path / "out")
    argv[argv.index("--train") + 1] = one
    code, _, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, str(one), "'pos'", "at least two")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("step-*"))
