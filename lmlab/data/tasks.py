"""Labelled data for fine-tuning and evaluation: read task files, turn them into token ids + labels.

Five tasks, each with a reader that parses a file into a plain dataclass and a feature builder that
encodes it with an lmlab :class:`~lmlab.tokenizer.Tokenizer` (model-independent; padding is left
to a collator):

============  ===================================  ========================================
task          reader                               features
============  ===================================  ========================================
classify      :func:`read_classify` (JSONL/CSV/    :func:`encode_classify`
              TSV), :func:`check_labels`
tag           :func:`read_tags` (CoNLL, JSONL),    :func:`align_tags`,
              :func:`check_tags`                   :func:`tags_from_predictions`
qa            :func:`read_squad` (SQuAD 1.1/2.0)   :func:`qa_features`, :func:`qa_postprocess`
seq2seq       :func:`read_seq2seq` (JSONL)         :func:`encode_seq2seq`,
                                                   :func:`encode_sources`
chat          :func:`read_chat` (JSONL messages    :func:`encode_chat`,
              or prompt/response)                  :func:`encode_conversation`
============  ===================================  ========================================

Special tokens come from the tokenizer's post-processor (WordPiece: ``[CLS] a [SEP] b [SEP]`` with
token type ids 0/1). A tokenizer whose post-processor adds nothing (byte-level BPE for decoders,
Unigram) gets the eos token after each segment instead — ``a eos`` and ``a eos b eos`` — so a
decoder can pool its last token and a pair stays separable. Chat conversations take no
post-processor: the chat template (:mod:`lmlab.templates`) writes every token, special ones included.

Files are strict UTF-8; bad input raises :class:`LmlabError` naming ``file:line`` (or the SQuAD
question id) and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import processors

from lmlab.config import json_line_object
from lmlab.errors import LmlabError
from lmlab.objectives import IGNORE_INDEX
from lmlab.tokenizer import Tokenizer

__all__ = [
    "LABEL_KINDS",
    "TAG_SCHEMES",
    "ClassifyData",
    "TagData",
    "QAExample",
    "SquadExamples",
    "QAFeature",
    "Seq2SeqData",
    "ChatData",
    "CHAT_ROLES",
    "read_classify",
    "check_labels",
    "read_tags",
    "check_tags",
    "read_squad",
    "read_seq2seq",
    "read_records",
    "read_chat",
    "encode_classify",
    "align_tags",
    "tags_from_predictions",
    "qa_features",
    "qa_postprocess",
    "encode_seq2seq",
    "encode_sources",
    "encode_conversation",
    "encode_chat",
]

LABEL_KINDS = ("single", "multi", "regression")
TAG_SCHEMES = ("bio", "iob1", "iobes", "plain")

_BOM = "\ufeff"
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_ENTITY_TAG = re.compile(r"(O|[BIES]-\S+)")
_COLUMN_SEP = re.compile(r"[ \t]+")
_MAX_SHOWN = 20  # known labels/tags listed in an error message


# ------------------------------------------------------------------------------------ dataclasses
@dataclass
class ClassifyData:
    """Texts (and optional second texts) with their labels.

    ``labels`` hold one label name per example (``kind="single"``), a list of names
    (``"multi"``) or a float score (``"regression"``); ``label_names`` are the sorted names
    (empty for regression) and fix the label ids. ``lines`` are the source lines, for messages.
    """

    texts: list[str]
    labels: list[Any]
    kind: str
    label_names: list[str]
    pairs: list[str] | None = None
    lines: list[int] = field(default_factory=list)
    path: Path | None = None


@dataclass
class TagData:
    """Sentences as word lists with one BIO tag per word (``scheme`` says what the file used).

    ``tag_names``: ``"O"`` then ``B-``/``I-`` of each entity type, by type (for ``scheme="plain"``
    the sorted tags). ``lines[s][w]`` is the source line of word ``w`` of sentence ``s``.
    """

    words: list[list[str]]
    tags: list[list[str]]
    tag_names: list[str]
    scheme: str = "bio"
    lines: list[list[int]] = field(default_factory=list)
    path: Path | None = None


@dataclass
class QAExample:
    """One SQuAD question. ``answer_starts`` are character offsets into ``context``."""

    id: str
    question: str
    context: str
    answer_texts: list[str]
    answer_starts: list[int]
    is_impossible: bool = False
    title: str = ""


class SquadExamples(list):
    """The :class:`QAExample` list of one SQuAD file; ``version_2`` is true when any question is
    unanswerable (SQuAD 2.0)."""

    def __init__(self, examples: Sequence[QAExample] = (), version_2: bool = False) -> None:
        super().__init__(examples)
        self.version_2 = version_2


@dataclass
class QAFeature:
    """One window of a question + context encoding.

    ``offsets[t]`` is the (start, end) character span of token ``t`` in the example's context, or
    None for question and special tokens. ``start_position``/``end_position`` are the answer's
    first and last token (both 0 when the answer is not wholly in this window, or there is none).
    """

    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]
    example_index: int
    start_position: int = 0
    end_position: int = 0


@dataclass
class Seq2SeqData:
    """Source texts and their target texts (prompts and completions for decoders)."""

    sources: list[str]
    targets: list[str]
    lines: list[int] = field(default_factory=list)
    path: Path | None = None


# -------------------------------------------------------------------------------------- file input
def _read_text(path: str | Path, what: str) -> tuple[Path, str]:
    """The file's text (strict UTF-8, BOM dropped); missing, unreadable or empty files raise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LmlabError(f"{path}: no such file; expected {what}") from None
    except OSError as err:
        raise LmlabError(f"{path}: cannot read file ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8").removeprefix(_BOM)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise LmlabError(f"{path}:{line}: invalid byte {data[err.start]:#04x}: expected UTF-8 text") from None
    if not text.strip():
        raise LmlabError(f"{path}: empty file; expected {what}")
    return path, text


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) pairs, split on ``\\n`` only (``\\r`` dropped) as editors count them."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON Lines file."""
    for number, line in _lines(text):
        if line.strip():
            yield number, json_line_object(path, number, line)


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every example in a ``.jsonl``, ``.csv`` or ``.tsv`` file, every field kept
    (CSV/TSV cells as strings): what the critique reads extra columns (a group, a slice) from, matched to
    a reader's examples by their ``lines``."""
    path, text = _read_text(path, "a .jsonl, .csv or .tsv file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_jsonl_records(path, text))
    if suffix in (".csv", ".tsv"):
        return list(_table_records(path, text))
    raise LmlabError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, .csv or .tsv")


def _table_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row as column -> cell) for each row of a CSV or TSV file with a header."""
    tsv = path.suffix.lower() == ".tsv"
    # TSV files (GLUE's among them) hold unbalanced quotes in text: no quoting there.
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    start = 1
    try:
        header = next(reader)
        start = reader.line_num + 1
        for row in reader:
            if row and any(cell.strip() for cell in row):
                if len(row) != len(header):
                    raise LmlabError(
                        f"{path}:{start}: row has {len(row)} fields; expected {len(header)} as in the header"
                    )
                yield start, dict(zip(header, row))
            start = reader.line_num + 1
    except csv.Error as err:
        raise LmlabError(f"{path}:{start}: malformed {path.suffix.lstrip('.')} ({err})") from None


def _require(record: Mapping[str, Any], name: str, where: str) -> Any:
    """``record[name]``; a missing field raises, listing the fields present."""
    if name not in record:
        present = ", ".join(map(repr, record)) or "none"
        raise LmlabError(f"{where}: missing field {name!r} (fields present: {present})")
    return record[name]


def _field(record: Mapping[str, Any], name: str, where: str, kind: type = str) -> Any:
    """``record[name]``, which must exist and be of ``kind``."""
    value = _require(record, name, where)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LmlabError(f"{where}: field {name!r} is {value!r}; expected {kind.__name__}")
    return value


def _shown(names: Sequence[str]) -> str:
    shown = ", ".join(map(repr, names[:_MAX_SHOWN]))
    return shown + (f", … ({len(names)} in all)" if len(names) > _MAX_SHOWN else "")


def _where(path: str | Path | None, lines: Sequence[int], index: int) -> str:
    """``file:line`` of example ``index`` when known, else its position."""
    if path is not None and index < len(lines):
        return f"{path}:{lines[index]}"
    return f"example {index}"


# -------------------------------------------------------------------------------------- classify
def _label_sort_key(name: str) -> tuple[int, int, str]:
    """Integer-looking names in numeric order ("2" before "10"), then the rest alphabetically."""
    return (0, int(name), "") if _INT.fullmatch(name) else (1, 0, name)


def _name(value: Any, where: str) -> str:
    """A class name from a JSON label or list element: a string, an integer or a boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    raise LmlabError(f"{where}: label {value!r}; expected a non-empty string or an integer")


