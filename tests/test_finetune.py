"""Fine-tuning: each task head learns a small synthetic task to a stated score, decoders classify too,
the task metric picks best/, early stopping stops, and a killed fine-tuning run resumes exactly."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import TINY_TRAIN
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import list_checkpoints, load_model, read_meta, save_checkpoint
from lmlab.model import build_model
from lmlab.train.finetune import ExampleBatches, finetune

GOOD = ["great", "wonderful", "superb", "lovely", "excellent"]
BAD = ["awful", "terrible", "boring", "dreadful", "poor"]
FILLER = ["the", "film", "was", "really", "a", "plot", "and", "acting", "quite", "story", "today", "we", "saw"]
PEOPLE = ["alice", "bob", "carol", "dave", "erin"]
CITIES = ["paris", "london", "tokyo", "berlin", "madrid"]


def sentiment(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=6)
        words.insert(rng.randrange(7), rng.choice(GOOD if label == "pos" else BAD))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def tagged(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(4, 8)):
            kind = rng.random()
            if kind < 0.2:
                tokens.append(rng.choice(PEOPLE)), tags.append("B-PER")
            elif kind < 0.4:
                tokens.append(rng.choice(CITIES)), tags.append("B-LOC")
            else:
                tokens.append(rng.choice(FILLER)), tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def squad(n, seed):
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        person, city = rng.choice(PEOPLE), rng.choice(CITIES)
        filler = " ".join(rng.choices(FILLER, k=4))
        context = f"{filler} {person} lives in {city} and {filler}"
        start = context.index(f"lives in {city}") + len("lives in ")
        qa = {"id": f"q{i}", "question": f"where does {person} live", "answers": [{"text": city, "answer_start": start}]}
        paragraphs.append({"context": context, "qas": [qa]})
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine it makes
    training many times slower (the threads spin against other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lmlab.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("ft")
    texts = [r["text"] for r in sentiment(300, 0)] + [" ".join(r["tokens"]) for r in tagged(300, 0)]
    texts += [p["context"] + " where does live" for p in squad(100, 0)["data"][0]["paragraphs"]]
    tok = train_tokenizer(texts, kind="wordpiece", vocab_size=200)
    out = {"tok": tok}
    out["cls_train"], out["cls_valid"] = write_jsonl(folder / "cls_train.jsonl", sentiment(400, 1)), write_jsonl(folder / "cls_valid.jsonl", sentiment(100, 2))
    out["tag_train"], out["tag_valid"] = write_jsonl(folder / "tag_train.jsonl", tagged(300, 3)), write_jsonl(folder / "tag_valid.jsonl", tagged(80, 4))
    for name, seed, n in (("qa_train", 5, 400), ("qa_valid", 6, 60)):
        out[name] = folder / f"{name}.json"
        out[name].write_text(json.dumps(squad(n, seed)), encoding="utf-8")
    for family in ("bert-tiny", "gpt2-tiny"):
        torch.manual_seed(0)
        model = build_model(preset(family, vocab_size=tok.vocab_size, dropout=0.0))
        out[family] = save_checkpoint(folder / family, model, tokenizer=tok)
    return out


# a post-norm BERT trained from scratch is unstable at the 2e-3 a tiny GPT-2 takes: 5e-4
FAST = dict(TINY_TRAIN, micro_batch_size=16, lr=5e-4, warmup_steps=5, eval_interval=40, log_interval=10, keep_last=2, seed=0)


@pytest.mark.parametrize("family", ["bert-tiny", "gpt2-tiny"])
def test_classifier_learns_keyword_sentiment(files, tmp_path, family):
    args = dict(FAST, lr=5e-4 if family == "bert-tiny" else 2e-3)
    result = finetune(files[family], "classify", files["cls_train"], tmp_path / "run", valid=files["cls_valid"], max_length=32, max_steps=120, **args)
    assert result.val_scores["accuracy"] >= 0.9, result.val_scores
    best = load_model(result.best_checkpoint)
    assert best.config.task == "classify" and best.config.labels == ["neg", "pos"]
    assert read_meta(result.best_checkpoint)["val_accuracy"] >= result.val_scores["accuracy"] - 1e-9


def test_tagger_learns_a_lexicon(files, tmp_path):
    result = finetune(files["bert-tiny"], "tag", files["tag_train"], tmp_path / "run", valid=files["tag_valid"], max_length=32, max_steps=120, **FAST)
    assert result.val_scores["f1"] >= 0.9, result.val_scores
    assert load_model(result.best_checkpoint).config.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_qa_learns_to_point_at_the_answer(files, tmp_path):
    args = dict(FAST, eval_interval=100)
    result = finetune(files["bert-tiny"], "qa", files["qa_train"], tmp_path / "run", valid=files["qa_valid"], max_length=48, max_steps=300, **args)
    assert result.val_scores["f1"] >= 80, result.val_scores


def test_early_stopping_and_exact_resume(files, tmp_path, monkeypatch):
    args = dict(FAST, eval_interval=5, max_steps=20, lr=1e-3)
    whole = finetune(files["bert-tiny"], "classify", files["cls_train"], tmp_path / "whole", valid=files["cls_valid"], max_length=32, **args)
    real = ExampleBatches.__call__

    def crash(self, step, micro):
        if step == 12:
            raise KeyboardInterrupt
        return real(self, step, micro)

    monkeypatch.setattr(ExampleBatches, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(files["bert-tiny"], "classify", files["cls_train"], tmp_path / "killed", valid=files["cls_valid"], max_length=32, **args)
    monkeypatch.setattr(ExampleBatches, "__call__", real)
    resumed = finetune(files["bert-tiny"], "classify", files["cls_train"], tmp_path / "killed", valid=files["cls_valid"], max_length=32, resume=True, **args)
    def log(run):  # every record but the wall-clock speed
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in (run / "log.jsonl").read_text().splitlines()]

    assert log(tmp_path / "killed") == log(tmp_path / "whole")
    assert resumed.val_scores == whole.val_scores

    # a learning rate of 1e-12 changes no prediction, so nothing improves: patience 2 stops after the third evaluation
    stopped = finetune(files["bert-tiny"], "classify", files["cls_train"], tmp_path / "stop", valid=files["cls_valid"], max_length=32,
                       patience=2, **dict(args, lr=1e-12))
    assert stopped.stopped_early and stopped.step == 15
    assert [s for s, _ in list_checkpoints(tmp_path / "stop")][-1] == 15


def test_bad_task_input_is_a_one_line_error(files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "great film", "label": "pos"}, {"text": "x", "label": "meh"}])
    with pytest.raises(LmlabError, match="bad.jsonl:2.*'meh'"):
        finetune(files["bert-tiny"], "classify", files["cls_train"], tmp_path / "run", valid=bad, max_length=32, **dict(FAST, max_steps=2))
    with pytest.raises(LmlabError, match="unknown --task 'ner'"):
        finetune(files["bert-tiny"], "ner", files["cls_train"], tmp_path / "run2")
    with pytest.raises(LmlabError, match="--max-length 999 exceeds"):
        finetune(files["bert-tiny"], "classify", files["cls_train"], tmp_path / "run3", max_length=999)
    assert not (tmp_path / "run").exists() or not list_checkpoints(tmp_path / "run")


def test_finetune_and_evaluate_through_the_cli(files, tmp_path, capsys, trained_run):
    from lmlab.cli import main

    run = tmp_path / "cls"
    argv = ["finetune", str(files["bert-tiny"]), "--task", "classify", "--train", str(files["cls_train"]), "--valid",
            str(files["cls_valid"]), "--out", str(run), "--max-length", "32", "--max-steps", "4", "--eval-interval", "2",
            "--micro-batch-size", "16", "--no-progress", "--no-tensorboard", "--lr", "5e-4"]
    assert main(argv) == 0
    assert "validation accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(files["cls_valid"]), "--out", str(tmp_path / "eval"), "--n-resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "95% CI" in out and "ECE" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["ci"]["accuracy"]["low"] <= metrics["accuracy"] <= metrics["ci"]["accuracy"]["high"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and {"text", "label", "prediction", "confidence"} <= set(rows[0])
    assert sum(r["label"] == r["prediction"] for r in rows) / 100 == pytest.approx(metrics["accuracy"])

    assert main(["evaluate", str(trained_run), "--data", str(files["cls_valid"]), "--task", "lm"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(files["tag_valid"]), "--task", "tag"]) == 1
    assert "fine-tuned for 'classify'" in capsys.readouterr().err
