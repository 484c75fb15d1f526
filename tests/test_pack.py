"""Packing: token counts, shard layout, memmap windows, rebuild rules, atomicity, errors."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from lmlab.data import PackedTokens, builtin_corpus, load_manifest, prepare, read_corpus, split_documents
from lmlab.data.pack import data_tokenizer, describe_splits
from lmlab.errors import LmlabError
from lmlab.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(builtin_corpus(max_chars=30_000), kind="bpe", vocab_size=300)


@pytest.fixture()
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = [{"text": f"Document {i}: the cat sat on mat number {i * 7}.\n大语言模型 {i}"} for i in range(60)]
    (folder / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    (folder / "b.txt").write_text("A plain text file is one document.\r\nIt keeps its CRLF.", encoding="utf-8")
    return folder


def expected_stream(tok: Tokenizer, docs: list[str]) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += tok.encode(doc) + [tok.eos_id]
    return out


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_manifest_counts_encoded_lengths_plus_one_eos_per_document(tok, corpus_dir, tmp_path):
    manifest = prepare(corpus_dir, tok, tmp_path / "out", valid_fraction=0.2, seed=1, show_progress=False)
    train, valid = split_documents(read_corpus(corpus_dir), valid_fraction=0.2, seed=1)
    for split, docs in (("train", train), ("valid", valid)):
        stream = expected_stream(tok, docs)
        assert manifest["splits"][split]["tokens"] == len(stream)
        assert manifest["splits"][split]["documents"] == len(docs)
        packed = PackedTokens(tmp_path / "out", split)
        assert len(packed) == len(stream)
        assert packed.window(0, len(packed)).tolist() == stream
    assert manifest["format"] == "lmlab-tokens" and manifest["eos_id"] == tok.eos_id
    assert manifest["tokenizer_sha256"] == tok.sha256
    assert manifest["_reused"] is False
    on_disk = load_manifest(tmp_path / "out")
    assert "_reused" not in on_disk and on_disk["splits"] == manifest["splits"]


def test_data_folder_carries_its_tokenizer(tok, corpus_dir, tmp_path):
    prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)
    assert Tokenizer.load(tmp_path / "out").sha256 == tok.sha256
    assert data_tokenizer(tmp_path / "out").sha256 == tok.sha256


def test_a_swapped_tokenizer_json_in_a_data_folder_is_refused(tok, corpus_dir, tmp_path):
    prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)
    train_tokenizer(builtin_corpus(max_chars=30_000), kind="bpe", vocab_size=280).save(tmp_path / "other")
    (tmp_path / "out" / "tokenizer.json").write_bytes((tmp_path / "other" / "tokenizer.json").read_bytes())
    with pytest.raises(
        LmlabError,
        match=r"out/tokenizer\.json does not match the tokenizer that made the folder's token ids \(manifest\.json",
    ):
        data_tokenizer(tmp_path / "out")


def test_window_across_shard_boundaries_equals_concatenation(tok, corpus_dir, tmp_path):
    manifest = prepare(corpus_dir, tok, tmp_path / "out", shard_tokens=7, show_progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(shard["tokens"] <= 7 for shard in shards)
    assert all(shard["tokens"] == 7 for shard in shards[:-1])
    whole = np.concatenate([np.fromfile(tmp_path / "out" / s["file"], dtype=np.uint16) for s in shards])
    packed = PackedTokens(tmp_path / "out")
    for start, length in [(0, 7), (5, 4), (6, 16), (13, 30), (len(whole) - 9, 9), (3, 0)]:
        window = packed.window(start, length)
        assert window.dtype == np.int64
        assert window.tolist() == whole[start : start + length].tolist()
    with pytest.raises(IndexError):
        packed.window(len(whole) - 2, 3)


def test_small_vocab_packs_as_uint16(tok, corpus_dir, tmp_path):
    manifest = prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)
    assert manifest["dtype"] == "uint16"
    shard = manifest["splits"]["train"]["shards"][0]
    assert (tmp_path / "out" / shard["file"]).stat().st_size == 2 * shard["tokens"]
    assert PackedTokens(tmp_path / "out").dtype == np.uint16


def test_large_vocab_packs_as_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["</s>"])
    (tmp_path / "a.txt").write_text("w69999 w1 w65536")
    manifest = prepare(tmp_path / "a.txt", Tokenizer(backend), tmp_path / "out", valid_fraction=0, show_progress=False)
    assert manifest["dtype"] == "uint32"
    assert PackedTokens(tmp_path / "out").window(0, 4).tolist() == [69999, 1, 65536, 70000]


def test_second_prepare_is_a_no_op_even_after_touching_inputs(tok, corpus_dir, tmp_path):
    out = tmp_path / "out"
    prepare(corpus_dir, tok, out, show_progress=False)
    before = mtimes(out)
    os.utime(corpus_dir / "b.txt", ns=(1, 1))  # same content, new mtime
    again = prepare(corpus_dir, tok, out, show_progress=False)
    assert again["_reused"] is True and again["_status"] == "up to date"
    assert mtimes(out) == before


def test_changed_input_tokenizer_or_option_rebuilds_and_says_why(tok, corpus_dir, tmp_path):
    out = tmp_path / "out"
    first = prepare(corpus_dir, tok, out, show_progress=False)
    (corpus_dir / "b.txt").write_text("Changed content, longer than before: " * 5, encoding="utf-8")
    changed = prepare(corpus_dir, tok, out, show_progress=False)
    assert changed["_status"] == "built (input changed)"
    assert changed["input_fingerprint"] != first["input_fingerprint"]
    other = train_tokenizer(builtin_corpus(max_chars=30_000), kind="bpe", vocab_size=310)
    assert prepare(corpus_dir, other, out, show_progress=False)["_status"] == "built (tokenizer changed)"
    assert load_manifest(out)["tokenizer_sha256"] == other.sha256
    assert prepare(corpus_dir, other, out, seed=5, show_progress=False)["_status"] == "built (options changed)"


def test_rebuild_removes_stale_shards(tok, corpus_dir, tmp_path):
    out = tmp_path / "out"
    prepare(corpus_dir, tok, out, shard_tokens=50, show_progress=False)
    many = {p.name for p in out.glob("train_*.bin")}
    manifest = prepare(corpus_dir, tok, out, shard_tokens=10**6, show_progress=False)
    assert len(many) > 1
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(
        s["file"] for split in manifest["splits"].values() for s in split["shards"]
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_num_workers_gives_identical_shards(tok, corpus_dir, tmp_path):
    prepare(corpus_dir, tok, tmp_path / "a", show_progress=False)
    prepare(corpus_dir, tok, tmp_path / "b", num_workers=2, show_progress=False)
    assert PackedTokens(tmp_path / "a").window(0, len(PackedTokens(tmp_path / "a"))).tolist() == (
        PackedTokens(tmp_path / "b").window(0, len(PackedTokens(tmp_path / "b"))).tolist()
    )


def test_output_folder_inside_the_input_folder_is_not_read_as_input(tok, corpus_dir):
    out = corpus_dir / "prepared"
    prepare(corpus_dir, tok, out, show_progress=False)
    assert prepare(corpus_dir, tok, out, show_progress=False)["_reused"] is True


def test_corpus_error_leaves_no_manifest(tok, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(LmlabError, match=r"bad\.jsonl:1: missing field 'text'"):
        prepare(tmp_path / "bad.jsonl", tok, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(LmlabError, match="empty corpus"):
        prepare(tmp_path / "blank.txt", tok, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_failed_rebuild_keeps_previous_build_and_no_temporary_folder(tok, corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = prepare(corpus_dir, tok, out, show_progress=False)
    (corpus_dir / "b.txt").write_text("new content", encoding="utf-8")

    def broken_save(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(Tokenizer, "write_files", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prepare(corpus_dir, tok, out, show_progress=False)
    assert load_manifest(out)["input_fingerprint"] == first["input_fingerprint"]
    assert len(PackedTokens(out)) == first["splits"]["train"]["tokens"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_tokenizer_without_eos_is_rejected(corpus_dir, tmp_path):
    tok = train_tokenizer(["abc def"] * 3, kind="bpe", vocab_size=300, special_tokens=["<pad>"])
    with pytest.raises(LmlabError, match="no eos token"):
        prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)


def test_non_prepared_folder_and_missing_split_are_errors(tok, corpus_dir, tmp_path):
    with pytest.raises(LmlabError, match=r"is not a prepared data folder: expected manifest\.json"):
        PackedTokens(tmp_path)
    prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)
    with pytest.raises(LmlabError, match=r"no split 'test'; available splits: train, valid"):
        PackedTokens(tmp_path / "out", "test")


def test_truncated_shard_is_reported(tok, corpus_dir, tmp_path):
    manifest = prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)
    shard = tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(LmlabError, match="re-run `lmlab prepare`"):
        PackedTokens(tmp_path / "out")
    assert prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)["_reused"] is False


def test_packed_tokens_pickle_by_reference(tok, corpus_dir, tmp_path):
    prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)
    packed = PackedTokens(tmp_path / "out")
    blob = pickle.dumps(packed)
    assert len(blob) < 1_000
    assert pickle.loads(blob).window(3, 20).tolist() == packed.window(3, 20).tolist()


def all_tokens(out):
    packed = PackedTokens(out)
    return np.array(packed.window(0, len(packed)))


@pytest.mark.parametrize("killed_at", ["manifest.json", "after the manifest"])
def test_a_kill_at_the_commit_leaves_the_old_build_or_the_new_one_whole(
    tok, corpus_dir, tmp_path, monkeypatch, killed_at
):
    out = tmp_path / "out"
    first = prepare(corpus_dir, tok, out, show_progress=False)
    old_tokens = all_tokens(out)
    (corpus_dir / "b.txt").write_text("new content for a second build", encoding="utf-8")
    real_replace, real_unlink = os.replace, Path.unlink

    def kill_at_manifest(src, dst):
        if Path(dst).name == "manifest.json":
            raise KeyboardInterrupt  # the kill, at the one rename that commits
        return real_replace(src, dst)

    def kill_at_cleanup(self, *args, **kwargs):
        if self.suffix == ".bin":
            raise KeyboardInterrupt  # the kill, after the commit, while the old shards go
        return real_unlink(self, *args, **kwargs)

    if killed_at == "manifest.json":
        monkeypatch.setattr("lmlab.data.pack.os.replace", kill_at_manifest)
    else:
        monkeypatch.setattr(Path, "unlink", kill_at_cleanup)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus_dir, tok, out, show_progress=False)
    monkeypatch.undo()
    manifest = load_manifest(out)
    tokens = all_tokens(out)
    if killed_at == "manifest.json":  # the old build, whole
        assert manifest["input_fingerprint"] == first["input_fingerprint"] and np.array_equal(tokens, old_tokens)
    else:  # the new build, whole
        assert (
            manifest["input_fingerprint"] != first["input_fingerprint"]
            and len(tokens) == manifest["splits"]["train"]["tokens"]
        )
    assert prepare(corpus_dir, tok, out, show_progress=False)["splits"]["train"]["tokens"] == len(PackedTokens(out))


def test_a_rebuild_deletes_only_the_files_the_old_manifest_listed(tok, corpus_dir, tmp_path):
    out = tmp_path / "out"
    first = prepare(corpus_dir, tok, out, show_progress=False, canaries={"n": 1, "repeats": 2, "digits": 3})
    (out / "train_00007.bin").write_bytes(b"a user's shard")
    (out / "notes.txt").write_text("mine")
    (out / ".tmp-k2j4h5g6").mkdir()  # a build temporary left by a killed run (the name lmlab used before)
    (corpus_dir / "b.txt").write_text("new content", encoding="utf-8")
    second = prepare(corpus_dir, tok, out, show_progress=False)  # without canaries now
    old_files = {s["file"] for split in first["splits"].values() for s in split["shards"]}
    new_files = {s["file"] for split in second["splits"].values() for s in split["shards"]}
    names = {p.name for p in out.iterdir()}
    assert not old_files & names and new_files <= names
    assert "canaries.json" not in names  # the old manifest planted canaries: its canaries.json was lmlab's
    assert (out / "train_00007.bin").read_bytes() == b"a user's shard" and (out / "notes.txt").read_text() == "mine"
    assert not (out / ".tmp-k2j4h5g6").exists()


def test_a_folder_that_is_not_a_data_folder_is_refused(tok, corpus_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "canaries.json").write_text("[]")
    (tmp_path / "out" / "manifest.json").write_text("{not json")
    with pytest.raises(LmlabError, match="exists and is not an lmlab data folder: .* overwrite"):
        prepare(corpus_dir, tok, tmp_path / "out", show_progress=False)
    manifest = prepare(corpus_dir, tok, tmp_path / "out", show_progress=False, overwrite=True)
    assert manifest["_status"] == "built (previous manifest unreadable)"
    assert (tmp_path / "out" / "canaries.json").read_text() == "[]"  # not listed by any lmlab manifest: kept


# ------------------------------------------------------------------------------------ validation splits
def packed(out: Path, split: str) -> list[int]:
    tokens = PackedTokens(out, split)
    return tokens.window(0, len(tokens)).tolist()


@pytest.fixture()
def one_document(tmp_path) -> Path:
    """A single text file: one document, as tiny-shakespeare is."""
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(builtin_corpus(max_chars=20_000)), encoding="utf-8")
    return path


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_a_single_document_is_split_by_token_ranges_nothing_lost_or_duplicated(tok, one_document, tmp_path, fraction):
    stream = expected_stream(tok, read_corpus(one_document))  # the document's tokens and its EOS
    manifest = prepare(one_document, tok, tmp_path / "out", valid_fraction=fraction, show_progress=False)
    assert manifest["split_by"] == "tokens"
    train, valid = packed(tmp_path / "out", "train"), packed(tmp_path / "out", "valid")
    assert len(valid) == int(fraction * len(stream)) > 0  # the asked fraction, to one token
    assert train + valid == stream  # the head trains, the tail validates: every token once, in order
    splits = manifest["splits"]
    assert [(splits[k]["tokens"], splits[k]["documents"]) for k in ("train", "valid")] == [
        (len(train), 1),
        (len(valid), 1),
    ]
    again = prepare(one_document, tok, tmp_path / "again", valid_fraction=fraction, seed=0, show_progress=False)
    assert again["splits"]["valid"]["tokens"] == len(valid) and packed(tmp_path / "again", "valid") == valid
    assert describe_splits(manifest).endswith("in 1 document (split by token ranges inside documents)")


def test_a_few_documents_each_give_validation_their_last_tokens(tok, tmp_path):
    docs = [f"Chapter {i}. " + "The quick brown fox jumps over the lazy dog. " * (20 + 15 * i) for i in range(3)]
    for i, doc in enumerate(docs):
        (tmp_path / f"chapter{i}.txt").write_text(doc, encoding="utf-8")
    manifest = prepare(tmp_path, tok, tmp_path / "out", valid_fraction=0.05, show_progress=False)
    assert manifest["split_by"] == "tokens"  # three documents cannot hold out 5% whole
    streams = [expected_stream(tok, [doc]) for doc in docs]
    train, valid = packed(tmp_path / "out", "train"), packed(tmp_path / "out", "valid")
    assert len(valid) == int(0.05 * sum(map(len, streams)))
    heads, tails, seen, taken = [], [], 0, 0
    for stream in streams:  # each document's share, rounded down as the running total goes
        seen += len(stream)
        share = int(0.05 * seen) - taken
        taken += share
        heads += stream[: len(stream) - share]
        tails += stream[len(stream) - share :]
    assert (train, valid) == (heads, tails)
    assert manifest["splits"]["train"]["documents"] == manifest["splits"]["valid"]["documents"] == 3


def test_many_documents_still_split_by_documents(tok, tmp_path):
    docs = [f"Document {i}: the cat sat on mat number {i * 7}." for i in range(400)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    manifest = prepare(tmp_path / "a.jsonl", tok, tmp_path / "out", valid_fraction=0.1, seed=2, show_progress=False)
    train_docs, valid_docs = split_documents(docs, valid_fraction=0.1, seed=2)
    assert manifest["split_by"] == "documents" and "token ranges" not in describe_splits(manifest)
    assert packed(tmp_path / "out", "train") == expected_stream(tok, train_docs)
    assert packed(tmp_path / "out", "valid") == expected_stream(tok, valid_docs)
    assert manifest["splits"]["valid"]["documents"] == len(valid_docs)


def test_an_empty_validation_split_is_warned_about_naming_the_flag(tok, tmp_path, caplog):
    (tmp_path / "tiny.txt").write_text("A few words.", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        manifest = prepare(tmp_path / "tiny.txt", tok, tmp_path / "out", valid_fraction=0.05, show_progress=False)
    assert manifest["splits"]["valid"]["tokens"] == 0 and manifest["splits"]["train"]["tokens"] > 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "validation split is empty" in warned[0] and "--valid-fraction 0.05" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        big = prepare(tmp_path / "tiny.txt", tok, tmp_path / "big", valid_fraction=0.5, show_progress=False)
    assert big["splits"]["valid"]["tokens"] > 0 and big["splits"]["train"]["tokens"] > 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_build_from_before_the_token_range_split_is_rebuilt(tok, one_document, tmp_path):
    out = tmp_path / "out"
    prepare(one_document, tok, out, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["options"]["split_rule"]  # as lmlab wrote it when a single document gave no validation
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert prepare(one_document, tok, out, show_progress=False)["_status"] == "built (options changed)"
    assert prepare(one_document, tok, out, show_progress=False)["_status"] == "up to date"


def test_canaries_in_a_token_range_split_stay_whole_in_train(tok, one_document, tmp_path):
    out = tmp_path / "out"
    options = {"n": 2, "repeats": 3, "digits": 4}
    manifest = prepare(one_document, tok, out, valid_fraction=0.2, show_progress=False, canaries=options)
    record = json.loads((out / "canaries.json").read_text())
    train, valid = tok.decode(packed(out, "train")), tok.decode(packed(out, "valid"))
    assert manifest["split_by"] == "tokens" and "secret" not in valid
    for canary in record["planted"]:
        assert train.count(canary["text"] + "<|endoftext|>") == 3
    assert manifest["splits"]["train"]["documents"] == 1 + 2 * 3
