"""Read raw text: find the input files, read documents from each format, clean, dedup and split.

Formats, by file extension:

- ``.txt .text .md .rst`` — the whole file is one document.
- ``.jsonl`` — one JSON object per line; the document is the string in field ``text_field``.
- ``.json`` — either JSON Lines (as ``.jsonl``) or, when the file starts with ``[``, one JSON array
  of such objects (or of plain strings).
- ``.csv .tsv`` — one document per row, from column ``column`` (default: ``text_field``).
- ``.parquet`` — one document per row, from column ``column`` (default: ``text_field``).

Text is decoded as strict UTF-8 and never rewritten on the way in: no newline translation, so
``\\r\\n`` stays ``\\r\\n`` and a document round-trips byte-exactly. A ``null`` value in a structured
file is an empty document (dropped later, like any empty document).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import inspect
import io
import json
import os
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from lmlab.errors import LmlabError

__all__ = [
    "TEXT_EXTENSIONS",
    "KNOWN_EXTENSIONS",
    "NORMALIZATIONS",
    "expand_inputs",
    "iter_documents",
    "read_corpus",
    "split_documents",
    "document_split",
    "SPLIT_TOLERANCE",
    "builtin_corpus",
]

TEXT_EXTENSIONS = frozenset({".txt", ".text", ".md", ".rst"})
JSON_EXTENSIONS = frozenset({".jsonl", ".json"})
TABLE_EXTENSIONS = frozenset({".csv", ".tsv", ".parquet"})
KNOWN_EXTENSIONS = TEXT_EXTENSIONS | JSON_EXTENSIONS | TABLE_EXTENSIONS
NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD")
# A document split is kept when validation's share of the text is within this factor of the asked fraction.
SPLIT_TOLERANCE = 2.0

_GLOB_CHARS = frozenset("*?[")
_BOM = "\ufeff"


def _known(path: Path) -> bool:
    return path.suffix.lower() in KNOWN_EXTENSIONS


def _walk_folder(folder: Path) -> list[Path]:
    """All files with a known extension under ``folder``, recursively, skipping hidden entries."""
    found = []
    # os.walk with sorted dirs/files keeps the order identical on every file system;
    # hidden entries (.git, .tmp-* build folders) are never corpus text.
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and _known(path):
                found.append(path)
    return found


def _check_readable(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise LmlabError(f"{path}: file is not readable (check its permissions)")


def expand_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Turn files, folders and glob patterns into a sorted, deduplicated list of files.

    A folder contributes every file with a known extension below it (hidden files and folders
    skipped); a glob (``data/*.txt``, ``data/**/*.jsonl``) every match with a known extension. A file
    named explicitly must have a known extension. A missing path, a glob matching nothing usable or
    an unreadable file raises :class:`LmlabError` naming it.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise LmlabError("no inputs given: expected at least one file, folder or glob")
    known = " ".join(sorted(KNOWN_EXTENSIONS))
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = _walk_folder(path)
            if not found:
                raise LmlabError(f"{path}: folder holds no files with a known extension ({known})")
            files.extend(found)
        elif path.is_file():
            if not _known(path):
                raise LmlabError(f"{path}: unknown file type {path.suffix!r}; expected one of {known}")
            files.append(path)
        elif _GLOB_CHARS & set(str(item)):
            found = []
            for match in sorted(glob.glob(str(item), recursive=True)):
                match_path = Path(match)
                if match_path.is_dir():
                    found.extend(_walk_folder(match_path))
                elif match_path.is_file() and _known(match_path):
                    found.append(match_path)
            if not found:
                raise LmlabError(f"{item}: glob matched no files with a known extension ({known})")
            files.extend(found)
        else:
            raise LmlabError(f"{path}: no such file or folder")
    unique: dict[Path, Path] = {}
    for path in files:
        # Two spellings of one file (a/../a/x.txt, a symlink) are one input.
        unique.setdefault(path.resolve(), path)
    result = sorted(unique.values(), key=str)
    for path in result:
        _check_readable(path)
    return result


def _decode(data: bytes, path: Path, base_offset: int = 0, line: int | None = None) -> str:
    """Strict UTF-8 decode whose error names the file and the byte offset of the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{path}:{line}" if line is not None else str(path)
        raise LmlabError(f"{where}: invalid byte at offset {base_offset + err.start}: expected UTF-8 text") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise LmlabError(f"{path}: cannot read file ({err.strerror or err})") from None


