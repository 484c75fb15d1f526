"""lmlab.io.outputs: lmlab writes over only what it can prove it wrote; temporaries, markers, permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from lmlab.config import preset, write_text_atomic
from lmlab.errors import LmlabError
from lmlab.io import outputs
from lmlab.io.checkpoint import list_checkpoints, prune_checkpoints, save_checkpoint
from lmlab.model import build_model

UNWRITABLE = "/sys/lmlab-test-out"  # read-only even for root


def plant(folder, names=("notes.txt", "sub/deep.bin", ".hidden")):
    """Unrelated files, with contents to compare byte for byte afterwards."""
    planted = {}
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(64) + name.encode())
        planted[path] = path.read_bytes()
    return planted


def assert_intact(planted):
    for path, data in planted.items():
        assert path.read_bytes() == data, path


def tiny_model():
    torch.manual_seed(0)
    return build_model(preset("gpt2-tiny", vocab_size=64))


def test_a_new_or_empty_folder_is_fine_and_is_not_created_by_the_check(tmp_path):
    assert outputs.check_output(tmp_path / "new", "run", lambda p: False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    outputs.check_output(tmp_path / "empty", "run", lambda p: False)


def test_a_folder_that_is_not_lmlabs_is_refused_unless_overwrite(tmp_path):
    planted = plant(tmp_path / "mine")
    with pytest.raises(
        LmlabError,
        match=r"out .*mine exists and is not an lmlab run: choose an empty or new out, or pass overwrite",
    ):
        outputs.check_output(tmp_path / "mine", "run", lambda p: False)
    outputs.check_output(tmp_path / "mine", "run", lambda p: False, overwrite=True)
    outputs.check_output(tmp_path / "mine", "run", lambda p: True)
    assert_intact(planted)


def test_a_file_an_unwritable_place_and_a_source_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmlabError, match="exists and is not a folder"):
        outputs.check_output(tmp_path / "file", "run", lambda p: True)
    with pytest.raises(LmlabError, match="cannot write in"):
        outputs.check_output(UNWRITABLE, "run", lambda p: True)
    with pytest.raises(LmlabError, match="is not a folder"):
        outputs.check_output(tmp_path / "file" / "below", "run", lambda p: True)
    (tmp_path / "ck").mkdir()
    for out in (tmp_path / "ck", tmp_path / "ck" / "inner"):
        with pytest.raises(LmlabError, match="which this command reads"):
            outputs.check_output(out, "run", lambda p: True, sources=(tmp_path / "ck",))


def test_an_output_file_is_not_a_folder_and_is_replaced_only_with_overwrite(tmp_path):
    with pytest.raises(LmlabError, match="output .* is a folder"):
        outputs.check_output_file(tmp_path)
    (tmp_path / "out.txt").write_text("keep me")
    with pytest.raises(LmlabError, match="output .*out.txt exists: .* overwrite"):
        outputs.check_output_file(tmp_path / "out.txt")
    outputs.check_output_file(tmp_path / "out.txt", overwrite=True)
    with pytest.raises(LmlabError, match="cannot write in"):
        outputs.check_output_file(UNWRITABLE + "/x.txt")


def test_stale_temporaries_of_dead_processes_are_cleaned_and_live_ones_kept(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = [
        f".tmp-step-00000010-pid{dead}-0123abcd",
        f".old-best-pid{dead}-89abcdef",
        ".tmp-step-00000020-deadbeef",
        ".old-best-0badf00d",
        ".tmp-k2j4h5g6",
    ]
    live = outputs.temp_name("best")  # this process's: a writer still at work
    for name in stale + [live]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    planted = plant(tmp_path, ("notes.tmp", ".tmp-notes", "tmp-step-1"))
    assert sorted(outputs.clean_stale(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, "notes.tmp", ".tmp-notes", "tmp-step-1"])
    assert_intact(planted)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_and_checkpoints_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        save_checkpoint(tmp_path / "ck", tiny_model())
    finally:
        os.umask(old)
    expected_file, expected_dir = 0o666 & ~mask, 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == expected_file
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == expected_dir
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "ck" / name).stat().st_mode) == expected_file, name


def test_markers_say_which_kind_lmlab_made(tmp_path):
    assert outputs.marker_kind(tmp_path) is None
    outputs.write_marker(tmp_path, "run")
    assert outputs.marker_kind(tmp_path) == "run"
    (tmp_path / outputs.MARKER).write_text("[1, 2]")
    assert outputs.marker_kind(tmp_path) is None


def test_save_checkpoint_swaps_its_own_checkpoint_whole(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny_model(), train_state={"step": 1})
    save_checkpoint(tmp_path / "ck", tiny_model())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]  # the stale train_state.pt went
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporaries left


def test_save_checkpoint_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    planted = plant(tmp_path / "mine", ("notes.txt", "model.safetensors"))
    with pytest.raises(LmlabError, match="exists and is not an lmlab checkpoint"):
        save_checkpoint(tmp_path / "mine", tiny_model())
    assert_intact(planted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_save_checkpoint_keeps_other_files_beside_its_own(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny_model(), train_state={"step": 1})
    planted = plant(tmp_path / "ck")
    save_checkpoint(tmp_path / "ck", tiny_model())  # lmlab's own checkpoint, with a user's notes in it
    assert_intact(planted)
    assert not (tmp_path / "ck" / "train_state.pt").exists()  # lmlab's, proved by its config.json
    foreign = plant(tmp_path / "theirs", ("notes.txt", "train_state.pt"))
    save_checkpoint(tmp_path / "theirs", tiny_model(), overwrite=True)
    assert_intact(foreign)  # not lmlab's folder: its train_state.pt is not proved lmlab's, so it stays
    assert (tmp_path / "theirs" / "model.safetensors").is_file()


def test_prune_deletes_only_lmlabs_own_step_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"step-{step:08d}", tiny_model())
    planted = plant(tmp_path / "step-00000001")
    prune_checkpoints(tmp_path, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 3]  # step 1 holds a user's files: kept
    assert_intact(planted)
