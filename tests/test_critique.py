"""The critique runner, the report writers and the performance lens: planted effects are found,
lenses without data are skipped with a note, and the report holds every number with its sentence."""

from __future__ import annotations

import json

import pytest

from lmlab.critique import LENSES, critique, load_subject, parse_lenses, run_lens
from lmlab.critique.core import proportion_ci
from lmlab.critique.report import format_value
from lmlab.errors import LmlabError


@pytest.mark.slow
def test_performance_finds_a_planted_bad_slice_and_overconfidence(classifier):
    subject = load_subject(classifier["ckpt"], data=classifier["flipped"])
    section = run_lens("performance", subject, n_resamples=200)
    slices = section.metrics["slices"]
    assert slices["a"]["accuracy"] >= 0.9 and slices["b"]["accuracy"] <= 0.1  # b's gold labels were inverted
    assert section.metrics["slice_gap"] >= 0.8
    assert any(f.level == "bad" and "slice" in f.text for f in section.findings)
    assert section.metrics["ece"] > 0.3  # confident everywhere, right half the time
    assert any(f.level == "bad" and "calibrated" in f.text for f in section.findings)
    assert (
        section.metrics["ci"]["accuracy"]["low"]
        <= section.metrics["accuracy"]
        <= section.metrics["ci"]["accuracy"]["high"]
    )
    assert {f.title for f in section.figures} >= {"Confusion matrix", "Reliability diagram", "Accuracy per slice"}
    assert all(f.png.startswith(b"\x89PNG") for f in section.figures)
    for name in ("accuracy", "ece", "slices", "slice_gap"):  # every number has its sentence
        assert section.explain.get(name), name

    clean = run_lens("performance", load_subject(classifier["ckpt"], data=classifier["test"]), n_resamples=200)
    assert clean.metrics["accuracy"] >= 0.9 and clean.metrics["slice_gap"] < 0.15
    assert any(f.level == "good" and "even across" in f.text for f in clean.findings)


@pytest.mark.slow
def test_performance_without_data_is_skipped_with_a_note(classifier, trained_run, corpus_file):
    section = run_lens("performance", load_subject(classifier["ckpt"]))
    assert section.skipped and "--data" in section.skipped
    lm = run_lens("performance", load_subject(trained_run, text=corpus_file))  # a decoder: perplexity of held-out text
    assert lm.skipped is None and 1 < lm.metrics["perplexity"] < lm.metrics["text_tokens"]
    assert lm.explain["perplexity"]


def test_critique_writes_json_and_a_self_contained_html(classifier, tmp_path):
    report = critique(
        classifier["ckpt"],
        tmp_path / "out",
        lenses="performance",
        data=classifier["flipped"],
        progress=False,
        options={"n_resamples": 100},
    )
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["lenses"]["performance"]["metrics"]["slices"]["b"]["n"] == 60
    assert on_disk["model"]["parameters"] == report["model"]["parameters"] > 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "What to look at first" in page and "worrying" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing fetched, nothing run
    assert "Expected calibration error" in page  # numbers come with their sentences
    assert "<td>ci.accuracy</td>" in page and "ci.accuracy.low" not in page  # an interval is one row: low – high


def test_a_lens_that_stops_with_an_error_is_skipped_with_the_reason_and_the_others_report(
    classifier, tmp_path, monkeypatch, caplog
):
    import lmlab.critique.bias as bias_lens

    def broken(subject, *, progress=False):
        raise LmlabError("pairs.csv:3: expected a sentence pair")

    monkeypatch.setattr(bias_lens, "bias", broken)
    report = critique(
        classifier["ckpt"],
        tmp_path / "out",
        lenses="performance,bias",
        data=classifier["flipped"],
        progress=False,
        options={"n_resamples": 100},
    )
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["lenses"]["bias"]["skipped"] == "it stopped with an error: pairs.csv:3: expected a sentence pair"
    assert (
        on_disk["lenses"]["performance"]["metrics"]["accuracy"]
        == report["lenses"]["performance"]["metrics"]["accuracy"]
    )
    assert any("bias lens is skipped: pairs.csv:3" in r.getMessage() for r in caplog.records)


def test_lens_choice_and_bad_input(classifier, tmp_path):
    assert parse_lenses(None) == list(LENSES)
    assert parse_lenses("bias, performance") == ["performance", "bias"]  # the report's order
    with pytest.raises(LmlabError, match="unknown lens 'speed'"):
        parse_lenses("performance,speed")
    with pytest.raises(LmlabError, match="data .*missing.jsonl: no such file"):
        load_subject(classifier["ckpt"], data=tmp_path / "missing.jsonl")


def test_small_helpers():
    low, high = proportion_ci(0, 10)
    assert low == 0.0 and 0.2 < high < 0.35  # Wilson: not the degenerate [0, 0]
    low, high = proportion_ci(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.96 * 0.05, abs=0.01)
    assert (
        format_value(1234567) == "1,234,567"
        and format_value(0.123456) == "0.1235"
        and format_value(1e-5) == "1.000e-05"
    )