def _field_value(value: object, path: Path, where: str, field: str) -> str:
    """A document from one record's field: a string, or null meaning an empty document."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LmlabError(f"{path}:{where}: field {field!r} holds {type(value).__name__}; expected a string")
    return value


def _iter_json_record(record: object, path: Path, where: str, text_field: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise LmlabError(
            f"{path}:{where}: expected a JSON object with field {text_field!r}, got {type(record).__name__}"
        )
    if text_field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        raise LmlabError(
            f"{path}:{where}: missing field {text_field!r} (fields present: {fields}); "
            "pass text_field to choose another",
            params="text_field",
        )
    return _field_value(record[text_field], path, where, text_field)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    try:
        handle = path.open("rb")
    except OSError as err:
        raise LmlabError(f"{path}: cannot read file ({err.strerror or err})") from None
    with handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, offset, number)
            offset += len(raw)
            if number == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LmlabError(f"{path}:{number}: invalid JSON ({err.msg}); expected one object per line") from None
            yield _iter_json_record(record, path, str(number), text_field)


def _iter_json(path: Path, text_field: str) -> Iterator[str]:
    # A .json file is JSON Lines unless it is one array; peek at the first non-blank byte to tell.
    data = _read_bytes(path)
    if not data.removeprefix(_BOM.encode()).lstrip().startswith(b"["):
        yield from _iter_jsonl(path, text_field)
        return
    text = _decode(data, path).removeprefix(_BOM)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise LmlabError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    for index, record in enumerate(records):
        yield _iter_json_record(record, path, f"item {index}", text_field)


def _iter_delimited(path: Path, column: str) -> Iterator[str]:
    text = _decode(_read_bytes(path), path).removeprefix(_BOM)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # Documents are long; the csv module's default 128 KiB field limit would reject them.
    # The limit only ever grows here, so raising it cannot break another caller.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        if column not in header:
            raise LmlabError(
                f"{path}: missing column {column!r}; available columns: {', '.join(map(repr, header))}"
                " (pass column to choose one)",
                params="column",
            )
        index = header.index(column)
        for row in reader:
            if not row:
                continue
            if index >= len(row):
                raise LmlabError(
                    f"{path}:{reader.line_num}: row has {len(row)} fields; expected column {column!r} "
                    f"at position {index + 1}"
                )
            yield row[index]
    except csv.Error as err:
        raise LmlabError(f"{path}:{reader.line_num}: malformed {path.suffix.lstrip('.')} ({err})") from None


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise LmlabError(f"{path}: cannot read parquet file ({err})") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise LmlabError(
            f"{path}: missing column {column!r}; available columns: {', '.join(map(repr, names))}"
            " (pass column to choose one)",
            params="column",
        )
    field_type = parquet.schema_arrow.field(column).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise LmlabError(f"{path}: column {column!r} has type {field_type}; expected string")
    # Batches keep memory flat on large files.
    for batch in parquet.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            yield "" if value is None else value


def iter_documents(path: Path, *, text_field: str = "text", column: str | None = None) -> Iterator[str]:
    """Yield the documents of one file, chosen by its extension (see the module docstring).

    ``text_field`` names the JSON field; ``column`` the CSV/TSV/Parquet column (default:
    ``text_field``). Bad content raises :class:`LmlabError` naming the file (and line where known).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TEXT_EXTENSIONS:
        yield _decode(_read_bytes(path), path)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, text_field)
    elif suffix == ".json":
        yield from _iter_json(path, text_field)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_delimited(path, column if column is not None else text_field)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, column if column is not None else text_field)
    else:
        known = " ".join(sorted(KNOWN_EXTENSIONS))
        raise LmlabError(f"{path}: unknown file type {path.suffix!r}; expected one of {known}")


