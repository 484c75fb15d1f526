"""The robustness lens finds planted effects: a classifier whose label is the letter case of its text
changes its answer under the case perturbation (and keeps it under name swaps); a decoder that only
ever saw lower-case text finds upper-cased text far less likely; the perturbations do what they say
on fixed strings and are a pure function of the seed."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from lmlab.config import preset
from lmlab.critique.core import load_subject
from lmlab.critique.perturb import (
    PERTURBATIONS,
    change_case,
    contractions,
    load_swaps,
    names,
    perturb,
    punctuation,
    title_case,
    typos,
    whitespace,
)
from lmlab.critique.robustness import robustness
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import train_tokenizer
from lmlab.train.finetune import finetune

MALE, FEMALE = (list(column) for column in zip(*load_swaps()["names"]))
FILLER = ["the", "film", "was", "really", "a", "plot", "and", "acting", "quite", "story", "today", "we", "saw"]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(FILLER, k=5)
        words.insert(rng.randrange(6), rng.choice(MALE + FEMALE))
        out.append(" ".join(words))
    return out


def case_examples(n: int, seed: int) -> list[dict]:
    """The label is the text's case: all UPPER or all lower."""
    rng = random.Random(seed)
    return [
        {"text": t.upper(), "label": "upper"} if rng.random() < 0.5 else {"text": t, "label": "lower"}
        for t in texts(n, seed)
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("robust")
    corpus = texts(200, 0)
    tok = train_tokenizer(corpus + [t.upper() for t in corpus], kind="bpe", vocab_size=400)
    torch.manual_seed(0)
    base = save_checkpoint(
        folder / "gpt2", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, dropout=0.0)), tokenizer=tok
    )
    train = write_jsonl(folder / "train.jsonl", case_examples(400, 1))
    test = write_jsonl(folder / "test.jsonl", case_examples(80, 2))
    run = finetune(
        base,
        "classify",
        train,
        folder / "run",
        max_length=32,
        max_steps=100,
        micro_batch_size=16,
        lr=2e-3,
        warmup_steps=5,
        eval_interval=100,
        log_interval=50,
        progress=False,
        tensorboard=False,
        keep_last=1,
        seed=0,
    )
    # a decoder that only ever saw lower-case text
    torch.manual_seed(0)
    decoder = build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, dropout=0.0))
    rows = [[tok.eos_id] + tok.encode(t) + [tok.eos_id] for t in corpus[:48]]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.eos_id] * (T - len(r)) for r in rows])
    labels = torch.tensor([r[1:] + [-100] * (T - len(r)) for r in rows])
    opt = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(decoder(ids[:, :-1]).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = write_jsonl(folder / "held_out.jsonl", [{"text": t} for t in texts(40, 3)])
    return {
        "classifier": run.last_checkpoint,
        "test": test,
        "decoder": save_checkpoint(folder / "decoder", decoder.eval(), tokenizer=tok),
        "held_out": held_out,
        "base": base,
    }


@pytest.mark.slow
def test_a_case_decided_classifier_is_not_case_invariant(made):
    section = robustness(load_subject(made["classifier"], data=made["test"]))
    m = section.metrics
    per = m["perturbations"]
    assert m["n"] == 80 and m["clean_accuracy"] >= 0.95
    assert per["case"]["altered"] == 80 and per["case"]["change_rate"] >= 0.5, per["case"]
    assert per["names"]["change_rate"] <= 0.1, per["names"]  # the names keep their case
    assert per["contractions"]["altered"] == 0 and per["contractions"]["change_rate"] is None
    assert m["worst_case_accuracy"] <= per["case"]["accuracy"] < m["clean_accuracy"]
    levels = {f.text.split(":")[0]: f.level for f in section.findings}
    assert levels["case"] == "bad" and levels["contractions"] == "info"
    assert len(section.figures) == 2 and section.tables
    assert robustness(load_subject(made["classifier"], data=made["test"])).metrics == m  # seeded: the same run twice
    assert (
        robustness(load_subject(made["classifier"], data=made["test"], seed=1)).metrics["perturbations"]["typos"]
        != per["typos"]
    )


def test_a_lower_case_decoder_is_thrown_by_upper_case(made):
    section = robustness(load_subject(made["decoder"], text=made["held_out"]), perturbations=["case", "names"])
    per = section.metrics["perturbations"]
    assert set(per) == {"case", "names"} and section.metrics["n"] == 40
    assert per["case"]["word_perplexity_ratio"] > 5 and per["case"]["worse_rate"] == 1.0
    assert per["names"]["word_perplexity_ratio"] < 1.5 < per["case"]["word_perplexity_ratio"]
    assert {f.level for f in section.findings if f.text.startswith("case")} == {"warn"}


def test_skips_and_bad_options(made):
    assert "--data" in robustness(load_subject(made["classifier"])).skipped
    assert "--text" in robustness(load_subject(made["base"])).skipped
    with pytest.raises(LmlabError, match="perturbation 'shout'"):
        robustness(load_subject(made["base"]), perturbations=["shout"])


# -- the perturbations on fixed strings -------------------------------------------------------------------


def test_contractions_expand_or_contract():
    rng = random.Random(0)
    assert contractions("I don't think it's done, Don't go", rng) == "I do not think it is done, Do not go"
    assert contractions("We do not know. IT IS late; they are here", rng) == "We don't know. IT'S late; they're here"
    assert contractions("I can’t", rng) == "I cannot"


def test_case_punctuation_whitespace_names_typos():
    rng = random.Random(0)
    assert title_case("hello WORLD, it's me") == "Hello World, It's Me"
    for text in ("hello world", "HELLO WORLD", "Hello World"):
        out = change_case(text, random.Random(1))
        assert out != text and out in (text.lower(), text.upper(), title_case(text))
    assert punctuation("Hi, there! (ok)", rng) == "Hi there ok"
    assert punctuation("hi there  ", rng) == "hi there.  "
    spaced = whitespace("a b  c d", rng)
    assert re.sub(" +", " ", spaced) == "a b c d" and all(len(run) > 1 for run in re.findall(" +", spaced))
    swapped = names("Mary met JOHN; mary smiled.", rng)
    first, second, third = (
        re.findall(r"\w+", swapped)[0],
        re.findall(r"\w+", swapped)[2],
        re.findall(r"\w+", swapped)[3],
    )
    assert first.lower() in FEMALE and first.lower() != "mary" and third == first.lower()
    assert second.isupper() and second.lower() in MALE and second.lower() != "john"
    text = "the wonderful acting was really excellent and so on"
    typo = typos(text, random.Random(0), rate=1.0)
    for a, b in zip(text.split(), typo.split()):
        assert (
            (a == b) if len(a) < 4 else (a != b and a[0] == b[0] and a[-1] == b[-1] and len(b) in (len(a), len(a) - 1))
        )


def test_perturbations_are_a_function_of_the_seed():
    text = "The wonderful acting was really excellent, don't you think, Mary? It is."
    for name in PERTURBATIONS:
        assert perturb(name, text, 3, 7) == perturb(name, text, 3, 7)
    long = " ".join(["wonderful acting"] * 30)
    assert perturb("typos", long, 3, 7) != perturb("typos", long, 4, 7) != long
    assert perturb("typos", long, 3, 7) != perturb("typos", long, 3, 8)
