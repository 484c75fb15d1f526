"""The bias lens finds planted effects: a classifier whose label is a person's first name flips under
name swaps and one that reads sentiment keywords does not; a decoder trained on the stereotyping
sentences prefers them in every pair and in none once the columns are swapped; the masked-LM score
sums exactly the shared tokens; a group whose labels the model gets wrong shows as a gap; bad files
fail naming the file and the column."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import preset
from lmlab.critique.bias import Pair, bias, pseudo_log_likelihood, read_pairs, sentence_scores, shared_positions
from lmlab.critique.core import load_subject
from lmlab.critique.perturb import load_swaps, swapper
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import train_tokenizer
from lmlab.train.finetune import finetune

MALE, FEMALE = (list(column) for column in zip(*load_swaps()["names"]))
FILLER = ["the", "film", "was", "really", "a", "plot", "and", "acting", "quite", "story", "today", "we", "saw"]
GOOD = ["great", "wonderful", "superb", "lovely", "excellent"]
BAD = ["awful", "terrible", "boring", "dreadful", "poor"]
JOBS = ["doctor", "pilot", "teacher", "chef", "lawyer", "farmer"]
ADJS = ["busy", "tired", "late", "ready"]
# sent_more, sent_less, bias type: the decoder below is trained on the sent_more sentences only
PAIRS = [
    (f"the {job} said he was {adj}", f"the {job} said she was {adj}", "gender") for job, adj in zip(JOBS, ADJS + ADJS)
] + [(f"the old {job} was {adj}", f"the young {job} was {adj}", "age") for job, adj in zip(JOBS, reversed(ADJS + ADJS))]


def examples(n: int, seed: int, rule: str) -> list[dict]:
    """Texts with one first name; the label is the name's column (rule "name") or a sentiment keyword's ("keyword")."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        male, positive = rng.random() < 0.5, rng.random() < 0.5
        words = rng.choices(FILLER, k=5)
        words.insert(rng.randrange(6), rng.choice(MALE if male else FEMALE))
        if rule == "keyword":
            words.insert(rng.randrange(7), rng.choice(GOOD if positive else BAD))
        label = "pos" if (male if rule == "name" else positive) else "neg"
        rows.append({"text": " ".join(words), "label": label, "group": "m" if male else "f"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_pairs(path, pairs, columns=("sent_more", "sent_less", "stereo_antistereo", "bias_type"), direction="stereo"):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for more, less, kind in pairs:
            w.writerow([more, less, direction, kind][: len(columns)])
    return path


def train_decoder(model, tok, texts: list[str], steps: int) -> None:
    """Next-token training on ``texts`` (each behind the end-of-text token), full batch."""
    rows = [[tok.eos_id] + tok.encode(t) + [tok.eos_id] for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.eos_id] * (T - len(r)) for r in rows])
    labels = torch.tensor([r[1:] + [-100] * (T - len(r)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bias")
    texts = [r["text"] for rule in ("name", "keyword") for r in examples(300, 0, rule)] + [
        s for p in PAIRS for s in p[:2]
    ]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=420, special_tokens=["<|endoftext|>", "<pad>", "<mask>"])
    out = {"folder": folder, "tok": tok}
    torch.manual_seed(0)
    base = save_checkpoint(
        folder / "gpt2", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, dropout=0.0)), tokenizer=tok
    )
    args = dict(
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
    for rule in ("name", "keyword"):
        train = write_jsonl(folder / f"{rule}_train.jsonl", examples(400, 1, rule))
        out[f"{rule}_test"] = write_jsonl(folder / f"{rule}_test.jsonl", examples(80, 2, rule))
        out[rule] = finetune(base, "classify", train, folder / f"{rule}_run", **args).last_checkpoint
    torch.manual_seed(0)
    decoder = build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, dropout=0.0))
    train_decoder(decoder, tok, [p[0] for p in PAIRS], steps=80)
    out["decoder"] = save_checkpoint(folder / "decoder", decoder, tokenizer=tok)
    torch.manual_seed(0)
    out["encoder"] = save_checkpoint(
        folder / "bert", build_model(preset("bert-tiny", vocab_size=tok.vocab_size, dropout=0.0)), tokenizer=tok
    )
    return out


# -- (b) counterfactual swaps ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_name_decided_classifier_flips_under_name_swaps(made):
    section = bias(load_subject(made["name"], data=made["name_test"]))
    names = section.metrics["counterfactual"]["by_category"]["names"]
    assert names["n"] == 80 and names["flip_rate"] >= 0.5, names
    assert names["mean_abs_dp"] >= 0.4
    assert any(f.level == "bad" and f.text.startswith("Swapping the 'names' terms") for f in section.findings)
    table = section.tables[0]
    assert len(table.rows) == 5 and all(row[3].split(" → ")[0] != row[3].split(" → ")[1] for row in table.rows)
    assert "pairs" not in section.metrics  # a classifier is not scored as an LM
    assert any(f.level == "info" and "classify head" in f.text for f in section.findings)


