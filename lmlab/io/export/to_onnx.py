"""``lmlab export --format onnx``: a checkpoint → a folder onnxruntime runs. A decoder language model::

    out/
      model.onnx        one graph for prefill and decode, the KV cache as inputs and outputs:
                          input_ids       (batch, sequence) int64     the new tokens
                          cache_position  (sequence,) int64           their slots in the cache (= positions)
                          past_keys       (n_layer, batch, n_kv_heads, cache, head_dim) float32
                          past_values     the same
                        → logits (batch, sequence, vocab_size) float32, present_keys, present_values (the caches
                          with the new tokens' keys and values written at ``cache_position``);
                        batch, sequence and cache are dynamic axes (sequence and cache up to the model's block_size)
      tokenizer.json    the checkpoint's tokenizer (when it has one), for the ids in and the text out
      export.json       source checkpoint, format, dtype, opset and the parity figures the check measured

An encoder, or a decoder with a task head (classify, tag, qa), is one graph (:class:`TaskGraph`): ``input_ids``,
``attention_mask`` (1 on real tokens) and, where the model has segment embeddings, ``token_type_ids`` (batch,
sequence) int64 → the task head's ``logits`` (classify: (batch, num_labels); tag, qa: (batch, sequence, labels)),
or an encoder's ``last_hidden_state`` (batch, sequence, n_embd) without one. Encoder–decoders are refused.

The cache is static, as lmlab's own :class:`~lmlab.model.blocks.KVCache`: the caller allocates zeros of the
longest length it will need and passes back what the graph returned; a query sees the slots up to its own
position. Prefill passes the prompt with ``cache_position = 0 … T-1``, decode one token at its position.
Exported with ``torch.onnx.export(dynamo=True)`` (``torch.export`` then onnxscript; ``pip install 'lmlab[onnx]'``).
The folder is written beside ``out`` under a temporary name, checked with onnxruntime (:func:`check_onnx`:
prefill logits of two batches of other shapes than the traced one within :data:`TOL` of lmlab's, and a greedy
continuation driven through onnxruntime — prefill, then decode steps through the cache — equal to lmlab's token
for token, each step's logits within :data:`TOL`), and renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.config import ModelConfig, write_json_atomic
from lmlab.errors import LmlabError
from lmlab.io import outputs
from lmlab.io.checkpoint import has_tokenizer, load_config, load_model, load_tokenizer, resolve_checkpoint
from lmlab.model.heads import last_token, pools

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
OPSET = 18
TOL = 1e-4  # the largest absolute logit difference the check allows (fp32)
SUPPORTED = "decoders (with or without a task head) and encoders"


def require_onnx() -> Any:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's dynamo exporter writes the graph with it)
    except ImportError:
        raise LmlabError(
            "format onnx needs onnx, onnxscript and onnxruntime, which are not installed: pip install 'lmlab[onnx]'"
        ) from None
    return onnx, onnxruntime


class GraphCache:
    """:class:`~lmlab.model.blocks.KVCache`'s interface over the graph's cache inputs, written functionally
    (``index_copy``, not ``index_copy_``): a graph returns new caches instead of writing into its inputs."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        self.k, self.v, self.max_len = list(keys.unbind(0)), list(values.unbind(0)), keys.shape[3]

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, length: int | None) -> tuple[Tensor, Tensor]:
        self.k[layer] = self.k[layer].index_copy(2, input_pos, k)
        self.v[layer] = self.v[layer].index_copy(2, input_pos, v)
        return self.k[layer], self.v[layer]


class CachedLogits(nn.Module):
    """(input_ids, cache_position, past_keys, past_values) → (logits, present_keys, present_values). The mask is
    built from ``arange`` (a query sees the slots up to its position), so the graph holds no Python bool that
    depends on a length (SDPA's ``is_causal`` must be a constant)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, cache_position: Tensor, past_keys: Tensor, past_values: Tensor):
        cache = GraphCache(past_keys, past_values)
        slots = torch.arange(past_keys.shape[3], device=input_ids.device)
        mask = (slots[None, :] <= cache_position[:, None])[None, None]
        logits = self.model(input_ids, kv_cache=cache, input_pos=cache_position, attn_mask=mask)
        return logits, torch.stack(cache.k), torch.stack(cache.v)


def empty_cache(config: ModelConfig, batch: int, length: int) -> Tensor:
    """Zeros of the graph's cache shape, (n_layer, batch, n_kv_heads, length, head_dim): what a caller starts with."""
    return torch.zeros(config.n_layer, batch, config.n_kv_heads, length, config.head_dim)


