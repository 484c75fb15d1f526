"""Task data: readers for classify/tag/qa/seq2seq files, their errors, and the feature builders."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from lmlab.data.tasks import (
    ClassifyData,
    QAExample,
    Seq2SeqData,
    align_tags,
    check_labels,
    check_tags,
    encode_classify,
    encode_seq2seq,
    qa_features,
    qa_postprocess,
    read_classify,
    read_seq2seq,
    read_squad,
    read_tags,
    tags_from_predictions,
)
from lmlab.errors import LmlabError
from lmlab.objectives import IGNORE_INDEX
from lmlab.tokenizer import train_tokenizer

NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Elena", "Farid"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo"]
THINGS = ["a red bicycle", "the old library", "seven green apples", "a quiet garden", "two blue boats"]
TEMPLATES = [
    "{n} travelled to {c} with {t}.",
    "In {c}, {n} found {t} near the river.",
    "{n} said that {t} was sold in {c} yesterday.",
]
LONG_WORD = "bicyclelibrarygarden"  # letters of the corpus, never seen as one word: several sub-tokens


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [tpl.format(n=n, c=c, t=t) for tpl, n, c, t in itertools.product(TEMPLATES, NAMES, CITIES, THINGS)]


@pytest.fixture(scope="module")
def tokenizers_by_kind(corpus):
    return {
        "wordpiece": train_tokenizer(corpus, kind="wordpiece", vocab_size=400),
        "bpe": train_tokenizer(corpus, kind="bpe", vocab_size=400),
        "unigram": train_tokenizer(corpus, kind="unigram", vocab_size=450),
    }


@pytest.fixture(scope="module")
def wordpiece(tokenizers_by_kind):
    return tokenizers_by_kind["wordpiece"]


@pytest.fixture(scope="module")
def bpe(tokenizers_by_kind):
    return tokenizers_by_kind["bpe"]


# ----------------------------------------------------------------------------- read_classify
def test_jsonl_single_label_with_integer_labels_sorted_numerically(tmp_path):
    records = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 1}]
    path = jsonl(tmp_path / "train.jsonl", records)
    data = read_classify(path)
    assert data.kind == "single"
    assert data.labels == ["10", "2", "1"]
    assert data.label_names == ["1", "2", "10"]
    assert data.lines == [1, 2, 3] and data.pairs is None


def test_csv_with_pair_field_quoted_commas_and_multiline_rows(tmp_path):
    path = write(
        tmp_path / "nli.csv",
        'premise,hypothesis,label\n"Bob, in Paris",Bob travels,entail\n"two\nlines",Alice sleeps,contradict\n',
    )
    data = read_classify(path, text_field="premise", pair_field="hypothesis")
    assert data.texts == ["Bob, in Paris", "two\nlines"]
    assert data.pairs == ["Bob travels", "Alice sleeps"]
    assert data.label_names == ["contradict", "entail"]
    assert data.lines == [2, 3]


def test_tsv_keeps_quotes_verbatim(tmp_path):
    path = write(tmp_path / "sst.tsv", 'sentence\tlabel\n"charming , if unbalanced\tpos\n"good" at all\tneg\n')
    data = read_classify(path, text_field="sentence")
    assert data.texts == ['"charming , if unbalanced', '"good" at all']
    assert data.labels == ["pos", "neg"] and data.lines == [2, 3]


def test_lists_of_labels_are_multi_label_in_jsonl_and_csv(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": ["sport", "news"]}, {"text": "b", "label": []}])
    data = read_classify(path)
    assert data.kind == "multi"
    assert data.labels == [["news", "sport"], []]
    assert data.label_names == ["news", "sport"]
    csv_path = write(tmp_path / "m.csv", 'text,label\na,"[""x"", ""y""]"\nb,"[""y""]"\n')
    assert read_classify(csv_path).labels == [["x", "y"], ["y"]]


def test_floats_make_regression_and_integers_join_them(tmp_path):
    path = jsonl(tmp_path / "sts.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": 4}])
    data = read_classify(path)
    assert data.kind == "regression" and data.labels == [0.5, 4.0] and data.label_names == []
    csv_path = write(tmp_path / "sts.csv", "text,label\na,3\nb,2.25\n")
    assert read_classify(csv_path).labels == [3.0, 2.25]


def test_forced_kind_reads_integer_scores_as_regression(tmp_path):
    path = jsonl(tmp_path / "valid.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 3}])
    assert read_classify(path).kind == "single"
    data = read_classify(path, kind="regression")
    assert data.kind == "regression" and data.labels == [1.0, 3.0]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", "\n\n", "empty.jsonl: empty file"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n', "bad.jsonl:2: invalid JSON"),
        ("missing.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n', "missing.jsonl:3: missing field 'label'"),
        ("notext.jsonl", '{"text": 5, "label": "x"}\n', "notext.jsonl:1: field 'text' is 5; expected str"),
        ("null.jsonl", '{"text": "a", "label": null}\n', "null.jsonl:1: field 'label' is null"),
        ("mixed.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": "y"}\n', "mixed.jsonl:2: label 'y'"),
        ("mixed2.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": 0.5}\n', "mixed2.jsonl:1: label 'pos'"),
        ("nan.jsonl", '{"text": "a", "label": NaN}\n', "nan.jsonl:1: label nan; expected a finite number"),
        ("row.csv", "text,label\na,x\nb,y,extra\n", "row.csv:3: row has 3 fields; expected 2"),
        ("header.csv", "text,label\n", "header.csv: no examples"),
        ("list.csv", "text,label\na,[x\n", "list.csv:2: label '[x' is not a JSON list"),
        ("data.xml", "<a/>", "data.xml: unknown file type '.xml'"),
    ],
)
def test_classify_errors_name_file_and_line(tmp_path, name, content, expected):
    path = write(tmp_path / name, content)
    with pytest.raises(LmlabError) as err:
        read_classify(path)
    assert str(err.value).startswith(str(tmp_path / expected))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(LmlabError, match=r"latin1\.jsonl:2: invalid byte 0xe9: expected UTF-8"):
        read_classify(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(LmlabError, match=r"nope\.jsonl: no such file"):
        read_classify(tmp_path / "nope.jsonl")


def test_check_labels_rejects_unseen_label_with_file_line_and_known_labels(tmp_path):
    train = read_classify(jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}]))
    valid_path = jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(LmlabError) as err:
        check_labels(read_classify(valid_path), train.label_names, valid_path)
    assert str(err.value) == f"{valid_path}:2: label 'meh' is not in the training data; known labels: 'neg', 'pos'"


def test_check_labels_returns_the_training_names_and_rejects_a_kind_mismatch(tmp_path):
    valid_path = jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": "pos"}])
    valid = check_labels(read_classify(valid_path), ["neg", "pos"], valid_path)
    assert valid.label_names == ["neg", "pos"]  # "pos" keeps id 1, as in training
    with pytest.raises(LmlabError, match="labels are class labels; expected regression scores"):
        check_labels(read_classify(valid_path), [], valid_path)


# ---------------------------------------------------------------------------------- read_tags
CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_skips_docstart_and_takes_the_last_column(tmp_path):
    data = read_tags(write(tmp_path / "train.conll", CONLL))
    assert data.words == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert data.tags == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
    assert data.scheme == "bio"
    assert data.tag_names == ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert data.lines == [[3, 4, 5, 6], [8, 9]]


def test_iob1_entity_initial_i_becomes_b(tmp_path):
    text = "Peter I-PER\nPaul I-PER\nMary B-PER\nin O\nOslo I-LOC\nCity I-LOC\n"
    data = read_tags(write(tmp_path / "iob1.txt", text))
    assert data.scheme == "iob1"
    assert data.tags == [["B-PER", "I-PER", "B-PER", "O", "B-LOC", "I-LOC"]]


def test_iobes_single_and_end_tags_become_b_and_i(tmp_path):
    text = "Bob\tS-PER\nvisited\tO\nNew\tB-LOC\nYork\tI-LOC\nCity\tE-LOC\n"
    data = read_tags(write(tmp_path / "iobes.conll", text))
    assert data.scheme == "iobes"
    assert data.tags == [["B-PER", "O", "B-LOC", "I-LOC", "I-LOC"]]
    assert data.tag_names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_jsonl_tags_and_plain_scheme_for_pos_tags(tmp_path):
    path = jsonl(tmp_path / "pos.jsonl", [{"tokens": ["Bob", "runs"], "tags": ["NNP", "VBZ"]}])
    with pytest.raises(LmlabError, match=r"pos\.jsonl:1: tag 'NNP' is not O or PREFIX-TYPE"):
        read_tags(path)
    data = read_tags(path, scheme="plain")
    assert data.tags == [["NNP", "VBZ"]] and data.tag_names == ["NNP", "VBZ"] and data.lines == [[1, 1]]


@pytest.mark.parametrize(
    ("name", "content", "scheme", "expected"),
    [
        ("one.conll", "EU B-ORG\nrejects\n", None, "one.conll:2: found 1 column ('rejects')"),
        ("tag.conll", "EU B-ORG\n\nPeter PER\n", None, "tag.conll:3: tag 'PER' is not O or PREFIX-TYPE"),
        ("s.conll", "Bob S-PER\n", "bio", "s.conll:1: tag 'S-PER' is IOBES"),
        (
            "len.jsonl",
            '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
            None,
            "len.jsonl:2: 2 tokens but 1 tags",
        ),
        ("empty.conll", "-DOCSTART- O\n\n", None, "empty.conll: no sentences"),
        ("blank.conll", " \n", None, "blank.conll: empty file"),
    ],
)
def test_tag_errors_name_file_and_line(tmp_path, name, content, scheme, expected):
    path = write(tmp_path / name, content)
    with pytest.raises(LmlabError) as err:
        read_tags(path, scheme=scheme)
    assert str(err.value).startswith(str(tmp_path / expected))


def test_check_tags_rejects_unseen_tag_with_file_line(tmp_path):
    train = read_tags(write(tmp_path / "train.conll", CONLL))
    valid_path = write(tmp_path / "valid.conll", "Bob B-PER\nin O\nOslo B-LOC\n")
    with pytest.raises(LmlabError, match=r"valid\.conll:3: tag 'B-LOC' is not in the training data; known tags: 'O'"):
        check_tags(read_tags(valid_path), train.tag_names, valid_path)
    ok = check_tags(read_tags(write(tmp_path / "ok.conll", "Bob B-PER\n")), train.tag_names, valid_path)
    assert ok.tag_names == train.tag_names


# --------------------------------------------------------------------------------- read_squad
CONTEXT = "Alice travelled to Paris with a red bicycle."


def squad(qas: list[dict], context: str = CONTEXT, version: str = "v2.0") -> dict:
    return {"version": version, "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_squad_v1_reads_every_answer(tmp_path):
    path = write(
        tmp_path / "v1.json",
        json.dumps(
            squad(
                [
                    {
                        "id": "q1",
                        "question": "Where?",
                        "answers": [{"text": "Paris", "answer_start": 19}, {"text": "to Paris", "answer_start": 16}],
                    },
                ],
                version="1.1",
            )
        ),
    )
    examples = read_squad(path)
    assert len(examples) == 1 and not examples.version_2
    ex = examples[0]
    assert (ex.id, ex.question, ex.context, ex.title) == ("q1", "Where?", CONTEXT, "T")
    assert ex.answer_texts == ["Paris", "to Paris"] and ex.answer_starts == [19, 16] and not ex.is_impossible


def test_squad_v2_flags_unanswerable_questions(tmp_path):
    path = write(
        tmp_path / "v2.json",
        json.dumps(
            squad(
                [
                    {
                        "id": "a",
                        "question": "Who?",
                        "answers": [{"text": "Alice", "answer_start": 0}],
                        "is_impossible": False,
                    },
                    {
                        "id": "b",
                        "question": "When?",
                        "answers": [],
                        "is_impossible": True,
                        "plausible_answers": [{"text": "Paris", "answer_start": 19}],
                    },
                ]
            )
        ),
    )
    examples = read_squad(path)
    assert examples.version_2
    assert [ex.is_impossible for ex in examples] == [False, True]
    assert examples[1].answer_texts == [] and examples[1].answer_starts == []


def test_squad_answer_not_at_answer_start_names_the_question_and_what_is_there(tmp_path):
    path = write(
        tmp_path / "bad.json",
        json.dumps(
            squad(
                [
                    {"id": "q7", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 18}]},
                ]
            )
        ),
    )
    with pytest.raises(LmlabError) as err:
        read_squad(path)
    assert str(err.value).startswith(
        f"{path}: question 'q7': answer 'Paris' at answer_start 18, but the context there reads ' Pari'"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"data": [\n  {"title": "x",\n  }]}', "bad.json:3: invalid JSON"),
        ('{"version": "1.1"}', "bad.json: expected a JSON object with a 'data' list"),
        (json.dumps(squad([{"id": "q2", "answers": []}])), "bad.json: question 'q2': missing field 'question'"),
        (json.dumps(squad([{"id": "q3", "question": "?", "answers": []}])), "bad.json: question 'q3': no answers"),
        (json.dumps(squad([])), "bad.json: no questions"),
    ],
)
def test_squad_errors(tmp_path, content, expected):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(LmlabError) as err:
        read_squad(path)
    assert str(err.value).startswith(str(tmp_path / expected))


# ------------------------------------------------------------------------------ read_seq2seq
def test_seq2seq_reads_source_target_and_prompt_completion(tmp_path):
    path = jsonl(
        tmp_path / "s.jsonl",
        [
            {"source": "hello", "target": "bonjour"},
            {"prompt": "Q: hi\nA:", "completion": " hello"},
        ],
    )
    data = read_seq2seq(path)
    assert data.sources == ["hello", "Q: hi\nA:"] and data.targets == ["bonjour", " hello"] and data.lines == [1, 2]
    custom = read_seq2seq(jsonl(tmp_path / "c.jsonl", [{"en": "a", "fr": "b"}]), source_field="en", target_field="fr")
    assert custom.sources == ["a"] and custom.targets == ["b"]


def test_seq2seq_missing_field_names_file_line_and_both_spellings(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", [{"source": "a", "target": "b"}, {"source": "a", "answer": "b"}])
    with pytest.raises(LmlabError, match=r"s\.jsonl:2: missing field 'target' .*'prompt' and 'completion'"):
        read_seq2seq(path)


# ---------------------------------------------------------------------------- encode_classify
def test_wordpiece_pair_gets_cls_sep_template_and_type_ids(wordpiece):
    data = ClassifyData(
        texts=["Alice travelled"], pairs=["to Paris"], labels=["b"], kind="single", label_names=["a", "b"]
    )
    out = encode_classify(wordpiece, data, max_length=64)
    a, b = wordpiece.encode("Alice travelled"), wordpiece.encode("to Paris")
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    assert out["input_ids"] == [[cls, *a, sep, *b, sep]]
    assert out["token_type_ids"] == [[0] * (len(a) + 2) + [1] * (len(b) + 1)]
    assert out["labels"] == [1]


def test_decoder_tokenizer_gets_eos_between_the_pair_and_at_the_end(bpe):
    data = ClassifyData(texts=["Alice travelled"], pairs=["to Paris"], labels=[0.5], kind="regression", label_names=[])
    out = encode_classify(bpe, data, max_length=64)
    a, b = bpe.encode("Alice travelled"), bpe.encode("to Paris")
    assert out["input_ids"] == [[*a, bpe.eos_id, *b, bpe.eos_id]]
    assert out["token_type_ids"] == [[0] * (len(a) + 1) + [1] * (len(b) + 1)]
    assert out["labels"] == [0.5]


def test_truncation_keeps_the_special_tokens_and_multi_labels_are_multi_hot(bpe, corpus):
    long_text = " ".join(corpus[:20])
    data = ClassifyData(texts=[long_text, "Bob"], labels=[["x", "z"], []], kind="multi", label_names=["x", "y", "z"])
    out = encode_classify(bpe, data, max_length=16)
    assert len(out["input_ids"][0]) == 16 and out["input_ids"][0][-1] == bpe.eos_id
    assert out["input_ids"][0][:15] == bpe.encode(long_text)[:15]
    assert out["labels"] == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_encode_classify_rejects_a_label_outside_label_names(bpe, tmp_path):
    data = ClassifyData(
        texts=["a"], labels=["zzz"], kind="single", label_names=["x"], lines=[4], path=tmp_path / "v.jsonl"
    )
    with pytest.raises(LmlabError, match=r"v\.jsonl:4: label 'zzz' is not among the label names"):
        encode_classify(bpe, data, max_length=8)


# ---------------------------------------------------------------------------------- align_tags
@pytest.fixture(scope="module")
def tag_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tags") / "t.conll"
    write(path, f"Alice B-PER\ntravelled O\nto O\n{LONG_WORD} B-LOC\nCity I-LOC\n.\tO\n\nBob B-PER\n")
    return read_tags(path)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_align_tags_labels_exactly_the_first_sub_token_of_each_word(tokenizers_by_kind, tag_data, kind):
    tok = tokenizers_by_kind[kind]
    tag_to_id = {tag: i for i, tag in enumerate(tag_data.tag_names)}
    out = align_tags(tok, tag_data, tag_to_id, max_length=64)
    word_ids, labels = out["word_ids"][0], out["labels"][0]
    long_word_tokens = [t for t, w in enumerate(word_ids) if w == 3]
    assert len(long_word_tokens) > 1  # the check below needs a word split into several sub-tokens
    assert labels[long_word_tokens[0]] == tag_to_id["B-LOC"]
    assert all(labels[t] == IGNORE_INDEX for t in long_word_tokens[1:])
    firsts = [t for t, w in enumerate(word_ids) if w is not None and w not in word_ids[:t]]
    expected = [tag_to_id[tag_data.tags[0][word_ids[t]]] if t in firsts else IGNORE_INDEX for t in range(len(word_ids))]
    assert labels == expected
    assert len(firsts) == len(tag_data.words[0])


def test_align_tags_tokenizes_words_as_in_running_text(bpe, wordpiece, tag_data):
    tag_to_id = {tag: i for i, tag in enumerate(tag_data.tag_names)}
    sentence = " ".join(tag_data.words[0])
    assert align_tags(bpe, tag_data, tag_to_id, 64)["input_ids"][0] == bpe.encode(sentence) + [bpe.eos_id]
    wordpiece_ids = align_tags(wordpiece, tag_data, tag_to_id, 64)["input_ids"][0]
    assert wordpiece_ids == wordpiece.encode(sentence, add_special_tokens=True)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_tags_from_predictions_round_trips_gold_labels(tokenizers_by_kind, tag_data, kind):
    tok = tokenizers_by_kind[kind]
    tag_to_id = {tag: i for i, tag in enumerate(tag_data.tag_names)}
    out = align_tags(tok, tag_data, tag_to_id, max_length=64)
    for s, (labels, word_ids) in enumerate(zip(out["labels"], out["word_ids"])):
        # Non-first sub-tokens predict something else: only the first sub-token may count.
        preds = [label if label != IGNORE_INDEX else tag_to_id["I-PER"] for label in labels] + [0, 0]  # + padding
        assert tags_from_predictions(preds, word_ids, tag_data.tag_names) == tag_data.tags[s]


def test_words_cut_by_truncation_are_predicted_o(wordpiece, tag_data):
    tag_to_id = {tag: i for i, tag in enumerate(tag_data.tag_names)}
    out = align_tags(wordpiece, tag_data, tag_to_id, max_length=4)  # [CLS] Alice travelled [SEP]
    assert len(out["input_ids"][0]) == 4 and out["word_ids"][0] == [None, 0, 1, None]
    preds = [label if label != IGNORE_INDEX else 0 for label in out["labels"][0]]
    words = tags_from_predictions(preds, out["word_ids"][0], tag_data.tag_names, n_words=len(tag_data.words[0]))
    assert words == ["B-PER", "O", "O", "O", "O", "O"]
    assert len(words) == len(tag_data.words[0])


def test_align_tags_rejects_a_tag_missing_from_tag_to_id(wordpiece, tag_data):
    with pytest.raises(LmlabError, match=r"t\.conll:1: tag 'B-PER' is not in tag_to_id"):
        align_tags(wordpiece, tag_data, {"O": 0}, max_length=32)


# ---------------------------------------------------------------------------------------- qa
def long_qa_examples(corpus) -> list[QAExample]:
    filler = " ".join(corpus[::7][:12])
    context = filler + " The prize was hidden by Elena in Osaka under seven green apples."
    answer = "seven green apples"
    start = context.rindex(answer)
    return [
        QAExample(
            id="late",
            question="Where was the prize hidden?",
            context=context,
            answer_texts=[answer],
            answer_starts=[start],
        ),
        QAExample(id="early", question="Who travelled?", context=CONTEXT, answer_texts=["Alice"], answer_starts=[0]),
        QAExample(id="none", question="Why?", context=CONTEXT, answer_texts=[], answer_starts=[], is_impossible=True),
    ]


def squash(text: str) -> str:
    return "".join(text.split()).lower()


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_late_answer_lands_in_a_later_window_at_the_right_tokens(tokenizers_by_kind, corpus, kind):
    tok = tokenizers_by_kind[kind]
    examples = long_qa_examples(corpus)
    features = qa_features(tok, examples, max_length=64, doc_stride=16, max_query_length=16)
    late = [f for f in features if f.example_index == 0]
    assert len(late) > 2
    assert all(len(f.input_ids) <= 64 for f in features)
    hits = [i for i, f in enumerate(late) if f.start_position > 0]
    assert hits and hits[0] > 0  # not in the first window
    for i, f in enumerate(late):
        if i not in hits:
            assert (f.start_position, f.end_position) == (0, 0)
        else:
            answer_ids = f.input_ids[f.start_position : f.end_position + 1]
            assert squash(tok.decode(answer_ids)) == squash("seven green apples")
            assert all(f.offsets[t] is not None for t in range(f.start_position, f.end_position + 1))
            # Offsets are trimmed of the leading space byte-level and Metaspace tokens carry.
            span = examples[0].context[f.offsets[f.start_position][0] : f.offsets[f.end_position][1]]
            assert span == "seven green apples"
            assert f.token_type_ids[f.start_position] == 1


def test_answer_positions_cover_every_byte_token_of_non_ascii_characters(bpe):
    context = "Alice found a café in Zürich-Ost near 大阪 today."
    answers = ["Zürich-Ost", "café", "大阪"]
    examples = [
        QAExample(id=a, question="Where?", context=context, answer_texts=[a], answer_starts=[context.index(a)])
        for a in answers
    ]
    for example, feature in zip(examples, qa_features(bpe, examples, max_length=64, doc_stride=8, max_query_length=8)):
        answer_ids = feature.input_ids[feature.start_position : feature.end_position + 1]
        assert bpe.decode(answer_ids).strip() == example.answer_texts[0]


def test_qa_windows_overlap_by_doc_stride_and_repeat_the_question(wordpiece, corpus):
    example = long_qa_examples(corpus)[0]
    features = qa_features(wordpiece, [example], max_length=64, doc_stride=16, max_query_length=16)
    question = wordpiece.encode(example.question)
    spans = []
    for f in features:
        assert f.input_ids[: len(question) + 2] == [wordpiece.bos_id, *question, wordpiece.eos_id]
        context_tokens = [t for t, span in enumerate(f.offsets) if span is not None]
        spans.append([f.offsets[t] for t in context_tokens])
    for previous, current in zip(spans, spans[1:]):
        assert previous[-16:] == current[:16]
    context_ids = wordpiece.encode(example.context)
    assert sum(len(s) for s in spans) - 16 * (len(spans) - 1) == len(context_ids)


def test_qa_features_truncate_long_questions_and_mark_unanswerable_at_zero(wordpiece, corpus):
    examples = long_qa_examples(corpus)
    long_question = QAExample(
        id="lq", question=" ".join(corpus[:3]), context=CONTEXT, answer_texts=["Paris"], answer_starts=[19]
    )
    features = qa_features(wordpiece, examples[2:] + [long_question], max_length=64, doc_stride=8, max_query_length=10)
    none, lq = features
    assert (none.start_position, none.end_position) == (0, 0) and none.example_index == 0
    assert lq.input_ids[1:11] == wordpiece.encode(long_question.question)[:10]
    assert lq.input_ids[11] == wordpiece.eos_id
    assert wordpiece.decode(lq.input_ids[lq.start_position : lq.end_position + 1]) == "Paris"


def test_qa_features_rejects_a_window_smaller_than_the_stride(wordpiece, corpus):
    expected = r"max_length=40: expected more than max_query_length \(64\) \+ special tokens \(3\) \+ doc_stride \(12\)"
    with pytest.raises(LmlabError, match=expected):
        qa_features(wordpiece, long_qa_examples(corpus), max_length=40, doc_stride=12, max_query_length=64)


def gold_logits(features, length):
    """Logits peaked at each feature's gold positions (at token 0 for features without the answer)."""
    start = np.zeros((len(features), length))
    end = np.zeros((len(features), length))
    for f, feature in enumerate(features):
        start[f, feature.start_position] = 10.0
        end[f, feature.end_position] = 10.0
    return start, end


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_postprocess_returns_gold_answers_from_gold_logits(tokenizers_by_kind, corpus, kind):
    examples = long_qa_examples(corpus)[:2]
    features = qa_features(tokenizers_by_kind[kind], examples, max_length=64, doc_stride=16, max_query_length=16)
    start, end = gold_logits(features, length=70)  # padded rows
    predictions = qa_postprocess(examples, features, start, end)
    assert predictions == {"late": "seven green apples", "early": "Alice"}


