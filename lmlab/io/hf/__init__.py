"""Weights and configs between lmlab and HF Transformers, both ways: GPT-2, LLaMA, BERT and BART, with their task heads.

The package, by concern (each module's docstring has the details)::

    family.py    what a family module defines: Family, Architecture; the weight-table words Rule, linear, fused
    gpt2.py      HF GPT-2  ↔ lmlab's decoder with learned positions   }  one module per family: the HF classes,
    llama.py     HF LLaMA  ↔ lmlab's RMSNorm/SwiGLU/RoPE decoder      }  the config fields both ways and the
    bert.py      HF BERT   ↔ lmlab's encoder                          }  weight table, with the name mapping
    bart.py      HF BART   ↔ lmlab's encoder–decoder                  }  drawn in its docstring
    registry.py  FAMILIES, one line per family, and the tables derived from them (ARCHITECTURES, …)
    config.py    ModelConfig ↔ HF config: which family and class express a config; task-head labels by the
                 kind of head (HEAD_KINDS: what HF makes of each)
    rules.py     state dicts both ways by walking a family's weight table; task heads; LoRA adapters (PEFT)
    folder.py    HF folders on disk: weight files, shards and their index, config.json, sentence-transformers
    parity.py    models in memory both ways (to_hf_model, from_hf_model) and the output check (check_parity)
    __init__.py  an HF folder as an lmlab checkpoint: read_hf_checkpoint, verify_hf_folder; the public names

Every mapping is exact, and the logits of both models agree to float rounding (``tests/test_hf.py``).

**HF folders are checkpoints** (:func:`is_hf_folder`, read by :mod:`lmlab.io.checkpoint`): a folder
with an HF ``config.json`` (``model_type``, no ``lmlab_model_config``), weights as
``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (sharded or not, read with ``torch.load(weights_only=True)`` only: a pickle
holding anything but tensors is refused), and ``tokenizer.json``. :func:`read_hf_checkpoint` reads the
weights and maps them — transformers is not imported to load. Then :func:`verify_hf_folder` builds
transformers' model from the same folder once and compares outputs on a fixed batch (fp32; a
mismatch is an LmlabError with the number). The result is cached in lmlab's cache folder
(:func:`~lmlab.io.hf.folder.cache_dir`, never in the model's folder), keyed by the folder's path and the size
and mtime of ``config.json`` and every weights file (and lmlab's version). Without transformers the check is
skipped with a warning. A sentence-transformers folder (``modules.json``) is read through its
Transformer module (the folder itself or ``0_Transformer/``); its pooling modules are not applied.

``transformers`` is an optional dependency (``pip install 'lmlab[hf]'``), imported only inside the
functions that need it.

Adding a model family to HF interop
-----------------------------------
1. Write ``lmlab/io/hf/<family>.py`` (``gpt2.py`` is the shortest example): a subclass of
   :class:`~lmlab.io.hf.family.Family` and ``FAMILY = <YourFamily>()``. It sets

   - ``model_type`` (HF's), ``defaults`` (the HF config class's defaults of every field it reads, so a
     config.json that leaves one out still imports without transformers), ``architectures`` (HF class →
     :class:`~lmlab.io.hf.family.Architecture`: the family's model_type, the task of its head, its backbone
     prefix, its Auto class, its head Linear; one class per task at most), ``lm_class`` (the class without
     a task head) and ``required`` (the ModelConfig field values the family needs; export refuses a config
     that differs, naming the field);
   - where needed: ``bare`` (a bare base class → the class read in its place), ``ignored`` (suffixes of
     non-weight tensors: buffers, copies of tied weights), ``unprefixed`` (head weights outside the
     backbone prefix), ``grouped_kv`` (True when the HF class takes n_kv_heads < n_head);

   and defines four methods: ``claims(config)`` (the reason this family is the one for a ModelConfig,
   '' otherwise; no two families claim one config: the claimant is what export writes),
   ``hf_config(tf, config, common)`` (the HF config object; pass ``**common`` on),
   ``config_from_hf(c, architecture, keys)`` (the ModelConfig of a config.json dict, refusing
   unsupported fields with :func:`~lmlab.io.hf.family.unsupported` / ``require``) and
   ``rules(config, architecture)`` (the weight table: one :class:`~lmlab.io.hf.family.Rule` per lmlab
   tensor, in ``model.state_dict()`` order, built with ``linear`` / ``fused``; the task head's Linear is
   added for you). Override ``architecture``, ``import_architecture`` or ``with_prefix`` only when the
   class depends on more than the task (BERT's heads). Draw the name mapping in the module docstring.
   Nothing else changes for a family whose models are one of lmlab's three arches with the outputs HF
   gives its like: :func:`~lmlab.io.hf.parity.check_parity` compares by ``arch`` (logits; task logits; a
   bare encoder's hidden states and pooled vector).
2. Add one line to ``FAMILIES`` in ``lmlab/io/hf/registry.py`` (and its import there).
3. Add parity cases, most of them one line each: in ``tests/test_hf.py``, a tiny lmlab config in
   ``CONFIGS`` (``to_hf_model`` / ``from_hf_model`` agree with transformers within ``TOL``, and the
   state dict round-trips exactly) and an HF class and config in ``HF_CASES`` (a folder transformers
   saved loads with ``load_model``, and the import check passes); in ``tests/test_export.py``, a case in
   ``CASES`` (the export loads with its Auto class, silently, and ``check_parity`` passes) and, for
   LoRA, one in ``LORA_CASES``. A decoder-only family fits ``CONFIGS``' causal-LM tests as they are; an
   encoder or encoder–decoder needs its own test beside BERT's or BART's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig, read_json_object, write_json_atomic
from lmlab.errors import LmlabError
from lmlab.io.hf.config import (
    ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    Architecture,
    config_from_hf,
    hf_architecture,
    hf_config_from,
    import_architecture,
    require_transformers,
    with_prefix,
)
from lmlab.io.hf.folder import (
    SAFETENSORS,
    VERIFIED_FILE,
    WEIGHT_FILES,
    hf_config_dict,
    hf_folder_config,
    is_hf_folder,
    read_hf_weights,
    sentence_transformers_module,
    stamp,
    verified_record,
    weight_names,
)
from lmlab.io.hf.parity import PARITY_TOL, check_parity, from_hf_model, max_logit_diff, quiet_transformers, to_hf_model
from lmlab.io.hf.registry import BARE
from lmlab.io.hf.rules import adapter_state_to_hf, complete_state_dict, state_dict_from_hf, state_dict_to_hf
from lmlab.version import __version__

logger = logging.getLogger(__name__)

# read_hf_checkpoint and verify_hf_folder join the folder, the weight rules and the parity check, so they
# live here: the names they call are this package's own (patching lmlab.io.hf.check_parity reaches them).


def read_hf_checkpoint(folder: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The lmlab config and weights (as a checkpoint stores them: a tied head once) of an HF folder:
    the tensors are read from the files and mapped, without building transformers' model."""
    config, state, _ = read_hf_parts(folder)
    return config, state