class _Cell(str):
    """A CSV/TSV cell: its label type is read from its text (JSON values carry their own)."""


def _parse_label(value: Any, where: str) -> tuple[str, Any]:
    """(category, value) of a raw label; category is "name", "int", "float" or "list"."""
    if isinstance(value, _Cell):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise LmlabError(f'{where}: label {text!r} is not a JSON list; expected e.g. ["a", "b"]') from None
        elif _INT.fullmatch(text):
            return "int", int(text)
        elif _FLOAT.fullmatch(text):
            return "float", float(text)
        else:
            return "name", _name(text, where)
    if isinstance(value, list):
        return "list", sorted({_name(item, where) for item in value}, key=_label_sort_key)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LmlabError(f"{where}: label {value!r}; expected a finite number")
        return "float", value
    if isinstance(value, int) and not isinstance(value, bool):
        return "int", value
    return "name", _name(value, where)


def _resolve_kind(parsed: list[tuple[str, Any]], where: list[str], kind: str | None) -> str:
    """The label kind of a file: forced by ``kind`` or read from the labels, which must agree."""
    categories = [category for category, _ in parsed]
    if kind is None:
        if "list" in categories:
            kind, first = "multi", categories.index("list")
        elif "float" in categories:
            kind, first = "regression", categories.index("float")
        else:
            return "single"
        allowed = {"list"} if kind == "multi" else {"int", "float"}
        for index, category in enumerate(categories):
            if category not in allowed:
                found = "a list of labels (multi-label)" if kind == "multi" else "a number (regression)"
                raise LmlabError(
                    f"{where[index]}: label {parsed[index][1]!r} does not match {where[first]}, which holds "
                    f"{found}; expected one kind of label per file"
                )
        return kind
    if kind not in LABEL_KINDS:
        raise LmlabError(f"kind={kind!r}: expected one of {', '.join(LABEL_KINDS)} or None")
    allowed = {"single": {"name", "int"}, "multi": {"list", "name", "int"}, "regression": {"int", "float"}}[kind]
    for index, category in enumerate(categories):
        if category not in allowed:
            raise LmlabError(f"{where[index]}: label {parsed[index][1]!r} is not a {kind} label")
    return kind