def test_postprocess_predicts_empty_for_v2_null_and_skips_non_context_spans(wordpiece, corpus):
    examples = long_qa_examples(corpus)[1:]  # "early" and the unanswerable "none"
    features = qa_features(wordpiece, examples, max_length=64, doc_stride=16, max_query_length=16)
    start, end = gold_logits(features, length=64)
    # A higher-scoring span on question tokens (offsets None) must be skipped.
    start[:, 2], end[:, 2] = 50.0, 50.0
    assert qa_postprocess(examples, features, start, end, version_2=True) == {"early": "Alice", "none": ""}
    # Without version_2 the best context span is returned even for the null-favoured example.
    without_v2 = qa_postprocess(examples, features, start, end)
    assert without_v2["early"] == "Alice" and without_v2["none"] != ""
    # A null score below best span + threshold keeps the span.
    assert qa_postprocess(examples, features, start, end, version_2=True, null_threshold=100.0)["none"] != ""


def test_postprocess_respects_max_answer_length(wordpiece, corpus):
    examples = long_qa_examples(corpus)[:1]
    features = qa_features(wordpiece, examples, max_length=64, doc_stride=16, max_query_length=16)
    start, end = gold_logits(features, length=64)
    predictions = qa_postprocess(examples, features, start, end, max_answer_length=2)
    assert predictions["late"] != "seven green apples"