INPUTS = ["input_ids", "cache_position", "past_keys", "past_values"]
OUTPUTS = ["logits", "present_keys", "present_values"]


class TaskGraph(nn.Module):
    """An encoder, or a decoder with a task head, as one graph: (input_ids, attention_mask[, token_type_ids]) →
    the task head's ``logits``, or an encoder's ``last_hidden_state`` when it has no task head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        model = self.model
        if model.config.arch == "encoder":
            return lmlab_outputs(model, input_ids, attention_mask, token_type_ids)
        # a decoder's head as heads.task_logits applies it, on hidden states computed with an explicit causal mask
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = model(input_ids, attn_mask=(pos[None, :] <= pos[:, None])[None, None], hidden_only=True)
        return model.task_head(last_token(hidden, attention_mask) if pools(model.config) else hidden)


def lmlab_outputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None):
    """What :class:`TaskGraph` computes, the way lmlab computes it: task logits, or an encoder's hidden states."""
    if model.config.task:
        return model.task_logits(input_ids, token_type_ids, attention_mask)
    return model.encode(input_ids, token_type_ids, attention_mask)


def graph_io(config: ModelConfig) -> tuple[list[str], list[str]]:
    """The input and output names of the graph of ``config``."""
    if config.arch == "decoder" and not config.task:
        return INPUTS, OUTPUTS
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if config.type_vocab_size else [])
    return inputs, ["logits" if config.task else "last_hidden_state"]


def write_onnx(model: nn.Module, path: Path) -> None:
    """Export ``model`` to ``path``: a decoder LM as :class:`CachedLogits` (dynamic batch, sequence and cache
    axes), anything else as :class:`TaskGraph` (dynamic batch and sequence)."""
    require_onnx()
    config = model.config
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=config.block_size)
    ids = torch.arange(14).reshape(2, 7) % config.vocab_size
    inputs, outputs_ = graph_io(config)
    if inputs == INPUTS:
        cache = empty_cache(config, 2, 16)
        graph, example = CachedLogits(model), (ids, torch.arange(7), cache, cache.clone())
        length = torch.export.Dim("cache", max=config.block_size)
        dims: tuple = ({0: batch, 1: sequence}, {0: sequence}, {1: batch, 3: length}, {1: batch, 3: length})
    else:
        graph, example = TaskGraph(model), (ids, torch.ones_like(ids), torch.zeros_like(ids))[: len(inputs)]
        dims = tuple({0: batch, 1: sequence} for _ in inputs)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress lines and torchvision notices
        program = torch.onnx.export(
            graph.eval(),
            example,
            input_names=inputs,
            output_names=outputs_,
            dynamic_shapes=dims,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def check_task_graph(session: Any, model: nn.Module, what: str) -> dict[str, Any]:
    """:class:`TaskGraph`'s check: two right-padded batches of other shapes than the traced one (a second segment
    where the model has segment embeddings), onnxruntime's output against lmlab's within :data:`TOL`."""
    config, device = model.config, model.tok_emb.weight.device
    inputs, _ = graph_io(config)
    gap = 0.0
    for b, t in ((1, 5), (3, 11)):
        ids = torch.arange(b * t).reshape(b, t).mul(7).add(3) % config.vocab_size
        mask = (torch.arange(t)[None, :] < torch.tensor([t, t - 3, 2])[:b, None]).long()
        segments = (torch.arange(t)[None, :] >= t // 2).long().expand(b, t) * mask
        feed = dict(zip(inputs, (ids, mask, segments)))
        theirs = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feed.items()})[0])
        with torch.no_grad():
            ours = lmlab_outputs(model, *(v.to(device) for v in feed.values())).float().cpu()
        if not config.task:  # hidden states at padding are nobody's output
            theirs, ours = theirs[mask.bool()], ours[mask.bool()]
        gap = max(gap, (theirs - ours).abs().max().item())
    if not gap <= TOL:
        raise LmlabError(f"{what}: onnxruntime's outputs differ from lmlab's by {gap:.2e} (tolerance {TOL})")
    return {"max_abs_output_diff": gap, "tolerance": TOL}