def _describe(inputs: str | Path | Sequence[str | Path]) -> str:
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return ", ".join(str(item) for item in items)


def read_corpus(
    inputs: str | Path | Sequence[str | Path],
    *,
    text_field: str = "text",
    column: str | None = None,
    normalize: str | None = None,
    dedup: bool = True,
    min_chars: int = 1,
) -> list[str]:
    """Read every document of ``inputs``, in file order, cleaned.

    ``normalize`` applies a Unicode normal form (``"NFC"``, ``"NFKC"``, ``"NFD"``, ``"NFKD"``) to each
    document; ``None`` keeps the text byte-exact. ``dedup`` drops exact duplicates (after
    normalization), keeping the first. Documents with fewer than ``min_chars`` characters once
    leading/trailing whitespace is ignored are dropped (the kept text itself is never stripped).
    """
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise LmlabError(f"normalize={normalize!r}: expected one of {', '.join(NORMALIZATIONS)} or None")
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 1:
        raise LmlabError(f"min_chars={min_chars!r}: expected an integer >= 1")
    documents: list[str] = []
    seen: set[bytes] = set()
    for path in expand_inputs(inputs):
        for doc in iter_documents(path, text_field=text_field, column=column):
            if normalize is not None:
                doc = unicodedata.normalize(normalize, doc)
            if len(doc.strip()) < min_chars:
                continue
            if dedup:
                # A 16-byte digest per document, not the text, so the set stays small.
                key = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
                if key in seen:
                    continue
                seen.add(key)
            documents.append(doc)
    if not documents:
        raise LmlabError(f"empty corpus: {_describe(inputs)} held no text")
    return documents


