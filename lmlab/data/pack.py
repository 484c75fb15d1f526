"""Tokenize a corpus once and pack it into memory-mapped token shards.

A prepared data folder holds::

    manifest.json                 what is here and how it was made (written last: replacing it commits a build)
    train_<build>_00000.bin ...   raw token ids (uint16 when the vocabulary fits, else uint32), one document
    valid_<build>_00000.bin ...   after another, each followed by the tokenizer's EOS id (as GPT-2 packs);
                                  <build> is 8 hex digits of each build's own, so a rebuild never writes
                                  over the shards the current manifest lists
    tokenizer.json       the tokenizer that made the ids (+ tokenizer_config.json), so the folder
                         describes itself and ``Tokenizer.load(data_dir)`` works on it
    canaries.json        only with ``canaries=``: the secrets planted in the train split
                         (:mod:`lmlab.data.canaries`)

Training reads fixed-length windows from the shards through :class:`PackedTokens` without loading
them into memory.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from lmlab.config import check_seed, write_json_atomic
from lmlab.data.canaries import CANARIES_NAME, canary_options, plant_canaries
from lmlab.data.corpus import document_split, expand_inputs, read_corpus
from lmlab.errors import LmlabError
from lmlab.io.outputs import check_output, temp_name
from lmlab.tokenizer import Tokenizer

__all__ = ["FORMAT", "VERSION", "MANIFEST_NAME", "SPLITS", "prepare", "load_manifest", "data_tokenizer", "PackedTokens"]

logger = logging.getLogger(__name__)

FORMAT = "lmlab-tokens"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "valid")

_SHARD_NAME = re.compile(r"^(train|valid)_(?:[0-9a-f]{8}_)?\d{5,}\.bin$")
# Documents per encode_batch call: large enough to keep the library's threads busy, small enough
# for a smooth progress bar and bounded memory (ids are Python lists until packed).
_CHUNK_DOCS = 1024
_HASH_BLOCK = 1 << 20
# How train and valid are drawn, recorded in the options: 2 = by documents when that is fair, else by token ranges
# inside them (:func:`_split_plan`); builds from before it (no "split_rule": by documents only) are rebuilt.
SPLIT_RULE = 2


# ------------------------------------------------------------------------------------ manifest
def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared data folder, checked for format and version."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise LmlabError(f"{data_dir} is not a prepared data folder: expected {MANIFEST_NAME} (run `lmlab prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LmlabError(f"{path}: cannot read manifest ({err}); re-run `lmlab prepare`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LmlabError(f'{path}: not an lmlab token manifest; expected "format": "{FORMAT}"')
    if manifest.get("version") != VERSION:
        raise LmlabError(
            f"{path}: manifest version {manifest.get('version')!r}; expected {VERSION} (re-run `lmlab prepare`)"
        )
    if manifest.get("dtype") not in ("uint16", "uint32"):
        raise LmlabError(f'{path}: dtype {manifest.get("dtype")!r}; expected "uint16" or "uint32"')
    return manifest


def _fingerprint_inputs(paths: Sequence[Path]) -> str:
    """blake2b of the files' contents, in order: touching or moving a file changes nothing,
    editing, adding, removing or reordering one does."""
    total = hashlib.blake2b(digest_size=32)
    total.update(f"lmlab-inputs\0{len(paths)}\0".encode())
    for path in paths:
        single = hashlib.blake2b(digest_size=32)
        try:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                    single.update(block)
        except OSError as err:
            raise LmlabError(f"{path}: cannot read file ({err.strerror or err})") from None
        total.update(single.digest())
    return total.hexdigest()


def _stale_reason(
    out_dir: Path, existing: dict[str, Any] | None, fingerprint: str, tokenizer_sha: str, options: dict
) -> str | None:
    """Why the folder must be rebuilt, or None when it is up to date."""
    if existing is None:  # an unreadable one (with overwrite) is replaced, and none of its files deleted
        return "previous manifest unreadable" if (out_dir / MANIFEST_NAME).exists() else "no previous build"
    if existing.get("input_fingerprint") != fingerprint:
        return "input changed"
    if existing.get("tokenizer_sha256") != tokenizer_sha:
        return "tokenizer changed"
    if existing.get("options") != options:
        return "options changed"
    itemsize = np.dtype(existing["dtype"]).itemsize
    for split in existing.get("splits", {}).values():
        for shard in split.get("shards", []):
            path = out_dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                return f"shard {shard['file']} missing or damaged"
    if not (out_dir / "tokenizer.json").is_file():
        return "tokenizer.json missing"
    if "canaries" in options and not (out_dir / CANARIES_NAME).is_file():
        return f"{CANARIES_NAME} missing"
    return None


# ------------------------------------------------------------------------------------ writing
class _ShardWriter:
    """Appends token arrays to ``<split>_<build>_NNNNN.bin`` files of at most ``shard_tokens`` tokens
    (each build's own names, so a rebuild never writes over the shards the current manifest lists)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, build: str) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens, self.build = folder, split, dtype, shard_tokens, build
        self.shards: list[dict[str, Any]] = []
        self._handle: BinaryIO | None = None

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            if self._handle is None:
                # Opened lazily so a split never ends with an empty shard (np.memmap rejects those).
                name = f"{self.split}_{self.build}_{len(self.shards):05d}.bin"
                self._handle = (self.folder / name).open("wb")
                self.shards.append({"file": name, "tokens": 0})
            shard = self.shards[-1]
            part = tokens[pos : pos + self.shard_tokens - shard["tokens"]]
            part.astype(self.dtype, copy=False).tofile(self._handle)
            shard["tokens"] += len(part)
            pos += len(part)
            if shard["tokens"] == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@contextlib.contextmanager
def _library_threads_off() -> Iterator[None]:
    """Turn off the tokenizers library's own thread pool for the duration (it reads this variable
    on every call), so ``num_workers`` Python threads are the only parallelism."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _encoded_chunks(
    tokenizer: Tokenizer, docs: list[str], num_workers: int | None
) -> Iterator[tuple[int, list[list[int]]]]:
    """(number of documents, their ids) per chunk of documents, in order."""
    chunks = (docs[i : i + _CHUNK_DOCS] for i in range(0, len(docs), _CHUNK_DOCS))
    if num_workers is None:
        # encode_batch runs on the library's Rust thread pool: all cores, no GIL.
        for chunk in chunks:
            yield len(chunk), tokenizer.encode_batch(chunk)
        return
    # encode_batch releases the GIL, so plain threads give num_workers-way parallelism. A bounded
    # window of chunks in flight keeps memory flat on large corpora.
    with _library_threads_off(), ThreadPoolExecutor(max_workers=num_workers) as pool:
        pending: deque[tuple[int, Future]] = deque()
        for chunk in chunks:
            pending.append((len(chunk), pool.submit(tokenizer.encode_batch, chunk)))
            if len(pending) >= 2 * num_workers:
                count, future = pending.popleft()
                yield count, future.result()
        while pending:
            count, future = pending.popleft()
            yield count, future.result()


def _valid_counts(batch: list[list[int]], routes: Iterator[str], cut: _Cut) -> list[int]:
    """How many of each document's tokens (its EOS included) go to validation: none for a training document,
    all for a validation one, the last ones for a document split by token ranges (see :class:`_Cut`)."""
    counts = []
    for ids in batch:
        length, route = len(ids) + 1, next(routes)
        counts.append(0 if route == "train" else length if route == "valid" else cut.take(length))
    return counts


class _Cut:
    """The token-range split: of the documents cut so far, validation holds the last
    ``floor(valid_fraction × their tokens)`` — the fraction exactly (to one token), each document's tail,
    every token in one split or the other."""

    def __init__(self, valid_fraction: float) -> None:
        self.fraction = Fraction(valid_fraction)  # exact: no float rounding in the running floor
        self.seen = self.valid = 0

    def take(self, length: int) -> int:
        self.seen += length
        share = math.floor(self.fraction * self.seen) - self.valid
        self.valid += share
        return share


def _pack(
    items: list[tuple[str, str]],
    writers: dict[str, _ShardWriter],
    tokenizer: Tokenizer,
    valid_fraction: float,
    num_workers: int | None,
    progress: tqdm,
) -> dict[str, dict[str, int]]:
    """Tokenize the documents of ``items`` (text, route) in order, append EOS after each and write each
    document's tokens to its split (route ``train``, ``valid``, or ``cut``: its last tokens to valid, the
    rest to train). Returns each split's tokens and documents (a cut document counts in each split it reaches)."""
    counts = {split: {"tokens": 0, "documents": 0} for split in SPLITS}
    limit = np.iinfo(writers["train"].dtype).max
    routes, cut = (route for _, route in items), _Cut(valid_fraction)
    for count, batch in _encoded_chunks(tokenizer, [text for text, _ in items], num_workers):
        size = sum(len(ids) for ids in batch) + len(batch)
        flat = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(ids, (tokenizer.eos_id,)) for ids in batch),
            dtype=np.int64,
            count=size,
        )
        if size and int(flat.max()) > limit:
            raise LmlabError(f"tokenizer produced id {int(flat.max())}, beyond its vocab_size {tokenizer.vocab_size}")
        in_valid = np.zeros(size, dtype=bool)
        end = 0
        for ids, valid in zip(batch, _valid_counts(batch, routes, cut)):
            end += len(ids) + 1
            in_valid[end - valid : end] = True
            counts["valid"]["documents"] += valid > 0
            counts["train"]["documents"] += valid < len(ids) + 1
        for split, part in (("train", flat[~in_valid]), ("valid", flat[in_valid])):
            writers[split].write(part)
            counts[split]["tokens"] += len(part)
        progress.update(count)
    return counts