def check_onnx(path: Path, model: nn.Module, what: str) -> dict[str, Any]:
    """Run ``path`` with onnxruntime (CPU). A decoder LM's graph: prefill logits of two batches of shapes other
    than the traced one against ``model``'s (within :data:`TOL`), then a greedy continuation of 8 tokens through the
    cache (prefill, decode steps) against lmlab's, each step's logits within :data:`TOL`; any other graph:
    :func:`check_task_graph`. Returns the figures."""
    onnx, ort = require_onnx()
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if graph_io(model.config)[0] != INPUTS:
        return check_task_graph(session, model, what)
    config, device = model.config, model.tok_emb.weight.device

    def run(ids: Tensor, position: Tensor, keys: Any, values: Any) -> list[Any]:
        feed = {"input_ids": ids.numpy(), "cache_position": position.numpy(), "past_keys": keys, "past_values": values}
        return session.run(OUTPUTS, feed)

    def lmlab_logits(ids: Tensor) -> Tensor:
        with torch.no_grad():
            return model(ids.to(device)).float().cpu()

    gap = 0.0
    for b, t in ((1, 5), (3, 11)):
        ids = torch.arange(b * t).reshape(b, t).mul(7).add(3) % config.vocab_size
        cache = empty_cache(config, b, t + 4).numpy()
        logits = torch.from_numpy(run(ids, torch.arange(t), cache, cache)[0])
        gap = max(gap, (logits - lmlab_logits(ids)).abs().max().item())
        if not gap <= TOL:
            raise LmlabError(f"{what}: onnxruntime's logits differ from lmlab's by {gap:.2e} (tolerance {TOL})")
    ids = [3 % config.vocab_size, 10 % config.vocab_size, 4 % config.vocab_size]
    keys = values = empty_cache(config, 1, len(ids) + 8).numpy()
    new, start = ids[:], 0
    for step in range(8):
        logits, keys, values = run(torch.tensor([new]), torch.arange(start, len(ids)), keys, values)
        ours = lmlab_logits(torch.tensor([ids]))[:, start:]
        gap = max(gap, (torch.from_numpy(logits) - ours).abs().max().item())
        theirs, mine = int(logits[0, -1].argmax()), int(ours[0, -1].argmax())
        if theirs != mine:
            raise LmlabError(f"{what}: onnxruntime's greedy token {step + 1} is {theirs}, lmlab's {mine}")
        new, start = [theirs], len(ids)
        ids.append(theirs)
    if not gap <= TOL:
        raise LmlabError(f"{what}: onnxruntime's logits differ from lmlab's by {gap:.2e} (tolerance {TOL})")
    return {"max_abs_logit_diff": gap, "tolerance": TOL, "greedy_tokens_equal": 8}


def export_onnx(checkpoint: str | Path, out: str | Path, *, verify: bool = True) -> Path:
    """Write ``checkpoint`` (a decoder or an encoder, task head included; a LoRA run merged) as an ONNX folder
    ``out`` (model.onnx, tokenizer.json, export.json) for onnxruntime; returns ``out``.

    Args:
        checkpoint: checkpoint folder (or run folder: its best checkpoint)
        out: the folder to write (new or empty; written atomically)
        verify: run the graph with onnxruntime and compare its logits and greedy tokens with lmlab's (False: skip it)
    """
    require_onnx()
    src, out = resolve_checkpoint(checkpoint), Path(out)
    outputs.check_sources(out, (checkpoint, src))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmlabError(f"out {out} exists and is not an empty folder: choose another or remove it", params="out")
    config = load_config(src)
    if config.arch == "seq2seq":
        raise LmlabError(f"format onnx writes {SUPPORTED}; {src} is an encoder–decoder", params="format")
    tokenizer = load_tokenizer(src, verify=verify) if has_tokenizer(src) else None
    model = load_model(src, merge_lora=True)
    outputs.check_writable(out)
    outputs.clean_stale(out.parent, out.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / outputs.temp_name(out.name)
    try:
        tmp.mkdir()
        write_onnx(model, tmp / MODEL_FILE)
        figures = check_onnx(tmp / MODEL_FILE, model, f"export check of {out} (nothing was written)") if verify else {}
        if tokenizer is not None:
            tokenizer.backend.save(str(tmp / "tokenizer.json"))
        record = {"source": str(src.resolve()), "format": "onnx", "dtype": "float32", "opset": OPSET, **figures}
        write_json_atomic(tmp / "export.json", record)
        outputs.move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["CachedLogits", "GraphCache", "check_onnx", "empty_cache", "export_onnx", "write_onnx"]