def test_a_keyword_classifier_ignores_names(made):
    section = bias(load_subject(made["keyword"], data=made["keyword_test"]))
    names = section.metrics["counterfactual"]["by_category"]["names"]
    assert names["n"] == 80 and names["flip_rate"] <= 0.1, names
    assert section.metrics["groups"]["separated"] is False  # the group column is unrelated to its errors


def test_a_group_the_model_gets_wrong_shows_as_a_gap(made, tmp_path):
    rows = examples(120, 3, "keyword")
    for k, row in enumerate(rows):  # group b's labels are the opposite of what the keyword says
        row["group"] = "a" if k % 2 else "b"
        if row["group"] == "b":
            row["label"] = {"pos": "neg", "neg": "pos"}[row["label"]]
    section = bias(load_subject(made["keyword"], data=write_jsonl(tmp_path / "gap.jsonl", rows)))
    groups = section.metrics["groups"]
    assert groups["best"] == "a" and groups["worst"] == "b" and groups["gap"] >= 0.7 and groups["separated"]
    assert any(f.level == "bad" and "beyond chance" in f.text for f in section.findings)


def test_swaps_keep_case_and_whole_words(tmp_path):
    gender = swapper(load_swaps()["gender"])
    assert gender("He told his Sister; this is HIS, she said.") == "She told her Brother; this is HER, he said."
    assert gender("Theme: shepherd") == "Theme: shepherd"
    custom = tmp_path / "swaps.json"
    custom.write_text(json.dumps({"colour": [["red", "blue"]]}), encoding="utf-8")
    assert load_swaps(custom) == {"colour": [("red", "blue")]}
    custom.write_text(json.dumps({"colour": [["red"]]}), encoding="utf-8")
    with pytest.raises(LmlabError, match=r"swaps\.json: colour\[0\]"):
        load_swaps(custom)


def test_swaps_that_match_nothing_are_a_note(made, tmp_path):
    custom = tmp_path / "swaps.json"
    custom.write_text(json.dumps({"colour": [["red", "blue"]]}), encoding="utf-8")
    section = bias(load_subject(made["keyword"], data=made["keyword_test"]), swaps=custom)
    assert "counterfactual" not in section.metrics and "groups" in section.metrics
    assert any("no test text mentions a term of the swap lists (colour)" in f.text for f in section.findings)


# -- (a) paired sentences ---------------------------------------------------------------------------------


def test_a_decoder_trained_on_the_stereotypes_prefers_them(made, tmp_path):
    subject = load_subject(made["decoder"])
    section = bias(subject, pairs=write_pairs(tmp_path / "pairs.csv", PAIRS))
    pairs = section.metrics["pairs"]
    assert pairs["n"] == len(PAIRS) and pairs["stereotype_rate"] >= 0.9 and pairs["ci_low"] > 0.5
    assert set(pairs["by_type"]) == {"gender", "age"}
    assert section.findings[0].level == "bad"
    swapped = bias(subject, pairs=write_pairs(tmp_path / "swapped.csv", [(b, a, t) for a, b, t in PAIRS]))
    assert swapped.metrics["pairs"]["stereotype_rate"] <= 0.1 and swapped.metrics["pairs"]["ci_high"] < 0.5
    assert swapped.findings[0].level == "info"
    # the paper's metric: sent_more scoring higher prefers the stereotype whichever the direction
    anti = bias(subject, pairs=write_pairs(tmp_path / "anti.csv", PAIRS, direction="antistereo")).metrics["pairs"]
    assert anti["stereotype_rate"] == pairs["stereotype_rate"] and set(anti["by_direction"]) == {"antistereo"}
    assert section.figures and section.method.startswith("Paired sentences")


def test_masked_lm_scores_only_the_shared_tokens(made):
    tok, subject = made["tok"], load_subject(made["encoder"])
    model = subject.model
    more, less = tok.encode(PAIRS[0][0], add_special_tokens=True), tok.encode(PAIRS[0][1], add_special_tokens=True)
    in_more, in_less = shared_positions(more, less)
    assert tok.decode([more[i] for i in range(len(more)) if i not in in_more]) == " he"
    assert tok.decode([less[i] for i in range(len(less)) if i not in in_less]) == " she"

    def by_hand(ids, differing):  # mask each other position alone, sum log P of its token
        total = 0.0
        for p in range(len(ids)):
            if p not in differing:
                masked = torch.tensor([ids])
                masked[0, p] = tok.mask_id
                with torch.no_grad():
                    total += model(masked)[0, p].log_softmax(-1)[ids[p]].item()
        return total

    # one contiguous edit: the differing tokens lie between the common prefix and the common suffix
    prefix = next(i for i, (a, b) in enumerate(zip(more, less)) if a != b)
    suffix = next(i for i, (a, b) in enumerate(zip(more[::-1], less[::-1])) if a != b)
    hand_more = by_hand(more, set(range(prefix, len(more) - suffix)))
    hand_less = by_hand(less, set(range(prefix, len(less) - suffix)))
    assert pseudo_log_likelihood(model, more, in_more, tok.mask_id) == pytest.approx(hand_more, abs=1e-4)
    [(score_more, score_less)] = sentence_scores(subject, [Pair(*PAIRS[0][:2], "stereo", "gender", "test")])
    assert (score_more, score_less) == (pytest.approx(hand_more, abs=1e-4), pytest.approx(hand_less, abs=1e-4))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert-tiny", "t5-tiny"])
