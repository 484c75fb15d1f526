"""Before and after: what every compression verb measures on the original and the compressed model in the same
run, the ``compression.json`` record it writes and the table it prints.

Each model gets a row (:func:`measure`): parameters (a quantized weight counts its elements; ``nonzero_parameters``
beside it when pruning zeroed some), the bytes of its weights file and of its block Linear layers' weights, the
FLOPs of a forward pass per token (:meth:`~lmlab.config.ModelConfig.flops_per_token`) and, given evaluation data,
the task's headline metric with its 95% bootstrap confidence interval (a decoder's perplexity, or what it was
fine-tuned for), tokens/s at batch 1 and 8 (decoders and encoder–decoders: new tokens of a greedy decode;
encoders: tokens read by a forward pass) and the peak memory of the batch-8 run (the weights, plus the most the
run held at once: ``torch.cuda.max_memory_allocated`` on a GPU, the profiler's allocation events on a CPU).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lmlab.api import LM
from lmlab.config import write_json_atomic
from lmlab.device import peak_memory, resolve_device
from lmlab.errors import LmlabError
from lmlab.evaluate.runner import NOT_FIGURES, evaluate_model
from lmlab.io.checkpoint import (
    WEIGHTS_FILE,
    check_checkpoint_target,
    is_lmlab_checkpoint,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.model.quant import quantizable, quantized_bytes

SPEED_TOKENS = 32  # new tokens per sequence when decoding speed is measured
SPEED_PROMPT = "The"
ENCODER_TOKENS = 128  # tokens per sequence when an encoder's speed is measured
N_RESAMPLES = 200  # bootstrap resamples of the metric's confidence interval


class Compression(dict):
    """What compression.json holds: ``original`` and ``compressed`` rows (:func:`measure`), the method and its
    settings, the machine; :meth:`summary` is the table the compression verbs print."""

    def summary(self) -> str:
        return summary(self)


def measure(
    model: nn.Module, tokenizer, folder: Path, eval_data: str | Path | None = None, meta: dict | None = None
) -> dict[str, Any]:
    """One model's row of compression.json (its checkpoint in ``folder``; ``meta``: its config.json, which says
    what it was fine-tuned for): size and FLOPs always; with ``eval_data`` its metric, speed and peak memory."""
    row: dict[str, Any] = {
        "parameters": model.num_params(),
        "weights_file_bytes": _file_bytes(folder),
        "linear_weight_bytes": _linear_bytes(model),  # the block Linear layers' weights (integers + scales)
        "flops_per_token": model.config.flops_per_token(training=False),
    }
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters()) + row["parameters"] - _dense(model)
    if nonzero < row["parameters"]:
        row["nonzero_parameters"] = nonzero
    if eval_data is not None:
        row.update(_metric(model, tokenizer, eval_data, meta))
        run = _runner(model, tokenizer)
        row.update({f"tokens_per_s_batch_{b}": _speed(run, b) for b in (1, 8)})
        row["peak_memory_bytes"] = peak_memory(lambda: run(8), next(model.parameters()).device) + _weight_bytes(model)
    return row


def load_source(
    checkpoint: str | Path,
    out: str | Path,
    verb: str,
    *,
    device: str,
    verify: bool,
    overwrite: bool,
    sources: tuple = (),
) -> tuple[Path, Path, Any, nn.Module]:
    """What every compression verb starts from: the checkpoint resolved (a quantized one refused: ``verb`` the
    checkpoint it came from), ``out`` checked before any work (``sources``: more inputs it must not overwrite), the
    tokenizer, and the model in eval mode on ``device`` with LoRA adapters merged. Returns (path, out, tokenizer,
    model)."""
    path = resolve_checkpoint(checkpoint)
    done = read_meta(path).get("lmlab_model_config", {}).get("quantization")
    if done:
        already = "already " if verb == "quantize" else ""
        raise LmlabError(f"{path} is {already}quantized ({done['method']}): {verb} the checkpoint it came from")
    out = check_checkpoint_target(out, overwrite=overwrite, sources=(checkpoint, path, *sources))
    tokenizer = load_tokenizer(path, verify=verify)
    model = load_model(path, device=resolve_device(device), merge_lora=True, verify=verify).eval()
    return path, out, tokenizer, model


def write_compressed(
    source: Path,
    out: Path,
    original: nn.Module,
    model: nn.Module,
    tokenizer,
    *,
    eval_data: str | Path | None,
    overwrite: bool,
    **fields: Any,
) -> Compression:
    """Save the compressed ``model`` as a checkpoint in ``out`` (the source checkpoint's config.json fields, plus
    ``compressed_from``), measure it beside the ``original`` it came from, and write compression.json: ``fields``
    (``title``, the method and its settings) and the two rows. Returns the record."""
    meta = read_meta(source)
    kept = {k: v for k, v in meta.items() if k != "lmlab_model_config"} if is_lmlab_checkpoint(source) else {}
    save_checkpoint(out, model, tokenizer=tokenizer, meta={**kept, "compressed_from": str(source)}, overwrite=overwrite)
    return compare(source, out, original, model, tokenizer, eval_data=eval_data, folder=out, **fields)


def compare(
    source: Path,
    out: Path,
    original: nn.Module,
    model: nn.Module,
    tokenizer,
    *,
    eval_data: str | Path | None,
    folder: Path,
    **fields: Any,
) -> Compression:
    """Measure the compressed ``model`` (its checkpoint already in ``out``) beside the ``original`` (in ``source``;
    its config.json says the task both are evaluated on) and write ``folder``/compression.json: ``fields`` and the
    two rows (and ``folder`` when it is not ``out``). Returns the record."""
    meta = read_meta(source)
    result = Compression(
        **fields,
        **({"folder": str(folder)} if Path(folder) != Path(out) else {}),
        checkpoint=str(source),
        out=str(out),
        original=measure(original, tokenizer, source, eval_data, meta),
        compressed=measure(model, tokenizer, out, eval_data, meta),
        machine=machine(next(model.parameters()).device),
    )
    write_json_atomic(Path(folder) / "compression.json", result)
    return result


def _dense(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _file_bytes(folder: Path) -> int:
    """The bytes of a checkpoint's weights: model.safetensors, an HF folder's shards, a DCP checkpoint's shards
    (model and optimizer state together), or a GGUF file."""
    if folder.is_file():
        return folder.stat().st_size
    files = [folder / WEIGHTS_FILE] if (folder / WEIGHTS_FILE).is_file() else [*folder.glob("*.safetensors")]
    return sum(f.stat().st_size for f in files or [*folder.glob("*.bin"), *folder.glob("dcp/*.distcp")])


def _linear_bytes(model: nn.Module) -> int:
    weights = (model.get_submodule(n).weight for n in quantizable(model))
    return quantized_bytes(model) or sum(t.numel() * t.element_size() for t in weights)


def _weight_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _metric(model: nn.Module, tokenizer, eval_data: str | Path, meta: dict | None) -> dict[str, Any]:
    """The headline figures of ``lmlab evaluate`` on ``eval_data`` (its default task for this checkpoint), each
    with its confidence interval under ``ci``."""
    result, _ = evaluate_model(model, tokenizer, eval_data, meta=meta, n_resamples=N_RESAMPLES)
    figures = {k: v for k, v in result.items() if k not in NOT_FIGURES and isinstance(v, (int, float))}
    ci = {k: v for k, v in result.get("ci", {}).items() if k in figures}
    return {"task": result["task"], "metrics": figures, "ci": ci}


def _runner(model: nn.Module, tokenizer) -> Callable[[int], int]:
    """A function of the batch size that runs the model's speed workload once and returns the tokens it made
    (decoders, encoder–decoders: greedy new tokens) or read (encoders: one forward pass)."""
    if model.config.arch == "encoder":
        length = min(ENCODER_TOKENS, model.config.block_size)
        device = next(model.parameters()).device

        @torch.no_grad()
        def forward(batch: int) -> int:
            model(torch.full((batch, length), tokenizer.unk_id or 0, device=device))
            return batch * length

        return forward
    lm = LM(model, tokenizer)

    def decode(batch: int) -> int:
        ids = lm.generate(
            [SPEED_PROMPT] * batch, max_new_tokens=SPEED_TOKENS, min_new_tokens=SPEED_TOKENS, return_ids=True
        )
        return sum(len(row) for row in ids)

    return decode


def _speed(run: Callable[[int], int], batch: int, repeats: int = 3) -> float:
    """Tokens per second of ``run(batch)``: the best of ``repeats`` runs after a warm-up (the least disturbed by
    whatever else the machine is doing)."""
    run(1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run(batch)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def machine(device: torch.device) -> str:
    """The device the figures were measured on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