def read_classify(
    path: str | Path,
    *,
    text_field: str = "text",
    pair_field: str | None = None,
    label_field: str = "label",
    kind: str | None = None,
) -> ClassifyData:
    """Read a classification file: ``.jsonl``, ``.csv`` or ``.tsv`` (with a header row).

    A label is a class name or integer (``kind="single"``), a list of them (``"multi"``; in CSV/TSV
    a JSON list such as ``["a", "b"]``) or a float score (``"regression"``; integers mixed with
    floats count as scores). The kind is read from the file unless ``kind`` forces it — pass the
    training file's kind when reading its validation file. TSV cells are taken verbatim (no quoting).
    """
    path, text = _read_text(path, "a .jsonl, .csv or .tsv classification file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records: Iterator[tuple[int, Mapping[str, Any]]] = _jsonl_records(path, text)
    elif suffix in (".csv", ".tsv"):
        records = ((n, {k: _Cell(v) for k, v in row.items()}) for n, row in _table_records(path, text))
    else:
        raise LmlabError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, .csv or .tsv")

    texts, pairs, parsed, lines, where = [], [], [], [], []
    for number, record in records:
        at = f"{path}:{number}"
        texts.append(str(_field(record, text_field, at)))
        if pair_field is not None:
            pairs.append(str(_field(record, pair_field, at)))
        label = _require(record, label_field, at)
        if label is None:
            raise LmlabError(f"{at}: field {label_field!r} is null; expected a label")
        parsed.append(_parse_label(label, at))
        lines.append(number)
        where.append(at)
    if not texts:
        raise LmlabError(f"{path}: no examples; expected one per line (after the header for CSV/TSV)")

    kind = _resolve_kind(parsed, where, kind)
    if kind == "regression":
        labels: list[Any] = [float(value) for _, value in parsed]
        names: list[str] = []
    elif kind == "multi":
        labels = [value if category == "list" else [str(value)] for category, value in parsed]
        names = sorted({name for names_ in labels for name in names_}, key=_label_sort_key)
        if not names:
            raise LmlabError(f"{path}: every label list is empty; expected at least one label in the file")
    else:
        labels = [str(value) for _, value in parsed]
        names = sorted(set(labels), key=_label_sort_key)
    return ClassifyData(
        texts=texts,
        labels=labels,
        kind=kind,
        label_names=names,
        pairs=pairs if pair_field is not None else None,
        lines=lines,
        path=path,
    )


def check_labels(data: ClassifyData, label_names: Sequence[str], path: str | Path) -> ClassifyData:
    """Check that every label of ``data`` (a validation file) is among ``label_names`` (the
    training labels); return ``data`` with those names, so ids match the training set's."""
    label_names = list(label_names)
    if (data.kind == "regression") != (not label_names):
        found = "regression scores" if data.kind == "regression" else "class labels"
        expected = "regression scores" if not label_names else f"class labels ({_shown(label_names)})"
        raise LmlabError(f"{path}: labels are {found}; expected {expected} as in the training data")
    known = set(label_names)
    if data.kind != "regression":
        for index, label in enumerate(data.labels):
            for name in label if data.kind == "multi" else [label]:
                if name not in known:
                    raise LmlabError(
                        f"{_where(path, data.lines, index)}: label {name!r} is not in the training data; "
                        f"known labels: {_shown(label_names)}"
                    )
    return dataclasses.replace(data, label_names=label_names)


# ------------------------------------------------------------------------------------------ tags
def _bio_repair(tags: list[str]) -> list[str]:
    """Make every entity start with ``B-``: an ``I-X`` after ``O`` or another type becomes
    ``B-X`` (IOB1's convention; a no-op on valid BIO)."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def _to_bio(tags: list[str], scheme: str) -> list[str]:
    """One sentence's tags in BIO (IOBES: ``S-``→``B-``, ``E-``→``I-``; IOB1: entity-initial
    ``I-``→``B-``)."""
    if scheme == "plain":
        return list(tags)
    if scheme == "iobes":
        tags = ["B-" + t[2:] if t[:2] == "S-" else "I-" + t[2:] if t[:2] == "E-" else t for t in tags]
    return _bio_repair(tags)


def _detect_scheme(sentences: list[list[str]]) -> str:
    """IOBES if any ``S-``/``E-`` tag, IOB1 if any entity starts with ``I-``, else BIO."""
    if any(tag[:2] in ("S-", "E-") for tags in sentences for tag in tags):
        return "iobes"
    if any(_bio_repair(tags) != tags for tags in sentences):
        return "iob1"
    return "bio"


def _check_tag(tag: str, scheme: str | None, where: str) -> None:
    if scheme == "plain":
        return
    if not _ENTITY_TAG.fullmatch(tag):
        raise LmlabError(
            f"{where}: tag {tag!r} is not O or PREFIX-TYPE with PREFIX one of B, I, E, S "
            "(pass scheme='plain' for tags without a scheme, such as POS tags)"
        )
    if scheme in ("bio", "iob1") and tag[:2] in ("S-", "E-"):
        raise LmlabError(f"{where}: tag {tag!r} is IOBES; expected O, B-TYPE or I-TYPE for scheme={scheme!r}")


@dataclass
class _Sentences:
    """What a tag reader collects: words, raw tags and source lines, per sentence."""

    words: list[list[str]] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)
    lines: list[list[int]] = field(default_factory=list)

    def add(self, words: list[str], tags: list[str], lines: list[int]) -> None:
        if words:
            self.words.append(words)
            self.tags.append(tags)
            self.lines.append(lines)


def _read_conll(path: Path, text: str, scheme: str | None) -> _Sentences:
    sentences = _Sentences()
    words, tags, lines = [], [], []
    for number, line in _lines(text):
        columns = _COLUMN_SEP.split(line.strip(" \t"))
        if columns == [""] or columns[0] == "-DOCSTART-":
            sentences.add(words, tags, lines)
            words, tags, lines = [], [], []
            continue
        if len(columns) < 2:
            raise LmlabError(
                f"{path}:{number}: found 1 column ({line.strip()!r}); expected a token and its tag "
                "separated by whitespace (the tag in the last column)"
            )
        _check_tag(columns[-1], scheme, f"{path}:{number}")
        words.append(columns[0])
        tags.append(columns[-1])
        lines.append(number)
    sentences.add(words, tags, lines)
    return sentences


def _read_tag_jsonl(path: Path, text: str, scheme: str | None) -> _Sentences:
    sentences = _Sentences()
    for number, record in _jsonl_records(path, text):
        at = f"{path}:{number}"
        words, tags = _field(record, "tokens", at, list), _field(record, "tags", at, list)
        if len(words) != len(tags):
            raise LmlabError(f"{at}: {len(words)} tokens but {len(tags)} tags; expected one tag per token")
        if not words:
            raise LmlabError(f"{at}: empty 'tokens'; expected at least one token")
        for index, (word, tag) in enumerate(zip(words, tags)):
            if not isinstance(word, str) or not word.strip():
                raise LmlabError(f"{at}: token {index} is {word!r}; expected a non-blank string")
            if not isinstance(tag, str) or not tag.strip():
                raise LmlabError(f"{at}: tag {index} is {tag!r}; expected a non-blank string")
            _check_tag(tag, scheme, at)
        sentences.add(words, tags, [number] * len(words))
    return sentences


def read_tags(path: str | Path, *, scheme: str | None = None) -> TagData:
    """Read a sequence-labelling file: ``.jsonl`` (``{"tokens": [...], "tags": [...]}`` per line) or,
    for any other extension, CoNLL (a token per line, whitespace-separated columns, the tag last;
    blank lines end sentences; ``-DOCSTART-`` lines skipped).

    Tags are ``O`` or ``B-``/``I-``/``E-``/``S-`` + type, in scheme ``"bio"``, ``"iob1"`` or
    ``"iobes"`` (read from the tags when ``scheme`` is None) and are converted to BIO.
    ``scheme="plain"`` takes any tags as they are (POS tags).
    """
    if scheme is not None and scheme not in TAG_SCHEMES:
        raise LmlabError(f"scheme={scheme!r}: expected one of {', '.join(TAG_SCHEMES)} or None")
    path, text = _read_text(path, "a CoNLL or JSONL tagging file")
    reader = _read_tag_jsonl if path.suffix.lower() == ".jsonl" else _read_conll
    sentences = reader(path, text, scheme)
    if not sentences.words:
        raise LmlabError(f"{path}: no sentences; expected tokens with tags")
    scheme = scheme or _detect_scheme(sentences.tags)
    tags = [_to_bio(sentence, scheme) for sentence in sentences.tags]
    seen = {tag for sentence in tags for tag in sentence}
    if scheme == "plain":
        tag_names = sorted(seen)
    else:
        types = sorted({tag[2:] for tag in seen if tag != "O"})
        tag_names = ["O"] + [f"{prefix}-{type_}" for type_ in types for prefix in "BI"]
    return TagData(
        words=sentences.words, tags=tags, tag_names=tag_names, scheme=scheme, lines=sentences.lines, path=path
    )


def check_tags(data: TagData, tag_names: Sequence[str], path: str | Path) -> TagData:
    """Check that every tag of ``data`` (a validation file) is among ``tag_names`` (the training
    tags); return ``data`` with those names."""
    tag_names = list(tag_names)
    known = set(tag_names)
    for s, tags in enumerate(data.tags):
        for w, tag in enumerate(tags):
            if tag not in known:
                line = data.lines[s][w] if s < len(data.lines) else None
                where = f"{path}:{line}" if line is not None else f"{path}: sentence {s}"
                raise LmlabError(f"{where}: tag {tag!r} is not in the training data; known tags: {_shown(tag_names)}")
    return dataclasses.replace(data, tag_names=tag_names)


# -------------------------------------------------------------------------------------------- qa
def read_squad(path: str | Path) -> SquadExamples:
    """Read a SQuAD v1.1 or v2.0 JSON file (``data[].paragraphs[].qas[]``).

    Every answer must be found in its context at ``answer_start``; an unanswerable question
    (``is_impossible``, v2.0) has no answers. ``version_2`` is set when any question is unanswerable.
    """
    path, text = _read_text(path, "a SQuAD JSON file")
    try:
        root = json.loads(text)
    except json.JSONDecodeError as err:
        raise LmlabError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise LmlabError(f"{path}: expected a JSON object with a 'data' list (SQuAD format)")

    examples = SquadExamples()
    for a, article in enumerate(root["data"]):
        at = f"{path}: data[{a}]"
        if not isinstance(article, dict):
            raise LmlabError(f"{at}: expected an object with 'paragraphs'")
        title = article.get("title") or ""
        for p, paragraph in enumerate(_field(article, "paragraphs", at, list)):
            at = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                raise LmlabError(f"{at}: expected an object with 'context' and 'qas'")
            context = _field(paragraph, "context", at)
            for q, qa in enumerate(_field(paragraph, "qas", at, list)):
                at = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    raise LmlabError(f"{at}: expected an object with 'id', 'question' and 'answers'")
                qid = qa.get("id")
                if not isinstance(qid, (str, int)) or isinstance(qid, bool):
                    raise LmlabError(f"{at}: field 'id' is {qid!r}; expected a string")
                at = f"{path}: question {str(qid)!r}"
                examples.append(_squad_example(qa, str(qid), context, title, at))
    if not examples:
        raise LmlabError(f"{path}: no questions; expected data[].paragraphs[].qas[]")
    examples.version_2 = any(example.is_impossible for example in examples)
    return examples


def _squad_example(qa: dict[str, Any], qid: str, context: str, title: str, at: str) -> QAExample:
    question = _field(qa, "question", at)
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise LmlabError(f"{at}: field 'is_impossible' is {impossible!r}; expected true or false")
    answers = [] if impossible and "answers" not in qa else _field(qa, "answers", at, list)
    if not impossible and not answers:
        raise LmlabError(f'{at}: no answers; expected at least one, or "is_impossible": true')
    texts, starts = [], []
    for answer in [] if impossible else answers:
        if not isinstance(answer, dict):
            raise LmlabError(f"{at}: answer {answer!r}; expected an object with 'text' and 'answer_start'")
        answer_text, start = _field(answer, "text", at), _field(answer, "answer_start", at, int)
        found = context[start : start + len(answer_text)] if start >= 0 else ""
        if found != answer_text:
            raise LmlabError(
                f"{at}: answer {answer_text!r} at answer_start {start}, but the context there reads "
                f"{found!r}; expected the answer text at that character offset"
            )
        texts.append(answer_text)
        starts.append(start)
    return QAExample(
        id=qid,
        question=question,
        context=context,
        answer_texts=texts,
        answer_starts=starts,
        is_impossible=impossible,
        title=title if isinstance(title, str) else "",
    )


# --------------------------------------------------------------------------------------- seq2seq
def read_seq2seq(path: str | Path, *, source_field: str = "source", target_field: str = "target") -> Seq2SeqData:
    """Read a ``.jsonl`` file of source/target pairs. A record without ``source_field`` and
    ``target_field`` may hold ``prompt`` and ``completion`` instead (the decoder fine-tuning names)."""
    path, text = _read_text(path, "a JSONL file of source/target pairs")
    if path.suffix.lower() != ".jsonl":
        raise LmlabError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl")
    sources, targets, lines = [], [], []
    for number, record in _jsonl_records(path, text):
        at = f"{path}:{number}"
        fields = (source_field, target_field)
        if source_field not in record and target_field not in record and {"prompt", "completion"} <= record.keys():
            fields = ("prompt", "completion")
        elif source_field not in record or target_field not in record:
            missing = source_field if source_field not in record else target_field
            present = ", ".join(map(repr, record)) or "none"
            raise LmlabError(
                f"{at}: missing field {missing!r} (fields present: {present}); expected "
                f"{source_field!r} and {target_field!r}, or 'prompt' and 'completion'"
            )
        sources.append(_field(record, fields[0], at))
        targets.append(_field(record, fields[1], at))
        lines.append(number)
    if not sources:
        raise LmlabError(f"{path}: no examples; expected one JSON object per line")
    return Seq2SeqData(sources=sources, targets=targets, lines=lines, path=path)


# ---------------------------------------------------------------------------------------- features
def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LmlabError(f"{name}={value!r}: expected an integer >= {minimum}")


def _task_backend(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    """A private copy of the tokenizer's backend, without truncation or padding, whose
    post-processor marks segment ends: the tokenizer's own when it adds special tokens, else
    ``$A eos`` / ``$A eos $B:1 eos:1``."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    if backend.num_special_tokens_to_add(is_pair=True) == 0:
        eos = tokenizer.special_tokens.get("eos")
        if eos is None:
            raise LmlabError(
                "tokenizer has no eos token and its post-processor adds no special tokens; expected one "
                "of them to mark where a segment ends"
            )
        template = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_id)]
        )
        # Keep the original (e.g. byte-level offset handling) and append eos after it.
        original = backend.post_processor
        backend.post_processor = template if original is None else processors.Sequence([original, template])
    return backend


