"""The privacy lens: planted canaries show high exposure and unseen ones do not, a memorising model is
caught reciting its training data, the extraction arithmetic, the PII patterns and their masking."""

from __future__ import annotations

import json
import math
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from lmlab.config import preset
from lmlab.critique import privacy as P
from lmlab.critique.core import load_subject
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import train_tokenizer


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    who = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "the old man", "a small bird", "the river"]
    does = ["walks to", "looks at", "thinks about", "runs past", "sings near", "waits for", "talks to", "reads about"]
    what = [
        "the market",
        "a green house",
        "the tall tree",
        "the city hall",
        "a quiet garden",
        "the bridge",
        "the station",
        "a red car",
    ]
    return [
        f"{rng.choice(who)} {rng.choice(does)} {rng.choice(what)} and then {rng.choice(who)} {rng.choice(does)} "
        f"{rng.choice(what)}."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A gpt2-tiny trained 150 steps on 40 sentences plus 2 canaries (4 digits, |R| = 10^4) planted 50 times each."""
    from lmlab.data.pack import prepare
    from lmlab.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("privacy")
    docs = _sentences(40, seed=0)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tok = train_tokenizer(docs + ["the secret code is"] * 20, kind="bpe", vocab_size=400)  # the template in few tokens
    prepare(
        root / "corpus.jsonl",
        tok,
        root / "data",
        valid_fraction=0.1,
        show_progress=False,
        canaries={"n": 2, "repeats": 50, "digits": 4},
    )
    pretrain(
        "gpt2-tiny",
        root / "data",
        root / "run",
        max_steps=150,
        eval_interval=150,
        micro_batch_size=16,
        seq_len=32,
        lr=3e-3,
        warmup_steps=5,
        eval_batches=1,
        progress=False,
        tensorboard=False,
    )
    untrained = save_checkpoint(
        root / "untrained", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size)), tokenizer=tok
    )
    return SimpleNamespace(root=root, data=root / "data", run=root / "run", untrained=untrained, tok=tok)


@pytest.fixture(scope="module")
def exposed(memorised):
    """The privacy section of the memorising model, canaries found through the data folder its checkpoint records."""
    return P.privacy(load_subject(memorised.run))


def _levels(section) -> dict[str, str]:
    return {f.level: f.text for f in section.findings}


@pytest.mark.slow
def test_planted_canaries_show_high_exposure_and_unseen_ones_low(memorised, exposed):
    section = exposed
    m = section.metrics
    top = math.log2(10**4)
    assert m["canary_space_size"] == 10**4 and m["canary_max_exposure"] == pytest.approx(top)
    assert m["canary_rank_method"].startswith("enumerated")
    assert m["canary_planted_exposure_mean"] >= top - 3
    assert m["canary_reference_exposure_mean"] <= top / 2
    assert "bad" in _levels(section) and "top 4 of 10,000" in _levels(section)["bad"]
    planted = [c for c in m["canary_exposures"] if c["planted"]]
    assert all(c["repeats"] == 50 and c["rank"] <= 4 for c in planted)
    assert section.figures and section.figures[0].png.startswith(b"\x89PNG")
    assert set(m) <= set(section.explain)
    assert any("Verbatim extraction and the PII scan not run" in f.text for f in section.findings)

    fresh = P.privacy(load_subject(memorised.untrained), canaries=memorised.data / "canaries.json")
    assert fresh.metrics["canary_planted_exposure_mean"] < top / 2  # the same secrets, a model that never saw them
    assert "bad" not in _levels(fresh)


def test_sampled_rank_estimate_agrees_with_enumeration(memorised, exposed, monkeypatch):
    from lmlab.data.canaries import load_canaries

    subject = load_subject(memorised.run)
    monkeypatch.setattr(P, "ENUMERATE_LIMIT", 1000)
    monkeypatch.setattr(P, "SAMPLE_SIZE", 2000)
    estimate = P.canary_exposures(subject.model, subject.tokenizer, load_canaries(memorised.data / "canaries.json"))
    assert estimate["method"].startswith("skew-normal")
    for exact, sampled in zip(exposed.metrics["canary_exposures"], estimate["canaries"]):
        assert sampled["exposure"] == pytest.approx(exact["exposure"], abs=1.5), exact["secret"]


def test_skew_normal_fit_matches_the_quantiles_of_its_sample():
    rng = np.random.default_rng(0)
    delta = 4 / math.sqrt(17)  # alpha = 4: strongly right-skewed
    big = 5 + 2 * (
        delta * np.abs(rng.standard_normal(200_000)) + math.sqrt(1 - delta**2) * rng.standard_normal(200_000)
    )
    log_cdf = P.skewnorm_log_cdf(big[:20_000])
    for q in (0.001, 0.01, 0.1, 0.5, 0.9):
        assert math.exp(log_cdf(float(np.quantile(big, q)))) == pytest.approx(q, rel=0.3)
    far = log_cdf(float(big.min()) - 50)
    assert math.isfinite(far) and far < -100  # a far tail is a small number, not log(0)


@pytest.mark.slow
def test_a_memorising_model_recites_its_training_data_and_an_untrained_one_does_not(memorised):
    trained = P.privacy(
        load_subject(memorised.run, train_data=memorised.data, max_examples=48),
        extraction_prefix=8,
        extraction_suffix=8,
    )
    m = trained.metrics
    assert m["extraction_windows"] == 48 and m["extraction_rate"] >= 0.3
    assert m["extraction_rate_ci"]["low"] <= m["extraction_rate"] <= m["extraction_rate_ci"]["high"]
    assert "the model recites its training data" in _levels(trained)["bad"]
    assert any(t.title == "Longest reproduced continuations" for t in trained.tables)
    assert m["pii_total"] == 0 and "good" in _levels(trained)
    assert set(m) <= set(trained.explain)

    untrained = P.privacy(
        load_subject(memorised.untrained, train_data=memorised.root / "corpus.jsonl", max_examples=48),
        extraction_prefix=8,
        extraction_suffix=8,
    )
    assert untrained.metrics["extraction_rate"] == 0.0 and untrained.metrics["extraction_mean_match_tokens"] < 1


def test_extraction_rate_and_matching_length_on_a_stub_with_known_continuations(memorised, tmp_path, monkeypatch):
    docs = [" ".join(f"w{i}x{j}" for j in range(30)) for i in range(6)]  # no window repeats
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    subject = load_subject(memorised.untrained, train_data=corpus, max_examples=20)
    tok = subject.tokenizer
    stream = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    prefix, suffix, matches = 6, 5, []

    def complete_ids(prompts, **options):
        assert options == {"strategy": "greedy", "max_new_tokens": suffix, "ignore_eos": True}
        out = []
        for prompt in prompts:
            at = next(i for i in range(len(stream)) if stream[i : i + prefix] == prompt) + prefix
            truth, m = stream[at : at + suffix], [suffix, 0, 2, suffix, 4][len(matches) % 5]
            matches.append(m)
            out.append([SimpleNamespace(token_ids=truth[:m] + [(t + 1) % tok.vocab_size for t in truth[m:]])])
        return out

    monkeypatch.setattr(subject.lm, "complete_ids", complete_ids)
    m = P.privacy(subject, extraction_prefix=prefix, extraction_suffix=suffix).metrics
    assert len(matches) == m["extraction_windows"] == 20
    assert m["extraction_rate"] == pytest.approx(sum(x == suffix for x in matches) / 20)
    assert m["extraction_mean_match_tokens"] == pytest.approx(np.mean(matches))
    with pytest.raises(LmlabError, match="exceed the model's context window of 128"):
        P.privacy(subject, extraction_prefix=100, extraction_suffix=100)


PII_TEXT = {
    "email": ["jane.doe@example.com", "x_y+tag@mail.co.uk"],
    "phone": ["+44 20 7946 0958", "(555) 123-4567", "555-123-4567", "13812345678", "020 7946 0958"],
    "credit_card": ["4111 1111 1111 1111", "5555555555554444"],
    "iban": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000"],
    "ipv4": ["192.168.0.1"],
    "us_ssn": ["123-45-6789"],
    "cn_resident_id": ["11010519491231002X"],
}
NEAR_MISSES = [
    "4111 1111 1111 1112",  # fails the Luhn check
    "GB82 WEST 1234 5698 7654 33",  # fails mod-97
    "110105194912310021",  # wrong check digit
    "256.1.1.1",
    "000-12-3456",
    "666-12-3456",
    "2020-01-02",
    "Python 3.10 and 3.11",
    "user at example dot com",
    "a@b",
    "12345",
    "1999-2005",
    "call 555 1234",
]


def test_pii_patterns_find_each_kind_and_skip_near_misses():
    for kind, values in PII_TEXT.items():
        for value in values:
            assert P.find_pii(f"Contact: {value}, thanks.") == [(kind, 9, 9 + len(value))], value
    for text in NEAR_MISSES:
        assert P.find_pii(f"See {text} here.") == [], text


def test_masking_never_reveals_a_whole_pii_string():
    for value in [v for values in PII_TEXT.values() for v in values] + ["a@b.io", "1.2.3.4"]:
        masked = P.mask(value)
        assert len(masked) == len(value) and masked != value
        assert sum(a == b for a, b in zip(masked, value)) <= len(value) // 2
    text = "Mail jane.doe@example.com or card 4111 1111 1111 1111."
    masked = P.mask_pii(text)
    assert "jane.doe@example.com" not in masked and "4111 1111 1111 1111" not in masked
    assert masked.startswith("Mail jan") and masked.endswith(".")


def test_pii_scan_runs_for_an_encoder_and_the_report_shows_only_masked_strings(tmp_path):
    tok = train_tokenizer(["plain words for a tokenizer"] * 3, kind="bpe", vocab_size=280)
    encoder = save_checkpoint(
        tmp_path / "bert", build_model(preset("bert-tiny", vocab_size=tok.vocab_size)), tokenizer=tok
    )
    docs = [
        f"Write to {PII_TEXT['email'][0]} today.",
        f"Card {PII_TEXT['credit_card'][0]} and card {PII_TEXT['credit_card'][1]}.",
        "Nothing personal here.",
        f"Server {PII_TEXT['ipv4'][0]} is down.",
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    section = P.privacy(load_subject(encoder, train_data=corpus))
    m = section.metrics
    assert m["pii_counts"] == {
        "email": 1,
        "iban": 0,
        "cn_resident_id": 0,
        "credit_card": 2,
        "us_ssn": 0,
        "phone": 0,
        "ipv4": 1,
    }
    assert m["pii_documents_scanned"] == 4 and m["pii_documents_affected"] == 3 and m["pii_total"] == 4
    assert "credit_card" in _levels(section)["bad"]
    assert "canary_space_size" not in m and "extraction_rate" not in m
    assert sum("not measured: the model is an encoder" in f.text for f in section.findings) == 2
    shown = json.dumps(section.to_json())
    assert all(value not in shown for values in PII_TEXT.values() for value in values)
    assert set(m) <= set(section.explain)

    assert load_subject(encoder).path and P.privacy(load_subject(encoder)).skipped  # nothing to do without --train-data


def test_malformed_canaries_file_is_a_one_line_error(memorised, tmp_path):
    bad = tmp_path / "canaries.json"
    bad.write_text(
        '{"format": "lmlab-canaries", "alphabet": "0123456789", "length": 4, "template": "code {}", '
        '"space_size": 10000, "planted": [{"secret": "12"}]}'
    )
    with pytest.raises(LmlabError, match=r"planted\[0\]\.secret is '12'") as err:
        P.privacy(load_subject(memorised.untrained), canaries=bad)
    assert "\n" not in str(err.value)
    with pytest.raises(LmlabError, match="extraction_prefix is 0"):
        P.privacy(load_subject(memorised.untrained), extraction_prefix=0)


def test_a_training_data_folder_with_a_swapped_tokenizer_is_refused_not_decoded_as_garbage(
    trained_run, data_dir, other_tokenizer_dir, tmp_path
):
    data = shutil.copytree(data_dir, tmp_path / "data")
    shutil.copy(other_tokenizer_dir / "tokenizer.json", data / "tokenizer.json")
    with pytest.raises(
        LmlabError, match=r"data/tokenizer\.json does not match the tokenizer that made the folder's token ids"
    ):
        P.privacy(load_subject(trained_run, train_data=data, max_examples=8), extraction_prefix=8, extraction_suffix=8)