def read_hf_parts(folder: str | Path) -> tuple[ModelConfig, dict[str, Tensor], list[str]]:
    """:func:`read_hf_checkpoint`, and the names of the weights the folder lacks that lmlab initialised freshly
    (:func:`complete_state_dict`: the MLM head of a bare BERT or a sentence-transformers folder)."""
    folder = Path(folder)
    c = hf_config_dict(folder)
    hf_state = read_hf_weights(folder)
    try:
        config = config_from_hf(c, keys=with_prefix(set(hf_state), c))
        mapped = state_dict_from_hf(hf_state, config)
        state = complete_state_dict(mapped, config, warn=False)  # recorded instead: most runs never read them
    except LmlabError as err:
        raise LmlabError(f"{folder}: {err}") from None
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return config, state, sorted(set(state) - set(mapped))


def _verified(folder: Path) -> dict | None:
    """The cached record of ``folder``'s passed check while its files and lmlab's version are unchanged, else None."""
    files = stamp(folder)
    try:
        record = read_json_object(verified_record(folder, files))
    except LmlabError:
        return None
    return record if record.get("files") == files and record.get("lmlab") == __version__ else None


def parity_checked(folder: str | Path) -> bool:
    """Whether :func:`verify_hf_folder` has checked ``folder`` as it is now (and would return at once)."""
    return _verified(Path(folder)) is not None


def verify_hf_folder(folder: str | Path, model: nn.Module) -> float | None:
    """Check ``model`` (as :func:`read_hf_checkpoint` built it) against transformers' model of ``folder``
    (its ``architectures`` class, fp32): an LmlabError with the number on a mismatch. Returns max |Δ|,
    or None when transformers is not installed (a warning says the check was skipped).

    A pass is recorded in lmlab's cache (:func:`~lmlab.io.hf.folder.verified_record`: ``$LMLAB_CACHE`` or
    ``~/.cache/lmlab``), never in ``folder``; while config.json and the weights files keep their size and mtime,
    later calls return it unchecked.
    """
    folder = Path(folder)
    record = _verified(folder)
    if record is not None:
        return record["max_abs_diff"]
    files = stamp(folder)
    record_file = verified_record(folder, files)
    try:
        import transformers  # noqa: F401
    except ImportError:
        logger.warning("transformers is not installed: the parity check of %s against transformers is skipped", folder)
        return None
    c = hf_config_dict(folder)
    declared = (c.get("architectures") or [import_architecture(model.config, with_prefix(weight_names(folder), c))])[0]
    class_name = BARE.get(declared, declared)
    with quiet_transformers() as tf:
        hf_model = getattr(tf, class_name).from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    hf_model = hf_model.to(model.tok_emb.weight.device).eval()
    diff = check_parity(model, hf_model, f"{folder}: import check (verify=False / --no-verify skips it)")
    try:
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record = {"files": files, "lmlab": __version__, "transformers": tf.__version__, "max_abs_diff": diff}
        write_json_atomic(record_file, record)
    except OSError as err:
        logger.info("cannot record the check in %s (%s)", record_file, err)
    return diff


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "PARITY_TOL",
    "SAFETENSORS",
    "SUPPORTED_MODEL_TYPES",
    "VERIFIED_FILE",
    "verified_record",
    "WEIGHT_FILES",
    "adapter_state_to_hf",
    "check_parity",
    "complete_state_dict",
    "config_from_hf",
    "from_hf_model",
    "hf_architecture",
    "hf_config_from",
    "hf_folder_config",
    "is_hf_folder",
    "max_logit_diff",
    "parity_checked",
    "quiet_transformers",
    "read_hf_checkpoint",
    "read_hf_parts",
    "read_hf_weights",
    "require_transformers",
    "sentence_transformers_module",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "to_hf_model",
    "verify_hf_folder",
]
