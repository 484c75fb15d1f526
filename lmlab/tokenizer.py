"""A thin layer over the Hugging Face ``tokenizers`` library: train, load, save, encode, decode.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` and adds what lmlab needs on top: the special
token *roles* (bos, eos, pad, unk, mask), a fingerprint (:attr:`Tokenizer.sha256`) and a folder
format that Hugging Face ``transformers`` reads as ``PreTrainedTokenizerFast`` (``tokenizer.json`` +
``tokenizer_config.json``).

:func:`train_tokenizer` trains one of three kinds:

- ``"bpe"`` — byte-level BPE as in GPT-2. Every byte is in the alphabet, so
  ``decode(encode(s)) == s`` for any string: English, Chinese, emoji, tabs, ``\\r\\n``.
- ``"wordpiece"`` — BERT-style WordPiece. Lossy by nature: the BERT pre-tokenizer drops whitespace
  and the decoder re-inserts single spaces between words and punctuation, and characters outside
  the learnt alphabet become ``[UNK]``.
- ``"unigram"`` — SentencePiece-style Unigram with a ``▁`` Metaspace pre-tokenizer and byte
  fallback (as LLaMA's tokenizer): characters never seen in training are encoded as ``<0xNN>``
  byte tokens instead of ``<unk>``, so ordinary text — Chinese and emoji included — round-trips
  exactly. The one exception is a literal ``▁`` (U+2581) in the text, which decodes as a space.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmlab.config import MAX_SIZES, read_json_object, write_text_atomic
from lmlab.errors import LmlabError
from lmlab.io.outputs import check_output, holds_only
from lmlab.templates import render

__all__ = [
    "KINDS",
    "SPECIAL_ROLES",
    "DEFAULT_SPECIAL_TOKENS",
    "ROLE_TOKENS",
    "Tokenizer",
    "sentinel_token",
    "train_tokenizer",
]

KINDS = ("bpe", "wordpiece", "unigram")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)  # a tokenizer folder holds only these
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask")

DEFAULT_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "bpe": ("<|endoftext|>", "<pad>"),
    "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "unigram": ("<pad>", "<unk>", "<s>", "</s>", "<mask>"),
}

# Exact-match table used when a tokenizer comes without a config naming its special tokens.
# Within a role, the first token present wins. GPT-2 uses <|endoftext|> as both bos and eos;
# BERT has no eos, and [SEP] (which ends every BERT segment) is the document separator it uses.
ROLE_TOKENS: dict[str, tuple[str, ...]] = {
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]", "<|endoftext|>"),
    "eos": ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
    "mask": ("<mask>", "[MASK]"),
}

# What each kind needs beyond its special tokens: byte-level BPE's 256-symbol alphabet, Unigram's
# 256 byte-fallback tokens plus at least one learnt piece, WordPiece at least one piece.
_KIND_MIN_EXTRA = {"bpe": 256, "wordpiece": 1, "unigram": 257}

# transformers writes int(1e30) as model_max_length when the limit is unknown.
_UNKNOWN_MAX_LENGTH = 10**18


def _infer_roles(backend: tokenizers.Tokenizer) -> dict[str, str]:
    """Roles from the tokenizer's added tokens via :data:`ROLE_TOKENS` (never from ordinary vocab,
    where a learnt piece such as ``<s>`` may be plain text)."""
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    roles = {}
    for role, candidates in ROLE_TOKENS.items():
        for token in candidates:
            if token in added:
                roles[role] = token
                break
    return roles


def _token_content(value: Any, source: Path, key: str) -> str | None:
    """A special token as transformers stores it: a string, a dict with "content", or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise LmlabError(f'{source}: field {key!r} is {value!r}; expected a string, {{"content": ...}} or null')


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus its special-token roles.

    ``special_tokens`` maps roles (``bos``, ``eos``, ``pad``, ``unk``, ``mask``) to token strings;
    ``None`` infers them from the added tokens with :data:`ROLE_TOKENS`. ``model_max_length`` (the
    longest input the paired model takes, if known) and ``chat_template`` are carried through
    :meth:`save` into ``tokenizer_config.json``; :meth:`apply_chat_template` renders conversations
    with the template (:mod:`lmlab.templates`).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str | None] | None = None,
        *,
        model_max_length: int | None = None,
        chat_template: Any = None,
    ) -> None:
        self._backend = backend
        roles = _infer_roles(backend) if special_tokens is None else dict(special_tokens)
        for role, token in roles.items():
            if role not in SPECIAL_ROLES:
                raise LmlabError(f"special token role {role!r}: expected one of {', '.join(SPECIAL_ROLES)}")
            if token is not None and backend.token_to_id(token) is None:
                raise LmlabError(f"special token {role}={token!r} is not in the tokenizer's vocabulary")
        self._roles: dict[str, str] = {role: roles[role] for role in SPECIAL_ROLES if roles.get(role)}
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self.chat_template_file: Path | None = None  # the tokenizer_config.json it came from, for error messages

    # ----------------------------------------------------------------------------------- properties
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (offsets, truncation, padding live there)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the size a model's embedding needs."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """Role -> token string, for the roles this tokenizer has."""
        return dict(self._roles)

    def _role_id(self, role: str) -> int | None:
        token = self._roles.get(role)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def unk_id(self) -> int | None:
        return self._role_id("unk")

    @property
    def mask_id(self) -> int | None:
        return self._role_id("mask")

    @property
    def sha256(self) -> str:
        """Hex digest of the canonical tokenizer.json and the roles: equal digests, equal ids."""
        # Hash the form a save/load cycle gives: the library parses floats (Unigram scores) with
        # up to one ulp of error, so a freshly trained and a reloaded tokenizer print differently.
        canonical = tokenizers.Tokenizer.from_str(self._backend.to_str()).to_str(pretty=False)
        digest = hashlib.sha256(canonical.encode("utf-8"))
        digest.update(b"\0" + json.dumps(self._roles, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()

    # ------------------------------------------------------------------------------ encode/decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` applies the post-processor (WordPiece's
        ``[CLS] ... [SEP]``; byte-level BPE and Unigram add nothing, as GPT-2 and T5's encoder)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded on the library's thread pool (``TOKENIZERS_PARALLELISM``
        turns it off)."""
        texts = list(texts)
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets, which we do not return.
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, array or 1-D tensor of ints)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **variables: Any,
    ) -> str | list[int]:
        """``messages`` (``[{"role": ..., "content": ...}, ...]``) rendered by ``chat_template``, else this
        tokenizer's :attr:`chat_template`, else lmlab's default — as transformers' method of this name
        renders them (:mod:`lmlab.templates`), though with the generation prompt on by default. ``tokenize``
        returns the token ids (special tokens in the text become their ids; nothing is added)."""

        text = render(self, messages, add_generation_prompt=add_generation_prompt, template=chat_template, **variables)
        return self.encode(text) if tokenize else text

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self._roles})"

    # ---------------------------------------------------------------------------------- save/load
    def tokenizer_config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` transformers' ``AutoTokenizer`` reads for this tokenizer."""
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        # Every role is written, null where unset, so loading does not re-infer a role on purpose
        # left empty.
        for role in SPECIAL_ROLES:
            config[f"{role}_token"] = self._roles.get(role)
        if self.model_max_length is not None:
            config["model_max_length"] = int(self.model_max_length)
        # transformers' default clean-up rewrites " ." as "." on decode; lmlab decodes exactly.
        config["clean_up_tokenization_spaces"] = False
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (created if
        missing), each atomically. Returns the folder.

        ``directory`` must be new, empty or a tokenizer folder (only tokenizer files); ``overwrite``
        allows another folder (lmlab's two files are written, nothing else is touched), but never a
        checkpoint or a data folder, whose tokenizer must stay the one their model or ids were made with.

        Args:
            directory: output folder for tokenizer.json and tokenizer_config.json
            overwrite: write into an existing folder that holds more than tokenizer files
        """
        check_tokenizer_folder(directory, overwrite)
        return self.write_files(directory)

    def write_files(self, directory: str | Path) -> Path:
        """:meth:`save` without its checks, for code that writes the tokenizer into a folder it is building
        (a checkpoint, a data folder, an export)."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LmlabError(f"{directory}: cannot create folder ({err.strerror or err})") from None
        write_text_atomic(directory / "tokenizer.json", self._backend.to_str(pretty=True))
        write_text_atomic(
            directory / "tokenizer_config.json",
            json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
        )
        return directory

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer folder (``tokenizer.json``, optionally ``tokenizer_config.json`` and
        ``special_tokens_map.json`` as Hugging Face folders hold them) or a ``tokenizer.json`` file.

        Roles come from ``tokenizer_config.json``, then ``special_tokens_map.json``, then — for roles
        neither file mentions — from the added tokens via :data:`ROLE_TOKENS`.
        """
        path = Path(path)
        if path.is_dir():
            file, folder = path / "tokenizer.json", path
            if not file.is_file():
                raise LmlabError(f"{path}: expected tokenizer.json in this folder")
        elif path.is_file():
            # Side files describe a tokenizer.json only when it sits beside them under that name.
            file, folder = path, (path.parent if path.name == "tokenizer.json" else None)
        else:
            raise LmlabError(f"{path}: no such file or folder; expected a tokenizer folder or tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises a bare Exception for every parse error
            raise LmlabError(f"{file}: not a valid tokenizer.json ({err})") from None
        # Some HF folders save padding/truncation settings in tokenizer.json (all-MiniLM-L6-v2 pads
        # every text to 128 tokens); transformers ignores them unless a call asks, and so does lmlab.
        backend.no_padding()
        backend.no_truncation()

        roles: dict[str, str | None] = dict(_infer_roles(backend))
        config: dict[str, Any] = {}
        if folder is not None:
            config_path = folder / "tokenizer_config.json"
            config = read_json_object(config_path)
            # transformers lets tokenizer_config.json override special_tokens_map.json.
            for source in (folder / "special_tokens_map.json", config_path):
                data = config if source == config_path else read_json_object(source)
                for role in SPECIAL_ROLES:
                    key = f"{role}_token"
                    if key in data:
                        token = _token_content(data[key], source, key)
                        if token is not None and backend.token_to_id(token) is None:
                            raise LmlabError(f"{source}: {key}={token!r} is not in the vocabulary of {file}")
                        roles[role] = token

        max_length = config.get("model_max_length")
        known = isinstance(max_length, (int, float)) and not isinstance(max_length, bool)
        if not known or max_length >= _UNKNOWN_MAX_LENGTH:
            max_length = None
        tokenizer = cls(
            backend,
            {role: token for role, token in roles.items() if token is not None},
            model_max_length=None if max_length is None else int(max_length),
            chat_template=config.get("chat_template"),
        )
        if tokenizer.chat_template is not None:
            tokenizer.chat_template_file = folder / "tokenizer_config.json"
        return tokenizer


# -------------------------------------------------------------------------------------- training
def _build_backend(kind: str, unk: str | None) -> tokenizers.Tokenizer:
    """An untrained tokenizer of ``kind``; the trainer is made by the caller."""
    if kind == "bpe":
        backend = tokenizers.Tokenizer(models.BPE())
        # GPT-2: no prefix space, so the text is tokenized as it is and decodes back byte-exactly.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        # Only fixes offsets (for QA/tagging spans); it adds no tokens.
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == "wordpiece":
        backend = tokenizers.Tokenizer(models.WordPiece(unk_token=unk))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
    else:  # unigram
        backend = tokenizers.Tokenizer(models.Unigram())
        # prepend_scheme="never": no dummy "▁" before the first word, so a leading space in the
        # text survives the round trip (SentencePiece's dummy prefix would swallow it).
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        backend.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="never")]
        )
    return backend


def _add_byte_fallback(backend: tokenizers.Tokenizer, unk: str) -> None:
    """Append the 256 ``<0xNN>`` tokens to a trained Unigram model and turn byte fallback on."""
    model = json.loads(backend.to_str())["model"]
    vocab = [(piece, float(score)) for piece, score in model["vocab"]]
    present = {piece for piece, _ in vocab}
    # Far below every learnt piece: a literal "<0x41>" in text still splits into its characters;
    # byte tokens are only reached through the fallback for unknown characters.
    score = min(score for _, score in vocab) - 1000.0
    vocab += [(f"<0x{byte:02X}>", score) for byte in range(256) if f"<0x{byte:02X}>" not in present]
    unk_id = next(i for i, (piece, _) in enumerate(vocab) if piece == unk)
    # Ids of existing pieces (and so of the added special tokens) do not move: bytes go at the end.
    backend.model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=True)


def check_tokenizer_folder(directory: str | Path, overwrite: bool = False) -> Path:
    """``directory`` may receive a tokenizer (:meth:`Tokenizer.save`'s rules); call it before training one."""
    directory = Path(directory)
    for what, files in (
        ("a model folder", ("config.json", "model.safetensors")),
        ("a data folder", ("manifest.json", "tokenizer.json")),
    ):
        if all((directory / name).is_file() for name in files):
            raise LmlabError(
                f"out {directory} is {what} ({', '.join(files)}): replacing its tokenizer would break it; choose a "
                "new folder",
                params="out",
            )
    return check_output(directory, "tokenizer folder", lambda d: holds_only(d, TOKENIZER_FILES), overwrite=overwrite)


def train_tokenizer(
    texts: Iterable[str],
    *,
    kind: str = "bpe",
    vocab_size: int = 8000,
    min_frequency: int = 2,
    special_tokens: Sequence[str] | None = None,
    sentinels: int = 0,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a tokenizer of ``kind`` (``"bpe"``, ``"wordpiece"``, ``"unigram"``) on ``texts``.

    ``special_tokens`` default per kind to :data:`DEFAULT_SPECIAL_TOKENS`; their roles come from
    :data:`ROLE_TOKENS`. ``sentinels`` adds T5's span-corruption sentinels ``<extra_id_0>`` …
    ``<extra_id_{N-1}>`` (:func:`sentinel_token`) after them, as special tokens, in that order: what
    ``--objective span`` replaces the k-th dropped span of a window with (T5 has 100; a window needs
    about seq_len × 0.15 / 3 of them). ``vocab_size`` counts everything (special tokens, sentinels, BPE's
    byte alphabet, Unigram's byte-fallback tokens); the result can be smaller when the corpus is too small
    to learn that many. ``min_frequency`` applies to BPE and WordPiece merges (Unigram has none).

    Args:
        texts: the training texts
        kind: bpe (byte-level), wordpiece or unigram
        vocab_size: vocabulary size including special tokens
        min_frequency: minimum pair/word frequency to enter the vocabulary
        special_tokens: special tokens (default: the kind's own, e.g. <|endoftext|> for bpe)
        sentinels: add N sentinel tokens <extra_id_0> … <extra_id_N-1> after the special tokens, as T5's
            tokenizer has them (100), for `lmlab pretrain --objective span` (default: none)
        show_progress: show the tokenizers library's progress bar
    """
    if kind not in KINDS:
        raise LmlabError(f"tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    specials = list(DEFAULT_SPECIAL_TOKENS[kind] if special_tokens is None else special_tokens)
    specials += _sentinel_tokens(sentinels, specials)
    _check_training_options(kind, specials, vocab_size, min_frequency)
    roles = {}
    for role, candidates in ROLE_TOKENS.items():
        token = next((token for token in candidates if token in specials), None)
        if token is not None:
            roles[role] = token
    unk = roles.get("unk")
    if kind in ("wordpiece", "unigram") and unk is None:
        raise LmlabError(
            f"special_tokens {specials!r}: a {kind} tokenizer needs an unknown token "
            f"({' or '.join(ROLE_TOKENS['unk'])})",
            params="special_tokens",
        )
    backend = _build_backend(kind, unk)
    _train_backend(
        backend, _trainer(kind, vocab_size, min_frequency, specials, unk, show_progress), texts, kind, vocab_size
    )
    if kind == "unigram":
        _add_byte_fallback(backend, unk)
    elif kind == "wordpiece" and roles.get("bos") and roles.get("eos"):
        # BERT's input layout: [CLS] A [SEP] and [CLS] A [SEP] B [SEP], B with type id 1.
        cls_token, sep_token = roles["bos"], roles["eos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token} $A {sep_token}",
            pair=f"{cls_token} $A {sep_token} $B:1 {sep_token}:1",
            special_tokens=[(cls_token, backend.token_to_id(cls_token)), (sep_token, backend.token_to_id(sep_token))],
        )
    # Reload once so the in-memory model holds exactly what a saved copy will load as (scores
    # pass through the library's float parser); ids then match before and after save/load.
    backend = tokenizers.Tokenizer.from_str(backend.to_str())
    return Tokenizer(backend, roles)


def sentinel_token(index: int) -> str:
    """T5's name for the sentinel of the ``index``-th span in span corruption: ``<extra_id_{index}>``."""
    return f"<extra_id_{index}>"


def _sentinel_tokens(sentinels: Any, specials: list) -> list[str]:
    """The ``sentinels`` sentinel tokens to add, checked: a count, none of them among the special tokens already."""
    if isinstance(sentinels, bool) or not isinstance(sentinels, int) or sentinels < 0:
        raise LmlabError(f"sentinels {sentinels!r}: expected an integer >= 0 (T5 has 100)", params="sentinels")
    tokens = [sentinel_token(k) for k in range(sentinels)]
    listed = [token for token in tokens if token in specials]
    if listed:
        raise LmlabError(
            f"sentinels {sentinels} adds <extra_id_0> … <extra_id_{sentinels - 1}>, and special_tokens already "
            f"lists {listed[0]}: give the sentinels one way, not both",
            params="sentinels special_tokens",
        )
    return tokens


def _check_training_options(kind: str, specials: list, vocab_size: Any, min_frequency: Any) -> None:
    if any(not isinstance(token, str) or not token for token in specials):
        raise LmlabError(f"special_tokens {specials!r}: expected non-empty strings", params="special_tokens")
    if len(set(specials)) != len(specials):
        raise LmlabError(f"special_tokens {specials!r}: expected no duplicates", params="special_tokens")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise LmlabError(f"vocab_size {vocab_size!r}: expected an integer", params="vocab_size")
    minimum = len(specials) + _KIND_MIN_EXTRA[kind]
    if vocab_size < minimum:
        raise LmlabError(
            f"vocab_size {vocab_size}: too small for a {kind} tokenizer with {len(specials)} special "
            f"tokens; expected at least {minimum}",
            params="vocab_size",
        )
    if vocab_size > MAX_SIZES["vocab_size"]:  # checked here: the Rust trainer aborts the process on a size past u32
        raise LmlabError(
            f"vocab_size {vocab_size:,}: expected at most {MAX_SIZES['vocab_size']:,} (2**24, the largest "
            "vocabulary an lmlab model takes)",
            params="vocab_size",
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise LmlabError(f"min_frequency {min_frequency!r}: expected an integer >= 0", params="min_frequency")


def _trainer(kind: str, vocab_size: int, min_frequency: int, specials: list[str], unk: str | None, show_progress: bool):
    """The tokenizers library's trainer for ``kind``."""
    if kind == "bpe":
        return trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
    if kind == "wordpiece":
        return trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            continuing_subword_prefix="##",
            show_progress=show_progress,
        )
    # 256 ids are kept for the byte-fallback tokens added after training.
    return trainers.UnigramTrainer(
        vocab_size=vocab_size - 256, special_tokens=specials, unk_token=unk, show_progress=show_progress
    )


def _train_backend(backend, trainer, texts: Iterable[str], kind: str, vocab_size: int) -> None:
    """Train ``backend`` on ``texts`` (each a str); no text at all, or a trainer's failure, is a one-line error."""
    chars = 0

    def counted(items: Iterable[str]) -> Iterator[str]:
        nonlocal chars
        for index, text in enumerate(items):
            if not isinstance(text, str):
                raise LmlabError(f"training text #{index} is {type(text).__name__}; expected str")
            chars += len(text)
            yield text

    try:
        backend.train_from_iterator(counted(texts), trainer=trainer)
    except LmlabError:
        raise
    except Exception as err:  # the Rust trainers raise a bare Exception (e.g. vocab too small)
        if chars == 0:
            raise LmlabError("no text to train the tokenizer on: expected at least one non-empty text") from None
        raise LmlabError(
            f"vocab_size {vocab_size}: training the {kind} tokenizer failed: {err}", params="vocab_size"
        ) from None
    if chars == 0:
        raise LmlabError("no text to train the tokenizer on: expected at least one non-empty text")
