"""Chat: templates render as transformers renders them, fine-tuning learns only the assistant turns, a
chat-tuned tiny model answers through ChatSession and `lmlab chat`, and bad conversations are one-line errors."""

from __future__ import annotations

import io
import json
import random
import re
import sys

import pytest
import torch
from conftest import TINY_TRAIN

from lmlab.chat import ChatSession, repl
from lmlab.config import preset
from lmlab.data.tasks import encode_conversation, read_chat
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import load_model, read_meta, save_checkpoint
from lmlab.model import build_model
from lmlab.templates import DEFAULT_CHAT_TEMPLATE, end_of_turn
from lmlab.tokenizer import Tokenizer, train_tokenizer
from lmlab.train.finetune import finetune

# real-style templates, written out: ChatML (Qwen's default system prompt, a {% generation %} block), Llama 3, Llama 2
# (system prompt folded into the first turn, namespace, raise_exception), and one using tojson, dict, strftime_now and
# loop controls
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2 = """{%- set ns = namespace(system='') -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- set ns.system = messages[0]['content'] -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{{ bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' and loop.first and ns.system %}
        {{- '[INST] <<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + message['content'] | trim + ' [/INST]' }}
    {%- elif message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] | trim + ' [/INST]' }}
    {%- else %}
        {{- ' ' + message['content'] | trim + ' ' + eos_token }}
    {%- endif %}
{%- endfor %}
"""
SUMMARY = """{% for message in messages %}
  {% if message.role == 'system' %}{% continue %}{% endif %}
  {{ message | tojson }}
  {% if loop.index > 4 %}{% break %}{% endif %}
{% endfor %}
{% set meta = dict(year=strftime_now('%Y'), n=messages | length) %}
{{ meta | tojson(sort_keys=True) }}{% if add_generation_prompt %}>>> {% endif %}"""

SPECIALS = [
    "<|endoftext|>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
]
COLOURS = {"red": "rouge", "blue": "bleu", "green": "vert", "black": "noir", "white": "blanc", "yellow": "jaune"}
SYSTEM = "Translate the colour."

CONVERSATIONS = [
    [{"role": "user", "content": "red"}, {"role": "assistant", "content": "rouge"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "red café 日本"},
        {"role": "assistant", "content": "rouge"},
        {"role": "user", "content": " blue"},
        {"role": "assistant", "content": "bleu", "name": None},
    ],
]