ROWS = [  # label, key, format: the table's rows (a row neither model has is left out)
    ("parameters", "parameters", "{:,}"),
    ("nonzero parameters", "nonzero_parameters", "{:,}"),
    ("weights file", "weights_file_bytes", "{:,} B"),
    ("block Linear weights", "linear_weight_bytes", "{:,} B"),
    ("FLOPs/token (forward)", "flops_per_token", "{:,.0f}"),
    ("tokens/s, batch 1", "tokens_per_s_batch_1", "{:.1f}"),
    ("tokens/s, batch 8", "tokens_per_s_batch_8", "{:.1f}"),
    ("peak memory, batch 8", "peak_memory_bytes", "{:,} B"),
]


def summary(record: dict[str, Any]) -> str:
    """The before/after table a compression verb prints: ``record["title"]``, then a row per figure."""
    before, after = record["original"], record["compressed"]
    first, second = record.get("columns", ("original", "compressed"))  # distillation: teacher and student
    lines = [f"lmlab: {record['title']} → {record['out']}", f"  {'':24}{first:>18}{second:>18}{'ratio':>9}"]
    rows = [(label, before.get(key), after.get(key), fmt) for label, key, fmt in ROWS]
    metrics = before.get("metrics", {})
    shown = [n for n in metrics if n in before["ci"]] or list(metrics)  # the figures with an interval, else all
    for name, value in ((n, metrics[n]) for n in shown):
        ci, ci_after = before["ci"].get(name), after.get("ci", {}).get(name)
        rows.append((name, value, after.get("metrics", {}).get(name), "{:.4f}"))
        if ci and ci_after:
            rows.append(
                ("  95% CI", f"{ci['low']:.4f}–{ci['high']:.4f}", f"{ci_after['low']:.4f}–{ci_after['high']:.4f}", "{}")
            )
    for label, a, b, fmt in rows:
        if a is None and b is None:
            continue
        ratio = f"{b / a:>8.3f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
        cells = [fmt.format(v) if v is not None else "–" for v in (a, b)]
        lines.append(f"  {label:24}{cells[0]:>18}{cells[1]:>18}{ratio}")
    written = Path(record.get("folder", record["out"])) / "compression.json"
    lines.append(f"  measured on {record['machine']}; written: {written}")
    return "\n".join(lines)
