"""Edited inputs for the bias and robustness lenses: group-term swaps, CheckList perturbations, and a
classifier's predictions on the edited texts.

**Swaps** (counterfactual fairness; Garg et al., 2019, "Counterfactual Fairness in Text
Classification"): a text that mentions a group is rewritten to mention the contrasting group — "he"
→ "she", "Mary" → "James", "Muslim" → "Christian" — whole words only (``his`` is swapped, ``this``
is not), keeping the case of what it replaces ("She" → "He", "MOM" → "DAD"). The word pairs are
:file:`data/groups.json` (written for lmlab) or the user's own JSON of the same shape.

**Perturbations** are CheckList's invariance tests (Ribeiro et al., 2020) as HELM applies them to
robustness (Liang et al., 2022): edits that should not change what a text means.

    typos          ~10% of the words of 4+ letters get one typo: two inner letters swapped, or one dropped
    case           the text in lower, UPPER or Title case (one of those that changes it)
    punctuation    punctuation stripped, or a full stop added to a text that has none
    contractions   contractions expanded ("don't" → "do not"), or, in a text without any, made
    whitespace     one or two extra spaces after every space
    names          each first name replaced by another of the same column of the name list

Every edit is a pure function of the text and a ``random.Random`` seeded by (seed, perturbation,
example index): the same seed edits the same example the same way, whatever else is edited.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from lmlab.errors import LmlabError

DATA = Path(__file__).parent / "data"
GROUPS = DATA / "groups.json"
MAX_LENGTH = 128  # tokens per classifier input, as `lmlab evaluate` reads a test file


# -- swaps -------------------------------------------------------------------------------------------


def match_case(word: str, like: str) -> str:
    """``word`` in the case of ``like``: UPPER, Capitalised or as is."""
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _key(term: str) -> str:
    return " ".join(term.lower().replace("’", "'").split())


class Replace:
    """Replace whole-word (or whole-phrase) occurrences of ``mapping``'s keys, case-insensitively, by
    their values in the case of what they replace. Longer keys win over their prefixes; apostrophes
    match straight or curly, and the words of a phrase any run of whitespace."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = {_key(k): v for k, v in mapping.items()}
        alternatives = (
            r"\s+".join(re.escape(w).replace("'", "['’]") for w in k.split())
            for k in sorted(self.mapping, key=len, reverse=True)
        )
        self.pattern = re.compile(rf"(?<!\w)(?:{'|'.join(alternatives)})(?!\w)", re.IGNORECASE)

    def __call__(self, text: str) -> str:
        return self.pattern.sub(lambda m: match_case(self.mapping[_key(m[0])], m[0]), text)

    def finds(self, text: str) -> bool:
        return self.pattern.search(text) is not None


def swapper(pairs: list[tuple[str, str]]) -> Replace:
    """Swap both ways along ``pairs``; a word in several pairs goes to its first partner."""
    mapping: dict[str, str] = {}
    for a, b in pairs:
        mapping.setdefault(_key(a), b.lower())
        mapping.setdefault(_key(b), a.lower())
    return Replace(mapping)