def encode_classify(tokenizer: Tokenizer, data: ClassifyData, max_length: int) -> dict[str, list]:
    """Token ids, token type ids and labels of each example, at most ``max_length`` tokens.

    Texts (and pairs) go through the post-processor (``[CLS] a [SEP] b [SEP]``, or ``a eos b eos``
    for tokenizers that add no special tokens; pairs truncated longest-first). Labels: an id into
    ``data.label_names`` (single), a multi-hot float list (multi) or the float score (regression).
    """
    backend = _task_backend(tokenizer)
    _check_int("max_length", max_length, backend.num_special_tokens_to_add(data.pairs is not None) + 1)
    backend.enable_truncation(max_length, strategy="longest_first")
    inputs = list(zip(data.texts, data.pairs)) if data.pairs is not None else list(data.texts)
    encodings = backend.encode_batch(inputs, add_special_tokens=True)

    label_to_id = {name: index for index, name in enumerate(data.label_names)}

    def label_id(name: str, index: int) -> int:
        if name not in label_to_id:
            raise LmlabError(
                f"{_where(data.path, data.lines, index)}: label {name!r} is not among the label names "
                f"{_shown(data.label_names)} (check validation files with check_labels)"
            )
        return label_to_id[name]

    labels: list[Any] = []
    for index, label in enumerate(data.labels):
        if data.kind == "regression":
            labels.append(float(label))
        elif data.kind == "multi":
            hot = [0.0] * len(data.label_names)
            for name in label:
                hot[label_id(name, index)] = 1.0
            labels.append(hot)
        else:
            labels.append(label_id(label, index))
    return {
        "input_ids": [encoding.ids for encoding in encodings],
        "token_type_ids": [encoding.type_ids for encoding in encodings],
        "labels": labels,
    }