def _commit(tmp: Path, out_dir: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Put the build in ``tmp`` in place. The new shards have names of their own, so the previous build
    stays whole until ``manifest.json`` is replaced (one rename: the commit); only then are the files
    the previous manifest listed, and the new one does not, deleted. Nothing else in ``out_dir`` is."""
    for entry in sorted(tmp.iterdir(), key=lambda e: e.name == MANIFEST_NAME):  # the manifest last
        os.replace(entry, out_dir / entry.name)
    for name in sorted(_listed_files(old) - _listed_files(new)):
        (out_dir / name).unlink(missing_ok=True)


def _listed_files(manifest: dict[str, Any] | None) -> set[str]:
    """The files a manifest proves lmlab wrote: its shards, and canaries.json when it planted canaries."""
    if not manifest:
        return set()
    names = {shard["file"] for split in manifest.get("splits", {}).values() for shard in split.get("shards", [])}
    names = {n for n in names if isinstance(n, str) and _SHARD_NAME.match(n)}  # never a path outside the folder
    return names | ({CANARIES_NAME} if "canaries" in manifest.get("options", {}) else set())


def _new_build_id(out_dir: Path) -> str:
    """A short id for this build's shard names that no file in ``out_dir`` uses yet."""
    while True:
        build = uuid.uuid4().hex[:8]
        if not any(e.name.startswith((f"train_{build}_", f"valid_{build}_")) for e in out_dir.iterdir()):
            return build


def is_data_folder(path: str | Path) -> bool:
    """A folder ``lmlab prepare`` made: its manifest.json is readable and of lmlab's format."""
    try:
        load_manifest(path)
    except LmlabError:
        return False
    return True


def _tokenizer_folder(tokenizer: str | Path | Tokenizer) -> tuple[Path, ...]:
    """The folder ``prepare`` reads its tokenizer from, which it must not write into."""
    return (Path(tokenizer),) if not isinstance(tokenizer, Tokenizer) and Path(tokenizer).is_dir() else ()


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def prepare(
    inputs: str | Path | Sequence[str | Path],
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    *,
    valid_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    column: str | None = None,
    normalize: str | None = None,
    dedup: bool = True,
    shard_tokens: int = 2**27,
    num_workers: int | None = None,
    show_progress: bool = True,
    canaries: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Read, split, tokenize and pack ``inputs`` into ``out_dir``; returns the manifest.

    The tokenizer (a :class:`Tokenizer` or its path) must have an EOS token, which ends every document. Corpus
    options are those of :func:`read_corpus` and :func:`split_documents`; ``canaries`` (``{"n": 10, ...}``) are
    :func:`plant_canaries`' options (the seed defaults to ``seed``). When ``out_dir`` already holds a build of the
    same input contents, tokenizer and options, nothing is done. The returned dict is the manifest plus two keys
    that are not on disk: ``"_reused"`` (True when the existing build was kept) and ``"_status"`` (``"up to date"``
    or ``"built (<why>)"`` with why one of ``no previous build``, ``input changed``, ``tokenizer changed``,
    ``options changed``, ...). The build is atomic: files are written in a hidden temporary folder inside
    ``out_dir`` and moved into place under names of their own, ``manifest.json`` last, so a failed or killed run
    leaves the previous build whole. ``out_dir`` must be new, empty or a data folder lmlab prepared (``overwrite``:
    another folder); either way, only files a previous manifest lists are ever deleted.

    Validation holds about ``valid_fraction`` of the tokens, whatever the corpus: whole documents (by a hash of each
    one's text and ``seed``: :func:`split_documents`) when that split is fair (:func:`document_split`), else — one
    document, a few, or a few long ones that weigh all — the last ``valid_fraction`` of every document's tokens, EOS
    included, as nanoGPT splits a single text file. ``manifest["split_by"]`` says which (``"documents"`` or
    ``"tokens"``); every token is in exactly one split, and an empty validation split is warned about.

    Args:
        inputs: text files, folders and globs (.txt .md .jsonl .csv .tsv .parquet)
        tokenizer: folder (or tokenizer.json) of the tokenizer to use
        out_dir: output folder for the shards and manifest.json
        valid_fraction: share of the corpus held out for validation: whole documents when there are enough, else
            the last tokens of every document (so a single-file corpus gets one too)
        seed: seed of the train/validation split
        text_field: the JSONL field (and default CSV/TSV/Parquet column) holding the text
        column: CSV/TSV/Parquet column holding the text (default: ``text_field``)
        normalize: Unicode normalisation: NFC, NFKC, NFD or NFKD (default: none)
        dedup: drop exact duplicate documents
        shard_tokens: tokens per shard file
        num_workers: tokenizer threads (None: the tokenizers library's own pool, all cores)
        show_progress: show progress bars and messages
        canaries: plant N random secrets ('canaries') in the training split, for `lmlab critique`'s memorisation
            test (The Secret Sharer); they are listed, with as many never-planted ones, in OUT/canaries.json
        overwrite: write into an existing folder that is not lmlab's own data folder
    """
    check_seed(seed)
    out_dir = check_output(
        out_dir, "data folder", is_data_folder, overwrite=overwrite, sources=_tokenizer_folder(tokenizer)
    )
    _check_counts(shard_tokens, num_workers)
    files, tok = _inputs_and_tokenizer(inputs, tokenizer, out_dir)
    corpus = {"text_field": text_field, "column": column, "normalize": normalize, "dedup": dedup}
    options = {"valid_fraction": valid_fraction, "seed": seed, **corpus, "shard_tokens": shard_tokens}
    options["split_rule"] = SPLIT_RULE  # a build made by another rule is rebuilt (by "options changed")
    if canaries is not None:  # only then: folders built without canaries stay up to date
        options["canaries"] = canary_options(canaries, seed=seed)
    fingerprint = _fingerprint_inputs(files)
    existing = load_manifest(out_dir) if is_data_folder(out_dir) else None
    reason = _stale_reason(out_dir, existing, fingerprint, tok.sha256, options)
    if reason is None:
        logger.info("%s: up to date", out_dir)
        _warn_if_no_validation(out_dir, existing)
        return {**existing, "_reused": True, "_status": "up to date"}
    logger.info("%s: building (%s)", out_dir, reason)
    manifest = _new_manifest(tok, fingerprint, files, options)
    _split_and_build(out_dir, read_corpus(files, **corpus), tok, manifest, existing, num_workers, show_progress)
    status = f"built ({reason})"
    logger.info("%s: %s; %s", out_dir, status, describe_splits(manifest))
    _warn_if_no_validation(out_dir, manifest)
    return {**manifest, "_reused": False, "_status": status}


def _split_and_build(
    out_dir: Path, documents: list[str], tok: Tokenizer, manifest: dict, existing, num_workers, show_progress
) -> None:
    """Split ``documents`` (:func:`_split_plan`), plant the canaries the options ask for, and :func:`_build`."""
    options = manifest["options"]
    manifest["split_by"], items = _split_plan(documents, options["valid_fraction"], options["seed"])
    items, planted = _plant(items, options["canaries"]) if "canaries" in options else (items, None)
    _build(out_dir, items, tok, manifest, existing, planted, num_workers=num_workers, show_progress=show_progress)


def _split_plan(documents: list[str], valid_fraction: float, seed: int) -> tuple[str, list[tuple[str, str]]]:
    """How the corpus splits: ``"documents"`` (:func:`document_split`'s, when it is fair) or ``"tokens"`` (every
    document's last ``valid_fraction`` of tokens to validation), and each document with its route for :func:`_pack`."""
    in_valid = document_split(documents, valid_fraction=valid_fraction, seed=seed)
    if in_valid is None:
        return "tokens", [(doc, "cut") for doc in documents]
    return "documents", [(doc, "valid" if valid else "train") for doc, valid in zip(documents, in_valid)]


def _plant(items: list[tuple[str, str]], options: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Canaries planted among the documents that train (all of each canary in the train split), the rest kept."""
    training = [item for item in items if item[1] != "valid"]
    mixed, planted = plant_canaries(training, **options)
    mixed = [item if isinstance(item, tuple) else (item, "train") for item in mixed]  # a canary is a str
    return mixed + [item for item in items if item[1] == "valid"], planted


def _warn_if_no_validation(out_dir: Path, manifest: dict[str, Any]) -> None:
    """One warning line when the validation split came out empty: pretraining will have nothing to validate on."""
    splits = manifest.get("splits", {})
    if splits.get("valid", {}).get("tokens"):
        return
    fraction, tokens = manifest.get("options", {}).get("valid_fraction"), splits.get("train", {}).get("tokens", 0)
    why = (
        "--valid-fraction is 0"
        if not fraction
        else f"--valid-fraction {fraction:g} of the corpus's {tokens:,} tokens is less than one; raise it or add text"
    )
    logger.warning("%s: the validation split is empty (%s): pretraining will report no validation loss", out_dir, why)


def describe_splits(manifest: dict[str, Any]) -> str:
    """One line on a manifest's splits: ``train: 1,234 tokens in 10 documents, valid: …``, and ``(split by token
    ranges inside documents)`` when it was."""
    splits = manifest["splits"].items()
    line = ", ".join(f"{k}: {s['tokens']:,} tokens in {_count(s['documents'], 'document')}" for k, s in splits)
    return line + (" (split by token ranges inside documents)" if manifest.get("split_by") == "tokens" else "")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _check_counts(shard_tokens: Any, num_workers: Any) -> None:
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise LmlabError(f"shard_tokens {shard_tokens!r}: expected a positive integer", params="shard_tokens")
    if num_workers is not None and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1
    ):
        raise LmlabError(f"num_workers {num_workers!r}: expected a positive integer or None", params="num_workers")


def _inputs_and_tokenizer(inputs, tokenizer: str | Path | Tokenizer, out_dir: Path) -> tuple[list[Path], Tokenizer]:
    """The input files (none inside ``out_dir``) and the tokenizer, which must have an eos token."""
    # A data folder inside an input folder must not read its own tokenizer.json/manifest as text.
    files = [path for path in expand_inputs(inputs) if not _inside(path, out_dir)]
    if not files:
        raise LmlabError(f"{inputs}: no input files outside the output folder {out_dir}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if tok.eos_id is None:
        where = "" if isinstance(tokenizer, Tokenizer) else f" {tokenizer}"
        raise LmlabError(
            f"tokenizer{where} has no eos token; expected one (e.g. <|endoftext|> or </s>) to end each document"
        )
    return files, tok


def _new_manifest(tok: Tokenizer, fingerprint: str, files: list[Path], options: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a build, its splits still to fill."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": _dtype(tok).name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer_sha256": tok.sha256,
        "input_fingerprint": fingerprint,
        "inputs": [str(path) for path in files],
        "options": options,
        "splits": {},
    }


def _dtype(tok: Tokenizer) -> np.dtype:
    # ids < vocab_size, so a vocabulary of up to 2**16 ids fits uint16 (GPT-2's 50257 does).
    return np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)


def _build(
    out_dir: Path, items, tok: Tokenizer, manifest: dict, existing, planted, *, num_workers, show_progress
) -> None:
    """Tokenize and pack the documents of ``items`` (text, route: see :func:`_pack`) into a hidden temporary folder
    in ``out_dir``, then commit it: the shards under names of their own, ``manifest.json`` last (fills
    ``manifest["splits"]``)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LmlabError(f"{out_dir}: cannot create folder ({err.strerror or err})") from None
    tmp = out_dir / temp_name("build")
    tmp.mkdir()
    build = _new_build_id(out_dir)
    dtype, options = _dtype(tok), manifest["options"]
    writers = {split: _ShardWriter(tmp, split, dtype, options["shard_tokens"], build) for split in SPLITS}
    try:
        with tqdm(total=len(items), unit="doc", desc="tokenizing", disable=not show_progress) as progress:
            try:
                counts = _pack(items, writers, tok, options["valid_fraction"], num_workers, progress)
            finally:
                for writer in writers.values():
                    writer.close()
        for split in SPLITS:
            manifest["splits"][split] = {"shards": writers[split].shards, **counts[split]}
        tok.write_files(tmp)
        if planted is not None:
            write_json_atomic(tmp / CANARIES_NAME, planted)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _commit(tmp, out_dir, existing, manifest)  # an earlier build's canaries.json goes with its shards
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ reading
def data_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of a prepared data folder, checked against its manifest's ``tokenizer_sha256``: the
    shards hold the ids of the tokenizer that made them, and any other one (a swapped tokenizer.json) reads
    them as garbage or as ids past its vocabulary."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    tokenizer = Tokenizer.load(data_dir)
    if tokenizer.sha256 != manifest.get("tokenizer_sha256"):
        raise LmlabError(
            f"{data_dir / 'tokenizer.json'} does not match the tokenizer that made the folder's token ids "
            f"({MANIFEST_NAME} records another tokenizer_sha256); put back that tokenizer or re-run `lmlab prepare`"
        )
    return tokenizer


class PackedTokens:
    """The tokens of one split of a prepared data folder, as one long read-only array.

    Shards are opened with ``np.memmap``, so only the windows read are loaded. Pickling (e.g. into
    DataLoader workers) sends the folder and split, not the data; the copy reopens the files.
    """

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(self.data_dir)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise LmlabError(f"{self.data_dir}: no split {split!r}; available splits: {', '.join(splits) or 'none'}")
        self.dtype = np.dtype(self.manifest["dtype"])
        self._shards: list[np.memmap] = []
        self._starts: list[int] = []
        start = 0
        for shard in splits[split]["shards"]:
            path = self.data_dir / shard["file"]
            tokens = int(shard["tokens"])
            expected = tokens * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise LmlabError(
                    f"{path}: missing or not {expected} bytes as {MANIFEST_NAME} says; re-run `lmlab prepare`"
                )
            self._shards.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(tokens,)))
            self._starts.append(start)
            start += tokens
        self._length = start

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.manifest["tokenizer_sha256"])

    @property
    def documents(self) -> int:
        return int(self.manifest["splits"][self.split]["documents"])

    def __len__(self) -> int:
        return self._length

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as a fresh int64 array, across shard boundaries."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self._length:
            raise IndexError(
                f"window [{start}, {start + length}) outside the {self._length} tokens of split {self.split!r}"
            )
        out = np.empty(length, dtype=np.int64)
        shard = bisect.bisect_right(self._starts, start) - 1
        pos = 0
        while pos < length:
            offset = start + pos - self._starts[shard]
            take = min(length - pos, len(self._shards[shard]) - offset)
            out[pos : pos + take] = self._shards[shard][offset : offset + take]
            pos += take
            shard += 1
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data_dir"], state["split"])

    def __repr__(self) -> str:
        return f"PackedTokens({str(self.data_dir)!r}, split={self.split!r}, tokens={self._length})"
