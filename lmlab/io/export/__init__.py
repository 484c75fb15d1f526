"""``lmlab export --format hf``: a checkpoint → a folder that Hugging Face Transformers loads as it is.
(``--format gguf``, a file for llama.cpp: :mod:`lmlab.io.export.to_gguf`; ``--format onnx``, a folder for
onnxruntime: :mod:`lmlab.io.export.to_onnx`.)

    out/
      config.json                the HF config of the class for the model and its head
                                 (:func:`lmlab.io.hf.hf_architecture`: GPT2LMHeadModel, LlamaForCausalLM,
                                 BertForPreTraining / BertForMaskedLM,
                                 *ForSequenceClassification / *ForTokenClassification / *ForQuestionAnswering,
                                 BartForConditionalGeneration), labels and special token ids included
      model.safetensors          the weights under HF's names (:func:`lmlab.io.hf.state_dict_to_hf`; a tied head once)
      generation_config.json     bos / eos / pad ids (+ decoder_start_token_id for BART); generative models only
      tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                 the tokenizer: ``AutoTokenizer`` encodes as lmlab does; roles and chat template carried
      export.json                the source checkpoint, format, dtype, LoRA mode and the parity check's largest
                                 difference (absent with ``verify=False``)

``AutoModelFor….from_pretrained(out)`` loads it with no missing or unexpected weights. A LoRA checkpoint
is exported merged (``lora="merge"``, the default: the adapters folded into the weights), or as a PEFT
adapter (``lora="adapter"``)::

    out/
      adapter_config.json, adapter_model.safetensors   the adapters on HF module names
                                                       (:func:`lmlab.io.hf.adapter_state_to_hf`)
      base/                                            the checkpoint's base weights (and trained task head) as above

so that ``peft.PeftModel.from_pretrained(AutoModelFor…(out/base), out)`` is the merged model
(``base_model_name_or_path`` points at ``out/base``).

The folder is written atomically: into a hidden temp folder beside ``out``, checked, then renamed into
place. The check (``verify``, on by default) loads the written folder with the Auto class (and PEFT)
and compares its outputs with lmlab's on a fixed batch (:func:`lmlab.io.hf.check_parity`); a mismatch
is an LmlabError with the number, and nothing is left behind. ``out`` must not exist or be empty.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmlab.config import LoraSpec, ModelConfig, write_json_atomic
from lmlab.errors import LmlabError
from lmlab.io import hf, outputs
from lmlab.io.checkpoint import has_tokenizer, load_config, load_model, load_tokenizer, resolve_checkpoint
from lmlab.model.heads import pools
from lmlab.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

LORA_MODES = ("merge", "adapter")
EXPORT_RECORD = "export.json"  # what an export was made from and what its check measured (every format writes one)


def export_hf(checkpoint: str | Path, out: str | Path, *, verify: bool = True, lora: str = "merge") -> Path:
    """Write ``checkpoint`` (an lmlab checkpoint, run folder or HF folder) as an HF folder ``out``; returns ``out``.

    ``lora``: "merge" exports a LoRA checkpoint's adapters folded in; "adapter" writes a PEFT adapter
    folder with the base model in ``out/base``. ``verify=False`` skips the parity check of the result, and
    exports a tokenizer that does not match the one the model was trained with (with a warning) instead of refusing.

    Args:
        checkpoint: checkpoint folder (or run folder: its best checkpoint)
        out: the folder to write (new or empty; written atomically)
        verify: load the written folder with transformers and compare its logits with lmlab's (False: skip it)
        lora: a LoRA checkpoint: merge (adapters folded into the weights) or adapter (format hf only: a PEFT adapter
            folder, the base in OUT/base)
    """
    if lora not in LORA_MODES:
        raise LmlabError(f"lora {lora!r}: expected one of {', '.join(LORA_MODES)}", params="lora")
    src = resolve_checkpoint(checkpoint)
    out = Path(out)
    outputs.check_sources(out, (checkpoint, src))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmlabError(f"out {out} exists and is not an empty folder: choose another or remove it", params="out")
    outputs.check_writable(out)
    outputs.clean_stale(out.parent, out.name)
    config = load_config(src)
    if lora == "adapter" and not config.lora:
        raise LmlabError(
            f"lora adapter: {src} has no LoRA adapters (its config has no LoRA settings); export it with lora merge",
            params="lora",
        )
    if config.quantization:
        raise LmlabError(
            f"{src} is quantized ({config.quantization['method']}); a Hugging Face folder holds float weights: "
            "export the checkpoint it was quantized from"
        )
    hf.hf_architecture(config)  # a config no HF class expresses fails here, before any work
    tokenizer = load_tokenizer(src, verify=verify) if has_tokenizer(src) else None
    if tokenizer is None:
        logger.warning("%s has no tokenizer.json: the export has no tokenizer", src)
    model = load_model(src, merge_lora=True)  # what the export must reproduce
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / outputs.temp_name(out.name)
    try:
        if lora == "adapter":
            adapted = load_model(src)  # base weights and adapters apart
            base = {k.replace(".base_layer.", "."): v for k, v in adapted.state_dict().items() if ".lora_" not in k}
            _write_model(tmp / "base", base, model.config, tokenizer)
            _write_adapter(tmp, adapted, out / "base")
        else:
            _write_model(tmp, model.state_dict(), model.config, tokenizer)
        record = {"source": str(src.resolve()), "format": "hf", "dtype": "float32", "lora": lora}
        if verify:
            what = f"export check of {out} (nothing was written; verify=False / --no-verify skips it)"
            record["max_abs_output_diff"] = _check(tmp, model, adapter=lora == "adapter", what=what)
        write_json_atomic(tmp / EXPORT_RECORD, record)
        outputs.move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _special_ids(config: ModelConfig, tokenizer: Tokenizer | None) -> dict[str, int | None]:
    """bos / eos / pad ids from the tokenizer. A decoder classifier pads with eos when there is no pad
    token (as fine-tuning does): HF pools its rows at the last token that is not pad_token_id."""
    if tokenizer is None:
        return {}
    pad = tokenizer.pad_id
    if pad is None and config.arch == "decoder" and pools(config):
        pad = tokenizer.eos_id
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": pad}


def _write_model(folder: Path, state: dict[str, Tensor], config: ModelConfig, tokenizer: Tokenizer | None) -> None:
    tf = hf.require_transformers()
    folder.mkdir(parents=True)
    hf_config = hf.hf_config_from(config)
    ids = _special_ids(config, tokenizer)
    for name, value in ids.items():
        setattr(hf_config, name, value)
    hf_config.save_pretrained(folder)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in hf.state_dict_to_hf(state, config).items()}
    save_file(weights, str(folder / hf.SAFETENSORS), metadata={"format": "pt"})
    if config.arch == "seq2seq" or (config.arch == "decoder" and not config.task):  # what generates
        start = {"decoder_start_token_id": config.decoder_start_token_id} if config.arch == "seq2seq" else {}
        tf.GenerationConfig(**ids, **start).save_pretrained(folder)
    if tokenizer is not None:
        exported = Tokenizer(
            tokenizer.backend,
            tokenizer.special_tokens,
            model_max_length=tokenizer.model_max_length or config.block_size,
            chat_template=tokenizer.chat_template,
        )
        exported.write_files(folder)
        write_json_atomic(
            folder / "special_tokens_map.json",
            {f"{role}_token": token for role, token in exported.special_tokens.items()},
        )


def _write_adapter(folder: Path, adapted: nn.Module, base: Path) -> None:
    """PEFT's adapter files for the LoRA model ``adapted``: adapter_model.safetensors and adapter_config.json."""
    peft = _peft()
    spec = LoraSpec.from_dict(adapted.config.lora)
    plain = dataclasses.replace(adapted.config, lora={})
    adapters = {k: v for k, v in adapted.state_dict().items() if ".lora_" in k}
    weights, modules = hf.adapter_state_to_hf(adapters, plain)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=modules,
        bias="none",
        fan_in_fan_out=hf.hf_architecture(plain).startswith("GPT2"),  # GPT-2's Conv1D stores (in, out)
        base_model_name_or_path=str(base.resolve()),
    ).save_pretrained(str(folder))


def _check(folder: Path, model: nn.Module, *, adapter: bool, what: str) -> float:
    """Load the written folder as transformers (and PEFT) would and compare its outputs with ``model``'s; returns
    the largest difference (fp32, a fixed batch)."""
    architecture = hf.hf_architecture(model.config)
    with hf.quiet_transformers() as tf:
        auto = getattr(tf, hf.ARCHITECTURES[architecture].auto)
        hf_model: Any = auto.from_pretrained(
            folder / "base" if adapter else folder, dtype=torch.float32, attn_implementation="sdpa"
        )
        if type(hf_model).__name__ != architecture:
            raise LmlabError(
                f"{what}: {auto.__name__} loaded a {type(hf_model).__name__}, not the {architecture} written"
            )
        if adapter:
            hf_model = _peft().PeftModel.from_pretrained(hf_model, str(folder))
    return hf.check_parity(model, hf_model.to(model.tok_emb.weight.device), what)


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise LmlabError(
            "a LoRA adapter export needs peft, which is not installed: pip install 'lmlab[lora]'"
        ) from None
    return peft


__all__ = ["LORA_MODES", "export_hf"]