def _split_key(doc: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0".encode() + doc.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_documents(docs: list[str], valid_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split documents into (train, valid), keeping their order within each split.

    A document goes to validation when a blake2b hash of ``(seed, its text)`` falls in the lowest
    ``valid_fraction`` of the hash range, so its split depends on nothing but itself and the seed:
    adding documents never moves existing ones. With two or more documents and ``valid_fraction >
    0`` each split gets at least one document (the smallest hash moves to valid, or the largest to
    train, when the hash left one empty). ``lmlab prepare`` uses this split only when it is fair
    (:func:`document_split`).
    """
    in_valid = _valid_mask(docs, valid_fraction, seed)
    train = [doc for doc, valid in zip(docs, in_valid) if not valid]
    valid = [doc for doc, valid in zip(docs, in_valid) if valid]
    return train, valid


def _valid_mask(docs: list[str], valid_fraction: float, seed: int) -> list[bool]:
    """Which documents :func:`split_documents` holds out."""
    if (
        isinstance(valid_fraction, bool)
        or not isinstance(valid_fraction, (int, float))
        or not (0.0 <= valid_fraction < 1.0)
    ):
        raise LmlabError(f"valid_fraction={valid_fraction!r}: expected a number in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LmlabError(f"seed={seed!r}: expected an integer")
    keys = [_split_key(doc, seed) for doc in docs]
    threshold = valid_fraction * 2**64
    in_valid = [key < threshold for key in keys]
    if len(docs) >= 2 and valid_fraction > 0:
        if not any(in_valid):
            in_valid[min(range(len(docs)), key=keys.__getitem__)] = True
        elif all(in_valid):
            in_valid[max(range(len(docs)), key=keys.__getitem__)] = False
    return in_valid


def document_split(docs: list[str], valid_fraction: float = 0.05, seed: int = 0) -> list[bool] | None:
    """Which documents :func:`split_documents` holds out for validation (a flag per document), when that
    is a fair validation split; None when it is not.

    Fair: both sides hold text, and validation's share of the characters is within a factor of
    :data:`SPLIT_TOLERANCE` (2) of ``valid_fraction``. It is not when there are too few documents (a
    single document goes wholly to one side; three documents cannot give 5%) or when their lengths are so
    uneven that a few documents weigh all; ``lmlab prepare`` then splits by token ranges inside the
    documents instead. ``valid_fraction=0`` is always fair (everything trains).
    """
    in_valid = _valid_mask(docs, valid_fraction, seed)
    if valid_fraction == 0:
        return in_valid
    held_out = sum(len(doc) for doc, valid in zip(docs, in_valid) if valid)
    total = sum(map(len, docs))
    if (
        held_out == total
        or not valid_fraction / SPLIT_TOLERANCE <= held_out / total <= valid_fraction * SPLIT_TOLERANCE
    ):
        return None
    return in_valid


# Pure-Python or always-built standard-library modules whose docstrings are real English prose.
# A fixed, sorted list (not a scan of the install) keeps the corpus the same wherever the same Python
# runs; modules that side-effect on import (antigravity, this) or need a GUI (tkinter) are left out.
_DOC_MODULES = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bdb",
    "binascii",
    "bisect",
    "builtins",
    "bz2",
    "calendar",
    "cmath",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "collections.abc",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "copyreg",
    "csv",
    "ctypes",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email",
    "email.message",
    "email.policy",
    "email.utils",
    "enum",
    "errno",
    "faulthandler",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib",
    "importlib.metadata",
    "importlib.resources",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "logging.config",
    "logging.handlers",
    "lzma",
    "mailbox",
    "marshal",
    "math",
    "mimetypes",
    "mmap",
    "modulefinder",
    "multiprocessing",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "os.path",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pyclbr",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "stat",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "symtable",
    "sys",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "tracemalloc",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "urllib.robotparser",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "wsgiref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax",
    "xmlrpc.client",
    "xmlrpc.server",
    "zipapp",
    "zipfile",
    "zipimport",
    "zlib",
    "zoneinfo",
)
_MIN_DOC_CHARS = 200


def _module_docstrings(name: str) -> Iterator[str]:
    """The module's docstring, then its public classes/functions (and their methods) by name."""
    import importlib

    try:
        module = importlib.import_module(name)
    except Exception:  # a module missing from this build (no _ssl, no _sqlite3): skip it
        return
    yield module.__doc__ or ""
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # Only what the module defines (or its C twin, _socket for socket), not what it imported.
        owner = getattr(obj, "__module__", None) or ""
        if not (
            name == "builtins"
            or owner == name
            or owner.startswith(name + ".")
            or owner.lstrip("_") == name.rsplit(".", 1)[-1]
        ):
            continue
        yield obj.__doc__ if isinstance(obj.__doc__, str) else ""
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_") and member_name != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    doc = member.__doc__
                    yield doc if isinstance(doc, str) else ""


@lru_cache(maxsize=1)
def _builtin_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    documents: list[str] = []
    seen: set[str] = set()

    def add(text: str) -> None:
        text = inspect.cleandoc(text)
        if len(text) >= _MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            documents.append(text)

    for key in sorted(topics):
        add(topics[key])
    with warnings.catch_warnings():
        # Touching deprecated aliases (typing.io, ...) warns; the docstrings are still prose.
        warnings.simplefilter("ignore")
        for name in _DOC_MODULES:
            for doc in _module_docstrings(name):
                add(doc)
    return tuple(documents)


def builtin_corpus(max_chars: int | None = None) -> list[str]:
    """English text that ships with every Python: the default corpus of ``lmlab demo``.

    The documents are the pages of the language reference that ``help()`` shows
    (``pydoc_data.topics``, sorted by topic) followed by the docstrings of a fixed, sorted list of
    ~170 standard-library modules (module, public classes and functions, their methods), each
    cleaned with :func:`inspect.cleandoc`, deduplicated, and kept when at least 200 characters long.
    On CPython 3.11 that is about 1,500 documents and 1.27 million characters (less under
    ``python -OO``, which strips docstrings). The order is fixed, so the result is the same on every
    run of the same Python. ``max_chars`` keeps the leading documents while their total stays
    within it (at least the first document).
    """
    documents = list(_builtin_documents())
    if max_chars is None:
        return documents
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise LmlabError(f"max_chars={max_chars!r}: expected a positive integer or None")
    kept: list[str] = []
    total = 0
    for doc in documents:
        if kept and total + len(doc) > max_chars:
            break
        kept.append(doc)
        total += len(doc)
    return kept
