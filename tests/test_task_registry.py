"""The task layer (lmlab.tasks): one registry, one Task object per task, and no task-name branches elsewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lmlab.config import TASKS as HEAD_TASKS
from lmlab.errors import LmlabError
from lmlab.tasks import TASKS, Task, TaskFields, get_task, task_names

LMLAB = Path(__file__).resolve().parent.parent / "lmlab"
NAMES = "|".join(TASKS)
# a comparison with a task's name: `task == "tag"`, `config.task in ("tag", "qa")`, `kind != "classify"`, …
# (`arch == "seq2seq"` names an architecture, not a task)
BRANCH = re.compile(
    rf"\btask\s*(==|!=)\s*[\"']|\btask\s+(not\s+)?in\s*[(\[{{]\s*[\"']"
    rf"|(?<!arch )(==|!=)\s*[\"']({NAMES})[\"']"
    rf"|\bin\s*[(\[{{]\s*[\"']({NAMES})[\"']"
)
# files being rewritten in another change, each with what is left in it
PENDING: dict[str, str] = {}


def test_every_task_implements_the_protocol_and_is_registered_by_its_name():
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name
        assert task.uses and set(task.uses) <= {"finetune", "evaluate"}
    assert task_names("finetune") == ("classify", "tag", "qa", "seq2seq", "chat")
    assert task_names("evaluate") == ("classify", "tag", "qa", "seq2seq", "lm")


def test_the_tasks_with_a_head_are_the_heads_a_model_config_takes():
    assert {name for name, task in TASKS.items() if not task.generates} | {""} == set(HEAD_TASKS)


def test_an_unknown_task_is_a_one_line_error_listing_the_known_ones():
    with pytest.raises(LmlabError, match=r"^unknown task 'regress'; expected one of classify, tag, qa, seq2seq, chat$"):
        get_task("regress")
    with pytest.raises(LmlabError, match="expected one of classify, tag, qa, seq2seq, lm"):
        get_task("chat", "evaluate")


def test_task_fields_carry_the_defaults_the_verbs_document():
    fields = TaskFields()
    assert (fields.text_field, fields.pair_field, fields.label_field) == ("text", None, "label")
    assert (fields.source_field, fields.target_field, fields.max_length, fields.max_target_length) == (
        "source",
        "target",
        128,
        128,
    )
    assert fields.replace(max_length=16).max_length == 16


def test_the_task_layer_imports_nothing_above_it():
    above = (
        "lmlab.io",
        "lmlab.api",
        "lmlab.train",
        "lmlab.evaluate",
        "lmlab.critique",
        "lmlab.cli",
        "lmlab.serve",
        "lmlab.demo",
    )
    for path in (LMLAB / "tasks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in getattr(node, "names", [])]
            )
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bad = [n for n in names if n.startswith(above)]
                assert not bad, f"{path.name} imports {bad}"


def test_evaluate_and_critique_import_nothing_from_train():
    for folder in ("evaluate", "critique"):
        for path in (LMLAB / folder).glob("*.py"):
            assert "lmlab.train" not in path.read_text(), path


def test_no_code_outside_the_task_layer_branches_on_a_task_name():
    found = []
    for path in sorted(LMLAB.rglob("*.py")):
        where = path.relative_to(LMLAB).as_posix()
        if where.startswith("tasks/") or where in PENDING:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if BRANCH.search(code):
                found.append(f"{where}:{number}: {line.strip()}")
    assert not found, "task-name branches outside lmlab/tasks/:\n" + "\n".join(found)


def documented_task() -> type:
    """The example task of docs/tasks.md ("Adding a task"), exactly as written there."""
    text = (LMLAB.parent / "docs" / "tasks.md").read_text()
    code = re.search(r"`lmlab/tasks/choice\.py`.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {"__name__": "lmlab.tasks.choice"}
    exec(compile(code, "docs/tasks.md", "exec"), namespace)
    return namespace["Choice"]


def test_the_documented_example_task_fine_tunes_and_evaluates_with_no_edit_outside_the_task_layer(
    tmp_path, monkeypatch
):
    import json
    import random

    import torch

    from lmlab.config import preset
    from lmlab.evaluate.runner import evaluate
    from lmlab.io.checkpoint import read_meta, save_checkpoint
    from lmlab.model import build_model
    from lmlab.tokenizer import train_tokenizer
    from lmlab.train.finetune import finetune

    monkeypatch.setitem(TASKS, "choice", documented_task()())  # the one registry line
    words = ["red", "green", "blue", "black", "white", "yellow"]
    rng = random.Random(0)

    def write(path: Path, n: int) -> Path:
        rows = []
        for _ in range(n):
            choices = rng.sample(words, 3)
            answer = rng.randrange(3)
            rows.append({"question": f"say {choices[answer]} :", "choices": choices, "answer": answer})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    tok = train_tokenizer([f"say {w} : {w}" for w in words] * 20, kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    base = save_checkpoint(
        tmp_path / "base", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, dropout=0.0)), tokenizer=tok
    )
    train, valid = write(tmp_path / "train.jsonl", 64), write(tmp_path / "valid.jsonl", 12)
    result = finetune(
        base,
        "choice",
        train,
        tmp_path / "run",
        valid=valid,
        max_length=16,
        max_steps=20,
        eval_interval=10,
        micro_batch_size=8,
        lr=3e-3,
        progress=False,
        tensorboard=False,
    )
    assert set(result.val_scores) == {"accuracy"} and read_meta(result.best_checkpoint)["objective"] == "choice"
    scored = evaluate(result.best_checkpoint, valid, task="choice")
    assert scored["task"] == "choice" and 0.0 <= scored["accuracy"] <= 1.0
    (tmp_path / "bad.jsonl").write_text('{"question": "say red :", "choices": ["red"], "answer": 3}\n')
    with pytest.raises(LmlabError, match=r"bad\.jsonl:1: expected \"choices\""):
        finetune(base, "choice", tmp_path / "bad.jsonl", tmp_path / "bad-run", max_length=16, max_steps=1)
