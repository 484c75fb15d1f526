"""Distillation: the KD loss against a hand computation, the objective's mix, DistilBERT's layer copy, and
`lmlab distill` end to end — a decoder and a classifier teacher, resume, the checks on teacher and student."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from conftest import TINY_TRAIN, crash_windows_at

from lmlab.cli import main
from lmlab.compress.distillation import distill, teacher_layers
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import list_checkpoints, load_model, read_meta, save_checkpoint
from lmlab.model import build_model
from lmlab.objectives import CausalLM
from lmlab.objectives.distill import Distillation, distillation_loss
from lmlab.tokenizer import Tokenizer

RUN = dict(TINY_TRAIN, eval_interval=10, log_interval=1, seed=1)


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(folder) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r[k]) for r in records for k in ("loss", "val_loss") if k in r]


# ---------------------------------------------------------------------------------------------- the loss


def test_the_kd_loss_is_t_squared_times_the_kl_of_the_softened_distributions_by_hand():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])

    def by_hand(T, rows):
        total = 0.0
        for r in rows:
            p = [math.exp(v / T) for v in teacher[r].tolist()]
            q = [math.exp(v / T) for v in student[r].tolist()]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            total += sum(a * math.log(a / b) for a, b in zip(p, q))
        return T * T * total / len(rows)

    for T in (1.0, 2.0, 4.0):
        assert distillation_loss(student, teacher, T).item() == pytest.approx(by_hand(T, [0, 1]), rel=1e-5)
    mask = torch.tensor([False, True])  # only the second row is a prediction
    assert distillation_loss(student, teacher, 2.0, mask).item() == pytest.approx(by_hand(2.0, [1]), rel=1e-5)
    assert distillation_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # T² scaling: the same KL at T = 2 weighs 4× the plain KL of the softened distributions
    plain = distillation_loss(student / 2, teacher / 2, 1.0)
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * plain.item(), rel=1e-6)


def tiny_pair(n_layer_teacher=2):
    torch.manual_seed(0)
    teacher = build_model(preset("gpt2-tiny", vocab_size=50, n_layer=n_layer_teacher))
    student = build_model(preset("gpt2-tiny", vocab_size=50, n_layer=1))
    return teacher, student


def test_alpha_mixes_the_teachers_term_with_the_students_own_loss():
    teacher, student = tiny_pair()
    clm = CausalLM()
    batch = clm.batch(torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0)))
    hard = clm.loss(student, batch).item()
    with torch.no_grad():
        kd = distillation_loss(student(batch["input_ids"]), teacher(batch["input_ids"]), 2.0).item()
    for alpha, expected in ((0.0, hard), (1.0, kd), (0.25, 0.25 * kd + 0.75 * hard)):
        loss = Distillation(CausalLM(), teacher, alpha, 2.0).loss(student, batch)
        assert loss.item() == pytest.approx(expected, rel=1e-5), alpha
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # frozen: no gradient reaches the teacher
    assert student.lm_head.weight.grad is not None
    same = Distillation(CausalLM(), copy.deepcopy(student), 1.0, 2.0)
    assert same.loss(student, batch).item() == pytest.approx(0.0, abs=1e-6)  # KL 0: the student is the teacher
    student.eval()  # validation: the student's own loss, so perplexity means what it means for any run
    assert Distillation(CausalLM(), teacher, 1.0, 2.0).loss(student, batch).item() == pytest.approx(hard, rel=1e-5)


def test_a_tagger_distills_on_its_labelled_words_only_and_a_classifier_on_every_text():
    from lmlab.tasks.classify import ClassifyObjective
    from lmlab.tasks.tag import TagObjective

    torch.manual_seed(0)
    ids = [[5, 6, 7, 8], [9, 10]]
    features = {"input_ids": ids, "labels": [[0, -100, 2, 1], [1, -100]]}
    classify = ClassifyObjective({"input_ids": ids, "labels": [2, 0]}, 0)
    for objective, task in ((TagObjective(features, 0), "tag"), (classify, "classify")):
        config = preset("bert-tiny", vocab_size=40, task=task, num_labels=3, dropout=0.0)
        teacher, student = build_model(config), build_model(dataclasses.replace(config, n_layer=1))
        batch = objective.batch(torch.tensor([0, 1]))
        with torch.no_grad():
            s = student.task_logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            t = teacher.task_logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        if task == "tag":  # the labelled words: row 0's first and third, fourth; row 1's first (no pads, no pieces)
            keep = batch["labels"] != -100
            assert int(keep.sum()) == 4
            s, t = s[keep], t[keep]
        expected = distillation_loss(s, t, 2.0).item()
        assert Distillation(objective, teacher, 1.0, 2.0).loss(student, batch).item() == pytest.approx(
            expected, rel=1e-5
        )


def test_wrong_alpha_or_temperature_names_the_parameter():
    teacher, _ = tiny_pair()
    for alpha, temperature, param in ((1.5, 2.0, "alpha"), (0.5, 0.0, "temperature"), (0.5, -1, "temperature")):
        with pytest.raises(LmlabError) as info:
            Distillation(CausalLM(), teacher, alpha, temperature)
        assert info.value.params == (param,)


@pytest.mark.parametrize("family,task", [("llama-tiny", ""), ("bert-tiny", "classify")])
def test_teacher_layers_copies_every_other_block_and_all_else(family, task):
    torch.manual_seed(0)
    config = preset(family, vocab_size=60, n_layer=4, **({"task": task, "num_labels": 3} if task else {}))
    teacher = build_model(config)
    student = teacher_layers(teacher)
    assert student.config.n_layer == 2 and student.config.n_embd == teacher.config.n_embd
    source = teacher.state_dict()
    for name, value in student.state_dict().items():
        parts = name.split(".")
        if parts[0] == "blocks":
            parts[1] = str(2 * int(parts[1]))  # student block i is teacher block 2i: 0, 2
        assert torch.equal(value, source[".".join(parts)]), name
    assert teacher_layers(teacher, 3).state_dict()["blocks.2.attn.qkv.weight"].equal(source["blocks.2.attn.qkv.weight"])


# ----------------------------------------------------------------------------------- lmlab distill, decoders


def kl_to(teacher, student, data_dir) -> float:
    from lmlab.data.pack import PackedTokens

    ids = torch.as_tensor(PackedTokens(data_dir, "valid").window(0, 4 * 32)).view(4, 32).long()
    with torch.no_grad():
        return distillation_loss(student(ids), teacher(ids), 1.0).item()


def test_a_decoder_distills_into_a_narrower_shallower_student_that_every_verb_loads(
    trained_run, data_dir, corpus_file, tokenizer_dir, tmp_path, capsys
):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    small = build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32))
    start = save_checkpoint(tmp_path / "small", small, tokenizer=tok, meta={"tokenizer_sha256": tok.sha256})
    out = tmp_path / "distilled"
    result = distill(trained_run, data_dir, out, student=start, alpha=1.0, max_steps=20, **RUN)
    trained = [loss for _, loss in losses(out)][:20]
    assert sum(trained[-5:]) < 0.8 * sum(trained[:5])  # the loss (the KL alone, at alpha 1) goes down
    teacher, student = load_model(trained_run), load_model(result.run.best_checkpoint)
    assert (student.config.n_layer, student.config.n_embd) == (1, 32)
    assert kl_to(teacher, student, data_dir) < 0.8 * kl_to(teacher, small, data_dir)  # nearer than untrained
    meta = read_meta(result.run.best_checkpoint)
    assert meta["distilled_from"] == str(trained_run / "best") and (meta["alpha"], meta["temperature"]) == (1.0, 2.0)
    assert student.num_params() < teacher.num_params()  # the teacher's weights are not in the student's checkpoint
    record = json.loads((out / "compression.json").read_text())
    assert record["original"]["parameters"] == teacher.num_params()
    assert (record["method"], record["alpha"], record["student_init"]) == ("distill", 1.0, "own")
    assert record["compressed"]["parameters"] == student.num_params()
    assert record["compressed"]["flops_per_token"] < record["original"]["flops_per_token"]
    assert record["compressed"]["metrics"]["perplexity"] > 1 and "perplexity" in record["compressed"]["ci"]
    assert "teacher" in result.summary() and "student" in result.summary()
    code, text, err = run(capsys, "generate", out, "--prompt", "The", "--max-new-tokens", 4)
    assert code == 0 and text.startswith("The"), err
    code, text, err = run(capsys, "evaluate", out, "--data", corpus_file, "--task", "lm", "--n-resamples", 10)
    assert code == 0 and "perplexity" in text, err
    assert run(capsys, "info", out)[0] == 0
    code, _, err = run(capsys, "export", out, "--out", tmp_path / "hf")
    assert code == 0, err
    code, _, err = run(capsys, "critique", out, "--out", tmp_path / "crit", "--lenses", "efficiency")
    assert code == 0, err


def test_a_killed_distill_run_resumes_to_the_uninterrupted_losses(trained_run, data_dir, tmp_path, monkeypatch):
    args = dict(RUN, max_steps=8, eval_interval=4)  # a fresh student this time
    distill(trained_run, data_dir, tmp_path / "whole", student="gpt2-tiny", alpha=0.7, temperature=3.0, **args)
    crash_windows_at(monkeypatch, 6)  # dies after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        distill(trained_run, data_dir, tmp_path / "killed", student="gpt2-tiny", alpha=0.7, temperature=3.0, **args)
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [4]
    monkeypatch.undo()
    with pytest.raises(LmlabError, match="temperature 3 \\(now 2\\)"):
        distill(trained_run, data_dir, tmp_path / "killed", student="gpt2-tiny", alpha=0.7, resume=True, **args)
    distill(
        trained_run, data_dir, tmp_path / "killed", student="gpt2-tiny", alpha=0.7, temperature=3.0, resume=True, **args
    )
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")  # exact float equality
    trained = [loss for step, loss in losses(tmp_path / "whole")][:8]
    assert sum(trained[-3:]) < sum(trained[:3]) - 0.3  # the fresh student's loss goes down


def test_teacher_and_student_must_share_tokenizer_and_vocabulary(
    trained_run, data_dir, other_tokenizer_dir, tokenizer_dir, tmp_path
):
    other = Tokenizer.load(other_tokenizer_dir)
    model = build_model(preset("gpt2-tiny", vocab_size=other.vocab_size))
    save_checkpoint(tmp_path / "other-tok", model, tokenizer=other, meta={"tokenizer_sha256": other.sha256})
    same = Tokenizer.load(tokenizer_dir)
    model = build_model(preset("gpt2-tiny", vocab_size=same.vocab_size + 64))
    save_checkpoint(tmp_path / "wide-vocab", model, tokenizer=same, meta={"tokenizer_sha256": same.sha256})
    cases = [
        (dict(student=tmp_path / "other-tok"), "another tokenizer than the teacher's", ("student",)),
        (dict(student=tmp_path / "wide-vocab"), "vocabulary of 576", ("student",)),
        (dict(), "no student", ("student",)),
        (dict(student="bert-tiny"), "is a encoder, the teacher a decoder", ("student",)),
        (dict(student="gpt2-tiny", valid=data_dir), "valid is for a classifier", ("valid",)),
        (dict(student_init="teacher-layers", seq_len=4096), "exceeds the teacher's block_size", ("seq_len",)),
    ]
    for kwargs, needle, params in cases:
        with pytest.raises(LmlabError, match=needle) as info:
            distill(trained_run, data_dir, tmp_path / "out", **{**dict(max_steps=2, progress=False), **kwargs})
        assert info.value.params == params, needle
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_cli_distills_shows_flags_in_errors_and_predicts_memory(trained_run, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    assert "--teacher" in text and "--student-init" in text and "--max-steps" in text and "--lora" in text
    base = ["distill", "--teacher", trained_run, "--data", data_dir, "--out", tmp_path / "o"]
    code, _, err = run(capsys, *base, "--student-init", "teacher-layers", "--alpha", 2)
    assert code == 1 and "--alpha is 2.0" in err and "Traceback" not in err
    code, text, err = run(capsys, *base, "--student-init", "teacher-layers", "--dry-run", "--seq-len", 32)
    assert code == 0 and "predicted memory" in text and "frozen teacher" in text, err
    assert not (tmp_path / "o").exists()
    argv = [*base, "--student-init", "teacher-layers", "--max-steps", 3, "--seq-len", 32, "--micro-batch-size", 2]
    code, text, err = run(capsys, *argv, "--lora", "r=4", "--eval-batches", 1, "--no-progress", "--lr", "1e-3")
    assert code == 0 and "teacher" in text and "student" in text, err
    student = load_model(tmp_path / "o")
    assert student.config.lora["r"] == 4  # LoRA on the student; the checkpoint loads with its adapters


# ------------------------------------------------------------------------------------ a classifier teacher


def test_a_fine_tuned_encoder_classifier_distills_into_a_shallower_student(tmp_path):
    from test_finetune import sentiment, write_jsonl

    from lmlab.tokenizer import train_tokenizer
    from lmlab.train.finetune import finetune

    train = write_jsonl(tmp_path / "train.jsonl", sentiment(300, 1))
    valid = write_jsonl(tmp_path / "valid.jsonl", sentiment(80, 2))
    tok = train_tokenizer([r["text"] for r in sentiment(300, 0)], kind="wordpiece", vocab_size=120)
    torch.manual_seed(0)
    base = save_checkpoint(
        tmp_path / "base", build_model(preset("bert-tiny", vocab_size=tok.vocab_size, n_layer=2)), tokenizer=tok
    )
    args = dict(TINY_TRAIN, micro_batch_size=16, warmup_steps=5, eval_interval=20, log_interval=5)
    fit = finetune(base, "classify", train, tmp_path / "teacher", valid=valid, max_length=16, max_steps=60, **args)
    assert fit.val_scores["accuracy"] >= 0.9, fit.val_scores
    result = distill(
        tmp_path / "teacher", train, tmp_path / "student", student_init="teacher-layers", valid=valid, max_length=16,
        max_steps=40, **dict(args, lr=5e-4)
    )  # fmt: skip
    student = load_model(result.run.best_checkpoint)
    assert student.config.task == "classify" and student.config.n_layer == 1 and student.config.labels == ["neg", "pos"]
    record = json.loads((tmp_path / "student" / "compression.json").read_text())
    assert record["original"]["task"] == "classify" and "accuracy" in record["compressed"]["metrics"]
    assert record["compressed"]["metrics"]["accuracy"] >= 0.8, record["compressed"]["metrics"]
    assert record["compressed"]["parameters"] < record["original"]["parameters"]
    renamed = [{**r, "label": {"pos": "good", "neg": "bad"}[r["label"]]} for r in sentiment(50, 3)]
    with pytest.raises(LmlabError, match="the same classes in the same order") as info:
        distill(tmp_path / "teacher", write_jsonl(tmp_path / "renamed.jsonl", renamed), tmp_path / "renamed",
                student_init="teacher-layers", max_length=16, max_steps=2, **args)  # fmt: skip
    assert info.value.params == ("teacher",)
