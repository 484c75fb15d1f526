"""Corpus reading: formats, byte-exact text, cleaning, deterministic splits, errors."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmlab.data import (
    builtin_corpus,
    document_split,
    expand_inputs,
    iter_documents,
    read_corpus,
    split_documents,
)
from lmlab.errors import LmlabError

CHINESE = "大语言模型是一种基于深度学习的自然语言处理技术。\r\n第二行\t制表符 🤖\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------------- formats
def test_txt_file_is_one_document(tmp_path):
    path = write(tmp_path / "a.txt", "line one\n\nline two\n")
    assert list(iter_documents(path)) == ["line one\n\nline two\n"]


def test_jsonl_reads_custom_field_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"body": "first"}\n\n{"body": "second", "id": 2}\n')
    assert list(iter_documents(path, text_field="body")) == ["first", "second"]


def test_json_array_file(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"text": "one"}, {"text": "two"}]))
    assert list(iter_documents(path)) == ["one", "two"]


def test_csv_reads_named_column_with_embedded_newlines(tmp_path):
    path = write(tmp_path / "a.csv", 'id,content\n1,"hello, world"\n2,"multi\r\nline"\n')
    assert list(iter_documents(path, column="content")) == ["hello, world", "multi\r\nline"]


def test_tsv_uses_text_field_as_default_column(tmp_path):
    path = write(tmp_path / "a.tsv", "text\tlabel\nfirst doc\tA\nsecond doc\tB\n")
    assert list(iter_documents(path)) == ["first doc", "second doc"]


def test_parquet_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["alpha", CHINESE]}), path)
    assert list(iter_documents(path)) == ["alpha", CHINESE]


def test_folder_is_expanded_recursively_sorted_and_skips_hidden_and_unknown(tmp_path):
    write(tmp_path / "b.txt", "b")
    write(tmp_path / "sub" / "a.md", "a")
    write(tmp_path / "notes.bin", "x")
    write(tmp_path / ".hidden" / "c.txt", "c")
    assert expand_inputs(tmp_path) == [tmp_path / "b.txt", tmp_path / "sub" / "a.md"]


def test_glob_with_double_star_and_dedup_of_repeated_inputs(tmp_path):
    write(tmp_path / "x" / "1.txt", "1")
    write(tmp_path / "x" / "y" / "2.txt", "2")
    write(tmp_path / "x" / "y" / "3.jsonl", '{"text": "3"}\n')
    found = expand_inputs([str(tmp_path / "x" / "**" / "*.txt"), tmp_path / "x" / "1.txt"])
    assert found == [tmp_path / "x" / "1.txt", tmp_path / "x" / "y" / "2.txt"]


def test_read_corpus_mixes_formats_in_sorted_file_order(tmp_path):
    write(tmp_path / "b.jsonl", '{"text": "from jsonl"}\n')
    write(tmp_path / "a.txt", "from txt")
    assert read_corpus(tmp_path) == ["from txt", "from jsonl"]


def test_utf8_bom_does_not_hide_the_first_column_or_record(tmp_path):
    csv_path = write(tmp_path / "a.csv", "\ufefftext,id\nhello,1\n")
    jsonl_path = write(tmp_path / "a.jsonl", '\ufeff{"text": "hi"}\n')
    assert list(iter_documents(csv_path)) == ["hello"]
    assert list(iter_documents(jsonl_path)) == ["hi"]


# ---------------------------------------------------------------------------- text fidelity
def test_chinese_and_crlf_round_trip_byte_exactly(tmp_path):
    path = write(tmp_path / "zh.txt", CHINESE)
    write(tmp_path / "zh.jsonl", json.dumps({"text": CHINESE}, ensure_ascii=False) + "\n")
    docs = read_corpus([path], dedup=False) + read_corpus([tmp_path / "zh.jsonl"])
    assert [doc.encode("utf-8") for doc in docs] == [CHINESE.encode("utf-8")] * 2


def test_nfkc_normalization_is_opt_in(tmp_path):
    write(tmp_path / "a.txt", "ｆｕｌｌｗｉｄｔｈ ﬁ ①")
    assert read_corpus(tmp_path) == ["ｆｕｌｌｗｉｄｔｈ ﬁ ①"]
    assert read_corpus(tmp_path, normalize="NFKC") == [unicodedata.normalize("NFKC", "ｆｕｌｌｗｉｄｔｈ ﬁ ①")]
    assert read_corpus(tmp_path, normalize="NFKC") == ["fullwidth fi 1"]


def test_unknown_normalization_names_the_option(tmp_path):
    write(tmp_path / "a.txt", "x")
    with pytest.raises(LmlabError, match="normalize"):
        read_corpus(tmp_path, normalize="nfkc")


def test_dedup_keeps_first_and_drops_whitespace_only(tmp_path):
    lines = ["same", "other", "same", "   \n", "", "other"]
    write(tmp_path / "a.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in lines))
    assert read_corpus(tmp_path) == ["same", "other"]
    assert read_corpus(tmp_path, dedup=False) == ["same", "other", "same", "other"]
    with pytest.raises(LmlabError, match="empty corpus"):
        read_corpus(tmp_path, min_chars=6)


# ------------------------------------------------------------------------------------ splits
DOCS = [f"document number {i}" for i in range(400)]


def test_split_is_deterministic_and_partitions_documents():
    train, valid = split_documents(DOCS, valid_fraction=0.1, seed=3)
    assert (train, valid) == split_documents(list(DOCS), valid_fraction=0.1, seed=3)
    assert sorted(train + valid) == sorted(DOCS)
    assert 20 <= len(valid) <= 60  # ~40 expected
    assert split_documents(DOCS, valid_fraction=0.1, seed=4) != (train, valid)


def test_a_documents_split_does_not_depend_on_other_documents():
    _, valid_all = split_documents(DOCS, valid_fraction=0.1)
    _, valid_half = split_documents(DOCS[::2], valid_fraction=0.1)
    assert set(valid_half) == set(valid_all) & set(DOCS[::2])


def test_split_guarantees_one_validation_and_one_training_document():
    train, valid = split_documents(["a", "b"], valid_fraction=0.001)
    assert len(train) == 1 and len(valid) == 1
    train, valid = split_documents(["a", "b", "c"], valid_fraction=0.999)
    assert len(train) == 1 and len(valid) == 2
    assert split_documents(["only"], valid_fraction=0.5) == (["only"], [])
    assert split_documents(["a", "b"], valid_fraction=0.0) == (["a", "b"], [])


def test_document_split_is_the_hash_split_when_fair_and_none_when_not():
    in_valid = document_split(DOCS, valid_fraction=0.1, seed=3)
    assert [doc for doc, valid in zip(DOCS, in_valid) if valid] == split_documents(DOCS, valid_fraction=0.1, seed=3)[1]
    assert document_split(["only one document"], valid_fraction=0.1) is None  # one side would be empty
    assert document_split(["a", "b", "c"], valid_fraction=0.05) is None  # a third held out, not 5%
    assert document_split(["a long document " * 100] + DOCS[:20], valid_fraction=0.1, seed=3) is None  # one weighs all
    assert document_split(["only one document"], valid_fraction=0.0) == [False]  # nothing asked, nothing held out


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2])
def test_split_rejects_fraction_outside_unit_interval(fraction):
    with pytest.raises(LmlabError, match="valid_fraction"):
        split_documents(DOCS, valid_fraction=fraction)


# ------------------------------------------------------------------------------------ errors
def test_missing_file_is_named(tmp_path):
    with pytest.raises(LmlabError, match="nope.txt"):
        expand_inputs(tmp_path / "nope.txt")


def test_glob_without_match_is_named(tmp_path):
    with pytest.raises(LmlabError, match=r"\*\.jsonl.*matched no files"):
        expand_inputs(str(tmp_path / "*.jsonl"))


def test_explicit_file_with_unknown_extension_is_rejected(tmp_path):
    with pytest.raises(LmlabError, match=r"data\.bin.*expected one of"):
        expand_inputs(write(tmp_path / "data.bin", "x"))


def test_missing_jsonl_field_names_file_line_and_field(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(LmlabError, match=r"a\.jsonl:2: missing field 'text'"):
        read_corpus(path)


def test_invalid_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(LmlabError, match=r"a\.jsonl:2: invalid JSON"):
        read_corpus(path)


def test_missing_csv_column_lists_available_columns(tmp_path):
    path = write(tmp_path / "a.csv", "id,body\n1,x\n")
    with pytest.raises(LmlabError, match=r"missing column 'text'; available columns: 'id', 'body'"):
        read_corpus(path)


def test_missing_parquet_column_lists_available_columns(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(LmlabError, match=r"a\.parquet: missing column 'text'; available columns: 'body'"):
        read_corpus(path)


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good start \xff\xfe bad")
    with pytest.raises(LmlabError, match=r"bad\.txt: invalid byte at offset 11: expected UTF-8"):
        read_corpus(path)
    lines = tmp_path / "bad.jsonl"
    lines.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(LmlabError, match=r"bad\.jsonl:2: invalid byte at offset 25"):
        read_corpus(lines)


def test_empty_corpus_names_the_inputs(tmp_path):
    write(tmp_path / "blank.txt", " \n\t\n")
    with pytest.raises(LmlabError, match=r"empty corpus: .*held no text"):
        read_corpus(tmp_path)


# --------------------------------------------------------------------------- builtin corpus
def test_builtin_corpus_is_large_deterministic_english_text():
    docs = builtin_corpus()
    assert sum(map(len, docs)) >= 1_000_000
    assert all(len(doc) >= 200 for doc in docs)
    assert len(set(docs)) == len(docs)
    assert builtin_corpus() == docs
    assert any(doc.startswith('The "assert" statement') for doc in docs)


def test_builtin_corpus_max_chars_keeps_a_prefix():
    docs = builtin_corpus()
    small = builtin_corpus(max_chars=50_000)
    assert small == docs[: len(small)]
    assert 0 < sum(map(len, small)) <= 50_000
