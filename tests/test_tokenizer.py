"""Tokenizer: training each kind, exact round trips, roles, save/load, HF folders, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from lmlab.data import builtin_corpus
from lmlab.errors import LmlabError
from lmlab.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, train_tokenizer

ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "大语言模型是一种基于深度学习的自然语言处理技术",
    "🤖🚀 ok",
    "  leading spaces,\ttabs\t\tand\r\nwindows newlines\n\n\ntrailing  ",
    "",
    "literal <0x41> and <|endoftext|> text",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return builtin_corpus(max_chars=100_000)


@pytest.fixture(scope="module")
def trained(corpus) -> dict[str, Tokenizer]:
    return {kind: train_tokenizer(corpus, kind=kind, vocab_size=800) for kind in ("bpe", "wordpiece", "unigram")}


# -------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_byte_level_bpe_round_trips_exactly(trained, text):
    tok = trained["bpe"]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIP[:5])
def test_unigram_with_byte_fallback_round_trips_exactly(trained, text):
    tok = trained["unigram"]
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # unseen characters fall back to bytes, not <unk>
    assert tok.decode(ids) == text


def test_wordpiece_is_lossy_on_whitespace_but_keeps_plain_english(trained):
    tok = trained["wordpiece"]
    assert tok.decode(tok.encode("The quick brown fox jumps over the lazy dog.")) == (
        "The quick brown fox jumps over the lazy dog."
    )
    assert tok.decode(tok.encode("the  lazy\tdog\n")) == "the lazy dog"


def test_encode_batch_matches_encode_and_decode_accepts_arrays(trained):
    tok = trained["bpe"]
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(text) for text in ROUND_TRIP]
    ids = tok.encode(ROUND_TRIP[0])
    assert tok.decode(np.array(ids, dtype=np.uint16)) == ROUND_TRIP[0]


# -------------------------------------------------------------------------------------- roles
def test_default_special_tokens_and_roles_per_kind(trained):
    bpe, wordpiece, unigram = trained["bpe"], trained["wordpiece"], trained["unigram"]
    assert bpe.special_tokens == {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<pad>"}
    assert bpe.bos_id == bpe.eos_id == bpe.token_to_id("<|endoftext|>")
    assert bpe.unk_id is None and bpe.mask_id is None
    assert wordpiece.special_tokens == {
        "bos": "[CLS]",
        "eos": "[SEP]",
        "pad": "[PAD]",
        "unk": "[UNK]",
        "mask": "[MASK]",
    }
    assert unigram.special_tokens == {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}
    assert unigram.id_to_token(unigram.eos_id) == "</s>"


def test_vocab_size_counts_everything_requested(trained):
    assert all(tok.vocab_size == 800 for tok in trained.values())


def test_wordpiece_adds_cls_and_sep_only_when_asked(trained):
    tok = trained["wordpiece"]
    plain = tok.encode("hello world")
    assert tok.encode("hello world", add_special_tokens=True) == [tok.bos_id, *plain, tok.eos_id]
    assert trained["bpe"].encode("hello", add_special_tokens=True) == trained["bpe"].encode("hello")


# ---------------------------------------------------------------------------------- sentinels
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentinels_are_t5s_extra_ids_after_the_special_tokens_and_survive_save_load(corpus, tmp_path, kind):
    from lmlab.objectives import SpanCorruption

    tok = train_tokenizer(corpus[:20], kind=kind, vocab_size=500, sentinels=4)
    specials = list(DEFAULT_SPECIAL_TOKENS[kind])
    added = {t.content: i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    names = specials + [f"<extra_id_{k}>" for k in range(4)]
    assert sorted(added, key=added.get) == names and [added[n] for n in names] == list(range(len(names)))
    assert tok.vocab_size == 500
    assert tok.special_tokens == train_tokenizer(corpus[:20], kind=kind, vocab_size=500).special_tokens  # no new role
    assert tok.encode("a <extra_id_3> b").count(added["<extra_id_3>"]) == 1  # one token, never split
    tok.save(tmp_path / "tok")
    span = SpanCorruption(Tokenizer.load(tmp_path / "tok"))
    assert span.sentinels.tolist() == [added[f"<extra_id_{k}>"] for k in range(4)]  # span k -> <extra_id_k>


def test_bad_sentinels_are_one_line_errors_naming_the_flag():
    with pytest.raises(LmlabError, match=r"sentinels -1: expected an integer >= 0"):
        train_tokenizer(["some text"], sentinels=-1)
    with pytest.raises(LmlabError, match=r"special_tokens already lists <extra_id_1>: give the sentinels one way"):
        train_tokenizer(["some text"], special_tokens=["<|endoftext|>", "<extra_id_1>"], sentinels=2)
    with pytest.raises(LmlabError, match=r"vocab_size 300: too small for a bpe tokenizer with 102 special tokens"):
        train_tokenizer(["some text"], vocab_size=300, sentinels=100)


# ---------------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_save_then_load_gives_identical_ids_roles_and_digest(trained, tmp_path, kind):
    tok = trained[kind]
    tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    texts = ROUND_TRIP + ["Another sentence, with punctuation; and numbers 12345."]
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.sha256 == tok.sha256
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == tok.special_tokens["eos"]


def test_save_leaves_no_temporary_files(trained, tmp_path):
    trained["bpe"].save(tmp_path)
    trained["bpe"].save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_load_folder_with_tokenizer_json_only_infers_roles(trained, tmp_path):
    (tmp_path / "tokenizer.json").write_text(trained["unigram"].backend.to_str(), encoding="utf-8")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.special_tokens == trained["unigram"].special_tokens
    assert Tokenizer.load(tmp_path / "tokenizer.json").special_tokens == loaded.special_tokens


def _plain_library_tokenizer(corpus) -> tokenizers.Tokenizer:
    """A tokenizer made by `tokenizers` directly, as an HF folder would hold it."""
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return backend


def test_load_hf_folder_reads_roles_from_configs(corpus, tmp_path):
    backend = _plain_library_tokenizer(corpus)
    backend.save(str(tmp_path / "tokenizer.json"))
    # transformers stores a token either as a string or as an AddedToken dict; the config wins
    # over special_tokens_map.json, and either wins over the inference table (<|endoftext|>).
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": {
                    "content": "</s>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                },
                "pad_token": None,
                "model_max_length": 1000000000000000019884624838656,
                "tokenizer_class": "LlamaTokenizer",
            }
        )
    )
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>", "unk_token": "<unk>"}))
    tok = Tokenizer.load(tmp_path)
    assert tok.special_tokens == {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}
    assert tok.eos_id == backend.token_to_id("</s>")
    assert tok.pad_id is None
    assert tok.model_max_length is None


def test_config_naming_a_token_outside_the_vocab_is_an_error(corpus, tmp_path):
    _plain_library_tokenizer(corpus).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(LmlabError, match=r"tokenizer_config\.json: eos_token='<\|im_end\|>' is not in the vocabulary"):
        Tokenizer.load(tmp_path)


def test_folder_without_tokenizer_json_is_an_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(LmlabError, match="expected tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(LmlabError, match="no such file"):
        Tokenizer.load(tmp_path / "missing")


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kind", "minimum"), [("bpe", 258), ("unigram", 262), ("wordpiece", 6)])
def test_vocab_size_below_the_kinds_minimum_names_the_flag(kind, minimum):
    with pytest.raises(LmlabError, match=rf"vocab_size {minimum - 1}.*at least {minimum}"):
        train_tokenizer(["some text"], kind=kind, vocab_size=minimum - 1)


@pytest.mark.parametrize("vocab_size", [2**24 + 1, 10**10])
def test_vocab_size_past_the_maximum_is_an_error_not_a_rust_abort(vocab_size):
    with pytest.raises(LmlabError, match=rf"vocab_size {vocab_size:,}: expected at most 16,777,216"):
        train_tokenizer(["some text"], kind="bpe", vocab_size=vocab_size)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(LmlabError, match="bpe, wordpiece, unigram"):
        train_tokenizer(["text"], kind="sentencepiece")


@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_training_on_no_text_is_an_error(texts):
    with pytest.raises(LmlabError, match="no text"):
        train_tokenizer(texts, vocab_size=300)


def test_sha256_changes_with_vocab_and_roles(corpus):
    small = train_tokenizer(corpus[:3], vocab_size=300)
    assert small.sha256 == train_tokenizer(corpus[:3], vocab_size=300).sha256
    larger = train_tokenizer(corpus[:3], vocab_size=320)
    assert larger.sha256 != small.sha256
    other_roles = Tokenizer(small.backend, {"eos": "<pad>"})
    assert other_roles.sha256 != small.sha256