def dialogues(n, seed):
    """Conversations of 1–4 turns: the user names a colour, the assistant answers its French name."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        for colour in rng.choices(list(COLOURS), k=rng.randint(1, 4)):
            messages += [{"role": "user", "content": colour}, {"role": "assistant", "content": COLOURS[colour]}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def tok():
    texts = [
        f"<|im_start|>user\n{e}<|endoftext|>\n<|im_start|>assistant\n{f}<|endoftext|>\n" for e, f in COLOURS.items()
    ] * 10
    texts += [f"<|im_start|>system\n{SYSTEM} Be brief. café 日本<|endoftext|>\n"] * 10
    # byte-level BPE: WordPiece training is not deterministic (huggingface/tokenizers#1794)
    return train_tokenizer(texts, kind="bpe", vocab_size=320, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def chat_run(tok, tmp_path_factory):
    """A gpt2-tiny fine-tuned on the colour dialogues (shared by the tests that talk to it)."""
    folder = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    base = save_checkpoint(
        folder / "base", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, dropout=0.0)), tokenizer=tok
    )
    train, valid = (
        write_jsonl(folder / "train.jsonl", dialogues(400, 1)),
        write_jsonl(folder / "valid.jsonl", dialogues(40, 2)),
    )
    args = dict(
        TINY_TRAIN, micro_batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=50, log_interval=25, keep_last=1, seed=0
    )
    result = finetune(base, "chat", train, folder / "run", valid=valid, max_length=96, max_steps=100, **args)
    return dict(base=base, train=train, valid=valid, result=result, folder=folder)


# -- templates ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [CHATML, LLAMA3, LLAMA2, SUMMARY], ids=["chatml", "llama3", "llama2", "tojson"])
def test_templates_render_as_transformers_renders_them(tok, tmp_path, template):
    from transformers import PreTrainedTokenizerFast

    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"),
        chat_template=template,
        **{f"{role}_token": token for role, token in tok.special_tokens.items()},
    )
    for messages in [CONVERSATIONS[0][:1], *CONVERSATIONS]:
        for prompt in (False, True):
            ours = tok.apply_chat_template(messages, add_generation_prompt=prompt, chat_template=template)
            assert ours == hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            ids = tok.apply_chat_template(messages, add_generation_prompt=prompt, chat_template=template, tokenize=True)
            assert ids == hf.apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=True, return_dict=False
            )


def test_template_errors_and_the_sandbox_are_lmlab_errors(tok):
    with pytest.raises(LmlabError, match="Conversation roles must alternate"):
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], chat_template=LLAMA2
        )
    with pytest.raises(LmlabError, match="chat template"):
        tok.apply_chat_template(CONVERSATIONS[0], chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(LmlabError, match="underscore"):
        tok.apply_chat_template(CONVERSATIONS[0], chat_template="{% set ns = namespace(_x=1) %}")
    with pytest.raises(LmlabError, match="TemplateSyntaxError"):
        tok.apply_chat_template(CONVERSATIONS[0], chat_template="{% for m in messages %}")
    with pytest.raises(LmlabError, match="non-empty list of messages"):
        tok.apply_chat_template([])


BOMBS = {  # templates that would loop or allocate without end: each is cut off before it does
    "repeat a string": (
        "{{ 'x' * 100000000000 }}",
        r"exceeded 67,108,864 characters \(a repetition of 100,000,000,000\)",
    ),
    "repeat a list": ("{{ [0] * 10**10 }}", r"exceeded 67,108,864 characters \(a repetition"),
    "a huge power": ("{{ 2 ** 100000000 }}", r"exceeded integers of 4,096 bits \(a power"),
    "nested ranges": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        r"exceeded 1,000,000 range\(\) items",
    ),
    "a huge range": (
        "{{ range(10**12)|list|length }}",
        r"exceeded 1,000,000 range\(\) items \(a range of 1,000,000,000,000\)",
    ),
    "doubling in a namespace": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        r"\(a concatenation of",
    ),
    "a str method's width": ("{{ 'x'.ljust(10**11) }}", r"\(a width argument of 100,000,000,000\)"),
    "a filter's width": ("{{ 'x'|center(10**11) }}", r"\(a width argument"),
    "a %-format width": ("{{ '%0999999999999d' % 1 }}", r"\(a format width"),
    "a str.format width": ("{{ '{:>999999999999}'.format(1) }}", r"\(a format width"),
    "endless recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", r"RecursionError"),
}


@pytest.mark.parametrize("template, match", BOMBS.values(), ids=BOMBS)
def test_template_bombs_are_one_line_errors(tok, template, match):
    with pytest.raises(LmlabError, match=r"^chat template: (rendering )?.*" + match) as err:
        tok.apply_chat_template(CONVERSATIONS[0], chat_template=template)
    assert "\n" not in str(err.value)


def test_a_render_is_bounded_in_output_and_time_and_the_error_names_the_file(tok, tmp_path, monkeypatch):
    import lmlab.templates as chat

    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for i in range(1000) %}{{ messages[0]['content'] * 20 }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.load(tmp_path)
    assert len(loaded.apply_chat_template(CONVERSATIONS[0])) == 1000 * 20 * len(CONVERSATIONS[0][0]["content"])
    monkeypatch.setattr(chat, "TEMPLATE_MAX_CHARS", 1000)
    with pytest.raises(
        LmlabError,
        match=(
            rf"^chat template of {re.escape(str(tmp_path / 'tokenizer_config.json'))}: "
            r"rendering exceeded 1,000 characters \(output of"
        ),
    ):
        loaded.apply_chat_template(CONVERSATIONS[0])
    monkeypatch.setattr(chat, "TEMPLATE_MAX_CHARS", 2**26)
    monkeypatch.setattr(chat, "TEMPLATE_MAX_SECONDS", 0.0)
    with pytest.raises(LmlabError, match="rendering exceeded 0 seconds"):
        loaded.apply_chat_template(CONVERSATIONS[0])


def test_ordinary_template_code_renders_within_the_budget(tok):
    template = (
        "{% for i in range(3) %}{{ i }}{% endfor %}|{{ range(3)|list }}|{{ range(4)|reverse|join(',') }}|"
        "{{ range(10)[2:4]|list }}|{{ 3 in range(5) }}|{{ '%3s' % 'a' }}|{{ '{:>3}'.format('b') }}|{{ 'x'|center(3) }}|"
        "{{ 2 ** 10 }}|{{ [1] + [2] }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + loop.length %}{% endfor %}{{ ns.n }}|"
        "{{ '%d'|format(1700000000) }}"
    )
    assert tok.apply_chat_template(CONVERSATIONS[0][:2], chat_template=template) == (
        "012|[0, 1, 2]|3,2,1,0|[2, 3]|True|  a|  b| x |1024|[1, 2]|4|1700000000"
    )


def test_the_default_template_round_trips_through_transformers(tok, tmp_path):
    from transformers import AutoTokenizer

    assert tok.chat_template is None and tok.apply_chat_template(CONVERSATIONS[0]) == (
        "<|im_start|>user\nred<|endoftext|>\n<|im_start|>assistant\nrouge<|endoftext|>\n<|im_start|>assistant\n"
    )
    assert end_of_turn(tok) == "<|endoftext|>"
    saved = Tokenizer(tok.backend, tok.special_tokens, chat_template=DEFAULT_CHAT_TEMPLATE)
    saved.save(tmp_path)
    loaded, hf = Tokenizer.load(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    for messages in CONVERSATIONS:
        assert loaded.apply_chat_template(messages) == hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert loaded.apply_chat_template(messages, tokenize=True) == hf.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False
        )


# -- masking -----------------------------------------------------------------------------------------------
def trained_runs(tok, ids, labels):
    """The decoded text of each run of labelled tokens, checking that labels equal the ids where set."""
    runs, current = [], []
    for token, label in zip(ids + [None], labels + [-100]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


@pytest.mark.parametrize("template, marker", [(None, "<|endoftext|>"), (CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")])
def test_labels_are_exactly_the_assistant_messages_and_their_end_marker(tok, template, marker):
    for messages in CONVERSATIONS:
        ids, labels = encode_conversation(tok, messages, template)
        assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False, chat_template=template))
        assert trained_runs(tok, ids, labels) == [m["content"] + marker for m in messages if m["role"] == "assistant"]


def test_a_template_that_is_not_prefix_wise_is_a_clear_error(tok):
    with pytest.raises(LmlabError, match="does not render this conversation prefix-wise"):
        encode_conversation(tok, CONVERSATIONS[1], SUMMARY)


# -- fine-tuning and talking ----------------------------------------------------------------------------
@pytest.mark.slow
def test_chat_fine_tuning_learns_the_dialogue_task(chat_run, tmp_path):
    from transformers import AutoTokenizer

    import lmlab

    result = chat_run["result"]
    assert result.val_scores["token_accuracy"] >= 0.95, result.val_scores
    assert result.best_val_loss is not None and read_meta(result.best_checkpoint)["objective"] == "chat"
    config = json.loads((result.best_checkpoint / "tokenizer_config.json").read_text())
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE  # chat, export and training render alike
    hf = AutoTokenizer.from_pretrained(result.best_checkpoint)
    assert hf.apply_chat_template(CONVERSATIONS[0], tokenize=False) == Tokenizer.load(
        result.best_checkpoint
    ).apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False)

    session = ChatSession(lmlab.load(result.best_checkpoint, device="cpu"), system=SYSTEM, max_new_tokens=8)
    for colour in ["blue", "green", "red", "white"]:
        assert "".join(session.send(colour)) == COLOURS[colour]
    assert [m["content"] for m in session.messages] == [
        "blue",
        "bleu",
        "green",
        "vert",
        "red",
        "rouge",
        "white",
        "blanc",
    ]
    assert session.conversation()[0] == {"role": "system", "content": SYSTEM}


def test_the_oldest_turns_are_dropped_when_the_conversation_outgrows_the_context(chat_run):
    import lmlab

    lm = lmlab.load(chat_run["result"].best_checkpoint, device="cpu")
    session = ChatSession(lm, system=SYSTEM, max_new_tokens=lm.block_size - 40)  # 40 tokens of room: a few turns
    dropped = 0
    for colour in ["red", "blue", "green", "black", "white", "yellow"]:
        assert "".join(session.send(colour)) == COLOURS[colour]
        dropped += session.dropped
        prompt = lm.tokenizer.apply_chat_template(session.conversation(session.messages[:-1]))
        assert len(lm.tokenizer.encode(prompt)) <= 40
    assert dropped >= 2 and session.messages[-2:] == [
        {"role": "user", "content": "yellow"},
        {"role": "assistant", "content": "jaune"},
    ]
    assert session.conversation()[0]["role"] == "system" and len(session.messages) < 12
    before = list(session.messages)
    with pytest.raises(LmlabError, match="the message does not fit"):
        list(session.send("red " * 60))
    assert session.messages == before


def test_the_repl_drives_turns_reset_and_system(chat_run):
    import lmlab

    session = ChatSession(lmlab.load(chat_run["result"].best_checkpoint, device="cpu"), max_new_tokens=8)
    lines, seen = iter(["red", "blue", "/system " + SYSTEM, "/reset", "", "/what", "green", "/quit", "never read"]), []

    def read(prompt):
        seen.append(len(session.messages))
        return next(lines)

    out, err = io.StringIO(), io.StringIO()
    assert repl(session, read, out, err) == 0
    assert out.getvalue() == "rouge\nbleu\nvert\n"
    assert seen == [0, 2, 4, 4, 0, 0, 0, 2]  # history grows a turn at a time and /reset empties it
    assert session.system == SYSTEM and session.messages == [
        {"role": "user", "content": "green"},
        {"role": "assistant", "content": "vert"},
    ]
    assert (
        "history cleared" in err.getvalue()
        and "system prompt set" in err.getvalue()
        and "unknown command /what" in err.getvalue()
    )


def test_lmlab_chat_and_show_masking_through_the_cli(chat_run, tmp_path, capsys, monkeypatch):
    from lmlab.cli import main

    monkeypatch.setattr(
        sys, "stdin", io.StringIO("red\n/system Translate the colour.\nblack\n")
    )  # ends at end of input
    code = main(
        [
            "chat",
            str(chat_run["result"].best_checkpoint),
            "--max-new-tokens",
            "8",
            "--system",
            "Be brief.",
            "--device",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and out == "» rouge\n» » noir\n» " and "/reset clears the history" in err

    code = main(
        [
            "finetune",
            str(chat_run["base"]),
            "--task",
            "chat",
            "--train",
            str(chat_run["train"]),
            "--out",
            str(tmp_path / "x"),
            "--show-masking",
        ]
    )
    out, err = capsys.readouterr()
    first = json.loads(chat_run["train"].read_text().splitlines()[0])["messages"]
    assert code == 0 and not (tmp_path / "x").exists()
    assert re.findall(r"\[\[(.*?)\]\]", out, re.S) == [
        m["content"] + "<|endoftext|>" for m in first if m["role"] == "assistant"
    ]
    assert (
        re.sub(r"\[\[|\]\]", "", out)
        == Tokenizer.load(chat_run["base"]).apply_chat_template(first, add_generation_prompt=False) + "\n"
    )
    assert "train.jsonl:1" in err


def test_help_documents_chat_and_show_masking(capsys):
    from lmlab.cli import main

    for verb, needles in (
        (["chat"], ["--system", "/reset", "--top-p", "--max-new-tokens"]),
        (["finetune"], ["--show-masking", "chat"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*verb, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and all(needle in out for needle in needles)


@pytest.mark.slow
def test_lora_chat_fine_tuning_runs(chat_run, tmp_path):
    result = finetune(
        chat_run["base"],
        "chat",
        chat_run["train"],
        tmp_path / "lora",
        max_length=96,
        lora="r=4,alpha=8",
        **dict(TINY_TRAIN, max_steps=2, eval_interval=2),
    )
    assert read_meta(result.last_checkpoint)["objective"] == "chat"
    assert Tokenizer.load(result.last_checkpoint).chat_template == DEFAULT_CHAT_TEMPLATE


# -- packing ---------------------------------------------------------------------------------------------
def test_packed_rows_train_each_conversation_as_if_alone(chat_run, tok):
    """A packed row's logits equal each conversation's run alone (block-diagonal causal mask, positions
    restarting), labels keep only assistant tokens, and no label crosses from one conversation to the next."""
    from lmlab.tasks import load_task_data, pack_examples
    from lmlab.tasks import task_objective as TaskObjective

    data = load_task_data("chat", chat_run["valid"], tok, max_length=96)
    packed = pack_examples(data.features, 96)
    assert len(packed["input_ids"]) < len(data) and all(len(row) <= 96 for row in packed["input_ids"])
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in data.features["input_ids"])  # nothing lost
    model = load_model(chat_run["result"].best_checkpoint)
    batch = TaskObjective("chat", packed, tok.eos_id, model_arch="decoder").batch(
        torch.arange(len(packed["input_ids"]))
    )
    with torch.no_grad():
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])
        for row, examples in enumerate(packed["examples"]):
            start = 0
            for k in examples:
                ids = data.features["input_ids"][k]
                alone = model(torch.tensor([ids]))[0]
                assert torch.allclose(logits[row, start : start + len(ids)], alone, atol=1e-5)
                assert packed["labels"][row][start + 1 : start + len(ids)] == data.features["labels"][k][1:]
                assert packed["labels"][row][start] == -100  # the boundary: nothing learnt across it
                start += len(ids)
    assert sorted(k for examples in packed["examples"] for k in examples) == list(range(len(data)))
    objective = TaskObjective("chat", packed, tok.eos_id, model_arch="decoder")
    unpacked = TaskObjective("chat", data.features, tok.eos_id, model_arch="decoder")
    with torch.no_grad():  # the same assistant tokens, so the same mean loss
        assert objective.loss(model, batch).item() == pytest.approx(
            unpacked.loss(model, unpacked.batch(torch.arange(len(data)))).item(), rel=1e-5
        )


def test_packed_chat_fine_tuning_runs(chat_run, tmp_path, capsys):
    result = finetune(
        chat_run["base"],
        "chat",
        chat_run["train"],
        tmp_path / "packed",
        max_length=96,
        pack=True,
        **dict(TINY_TRAIN, max_steps=2, eval_interval=2),
    )
    assert read_meta(result.last_checkpoint)["objective"] == "chat"
    assert "conversations packed into" in capsys.readouterr().err
    with pytest.raises(LmlabError, match="pack packs conversations for task chat"):
        finetune(
            chat_run["base"],
            "seq2seq",
            chat_run["train"],
            tmp_path / "x",
            max_length=32,
            max_target_length=32,
            pack=True,
        )


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, needle",
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "bad.jsonl:2: message 1: unknown role 'bot'; expected one of system, user, assistant",
        ),
        ({"messages": []}, "bad.jsonl:2: empty 'messages'; expected a conversation"),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]},
            "bad.jsonl:2: no assistant message; expected",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
            "bad.jsonl:2: message 0: field 'content' is 3; expected str",
        ),
        (
            {"messages": [{"role": "assistant", "content": "hi"}]},
            "bad.jsonl:2: message 0 is an assistant message; expected",
        ),
        (
            {"text": "hello"},
            "bad.jsonl:2: no conversation (fields present: 'text'); expected 'messages', or 'prompt' with 'response'",
        ),
        ('{"messages": [', "bad.jsonl:2: invalid JSON"),
    ],
)
def test_bad_conversations_are_file_line_errors(tmp_path, line, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "red", "completion": "rouge"}, line])
    with pytest.raises(LmlabError) as info:
        read_chat(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_chat_runs_are_one_line_errors(chat_run, tok, tmp_path, capsys):
    from lmlab.cli import main

    base, train = chat_run["base"], chat_run["train"]
    assert read_chat(write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "red", "response": "rouge"}])).conversations == [
        [{"role": "user", "content": "red"}, {"role": "assistant", "content": "rouge"}]
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "tool", "content": "x"}]}])
    code = main(["finetune", str(base), "--task", "chat", "--train", str(bad), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert (
        code == 1
        and err.count("\n") == 1
        and "lmlab: error: " in err
        and "bad.jsonl:1: message 0: unknown role 'tool'" in err
    )
    long = write_jsonl(
        tmp_path / "long.jsonl",
        [{"messages": [{"role": "user", "content": "red " * 40}, {"role": "assistant", "content": "rouge"}]}],
    )
    with pytest.raises(LmlabError, match="long.jsonl:1: no assistant token within the first 16 tokens"):
        finetune(base, "chat", long, tmp_path / "b", max_length=16)
    with pytest.raises(LmlabError, match="show_masking shows which tokens task chat trains on"):
        finetune(base, "classify", train, tmp_path / "c", show_masking=True)
    encoder = save_checkpoint(
        tmp_path / "bert", build_model(preset("bert-tiny", vocab_size=tok.vocab_size)), tokenizer=tok
    )
    with pytest.raises(LmlabError, match="an encoder model; task chat fine-tunes decoders"):
        finetune(encoder, "chat", train, tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")