# ------------------------------------------------------------------------------ encode_seq2seq
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_decoder_only_labels_mask_exactly_the_prompt(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind[kind]
    data = Seq2SeqData(sources=["Where did Alice travel?", "Bob said"], targets=[" to Paris", " that two blue boats"])
    out = encode_seq2seq(tok, data, max_source_length=32, max_target_length=32, decoder_only=True)
    for source, target, ids, labels in zip(data.sources, data.targets, out["input_ids"], out["labels"]):
        prompt, completion = tok.encode(source), tok.encode(target)
        assert ids == prompt + completion + [tok.eos_id]
        assert labels == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_id]


def test_encoder_decoder_targets_end_with_eos_and_respect_lengths(bpe, corpus):
    data = Seq2SeqData(sources=[corpus[0], " ".join(corpus[:5])], targets=["Paris", " ".join(corpus[5:10])])
    out = encode_seq2seq(bpe, data, max_source_length=12, max_target_length=10)
    assert out["input_ids"][0] == bpe.encode(corpus[0]) + [bpe.eos_id]
    assert len(out["input_ids"][1]) == 12 and out["input_ids"][1][-1] == bpe.eos_id
    assert out["labels"][0] == bpe.encode("Paris") + [bpe.eos_id]
    assert out["labels"][1] == bpe.encode(data.targets[1])[:9] + [bpe.eos_id]
    truncated = encode_seq2seq(bpe, data, max_source_length=4, max_target_length=3, decoder_only=True)
    assert truncated["labels"][1] == [IGNORE_INDEX] * 4 + bpe.encode(data.targets[1])[:2] + [bpe.eos_id]
    assert (
        truncated["input_ids"][1][:4] == bpe.encode(data.sources[1])[-4:]
    )  # a prompt keeps its end, where generation goes on


def test_lm_scores_a_prepared_data_folder_on_its_validation_tokens(trained_run, data_dir, other_tokenizer_dir):
    from lmlab.data.pack import PackedTokens
    from lmlab.evaluate.runner import evaluate

    result = evaluate(trained_run, data_dir, task="lm", n_resamples=10)
    assert result["tokens"] == len(PackedTokens(data_dir, "valid")) - 1  # every token after the first is predicted
    assert 1 < result["perplexity"] < 512
    from lmlab.tasks import TaskFields, get_task
    from lmlab.tokenizer import Tokenizer

    other = Tokenizer.load(other_tokenizer_dir)
    with pytest.raises(LmlabError, match="another tokenizer"):
        get_task("lm", "evaluate").read(data_dir, other, TaskFields())
