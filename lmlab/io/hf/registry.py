"""The HF model families lmlab converts, one line each, and the tables derived from them.

Adding a family is one module defining ``FAMILY`` (see :mod:`lmlab.io.hf`) and one line in ``FAMILIES``.
The order is the order errors list them in.
"""

from __future__ import annotations

from lmlab.io.hf import bart, bert, gpt2, llama
from lmlab.io.hf.family import Architecture, Family

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        gpt2.FAMILY,
        llama.FAMILY,
        bert.FAMILY,
        bart.FAMILY,
    )
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
ARCHITECTURES: dict[str, Architecture] = {
    name: spec for family in FAMILIES.values() for name, spec in family.architectures.items()
}
# bare base models read as the LM class around them (their weights lack the prefix, and a tied LM head has none)
BARE: dict[str, str] = {name: lm for family in FAMILIES.values() for name, lm in family.bare.items()}
# Tensors an HF state dict may hold that are not weights, or copies of a tied weight: importing ignores
# them, as they are rebuilt from the config or tied by transformers itself.
IGNORED_SUFFIXES = tuple(dict.fromkeys(suffix for family in FAMILIES.values() for suffix in family.ignored))
UNPREFIXED = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.unprefixed))
