"""``critique --compare``: the compared model beside the original — every figure, the flipped examples, accuracy
per group — on a change whose effect is known exactly (a classifier with its two label rows swapped flips every
prediction), and a decoder's documents beside its int4 quantization."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.critique import critique
from lmlab.critique.compare import moved
from lmlab.io.checkpoint import load_model, load_tokenizer, save_checkpoint


@pytest.fixture(scope="module")
def swapped(classifier, tmp_path_factory):
    """The classifier with its head's two label rows swapped: every prediction flips."""
    model = load_model(classifier["ckpt"])
    head = model.get_submodule("task_head.out")
    with torch.no_grad():
        head.weight.copy_(head.weight.flip(0))
        if head.bias is not None:
            head.bias.copy_(head.bias.flip(0))
    folder = tmp_path_factory.mktemp("swapped") / "ckpt"
    return save_checkpoint(folder, model, tokenizer=load_tokenizer(classifier["ckpt"]))


def test_every_prediction_flipped_is_counted_and_listed_with_groups(classifier, swapped, tmp_path):
    options = dict(lenses="performance", data=classifier["test"], fields={"group_field": "group"}, progress=False)
    report = critique(swapped, tmp_path / "r", compare=classifier["ckpt"], **options)
    section = report["lenses"]["compare"]
    original = report["compared_with"]["lenses"]["performance"]["metrics"]
    accuracy = original["accuracy"]
    n = section["metrics"]["examples"]
    assert n == 120 and section["metrics"]["flipped"] == n
    assert section["metrics"]["became_wrong"] == round(accuracy * n)
    assert section["metrics"]["became_right"] == n - round(accuracy * n)
    assert report["lenses"]["performance"]["metrics"]["accuracy"] == pytest.approx(1 - accuracy, abs=1e-6)
    groups = section["metrics"]["group_accuracy_change"]
    assert set(groups) == {"a", "b"} and all(change < 0 for change in groups.values())  # a good model got worse
    tables = {t["title"]: t for t in section["tables"]}
    assert len(tables["Flipped examples"]["rows"]) == 20
    figures = {(row[0], row[1]): row for row in tables["Every figure, original and compressed"]["rows"]}
    assert figures["performance", "accuracy"][2:4] == [accuracy, pytest.approx(1 - accuracy, abs=1e-6)]
    assert any("ECE" in f["text"] or "ece" in f["text"] for f in section["findings"])  # calibration moved
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.index("Compared with the original") < html.index('id="performance"')


def test_compare_on_the_command_line_and_a_decoder_documents(trained_run, corpus_file, tmp_path, capsys):
    import lmlab

    small = lmlab.quantize(trained_run, tmp_path / "int4", method="int4", group_size=32)["out"]
    args = ["critique", small, "--out", tmp_path / "r", "--lenses", "performance", "--text", corpus_file]
    assert main([str(a) for a in [*args, "--compare", trained_run, "--no-progress"]]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    section = report["lenses"]["compare"]
    rows = {t["title"]: t["rows"] for t in section["tables"]}["Documents whose perplexity changed most"]
    assert rows and all(row[1] > 1 and row[2] > 1 for row in rows)
    assert report["compared_with"]["checkpoint"].startswith(str(trained_run))


def test_moved_is_absolute_for_rates_and_relative_above_one():
    assert moved(0.50, 0.53) and not moved(0.50, 0.51)
    assert moved(100.0, 103.0) and not moved(100.0, 101.0)
