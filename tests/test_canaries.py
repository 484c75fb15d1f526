"""Canaries: seeded planting, the record, prepare's train-only planting and rebuild rules, bad records."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmlab.config import write_json_atomic
from lmlab.data.canaries import canary_options, load_canaries, plant_canaries
from lmlab.data.pack import PackedTokens, load_manifest, prepare
from lmlab.errors import LmlabError
from lmlab.tokenizer import train_tokenizer

DOCS = [f"Document number {i} talks about the weather and the market." for i in range(40)]


def test_planting_is_seeded_counted_and_keeps_the_other_documents_in_order():
    out, record = plant_canaries(DOCS, n=3, repeats=7, seed=5, digits=5)
    again, record_again = plant_canaries(DOCS, n=3, repeats=7, seed=5, digits=5)
    assert (out, record) == (again, record_again)
    other, _ = plant_canaries(DOCS, n=3, repeats=7, seed=6, digits=5)
    assert other != out

    assert len(out) == len(DOCS) + 3 * 7
    counts = Counter(out)
    planted = {c["text"] for c in record["planted"]}
    assert all(counts[c["text"]] == 7 and c["repeats"] == 7 for c in record["planted"])
    assert [d for d in out if d not in planted] == DOCS
    assert out[: len(DOCS)] != DOCS  # inserted among the documents, not appended at the end

    assert record["space_size"] == 10**5 and record["alphabet"] == "0123456789" and record["length"] == 5
    secrets = [c["secret"] for c in record["planted"] + record["reference"]]
    assert len(set(secrets)) == 6 and all(len(s) == 5 and s.isdigit() for s in secrets)
    assert all(c["text"] == f"the secret code is {c['secret']}" for c in record["planted"] + record["reference"])
    assert all(c["repeats"] == 0 and c["text"] not in out for c in record["reference"])
    json.dumps(record)  # JSON-able as is


def test_bad_planting_options_are_one_line_errors():
    with pytest.raises(LmlabError, match="do not fit in the 100 secrets"):
        plant_canaries(DOCS, n=60, repeats=1, seed=0, digits=2)
    with pytest.raises(LmlabError, match="exactly one {}"):
        plant_canaries(DOCS, n=1, repeats=1, seed=0, template="no slot")
    with pytest.raises(LmlabError, match="repeats=0"):
        plant_canaries(DOCS, n=1, repeats=0, seed=0)
    with pytest.raises(LmlabError, match="unknown option"):
        canary_options({"n": 1, "repeat": 5})


def test_prepare_plants_in_the_train_split_only_and_rebuilds_when_the_canaries_change(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    tok = train_tokenizer(DOCS + ["the secret code is 0123456789"], kind="bpe", vocab_size=300)
    out = tmp_path / "data"
    manifest = prepare(
        corpus, tok, out, valid_fraction=0.2, seed=3, show_progress=False, canaries={"n": 2, "repeats": 6, "digits": 4}
    )
    record = load_canaries(out / "canaries.json")
    assert manifest["options"]["canaries"] == {
        "n": 2,
        "repeats": 6,
        "seed": 3,
        "template": "the secret code is {}",
        "digits": 4,
    }
    assert record["seed"] == 3 and len(record["planted"]) == 2 and len(record["reference"]) == 2

    train = tok.decode(PackedTokens(out, "train").window(0, len(PackedTokens(out, "train"))).tolist())
    valid = tok.decode(PackedTokens(out, "valid").window(0, len(PackedTokens(out, "valid"))).tolist())
    assert valid and "secret" not in valid
    for c in record["planted"]:
        assert train.count(c["text"] + "<|endoftext|>") == 6  # a document of its own, 6 times
    for c in record["reference"]:
        assert c["text"] not in train
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["valid"]["documents"] == len(DOCS) + 2 * 6

    same = prepare(
        corpus, tok, out, valid_fraction=0.2, seed=3, show_progress=False, canaries={"n": 2, "repeats": 6, "digits": 4}
    )
    assert same["_status"] == "up to date"
    more = prepare(
        corpus, tok, out, valid_fraction=0.2, seed=3, show_progress=False, canaries={"n": 2, "repeats": 9, "digits": 4}
    )
    assert more["_status"] == "built (options changed)"
    assert load_canaries(out / "canaries.json")["repeats"] == 9
    (out / "canaries.json").unlink()
    again = prepare(
        corpus, tok, out, valid_fraction=0.2, seed=3, show_progress=False, canaries={"n": 2, "repeats": 9, "digits": 4}
    )
    assert again["_status"] == "built (canaries.json missing)" and (out / "canaries.json").is_file()
    plain = prepare(corpus, tok, out, valid_fraction=0.2, seed=3, show_progress=False)
    assert plain["_status"] == "built (options changed)" and "canaries" not in load_manifest(out)["options"]
    assert not (out / "canaries.json").exists()  # no stale record of secrets the data no longer holds


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"canaries\.json:1: invalid JSON"),
        ('{"format": "other"}', "not a canaries record"),
        ("BAD_SECRET", r"planted\[0\]\.secret is '12a4'; expected 4 characters"),
        ("BAD_SPACE", "field 'space_size' is 99"),
    ],
)
def test_malformed_canaries_file_is_a_one_line_error(tmp_path, content, message):
    _, record = plant_canaries(DOCS, n=1, repeats=1, seed=0, digits=4)
    path = tmp_path / "canaries.json"
    if content == "BAD_SECRET":
        record["planted"][0]["secret"] = "12a4"
        write_json_atomic(path, record)
    elif content == "BAD_SPACE":
        record["space_size"] = 99
        write_json_atomic(path, record)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(LmlabError, match=message) as err:
        load_canaries(path)
    assert "\n" not in str(err.value)
    with pytest.raises(LmlabError, match="no such canaries file"):
        load_canaries(tmp_path / "missing.json")
