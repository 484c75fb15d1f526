"""Canaries: random secrets planted in a training corpus, to measure memorisation afterwards.

The Secret Sharer (Carlini et al., 2019, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks", USENIX Security) inserts a *canary* — a fixed template filled with a
random secret, ``"the secret code is 281265"`` — into the training data a known number of times, then
asks how much more likely the trained model finds the planted secret than the other secrets of the
same randomness space R. That ratio, in bits, is the *exposure* (computed by
:func:`lmlab.critique.privacy.privacy`).

:func:`plant_canaries` draws ``2 n`` distinct secrets (strings of ``digits`` decimal digits, so
``|R| = 10**digits``) from a seeded generator: the first ``n`` are planted, the other ``n`` are
*reference* secrets that are never planted, so a report can set the exposure of what was seen beside
that of what was not. Each planted canary text is added ``repeats`` times, **as a document of its
own**, at seeded random positions among the documents (a packed corpus puts an end-of-text token
before and after it, as around any document). The record it returns is what ``canaries.json`` holds::

    {"format": "lmlab-canaries", "version": 1, "template": "the secret code is {}",
     "alphabet": "0123456789", "length": 6, "space_size": 1000000, "seed": 0, "repeats": 50,
     "placement": "...", "planted": [{"secret": "...", "text": "...", "repeats": 50}, ...],
     "reference": [{"secret": "...", "text": "...", "repeats": 0}, ...]}

``lmlab prepare --canaries N`` plants them in the training split only (see :func:`lmlab.data.pack.prepare`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, TypeVar

from lmlab.errors import LmlabError

__all__ = ["CANARIES_NAME", "FORMAT", "plant_canaries", "canary_options", "load_canaries", "secret_at"]

T = TypeVar("T")
CANARIES_NAME = "canaries.json"
FORMAT = "lmlab-canaries"
VERSION = 1
ALPHABET = "0123456789"
DEFAULTS: dict[str, Any] = {"repeats": 50, "seed": 0, "template": "the secret code is {}", "digits": 6}
PLACEMENT = (
    "each planted canary is a separate document, inserted `repeats` times at seeded random positions among the "
    "training documents"
)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmlabError(f"canaries {name}={value!r}: expected a positive integer")
    return value


def canary_options(options: dict[str, Any], *, seed: int = DEFAULTS["seed"]) -> dict[str, Any]:
    """``options`` checked and completed with the defaults (``seed`` when it names none): the canonical
    dict that :func:`plant_canaries` takes as keywords (and ``prepare`` records in its manifest)."""
    if not isinstance(options, dict):
        raise LmlabError(f"canaries={options!r}: expected a dict such as {{'n': 10, 'repeats': 50}}")
    unknown = sorted(set(options) - {"n", *DEFAULTS})
    if unknown:
        raise LmlabError(f"canaries: unknown option(s) {', '.join(unknown)}; expected some of n, {', '.join(DEFAULTS)}")
    if "n" not in options:
        raise LmlabError("canaries: missing 'n', the number of secrets to plant")
    merged = {"n": options["n"], **{k: options.get(k, v) for k, v in {**DEFAULTS, "seed": seed}.items()}}
    for name in ("n", "repeats", "digits"):
        _positive_int(merged[name], name)
    if isinstance(merged["seed"], bool) or not isinstance(merged["seed"], int):
        raise LmlabError(f"canaries seed={merged['seed']!r}: expected an integer")
    template = merged["template"]
    if not isinstance(template, str) or template.count("{}") != 1:
        raise LmlabError(
            f"canaries template={template!r}: expected a string with exactly one {{}} where the secret goes"
        )
    if 2 * merged["n"] > len(ALPHABET) ** merged["digits"]:
        raise LmlabError(
            f"canaries: {merged['n']} planted + {merged['n']} reference secrets do not fit in the "
            f"{len(ALPHABET) ** merged['digits']} secrets of {merged['digits']} digits; raise digits or lower n"
        )
    return merged


def secret_at(index: int, alphabet: str, length: int) -> str:
    """The ``index``-th secret of the space (``alphabet`` ** ``length``, in lexicographic order)."""
    chars = []
    for _ in range(length):
        index, digit = divmod(index, len(alphabet))
        chars.append(alphabet[digit])
    return "".join(reversed(chars))


def plant_canaries(
    documents: list[T],
    *,
    n: int,
    repeats: int = DEFAULTS["repeats"],
    seed: int = DEFAULTS["seed"],
    template: str = DEFAULTS["template"],
    digits: int = DEFAULTS["digits"],
) -> tuple[list[T | str], dict[str, Any]]:
    """``documents`` with ``n`` canaries added ``repeats`` times each (as separate documents at seeded
    random positions; the input order of the other documents is kept), and the record of what was
    planted plus ``n`` unplanted reference secrets from the same space (see the module docstring).

    Args:
        documents: the training documents (or anything standing for them; the canaries added are str)
        n: how many secrets to plant
        repeats: copies of each canary in the training split
        seed: seed of the secrets and their positions
        template: the canary sentence; {} is the secret
        digits: digits of each secret: 10^digits possible secrets
    """
    options = canary_options(dict(n=n, repeats=repeats, seed=seed, template=template, digits=digits))
    space = len(ALPHABET) ** digits
    rng = random.Random(seed)
    drawn = [secret_at(i, ALPHABET, digits) for i in rng.sample(range(space), 2 * n)]

    def entry(secret: str, count: int) -> dict[str, Any]:
        return {"secret": secret, "text": template.replace("{}", secret), "repeats": count}

    planted = [entry(s, repeats) for s in drawn[:n]]
    reference = [entry(s, 0) for s in drawn[n:]]
    canaries = [c["text"] for c in planted for _ in range(repeats)]
    rng.shuffle(canaries)
    total = len(documents) + len(canaries)
    at = set(rng.sample(range(total), len(canaries)))
    source, planted_docs = iter(documents), iter(canaries)
    out = [next(planted_docs) if i in at else next(source) for i in range(total)]
    record = {
        "format": FORMAT,
        "version": VERSION,
        **{k: options[k] for k in ("template", "seed", "repeats")},
        "alphabet": ALPHABET,
        "length": digits,
        "space_size": space,
        "placement": PLACEMENT,
        "planted": planted,
        "reference": reference,
    }
    return out, record


def load_canaries(path: str | Path) -> dict[str, Any]:
    """A ``canaries.json`` record, checked: bad content is a one-line :class:`LmlabError` naming the field."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmlabError(f"{path}: no such canaries file (make one with `lmlab prepare --canaries N`)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LmlabError(f"{path}: cannot read canaries file ({err})") from None
    except json.JSONDecodeError as err:
        raise LmlabError(
            f"{path}:{err.lineno}: invalid JSON ({err.msg}); expected a canaries record from `lmlab prepare --canaries`"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise LmlabError(f'{path}: not a canaries record; expected a JSON object with "format": "{FORMAT}"')
    alphabet, length, template = record.get("alphabet"), record.get("length"), record.get("template")
    if not isinstance(alphabet, str) or len(set(alphabet)) != len(alphabet) or len(alphabet) < 2:
        raise LmlabError(
            f"{path}: field 'alphabet' is {alphabet!r}; expected a string of at least 2 distinct characters"
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise LmlabError(f"{path}: field 'length' is {length!r}; expected a positive integer")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise LmlabError(f"{path}: field 'template' is {template!r}; expected a string with exactly one {{}}")
    if record.get("space_size") != len(alphabet) ** length:
        raise LmlabError(
            f"{path}: field 'space_size' is {record.get('space_size')!r}; expected {len(alphabet) ** length} "
            "(alphabet size ** length)"
        )
    for key in ("planted", "reference"):
        items = record.get(key)
        if not isinstance(items, list) or (key == "planted" and not items):
            raise LmlabError(
                f'{path}: field {key!r} is {items!r}; expected a list of {{"secret": ..., "repeats": ...}}'
            )
        for i, item in enumerate(items):
            secret = item.get("secret") if isinstance(item, dict) else None
            if not isinstance(secret, str) or len(secret) != length or set(secret) - set(alphabet):
                raise LmlabError(
                    f"{path}: {key}[{i}].secret is {secret!r}; expected {length} characters of {alphabet!r}"
                )
            repeats = item.get("repeats")
            if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
                raise LmlabError(f"{path}: {key}[{i}].repeats is {repeats!r}; expected a count (0 or more)")
    return record