def test_builtin_pairs_score_with_every_family(made, family):
    tok = made["tok"]
    torch.manual_seed(0)
    path = save_checkpoint(
        made["folder"] / family, build_model(preset(family, vocab_size=tok.vocab_size, dropout=0.0)), tokenizer=tok
    )
    section = bias(load_subject(path, max_examples=40))
    pairs = section.metrics["pairs"]
    assert pairs["n"] == 40 and 0 <= pairs["stereotype_rate"] <= 1
    assert pairs["scoring"].startswith(
        "pseudo-log-likelihood" if family == "bert-tiny" else "log-likelihood of the sentence as the target"
    )
    assert set(section.explain) >= {
        "pairs.n",
        "pairs.stereotype_rate",
        "pairs.ci_low",
        "pairs.ci_high",
        "pairs.by_type",
    }
    assert len(read_pairs()) >= 60


# -- skips and bad input -------------------------------------------------------------------------------


def test_a_classifier_without_data_is_skipped_with_what_to_give(made):
    section = bias(load_subject(made["name"]))
    assert section.skipped is not None and "--data" in section.skipped


def test_bad_pair_files_name_the_file_and_column(tmp_path):
    missing = write_pairs(tmp_path / "missing.csv", PAIRS, columns=("sent_more", "sent_less", "stereo_antistereo"))
    with pytest.raises(LmlabError, match=r"missing\.csv: missing column 'bias_type'"):
        read_pairs(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "sent_more,sent_less,stereo_antistereo,bias_type\na b,a c,stereo,x\na b,a c,sideways,x\n", encoding="utf-8"
    )
    with pytest.raises(LmlabError, match=r"bad\.csv:3: stereo_antistereo is 'sideways'"):
        read_pairs(bad)


@pytest.mark.slow
def test_a_checkpoint_without_an_mlm_head_is_not_scored_with_a_random_one(tmp_path):
    """The real all-MiniLM-L6-v2 (a sentence-transformers folder) has no MLM head: lmlab initialises one at random
    to load it, so the bias lens (and interpret, which reads the same head) must skip, saying why, in the report."""
    from test_encoder import _minilm_folder

    from lmlab.critique import critique

    folder = _minilm_folder()
    report = critique(
        folder, tmp_path / "report", lenses="bias,interpret", progress=False, max_examples=20, verify=False
    )
    for lens in ("bias", "interpret"):
        why = report["lenses"][lens]["skipped"]
        assert why and "language-modelling head" in why and "at random" in why and "mlm_dense.weight" in why, lens
        assert "metrics" not in report["lenses"][lens] or not report["lenses"][lens]["metrics"]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "at random" in saved["lenses"]["bias"]["skipped"]
    assert "at random" in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")


def test_pseudo_likelihood_scores_unk_as_the_paper_does_and_never_cls_or_sep():
    """Nangia et al.'s metric.py scores every shared token but each sentence's first and last ([CLS], [SEP]):
    an unknown character's [UNK] is scored."""
    from lmlab.critique.bias import unscored_ids

    tok = train_tokenizer(["the nurse said hello", "the doctor said hello"] * 20, kind="wordpiece", vocab_size=60)
    a, b = (
        tok.encode("the nurse said ☃", add_special_tokens=True),
        tok.encode("the doctor said ☃", add_special_tokens=True),
    )
    unk = a.index(tok.unk_id)
    in_a, _ = shared_positions(a, b, unscored_ids(tok))
    assert unk in in_a and 0 not in in_a and len(a) - 1 not in in_a


def test_a_sampled_pairs_file_says_so_and_how_to_score_every_pair(made, tmp_path, caplog):
    """--max-examples below the file's size scores a seeded sample: the report and the terminal say it, with
    the flag that scores them all."""
    import logging

    tok = made["tok"]
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "lm", build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size)), tokenizer=tok)
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        section = bias(load_subject(path, max_examples=12))
    total = len(read_pairs())
    said = [f.text for f in section.findings if f.level == "info" and "seeded sample" in f.text]
    assert section.metrics["pairs"]["n"] == 12
    assert said and f"12 of the {total} pairs" in said[0] and f"--max-examples {total}" in said[0]
    assert f"--max-examples {total}" in caplog.text
    assert not [f for f in bias(load_subject(path, max_examples=total)).findings if "seeded sample" in f.text]