def load_swaps(path: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Swap categories → word pairs, from ``path`` (``{"swaps": {category: [[a, b], …]}}`` or the inner
    object alone) or the built-in lists."""
    source = Path(path) if path is not None else GROUPS
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmlabError(f"{source}: no such file; expected a JSON object of swap categories") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LmlabError(f"{source}: cannot read JSON ({err}); expected {{category: [[word, word], …]}}") from None
    if isinstance(raw, dict) and isinstance(raw.get("swaps"), dict):
        raw = raw["swaps"]
    if not isinstance(raw, dict) or not raw:
        raise LmlabError(
            f'{source}: expected a JSON object mapping a category to word pairs, e.g. {{"gender": [["he", "she"]]}}'
        )
    out = {}
    for category, pairs in raw.items():
        if not isinstance(pairs, list) or not pairs:
            raise LmlabError(f"{source}: category {category!r} is {pairs!r}; expected a non-empty list of word pairs")
        for i, pair in enumerate(pairs):
            ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(w, str) and w.strip() for w in pair)
            if not ok or _key(pair[0]) == _key(pair[1]):
                raise LmlabError(
                    f'{source}: {category}[{i}] is {pair!r}; expected two different words, e.g. ["he", "she"]'
                )
        out[str(category)] = [(a.strip(), b.strip()) for a, b in pairs]
    return out


# -- perturbations -----------------------------------------------------------------------------------

# contraction → expansion; each direction is unambiguous within this table ("it's" is read as "it is")
CONTRACTIONS = {
    "don't": "do not",
    "doesn't": "does not",
    "didn't": "did not",
    "isn't": "is not",
    "aren't": "are not",
    "wasn't": "was not",
    "weren't": "were not",
    "haven't": "have not",
    "hasn't": "has not",
    "hadn't": "had not",
    "won't": "will not",
    "wouldn't": "would not",
    "can't": "cannot",
    "couldn't": "could not",
    "shouldn't": "should not",
    "mustn't": "must not",
    "i'm": "i am",
    "you're": "you are",
    "we're": "we are",
    "they're": "they are",
    "it's": "it is",
    "that's": "that is",
    "there's": "there is",
    "what's": "what is",
    "he's": "he is",
    "she's": "she is",
    "i've": "i have",
    "you've": "you have",
    "we've": "we have",
    "they've": "they have",
    "i'll": "i will",
    "you'll": "you will",
    "we'll": "we will",
    "they'll": "they will",
}
EXPAND = Replace(CONTRACTIONS)
CONTRACT = Replace({expanded: short for short, expanded in CONTRACTIONS.items()})


def typos(text: str, rng: random.Random, rate: float = 0.1) -> str:
    """Each word of 4+ letters, with probability ``rate``: two neighbouring inner letters swapped, or one dropped."""

    def edit(m: re.Match) -> str:
        w = m[0]
        if rng.random() >= rate:
            return w
        i = rng.randrange(1, len(w) - 2)  # first and last letter kept
        if w[i] != w[i + 1] and rng.random() < 0.5:
            return w[:i] + w[i + 1] + w[i] + w[i + 2 :]
        return w[:i] + w[i + 1 :]

    return re.sub(r"[^\W\d_]{4,}", edit, text)


def title_case(text: str) -> str:
    return re.sub(r"\S+", lambda m: m[0][:1].upper() + m[0][1:].lower(), text)


def change_case(text: str, rng: random.Random) -> str:
    """The text in lower, UPPER or Title case: one of those that changes it, at random."""
    variants = [v for v in (text.lower(), text.upper(), title_case(text)) if v != text]
    return rng.choice(variants) if variants else text


def punctuation(text: str, rng: random.Random) -> str:
    """Punctuation stripped; a text without any gets a full stop."""
    if re.search(r"[^\w\s]", text):
        return re.sub(r"[^\w\s]", "", text)
    body = text.rstrip()
    return body + "." + text[len(body) :] if body else text


def contractions(text: str, rng: random.Random) -> str:
    """Contractions expanded; a text without any gets its expandable phrases contracted."""
    expanded = EXPAND(text)
    return expanded if expanded != text else CONTRACT(text)


def whitespace(text: str, rng: random.Random) -> str:
    """One or two extra spaces after every run of spaces."""
    return re.sub(r" +", lambda m: m[0] + " " * rng.randint(1, 2), text)


@lru_cache(maxsize=1)
def _name_table() -> tuple[Replace, dict[str, list[str]]]:
    pairs = load_swaps()["names"]
    columns = [[_key(a) for a, _ in pairs], [_key(b) for _, b in pairs]]
    others = {name: [o for o in column if o != name] for column in columns for name in column}
    return Replace({name: name for name in others}), others


def names(text: str, rng: random.Random) -> str:
    """Each first name of the built-in list replaced by another from its column (the same name alike throughout)."""
    finder, others = _name_table()
    chosen: dict[str, str] = {}

    def swap(m: re.Match) -> str:
        name = _key(m[0])
        if name not in chosen:
            chosen[name] = rng.choice(others[name])
        return match_case(chosen[name], m[0])

    return finder.pattern.sub(swap, text)


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "typos": typos,
    "case": change_case,
    "punctuation": punctuation,
    "contractions": contractions,
    "whitespace": whitespace,
    "names": names,
}


def perturbation_rng(name: str, seed: int, index: int) -> random.Random:
    """The generator of perturbation ``name`` on example ``index`` (string seeds hash the same in every process)."""
    return random.Random(f"{seed}:{name}:{index}")


def perturb(name: str, text: str, seed: int, index: int) -> str:
    """Perturbation ``name`` of ``text``, the ``index``-th example, under ``seed``."""
    if name not in PERTURBATIONS:
        raise LmlabError(f"perturbation {name!r}: expected one of {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name](text, perturbation_rng(name, seed, index))


# -- a classifier on edited texts ----------------------------------------------------------------------


def read_classifier_data(subject):
    """The subject's labelled test file as :class:`~lmlab.data.tasks.ClassifyData` with the model's label ids."""
    from lmlab.data.tasks import check_labels, read_classify

    f, config = subject.fields, subject.config
    data = read_classify(
        subject.data,
        text_field=f.get("text_field", "text"),
        pair_field=f.get("pair_field"),
        label_field=f.get("label_field", "label"),
        kind=config.problem_type,
    )
    return check_labels(data, config.labels, subject.data)


def take(data, rows: list[int], texts: list[str] | None = None, pairs: list[str] | None = None):
    """Examples ``rows`` of ``data``, their texts (and second texts) replaced when given."""
    return dataclasses.replace(
        data,
        texts=texts if texts is not None else [data.texts[i] for i in rows],
        pairs=pairs if pairs is not None else (None if data.pairs is None else [data.pairs[i] for i in rows]),
        labels=[data.labels[i] for i in rows],
        lines=[data.lines[i] for i in rows],
    )


def class_probabilities(
    subject, data, *, batch_size: int = 32, progress: bool = False, desc: str = "predict"
) -> torch.Tensor:
    """(N, C) class probabilities of ``data``'s examples: softmax (single-label) or sigmoid per label (multi-label)."""
    from tqdm import tqdm

    from lmlab.data.tasks import encode_classify
    from lmlab.tasks import predict_logits, task_objective

    tok = subject.tokenizer
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    features = encode_classify(tok, data, min(MAX_LENGTH, subject.config.block_size))
    n = len(data.texts)
    chunk = batch_size * 8
    logits: list[torch.Tensor] = []
    for start in tqdm(range(0, n, chunk), desc=desc, disable=not progress or n <= chunk, leave=False):
        stop = min(start + chunk, n)
        part = task_objective("classify", {k: v[start:stop] for k, v in features.items()}, pad, data.kind)
        logits += predict_logits(subject.model, part, stop - start, batch_size, subject.device)
    stacked = torch.stack(logits)
    return stacked.sigmoid() if data.kind == "multi" else stacked.softmax(-1)


def decisions(probs: torch.Tensor, kind: str) -> list:
    """The predicted label (single-label: its id) or label set (multi-label: a 0/1 tuple) of each row."""
    if kind == "multi":
        return [tuple(row) for row in (probs > 0.5).int().tolist()]
    return probs.argmax(-1).tolist()


def gold(data) -> list:
    """Each example's gold answer in the form :func:`decisions` gives."""
    names = {n: i for i, n in enumerate(data.label_names)}
    if data.kind == "multi":
        return [tuple(int(n in set(label)) for n in data.label_names) for label in data.labels]
    return [names[label] for label in data.labels]


def label_text(prediction, kind: str, names: list[str]) -> str:
    """A prediction from :func:`decisions` as a person reads it: the label, or the set of labels."""
    if kind == "multi":
        return "{" + ", ".join(n for n, on in zip(names, prediction) if on) + "}"
    return names[prediction]


def clip(text: str, n: int = 160) -> str:
    """``text`` cut to ``n`` characters for a table cell."""
    return text if len(text) <= n else text[: n - 1] + "…"
