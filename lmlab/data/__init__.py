"""Corpus reading, cleaning and splitting; packing token ids into memory-mapped shards; the unigram baseline."""

from lmlab.data.corpus import (
    KNOWN_EXTENSIONS,
    builtin_corpus,
    document_split,
    expand_inputs,
    iter_documents,
    read_corpus,
    split_documents,
)
from lmlab.data.pack import PackedTokens, load_manifest, prepare
from lmlab.data.unigram import unigram_perplexity

__all__ = [
    "KNOWN_EXTENSIONS",
    "PackedTokens",
    "builtin_corpus",
    "document_split",
    "expand_inputs",
    "iter_documents",
    "load_manifest",
    "prepare",
    "read_corpus",
    "split_documents",
    "unigram_perplexity",
]
