"""Checkpoint folders: safetensors round trip, atomic replace, clear errors on folders that are not checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import is_checkpoint, load_model, load_train_state, resolve_checkpoint, save_checkpoint
from lmlab.model import build_model


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_save_load_gives_identical_logits_and_a_plain_safetensors_file(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(preset(name, vocab_size=64)).eval()
    save_checkpoint(tmp_path / "ck", model, meta={"step": 1})
    weights = load_file(tmp_path / "ck" / "model.safetensors")
    assert ("lm_head.weight" in weights) == (not model.config.tie_embeddings)  # a tied head is stored once
    loaded = load_model(tmp_path / "ck")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == model.config.tie_embeddings


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    a = build_model(preset("gpt2-tiny", vocab_size=64))
    b = build_model(preset("gpt2-tiny", vocab_size=64))
    save_checkpoint(tmp_path / "ck", a)
    save_checkpoint(tmp_path / "ck", b)
    assert torch.equal(load_model(tmp_path / "ck").tok_emb.weight, b.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_failed_write_leaves_no_partial_folder(tmp_path):
    class Broken:
        def write_files(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", build_model(preset("gpt2-tiny", vocab_size=64)), tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(LmlabError, match="is not a checkpoint: expected a folder with config.json"):
        load_model(tmp_path)
    with pytest.raises(LmlabError, match="no such checkpoint folder"):
        resolve_checkpoint(tmp_path / "missing")


def test_mismatched_weights_name_the_tensor(tmp_path):
    save_checkpoint(tmp_path / "ck", build_model(preset("gpt2-tiny", vocab_size=64)))
    other = preset("gpt2-tiny", vocab_size=64, n_layer=3)
    other.save(tmp_path / "ck" / "config.json")
    with pytest.raises(LmlabError, match=r"missing blocks\.2\."):
        load_model(tmp_path / "ck")


def test_a_run_folder_resolves_to_its_best_checkpoint(trained_run):
    assert resolve_checkpoint(trained_run) == trained_run / "best"
    assert is_checkpoint(trained_run / "step-00000030")


# -- a checkpoint's tokenizer must be the one its model was trained with ----------------------------------------------
def swap_tokenizer(folder, other_tokenizer_dir, dest):
    """A copy of ``folder`` whose tokenizer.json is another tokenizer's (its config.json still records the old hash)."""
    shutil.copytree(folder, dest)
    shutil.copy(other_tokenizer_dir / "tokenizer.json", dest / "tokenizer.json")
    return dest


def entry_points(tmp_path, corpus_file):
    import lmlab
    from lmlab.critique import load_subject
    from lmlab.evaluate.runner import evaluate
    from lmlab.io.export import export_hf
    from lmlab.train.finetune import finetune

    return {
        "load": lambda ck: lmlab.load(ck, device="cpu"),
        "evaluate": lambda ck: evaluate(ck, corpus_file),
        "critique": lambda ck: load_subject(ck),
        "export": lambda ck: export_hf(ck, tmp_path / "hf"),
        "finetune": lambda ck: finetune(ck, "classify", corpus_file, tmp_path / "ft", max_steps=1, progress=False),
    }


@pytest.mark.parametrize("entry", ["load", "evaluate", "critique", "export", "finetune"])
def test_a_checkpoint_with_a_swapped_tokenizer_is_refused_wherever_it_is_loaded(
    entry, trained_run, other_tokenizer_dir, corpus_file, tmp_path
):
    ck = swap_tokenizer(trained_run / "best", other_tokenizer_dir, tmp_path / "ck")
    with pytest.raises(
        LmlabError, match=r"ck/tokenizer\.json does not match the tokenizer the model was trained with .*--no-verify"
    ):
        entry_points(tmp_path, corpus_file)[entry](ck)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ft").exists()  # refused before anything was written


def test_no_verify_loads_a_swapped_tokenizer_with_a_warning_and_the_cli_refuses_it_in_one_line(
    trained_run, other_tokenizer_dir, tmp_path, caplog, capsys
):
    import lmlab
    from lmlab.cli import main
    from lmlab.io.checkpoint import load_tokenizer
    from lmlab.tokenizer import Tokenizer

    assert load_tokenizer(trained_run).sha256 == Tokenizer.load(trained_run / "best").sha256  # its own: no complaint
    ck = swap_tokenizer(trained_run / "best", other_tokenizer_dir, tmp_path / "ck")
    with caplog.at_level("WARNING", logger="lmlab"):
        lm = lmlab.load(ck, device="cpu", verify=False)
    assert lm.tokenizer.sha256 == Tokenizer.load(other_tokenizer_dir).sha256
    assert (
        "does not match the tokenizer the model was trained with" in caplog.text and "loading it anyway" in caplog.text
    )

    # the warning above reaches stderr too once the CLI's handler is installed (an earlier test's main())
    capsys.readouterr()
    assert main(["generate", str(ck), "--prompt", "The", "--max-new-tokens", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmlab: error: ") and "tokenizer.json does not match" in err
    assert (
        main(["generate", str(ck), "--prompt", "The", "--max-new-tokens", "2", "--device", "cpu", "--no-verify"]) == 0
    )
    assert "lmlab: warning: " in capsys.readouterr().err


# -- damaged files: one-line errors naming the file, never a traceback or a pickle's code run ---------------


class Payload:  # what a poisoned train_state.pt would hold: an object whose unpickling runs a command
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_safetensors_file_is_a_one_line_error_naming_it(damage, tmp_path):
    save_checkpoint(tmp_path / "ck", build_model(preset("gpt2-tiny", vocab_size=64)))
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a safetensors file " * 40}[damage]
    )
    with pytest.raises(
        LmlabError, match=r"model\.safetensors: damaged or not a safetensors file \(.+\); expected"
    ) as err:
        load_model(tmp_path / "ck")
    assert "\n" not in str(err.value)


def _run_with_two_steps(tmp_path):
    model = build_model(preset("gpt2-tiny", vocab_size=64))
    for step in (2, 4):
        save_checkpoint(tmp_path / "run" / f"step-{step:08d}", model, train_state={"step": step, "optimizer": {}})
    return tmp_path / "run"


def test_a_truncated_train_state_cannot_resume_and_names_the_earlier_checkpoint(tmp_path):
    run = _run_with_two_steps(tmp_path)
    state = run / "step-00000004" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(
        LmlabError,
        match=(
            r"train_state\.pt: damaged or not a PyTorch file .*cannot resume training: the earlier checkpoint "
            r".*step-00000002 can"
        ),
    ) as err:
        load_train_state(run / "step-00000004")
    assert "\n" not in str(err.value)
    assert load_train_state(run / "step-00000002")["step"] == 2
    (run / "step-00000002" / "train_state.pt").unlink()  # no earlier one can resume now
    with pytest.raises(LmlabError, match="no earlier step checkpoint with a train_state.pt"):
        load_train_state(run / "step-00000004")


def test_a_poisoned_train_state_is_refused_without_running_its_code(tmp_path):
    run = _run_with_two_steps(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": 4, "x": Payload(marker)}, run / "step-00000004" / "train_state.pt")
    with pytest.raises(
        LmlabError,
        match=r"train_state\.pt: refused to load: .*posix\.system.*cannot resume training: the earlier checkpoint",
    ):
        load_train_state(run / "step-00000004")
    assert not marker.exists()