def align_tags(tokenizer: Tokenizer, data: TagData, tag_to_id: Mapping[str, int], max_length: int) -> dict[str, list]:
    """Token ids and token labels of each sentence, at most ``max_length`` tokens.

    The first sub-token of each word is labelled with its tag id; later sub-tokens and special
    tokens get ``IGNORE_INDEX`` (-100). ``word_ids[t]`` is the word of token ``t`` (None for special
    tokens). Words after the first are encoded with a leading space, so byte-level BPE and
    Metaspace tokenizers split them as in running text.
    """
    backend = _task_backend(tokenizer)
    _check_int("max_length", max_length, backend.num_special_tokens_to_add(False) + 1)
    backend.enable_truncation(max_length)
    spaced = [[word if w == 0 else " " + word for w, word in enumerate(words)] for words in data.words]
    encodings = backend.encode_batch(spaced, is_pretokenized=True, add_special_tokens=True)

    input_ids, labels, word_ids = [], [], []
    for s, (encoding, tags) in enumerate(zip(encodings, data.tags)):
        sentence_labels, previous = [], None
        for word in encoding.word_ids:
            if word is None or word == previous:
                sentence_labels.append(IGNORE_INDEX)
            else:
                tag = tags[word]
                if tag not in tag_to_id:
                    line = data.lines[s][word] if s < len(data.lines) else None
                    where = f"{data.path}:{line}" if line is not None and data.path else f"sentence {s}"
                    raise LmlabError(
                        f"{where}: tag {tag!r} is not in tag_to_id (check validation files with check_tags)"
                    )
                sentence_labels.append(tag_to_id[tag])
            previous = word
        input_ids.append(encoding.ids)
        labels.append(sentence_labels)
        word_ids.append(list(encoding.word_ids))
    return {"input_ids": input_ids, "labels": labels, "word_ids": word_ids}


