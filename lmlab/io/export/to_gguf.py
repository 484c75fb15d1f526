"""``lmlab export --format gguf``: a decoder checkpoint → one GGUF file that llama.cpp loads, the tokenizer inside.

Written with the ``gguf`` package (llama.cpp's own writer, ``pip install 'lmlab[gguf]'``), the way llama.cpp's
``convert_hf_to_gguf.py`` writes the same model's HF folder: lmlab's weights go to HF's names first
(:func:`lmlab.io.hf.state_dict_to_hf`), then through ``gguf``'s ``TensorNameMap`` of the architecture, with
the converter's changes to the data::

    lmlab family      GGUF architecture   what changes on the way
    GPT-2             gpt2                Conv1D weights transposed back to (out, in): blk.N.attn_qkv, attn_output,
                                          ffn_up, ffn_down; position_embd kept in F32
    LLaMA             llama               q and k rows permuted (convert_hf_to_gguf's ``LlamaModel.permute``: HF's
                                          rotate-half RoPE, which lmlab's is, → llama.cpp's interleaved pairs);
                                          RoPE scaling ``linear`` as rope.scaling.type/factor, ``llama3`` as the
                                          ``rope_freqs.weight`` factors and rope.scaling.original_context_length
                                          (which llama.cpp reads only for YaRN; import reads it back); ``dynamic``
                                          changes nothing within context_length (= block_size), so nothing is
                                          written for it

A tied head is ``token_embd`` alone (llama.cpp reads it as the output matrix); an untied one is ``output``.
The tokenizer is written as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary: tokens (an id past the
tokenizer's vocabulary, from ``pad_vocab_multiple``, is ``[PAD{id}]``, UNUSED, as the converter writes it),
token types (special tokens CONTROL, other added tokens USER_DEFINED), merges, bos / eos / unk / pad ids,
``tokenizer.ggml.pre`` and the chat template. ``tokenizer.ggml.pre`` names the regex llama.cpp splits text with
before BPE; it must split as the tokenizer's pre-tokenizer does, or llama.cpp's ids differ from lmlab's. lmlab
trains byte-level BPE with ``ByteLevel(use_regex=True)``, GPT-2's regex, which llama.cpp calls ``gpt-2``; a
tokenizer read from a GGUF file keeps its own (SmolLM2's ``smollm``: every digit apart, then GPT-2's regex).
:data:`lmlab.io.gguf_file.PRE_TOKENIZERS` is the table, used both ways; another pre-tokenizer is refused.
A ``.gguf`` file is also a checkpoint lmlab reads (:mod:`lmlab.io.gguf_file`), so a GGUF file exports again.
``outtype``: f32, f16 or q8_0 (``gguf.quants``); one-dimensional tensors (norms, biases) stay F32 as the
converter keeps them, and a matrix whose rows do not split into Q8_0's blocks of 32 is written F16.

The file is written to a temporary name beside ``out``, checked (:func:`check_gguf`), and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig, write_json_atomic
from lmlab.errors import LmlabError
from lmlab.io import hf, outputs
from lmlab.io.checkpoint import (
    has_tokenizer,
    load_config,
    load_model,
    load_tokenizer,
    load_weights,
    rebuild_buffers,
    resolve_checkpoint,
)
from lmlab.io.gguf_file import (
    GPT2_CONV1D,
    hf_state_from_gguf,
    permute,
    pre_tokenizer_name,
    read_tensors,
    require_gguf,
    tensor_name_map,
    unpermute,
)
from lmlab.model import build_model
from lmlab.model.blocks import rope_inv_freq
from lmlab.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}  # HF class → GGUF architecture
SUPPORTED = "decoder language models of the GPT-2 and LLaMA families (no task head)"
# the round trip's largest logit difference, as a fraction of the largest logit (at least 1)
TOLERANCES = {"f32": 1e-5, "f16": 5e-3, "q8_0": 5e-2}
CHECK_IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 8, 4, 6, 10, 11, 12], [13, 3, 3, 0, 14, 15, 2, 9, 1, 16, 17, 18]])


def gguf_architecture(config: ModelConfig, source: str | Path) -> str:
    """The GGUF architecture of ``config`` (gpt2 or llama), or an LmlabError naming what GGUF export supports."""
    what = {"encoder": "an encoder", "seq2seq": "an encoder–decoder"}.get(config.arch)
    if what is None and config.task:
        what = f"a decoder with a {config.task} head"
    architecture = "" if what else hf.hf_architecture(config)
    if what or architecture not in ARCHITECTURES:
        raise LmlabError(f"format gguf writes {SUPPORTED}; {source} is {what or 'a ' + architecture}", params="format")
    if architecture == "GPT2LMHeadModel" and config.gelu_approximate != "tanh":
        logger.warning(
            "%s uses exact GELU; llama.cpp's gpt2 computes the tanh approximation (logits differ slightly)", source
        )
    return ARCHITECTURES[architecture]


def gguf_tensors(state: dict[str, Tensor], config: ModelConfig, arch: str) -> dict[str, Tensor]:
    """lmlab's state dict → GGUF name → fp32 tensor, as convert_hf_to_gguf makes them from the HF weights."""
    names = tensor_name_map(arch, config.n_layer)
    out: dict[str, Tensor] = {}
    for name, t in hf.state_dict_to_hf(state, config).items():
        t = t.detach().to("cpu", torch.float32)
        if arch == "gpt2" and name.endswith(GPT2_CONV1D):
            t = t.T
        elif name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute(t, config.n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute(t, config.n_kv_heads)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise LmlabError(f"format gguf: no GGUF name for the weight {name}")
        out[new] = t.contiguous()
    if config.rope_scaling.get("rope_type") == "llama3":  # llama.cpp divides its frequencies by these factors
        plain = rope_inv_freq(dataclasses.replace(config, rope_scaling={}))
        out["rope_freqs.weight"] = plain / rope_inv_freq(config)
    return out


def expected_metadata(config: ModelConfig, arch: str, outtype: str) -> dict[str, Any]:
    """The architecture's metadata keys and values, as convert_hf_to_gguf writes them."""
    gguf = require_gguf()
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    m: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.block_count": config.n_layer,
        f"{arch}.context_length": config.block_size,
        f"{arch}.embedding_length": config.n_embd,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.n_head,
        "general.file_type": int(file_type.get(outtype, gguf.LlamaFileType.MOSTLY_Q8_0)),
    }
    if arch == "gpt2":
        m[f"{arch}.attention.layer_norm_epsilon"] = config.norm_eps
        return m
    m[f"{arch}.attention.head_count_kv"] = config.n_kv_heads
    m[f"{arch}.rope.freq_base"] = config.rope_theta
    m[f"{arch}.attention.layer_norm_rms_epsilon"] = config.norm_eps
    m[f"{arch}.attention.key_length"] = m[f"{arch}.attention.value_length"] = config.head_dim
    m[f"{arch}.vocab_size"] = config.vocab_size
    m[f"{arch}.rope.dimension_count"] = config.head_dim
    if config.rope_scaling.get("rope_type") == "linear":
        m[f"{arch}.rope.scaling.type"] = "linear"
        m[f"{arch}.rope.scaling.factor"] = float(config.rope_scaling["factor"])
    if config.rope_scaling.get("rope_type") == "llama3":  # rope_freqs holds the rest; import reads this back
        m[f"{arch}.rope.scaling.original_context_length"] = int(config.rope_scaling["original_max_position_embeddings"])
    return m


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The tokenizer's GGUF keys (``tokenizer.ggml.*``, ``tokenizer.chat_template``) and their values."""
    gguf = require_gguf()
    spec = json.loads(tokenizer.backend.to_str())
    pre = pre_tokenizer_name(tokenizer.backend)
    if spec["model"]["type"] != "BPE" or pre is None:
        raise LmlabError(
            f"format gguf writes byte-level BPE tokenizers (lmlab's bpe kind) pre-tokenized as llama.cpp knows; this "
            f"one is {spec['model']['type']} with a {(spec.get('pre_tokenizer') or {}).get('type')} pre-tokenizer",
            params="format",
        )
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size:
        raise LmlabError(f"format gguf: the tokenizer has {len(by_id)} tokens, more than the model's {vocab_size}")
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        kind = "UNUSED" if i not in by_id else "NORMAL" if i not in added else "USER_DEFINED"
        types.append(int(getattr(gguf.TokenType, "CONTROL" if i in added and added[i].special else kind)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    keys: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,  # llama.cpp's name for the regex that splits text as this tokenizer does
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": False,  # lmlab encodes prompts without special tokens
        "tokenizer.ggml.add_eos_token": False,
    }
    for role in ("bos", "eos", "unk", "pad"):
        if (token_id := getattr(tokenizer, f"{role}_id")) is not None:
            keys[f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id"] = token_id
    if tokenizer.chat_template:
        keys["tokenizer.chat_template"] = tokenizer.chat_template
    return keys


def _qtype(name: str, t: Tensor, outtype: str) -> Any:
    gguf = require_gguf()
    q = gguf.GGMLQuantizationType
    if outtype == "f32" or t.ndim == 1 or name in ("position_embd.weight", "rope_freqs.weight"):
        return q.F32
    if outtype == "q8_0" and t.shape[-1] % 32 == 0:
        return q.Q8_0
    return q.F16


def write_gguf(path: Path, tensors: dict[str, Tensor], metadata: dict[str, Any], name: str, outtype: str) -> None:
    """Write one GGUF file: ``metadata`` (general.architecture first) and ``tensors`` as ``outtype`` says."""
    gguf = require_gguf()
    writer = gguf.GGUFWriter(str(path), metadata["general.architecture"])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):  # counts and token ids alike: llama.cpp reads them as u32
            writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            kind = gguf.GGUFValueType.INT32 if key.endswith("token_type") else gguf.GGUFValueType.STRING
            writer.add_array(key, value) if kind == gguf.GGUFValueType.STRING else writer.add_key_value(
                key, value, gguf.GGUFValueType.ARRAY, sub_type=kind
            )
    for tensor_name, t in tensors.items():
        qtype = _qtype(tensor_name, t, outtype)
        data = gguf.quants.quantize(t.numpy().astype(np.float32), qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _check_metadata(reader: Any, expected: dict[str, Any], what: str) -> None:
    for key, value in expected.items():
        got = _field(reader, key)
        same = math.isclose(got, value, rel_tol=1e-6) if isinstance(value, float) and got is not None else got == value
        if not same:
            shown = f"{len(got)} items" if isinstance(got, list) and len(got) > 8 else repr(got)
            raise LmlabError(f"{what}: metadata {key} reads back as {shown}, expected {value!r:.200}")


def model_from_gguf(tensors: dict[str, Tensor], config: ModelConfig, arch: str) -> nn.Module:
    """An lmlab model of ``config`` with the GGUF tensors (permutations and transposes undone) as its weights."""
    model = build_model(config)
    state = hf.state_dict_from_hf(hf_state_from_gguf(tensors, config, arch), config)
    if config.tie_embeddings:  # a checkpoint holds a tied head once
        state.pop("lm_head.weight", None)
    load_weights(model, state, source="the GGUF file")
    rebuild_buffers(model)  # RoPE tables with the config's scaling
    return model.eval()


def check_gguf(path: Path, model: nn.Module, tokenizer: Tokenizer | None, outtype: str, what: str) -> float:
    """Read ``path`` back with ``gguf.GGUFReader``: tensor names, shapes and types, the metadata and the
    tokenizer as written; then rebuild an lmlab model from its tensors and compare its logits with ``model``'s.
    Returns the largest logit difference as a fraction of the largest logit (at least 1)."""
    gguf = require_gguf()
    config = model.config
    arch = gguf_architecture(config, what)
    reader = gguf.GGUFReader(str(path))
    want = gguf_tensors(model.state_dict(), config, arch)
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(want):
        raise LmlabError(f"{what}: tensors {sorted(set(found) ^ set(want))} differ from the ones written")
    for name, t in want.items():
        shape = tuple(int(n) for n in reversed(found[name].shape))  # GGUF lists ggml's order, innermost first
        if shape != tuple(t.shape) or found[name].tensor_type != _qtype(name, t, outtype):
            raise LmlabError(f"{what}: tensor {name} reads back as {found[name].tensor_type.name} {shape}")
    _check_metadata(reader, expected_metadata(config, arch, outtype), what)
    if tokenizer is not None:
        _check_metadata(reader, vocabulary(tokenizer, config.vocab_size), what)
    tensors = read_tensors(reader)
    if "rope_freqs.weight" in tensors:
        plain = rope_inv_freq(dataclasses.replace(config, rope_scaling={}))
        if not torch.allclose(plain / tensors["rope_freqs.weight"], rope_inv_freq(config), rtol=1e-5):
            raise LmlabError(f"{what}: rope_freqs do not give lmlab's scaled RoPE frequencies")
    rebuilt = model_from_gguf(tensors, config, arch)
    ids = CHECK_IDS % config.vocab_size
    with torch.no_grad():
        ours, theirs = model(ids.to(model.tok_emb.weight.device)).float().cpu(), rebuilt(ids)
    gap = ((ours - theirs).abs().max() / ours.abs().max().clamp(min=1.0)).item()
    if not gap <= TOLERANCES[outtype]:
        raise LmlabError(
            f"{what}: the model rebuilt from the file differs by {gap:.2e} (tolerance {TOLERANCES[outtype]})"
        )
    return gap


def export_gguf(checkpoint: str | Path, out: str | Path, *, outtype: str = "f32", verify: bool = True) -> Path:
    """Write ``checkpoint`` (a GPT-2 or LLaMA decoder; a LoRA run merged) as one GGUF file ``out``; returns ``out``.

    Args:
        checkpoint: checkpoint folder (or run folder: its best checkpoint)
        out: the file to write (new; written atomically)
        outtype: gguf: the weights' type, f32, f16 or q8_0 (norms and biases stay f32)
        verify: read the written file back and compare the model rebuilt from it with lmlab's (False: skip it)
    """
    if outtype not in OUTTYPES:
        raise LmlabError(f"outtype is {outtype!r}: expected {', '.join(OUTTYPES)}", params="outtype")
    require_gguf()
    src, out = resolve_checkpoint(checkpoint), Path(out)
    outputs.check_sources(out, (checkpoint, src))
    record_path = out.with_name(out.name + ".export.json")  # beside the file: a folder may hold several exports
    for path in (out, record_path):
        if path.exists():
            raise LmlabError(f"out: {path} exists: choose another name or remove it", params="out")
    config = load_config(src)
    arch = gguf_architecture(config, src)
    if not has_tokenizer(src):
        raise LmlabError(f"format gguf needs the checkpoint's tokenizer: {src} has no tokenizer.json", params="format")
    tokenizer = load_tokenizer(src, verify=verify)
    model = load_model(src, merge_lora=True)
    metadata = {**expected_metadata(model.config, arch, outtype), **vocabulary(tokenizer, config.vocab_size)}
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.check_writable(out)
    outputs.clean_stale(out.parent, out.name)
    tmp = out.parent / outputs.temp_name(out.name)
    try:
        write_gguf(tmp, gguf_tensors(model.state_dict(), model.config, arch), metadata, src.name, outtype)
        record = {"source": str(src.resolve()), "format": "gguf", "dtype": outtype}
        if verify:
            gap = check_gguf(tmp, model, tokenizer, outtype, f"export check of {out} (nothing was written)")
            logger.info("gguf %s: the model rebuilt from the file is within %.1e of lmlab's logits", outtype, gap)
            record["logit_gap_relative"] = gap  # the largest logit difference ÷ the largest logit
        outputs.honour_umask(tmp)
        write_json_atomic(record_path, record)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


__all__ = ["OUTTYPES", "check_gguf", "export_gguf", "gguf_architecture", "model_from_gguf", "permute", "unpermute"]