def tags_from_predictions(
    pred_ids_per_token: Sequence[int],
    word_ids: Sequence[int | None],
    id_to_tag: Sequence[str] | Mapping[int, str],
    *,
    n_words: int | None = None,
) -> list[str]:
    """One tag per word from token-level predicted ids: the prediction at each word's first
    sub-token. Words with no token (cut by truncation) are ``"O"``; ``n_words`` (default: one past
    the last word seen) is the sentence's length. Predictions may be longer (padding) than ``word_ids``."""
    if len(pred_ids_per_token) < len(word_ids):
        raise LmlabError(f"{len(pred_ids_per_token)} predictions for {len(word_ids)} tokens; expected one per token")
    seen = [word for word in word_ids if word is not None]
    count = n_words if n_words is not None else (max(seen) + 1 if seen else 0)
    tags = [None] * count
    for word, pred in zip(word_ids, pred_ids_per_token):
        if word is not None and word < count and tags[word] is None:
            tags[word] = id_to_tag[int(pred)]
    return [tag if tag is not None else "O" for tag in tags]


def _trimmed(context: str, start: int, end: int) -> tuple[int, int]:
    """A token's span without surrounding whitespace (byte-level BPE and Metaspace tokens carry
    their leading space); a whitespace-only token keeps its span."""
    s, e = start, end
    while s < e and context[s].isspace():
        s += 1
    while e > s and context[e - 1].isspace():
        e -= 1
    return (s, e) if s < e else (start, end)


def _answer_positions(example: QAExample, offsets: list[tuple[int, int] | None]) -> tuple[int, int]:
    """First and last token of the example's first answer, or (0, 0) when it has none or the
    answer is not wholly inside this window."""
    if example.is_impossible or not example.answer_texts:
        return 0, 0
    start_char = example.answer_starts[0]
    end_char = start_char + len(example.answer_texts[0])
    context = [t for t, span in enumerate(offsets) if span is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    # First token ending after the answer starts, last token starting before it ends: with
    # byte-level BPE a character can span several tokens, and all of them belong to the answer.
    start = min(t for t in context if offsets[t][1] > start_char)
    end = max(t for t in context if offsets[t][0] < end_char)
    return start, end


def qa_features(
    tokenizer: Tokenizer,
    examples: Sequence[QAExample],
    *,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> list[QAFeature]:
    """Encode each question + context pair into one or more windows of ``max_length`` tokens.

    As Hugging Face's ``run_qa``: the question (cut to ``max_query_length`` tokens) is repeated in
    every window; the context is split into windows that overlap by ``doc_stride`` tokens. Layout:
    ``[CLS] question [SEP] context [SEP]``, or ``question eos context eos`` for tokenizers that add
    no special tokens. Answer positions use each example's first answer.
    """
    backend = _task_backend(tokenizer)
    n_special = backend.num_special_tokens_to_add(is_pair=True)
    _check_int("max_query_length", max_query_length, 1)
    _check_int("doc_stride", doc_stride, 0)
    _check_int("max_length", max_length, 1)
    if max_length <= max_query_length + n_special + doc_stride:
        raise LmlabError(
            f"max_length={max_length}: expected more than max_query_length ({max_query_length}) + special "
            f"tokens ({n_special}) + doc_stride ({doc_stride}), so every window holds new context tokens"
        )
    # HF run_qa strips the question's leading whitespace: some SQuAD questions start with spaces.
    questions = backend.encode_batch([example.question.lstrip() for example in examples], add_special_tokens=False)
    contexts = backend.encode_batch([example.context for example in examples], add_special_tokens=False)

    features = []
    for index, (example, question, context) in enumerate(zip(examples, questions, contexts)):
        question.truncate(max_query_length)
        # Encoding.truncate leaves the first window in place and the rest, each starting
        # doc_stride tokens before the previous one ended, in .overflowing.
        context.truncate(max_length - len(question.ids) - n_special, stride=doc_stride)
        for window in [context, *context.overflowing]:
            encoding = backend.post_process(question, window, add_special_tokens=True)
            offsets = [
                _trimmed(example.context, *span) if sequence == 1 else None
                for span, sequence in zip(encoding.offsets, encoding.sequence_ids)
            ]
            start, end = _answer_positions(example, offsets)
            features.append(
                QAFeature(
                    input_ids=encoding.ids,
                    token_type_ids=encoding.type_ids,
                    offsets=offsets,
                    example_index=index,
                    start_position=start,
                    end_position=end,
                )
            )
    return features


def qa_postprocess(
    examples: Sequence[QAExample],
    features: Sequence[QAFeature],
    start_logits: Sequence[Sequence[float]],
    end_logits: Sequence[Sequence[float]],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
    version_2: bool = False,
) -> dict[str, str]:
    """Answer text per example id from per-feature start/end logits (lists, arrays or CPU
    tensors, one row per feature, possibly padded).

    For each feature, the ``n_best`` highest start and end logits are paired; spans outside the
    context, ending before they start or longer than ``max_answer_length`` tokens are skipped, and
    the best span (highest start + end logit) over all of an example's features wins. With
    ``version_2`` the answer is ``""`` when the null score (``start[0] + end[0]``, lowest over the
    features) exceeds the best span's score by more than ``null_threshold``.
    """
    if not (len(features) == len(start_logits) == len(end_logits)):
        raise LmlabError(
            f"{len(features)} features but {len(start_logits)} start and {len(end_logits)} end logit rows; "
            "expected one row per feature"
        )
    by_example: dict[int, list[int]] = {}
    for f, feature in enumerate(features):
        by_example.setdefault(feature.example_index, []).append(f)

    predictions = {}
    for index, example in enumerate(examples):
        best_score, best_span, null_score = -math.inf, None, math.inf
        for f in by_example.get(index, []):
            offsets = features[f].offsets
            starts = np.asarray(start_logits[f], dtype=np.float64)[: len(offsets)]
            ends = np.asarray(end_logits[f], dtype=np.float64)[: len(offsets)]
            null_score = min(null_score, starts[0] + ends[0])
            best_ends = np.argsort(ends)[::-1][:n_best]
            for s in np.argsort(starts)[::-1][:n_best]:
                for e in best_ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = starts[s] + ends[e]
                    if score > best_score:
                        best_score, best_span = score, (offsets[s][0], offsets[e][1])
        if best_span is None or (version_2 and null_score - best_score > null_threshold):
            predictions[example.id] = ""
        else:
            predictions[example.id] = example.context[best_span[0] : best_span[1]].strip()
    return predictions


def encode_seq2seq(
    tokenizer: Tokenizer,
    data: Seq2SeqData,
    max_source_length: int,
    max_target_length: int,
    *,
    decoder_only: bool = False,
) -> dict[str, list[list[int]]]:
    """Token ids for sequence-to-sequence training.

    Encoder–decoder: ``input_ids`` is the source through the post-processor (:func:`encode_sources`),
    at most ``max_source_length`` tokens; ``labels`` the target, at most ``max_target_length`` tokens
    ending with eos. Decoder-only: ``input_ids`` is prompt + completion + eos in one sequence (the
    prompt's last ``max_source_length`` tokens — its end, where a cue such as "Answer:" sits, is what
    generation continues from —, completion + eos cut to ``max_target_length``) and ``labels`` equal
    it with ``IGNORE_INDEX`` on the prompt tokens, so only the completion is learnt. Labels line up
    with ``input_ids``; the loss shifts them.
    """
    eos_id = tokenizer.eos_id
    if eos_id is None:
        raise LmlabError("tokenizer has no eos token; expected one to end each target")
    _check_int("max_target_length", max_target_length, 2)
    backend = _task_backend(tokenizer)
    target_encodings = backend.encode_batch(data.targets, add_special_tokens=False)
    targets = [encoding.ids[: max_target_length - 1] + [eos_id] for encoding in target_encodings]
    if decoder_only:
        _check_int("max_source_length", max_source_length, 1)
        prompts = [e.ids[-max_source_length:] for e in backend.encode_batch(data.sources, add_special_tokens=False)]
        return {
            "input_ids": [prompt + target for prompt, target in zip(prompts, targets)],
            "labels": [[IGNORE_INDEX] * len(prompt) + target for prompt, target in zip(prompts, targets)],
        }
    return {"input_ids": encode_sources(tokenizer, data.sources, max_source_length), "labels": targets}


def encode_sources(tokenizer: Tokenizer, sources: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """An encoder–decoder's source ids: each text through the post-processor (``[CLS] src [SEP]``, or
    ``src eos`` for tokenizers that add no special tokens), cut to ``max_length`` tokens keeping the
    special tokens (``None``: not cut). Training and generation both encode sources this way."""
    backend = _task_backend(tokenizer)
    if max_length is not None:
        _check_int("max_source_length", max_length, backend.num_special_tokens_to_add(False) + 1)
        backend.enable_truncation(max_length)
    return [e.ids for e in backend.encode_batch(list(sources), add_special_tokens=True)]


# ------------------------------------------------------------------------------------------- chat
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class ChatData:
    """Conversations as message lists (``{"role": ..., "content": ...}``), each with its source line."""

    conversations: list[list[dict[str, str]]]
    lines: list[int] = field(default_factory=list)
    path: Path | None = None


def _chat_messages(record: Mapping[str, Any], at: str) -> list[dict[str, str]]:
    """One record's conversation: its ``messages``, or a ``prompt`` with a ``response`` (or ``completion``)."""
    if "messages" not in record:
        reply = next((name for name in ("response", "completion") if name in record), None)
        if "prompt" not in record or reply is None:
            present = ", ".join(map(repr, record)) or "none"
            raise LmlabError(
                f"{at}: no conversation (fields present: {present}); expected 'messages', or 'prompt' with 'response' "
                "(or 'completion')"
            )
        return [
            {"role": "user", "content": _field(record, "prompt", at)},
            {"role": "assistant", "content": _field(record, reply, at)},
        ]
    messages = _field(record, "messages", at, list)
    if not messages:
        raise LmlabError(f"{at}: empty 'messages'; expected a conversation with at least one assistant message")
    out = []
    for index, message in enumerate(messages):
        where = f"{at}: message {index}"
        if not isinstance(message, dict):
            raise LmlabError(f"{where} is {message!r}; expected an object with 'role' and 'content'")
        role = _field(message, "role", where)
        if role not in CHAT_ROLES:
            raise LmlabError(f"{where}: unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        out.append({"role": role, "content": _field(message, "content", where)})
    if not any(m["role"] == "assistant" for m in out):
        raise LmlabError(f"{at}: no assistant message; expected at least one to train on")
    if out[0]["role"] == "assistant":
        raise LmlabError(
            f"{at}: message 0 is an assistant message; expected a system or user message before the first reply"
        )
    return out


def read_chat(path: str | Path) -> ChatData:
    """Read a ``.jsonl`` file of conversations, one per line: ``{"messages": [{"role": "system" | "user" |
    "assistant", "content": "…"}, …]}`` (OpenAI's fine-tuning format) or ``{"prompt": …, "response": …}``
    (or ``"completion"``), read as one user message and its reply."""
    path, text = _read_text(path, "a JSONL file of conversations")
    if path.suffix.lower() != ".jsonl":
        raise LmlabError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl")
    conversations, lines = [], []
    for number, record in _jsonl_records(path, text):
        conversations.append(_chat_messages(record, f"{path}:{number}"))
        lines.append(number)
    return ChatData(conversations=conversations, lines=lines, path=path)


def encode_conversation(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], template: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered by the chat ``template`` (default: the tokenizer's, see
    :mod:`lmlab.templates`), and labels that equal them on the assistant messages — each one's text through
    its end-of-turn marker — and are ``IGNORE_INDEX`` everywhere else.

    The spans are found prefix-wise, as TRL's SFT trainer finds a completion: the conversation up to an
    assistant message rendered with the generation prompt, and up to the end of that message, must be
    prefixes of the whole rendering, as text and as token ids. A template that renders earlier turns
    differently, or a tokenizer that merges text across a turn boundary, fails that check and raises
    rather than train on misplaced labels."""
    from lmlab.templates import chat_template, end_of_turn, render

    template = template if template is not None else chat_template(tokenizer)
    marker = end_of_turn(tokenizer, template)
    whole = render(tokenizer, messages, template=template)
    ids = tokenizer.encode(whole)
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], add_generation_prompt=True, template=template)
        through = render(tokenizer, messages[: index + 1], template=template)
        if not (through.startswith(before) and whole.startswith(through)):
            raise LmlabError(
                f"message {index}: the chat template does not render this conversation prefix-wise; expected the "
                "conversation up to each assistant message to render as the start of the whole one"
            )
        found = through.rfind(marker, len(before))
        end = found + len(marker) if found >= 0 else len(through)
        start_ids, end_ids = tokenizer.encode(before), tokenizer.encode(through[:end])
        if ids[: len(start_ids)] != start_ids or ids[: len(end_ids)] != end_ids:
            raise LmlabError(
                f"message {index}: the tokenizer merges text across the start or end of this assistant message; "
                "expected "
                "the tokens of the conversation up to it to be a prefix of the whole conversation's tokens"
            )
        labels[len(start_ids) : len(end_ids)] = ids[len(start_ids) : len(end_ids)]
    return ids, labels


def encode_chat(
    tokenizer: Tokenizer, data: ChatData, max_length: int, template: str | None = None
) -> dict[str, list[list[int]]]:
    """:func:`encode_conversation` of every conversation, cut to its first ``max_length`` tokens; a
    conversation must keep an assistant token past its first token (the loss predicts each token from
    those before it)."""
    _check_int("max_length", max_length, 2)
    input_ids, labels = [], []
    for index, messages in enumerate(data.conversations):
        at = _where(data.path, data.lines, index)
        try:
            ids, marks = encode_conversation(tokenizer, messages, template)
        except LmlabError as err:
            raise LmlabError(f"{at}: {err}") from None
        ids, marks = ids[:max_length], marks[:max_length]
        if all(mark == IGNORE_INDEX for mark in marks[1:]):
            raise LmlabError(
                f"{at}: no assistant token within the first {max_length} tokens; expected max_length to reach "
                "an assistant reply (raise it, or shorten the conversation)",
                params="max_length",
            )
        input_ids.append(ids)
        labels.append(marks)
    return {"input_ids": input_ids, "labels": labels}
