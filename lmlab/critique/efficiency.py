"""The efficiency lens: what the model costs — size, compute, latency, memory, and the energy and CO2
of the run that trained it.

- **Size**: parameters (total and without the embedding tables), the checkpoint's bytes on disk and
  bytes per parameter (4 = fp32, 2 = bf16/fp16), read from the safetensors header.
- **Compute**: FLOPs per token from :meth:`~lmlab.config.ModelConfig.flops_per_token`, the
  6·N + 12·L·d·T of Kaplan et al. (2020) and PaLM's appendix B (Chowdhery et al., 2022): each
  parameter costs a multiply-add (2 FLOPs) per token forward and twice that backward, and attention's
  QKᵀ and A·V add 2·2·L·d·T forward over a T-token context; inference is the forward third, ≈ 2N + 4·L·d·T.
- **Latency**: greedy generation through ``subject.lm`` (the library's own decoding loop with its KV
  cache), timed with ``time.perf_counter`` after a warm-up, the median of ``repeats`` runs: the time
  to the first token (prefill of the prompt + one step) and the per-token decode time from the
  difference between an N-token and a 1-token generation. Encoders: one forward pass.
- **Memory**: on CUDA the peak allocated memory while timing; everywhere an estimate from the sizes
  (weights + KV cache + the widest activations of one layer), and the process's peak RSS.
- **Energy and CO2** of training, as the ML CO2 calculator does (Lacoste et al., 2019; Strubell et
  al., 2019; Patterson et al., 2021): hours × power × PUE, times the grid's carbon intensity. The
  hours are the run's logged ``elapsed_s``; every other factor is an assumption, printed with the result.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from lmlab.config import read_jsonl_log
from lmlab.critique.core import Figure, Finding, Section, Subject, Table, check_option, figure_png, new_figure
from lmlab.errors import LmlabError
from lmlab.io.weights import safetensors_header

TITLE = "Efficiency: size, compute, latency, memory and training energy"
PASSAGE = (
    "The river rose through the night, and by morning the lower town stood in water. People carried what they could "
    "to the church on the hill, where the old stones had kept them dry for three hundred years."
)
# Board power (TDP) from NVIDIA's datasheets, SXM where there are two forms; a name matches on the
# first key it contains, so longer names come before their prefixes (A100 before A10, L40 before L4).
GPU_WATTS = (
    ("H200", 700.0),
    ("H100", 700.0),
    ("A100", 400.0),
    ("A10", 150.0),
    ("L40", 300.0),
    ("L4", 72.0),
    ("V100", 300.0),
    ("T4", 70.0),
    ("4090", 450.0),
    ("3090", 350.0),
)
UNKNOWN_GPU_WATTS = 300.0  # a mid-range data-centre board, when the name is not in the table
CPU_WATTS_PER_CORE = 10.0  # server CPUs: ≈ 150–250 W TDP over 16–32 cores; a rough upper bound under load
GRID_INTENSITY = (
    0.4  # kg CO2e per kWh: a round figure near the world average (≈ 0.45–0.48 in recent IEA and Ember data)
)
PUE = 1.1  # power usage effectiveness of a hyperscale data centre (Google reports ≈ 1.1 across its fleet)
LARGE_MODEL = 100_000_000  # parameters above which an fp32 checkpoint is worth halving


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device, progress: bool, desc: str) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, after one untimed warm-up run."""
    fn()
    times = []
    for _ in tqdm(range(repeats), desc=desc, disable=not progress):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PASSAGE)
    return (ids * (n // len(ids) + 1))[:n]


def stored_dtypes(path: Path) -> dict[str, int]:
    """Parameters per dtype in a safetensors file, read from its header (a damaged file is a one-line error)."""
    counts: dict[str, int] = {}
    for dtype, shape in safetensors_header(path).values():
        counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return counts


def _memory_estimate(model, batch: int, prompt: int, new: int) -> dict[str, int]:
    """Bytes of the weights, the KV cache of a prompt + new tokens, and the widest activations alive at
    once in one layer of the prefill (residual + normed input, the MLP's hidden, one set of attention
    scores if the math kernel runs) plus the last position's logits."""
    config = model.config
    elem = next(model.parameters()).element_size()
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    per_token_kv = 2 * config.n_kv_heads * config.head_dim * elem  # keys and values, one layer
    if config.arch == "decoder":
        kv = config.n_layer * batch * (prompt + new) * per_token_kv
    elif config.arch == "seq2seq":  # the decoder's self-attention cache + its cross-attention keys/values of the source
        kv = config.n_decoder_layer * batch * (new + 1 + prompt) * per_token_kv
    else:
        kv = 0
    mlp = config.intermediate_size * (2 if config.mlp == "swiglu" else 1)
    activations = batch * prompt * (2 * config.n_embd + mlp + config.n_head * prompt) * elem
    outputs = config.num_labels if config.task else config.vocab_size * (prompt if config.arch == "encoder" else 1)
    activations += batch * outputs * 4  # fp32 logits
    return {"weights": weights, "kv_cache": kv, "activations": activations}


def efficiency(
    subject: Subject,
    *,
    batch_size: int = 1,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    repeats: int = 3,
    grid_intensity: float = GRID_INTENSITY,
    power_watts: float | None = None,
    progress: bool = False,
) -> Section:
    """Parameters, FLOPs per token, checkpoint size, latency (greedy generation of ``new_tokens``
    after a ``prompt_tokens`` prompt, ``batch_size`` sequences; encoders: a forward pass), memory, and
    the training run's energy and CO2 (``grid_intensity`` kg CO2e per kWh; ``power_watts`` replaces
    the assumed device power).

    Args:
        subject: the model and its data
        batch_size: sequences generated together for the latency
        prompt_tokens: prompt length for the latency
        new_tokens: tokens generated for the latency
        repeats: timed repeats
        grid_intensity: kg CO2e per kWh of the training electricity; the world average is about 0.4
        power_watts: the training hardware's power draw, for the energy estimate (default: a stated assumption)
        progress: show progress
    """
    for name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("prompt_tokens", prompt_tokens, 1),
        ("new_tokens", new_tokens, 2),
        ("repeats", repeats, 1),
    ):
        check_option(name, value, minimum)
    check_option("grid_intensity", grid_intensity, 0, integer=False)
    if power_watts is not None:
        check_option("power_watts", power_watts, 1e-9, integer=False)
    config, device = subject.config, subject.device
    section = Section(lens="efficiency", title=TITLE)
    notes = [_size_part(section, subject)]
    if config.arch == "decoder":
        room = config.block_size - new_tokens
        if room < 1:
            raise LmlabError(
                f"efficiency: new_tokens={new_tokens} leaves no room for a prompt in the {config.block_size}-token "
                "context window"
            )
        prompt_tokens = min(prompt_tokens, room)
    else:
        prompt_tokens = min(prompt_tokens, config.block_size)
        new_tokens = min(new_tokens, config.block_size - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if subject.lm is not None:
        notes.append(_generation_part(section, subject, batch_size, prompt_tokens, new_tokens, repeats, progress))
    else:
        notes.append(_forward_part(section, subject, batch_size, prompt_tokens, repeats, progress))
    notes.append(_memory_part(section, subject, batch_size, prompt_tokens, 0 if subject.lm is None else new_tokens))
    notes.append(_energy_part(section, subject, grid_intensity, power_watts))
    section.method = " ".join(notes)
    return section


def _size_part(section: Section, subject: Subject) -> str:
    model, config = subject.model, subject.config
    params, non_embedding = model.num_params(), model.num_params(include_embeddings=False)
    # an lmlab checkpoint's model.safetensors, or a Hugging Face folder's (possibly sharded) weight files
    files = sorted(subject.path.glob("*.safetensors")) or sorted(subject.path.glob("pytorch_model*.bin"))
    size = sum(f.stat().st_size for f in files)
    dtypes: dict[str, int] = {}
    for f in files:
        if f.suffix == ".safetensors":
            for dtype, count in stored_dtypes(f).items():
                dtypes[dtype] = dtypes.get(dtype, 0) + count
    dominant = max(dtypes, key=dtypes.get) if dtypes else "unknown (pickled weights)"
    train_flops, infer_flops = (
        config.flops_per_token(config.block_size),
        config.flops_per_token(config.block_size, training=False),
    )
    section.metrics.update(
        params=params,
        params_non_embedding=non_embedding,
        flops_per_token_train=train_flops,
        flops_per_token_inference=infer_flops,
        checkpoint_bytes=size,
        bytes_per_param=round(size / params, 4),
        stored_dtype=dominant,
    )
    L, d, T = config.attention_layers(), config.n_embd, config.block_size
    layers = f"L={L} attention layers" + (
        ": the encoder's self-attention and the decoder's self- and cross-attention; a token is a target token with "
        "one source token beside it"
        if config.arch == "seq2seq"
        else ""
    )
    section.explain.update(
        params="Parameters of the model (tied embedding and output head counted once).",
        params_non_embedding=(
            "Parameters without the token, position and segment embedding tables: what scaling laws count as N."
        ),
        flops_per_token_train=(
            f"Training FLOPs per token at the full {T}-token context: 6·N + 12·L·d·T (N without position embeddings, "
            f"d={d}, {layers})."
        ),
        flops_per_token_inference=(
            f"Forward-pass FLOPs per token at a {T}-token context: 2·N + 4·L·d·T, a third of the training figure."
        ),
        checkpoint_bytes="Size of the weight files on disk (model.safetensors, or a Hugging Face folder's shards).",
        bytes_per_param=(
            "Checkpoint bytes per parameter: ≈ 4 for fp32 weights, ≈ 2 for bf16/fp16 (plus a small header)."
        ),
        stored_dtype="The data type most of the checkpoint's parameters are stored in.",
    )
    if dominant == "F32" and params >= LARGE_MODEL:
        section.findings.append(
            Finding(
                "warn",
                f"The checkpoint stores {params / 1e6:,.0f}M parameters in fp32 ({size / 1e9:.2f} GB, "
                f"{size / params:.2f} bytes/parameter): bf16 would halve it to ≈ {size / 2e9:.2f} GB with no loss for "
                "inference.",
            )
        )
    return (
        (
            f"Sizes: {params:,} parameters; FLOPs per token 6N + 12·L·d·T for training (Kaplan et al., 2020; "
            "Chowdhery et al., 2022, appendix B), ≈ 2N + 4·L·d·T for a forward pass"
        )
        + (" (the attention term counts the encoder's layers only)" if config.arch == "seq2seq" else "")
        + f". An fp32 checkpoint above {LARGE_MODEL / 1e6:.0f}M parameters is flagged."
    )


def _generation_part(
    section: Section, subject: Subject, batch: int, prompt: int, new: int, repeats: int, progress: bool
) -> str:
    prompts = [_prompt_ids(subject.tokenizer, prompt)] * batch

    def generate(n: int) -> Callable[[], object]:
        return lambda: subject.lm.complete_ids(prompts, max_new_tokens=n, strategy="greedy", ignore_eos=True)

    first = _median_seconds(generate(1), repeats, subject.device, progress, "time to first token")
    whole = _median_seconds(generate(new), repeats, subject.device, progress, f"{new} tokens")
    per_token = max(whole - first, 1e-9) / (new - 1)
    section.metrics.update(
        batch_size=batch,
        prompt_tokens=prompt,
        new_tokens=new,
        time_to_first_token_ms=round(first * 1e3, 4),
        decode_ms_per_token=round(per_token * 1e3, 4),
        decode_tokens_per_s=round(batch / per_token, 3),
        generation_tokens_per_s=round(batch * new / whole, 3),
    )
    source = "source" if subject.config.arch == "seq2seq" else "prompt"
    section.explain.update(
        batch_size="Sequences generated at once.",
        prompt_tokens=f"Tokens of the {source} (cut to fit the context window with the new tokens).",
        new_tokens="Tokens generated per sequence (greedy, end-of-text ignored so every run makes the same number).",
        time_to_first_token_ms=(
            f"Milliseconds to return one new token: the prefill of the {source} plus one decoding step (median of the "
            "runs)."
        ),
        decode_ms_per_token=(
            f"Milliseconds per further token per step of the batch: (time for {new} tokens − time for 1) / {new - 1}."
        ),
        decode_tokens_per_s="Tokens per second while decoding: batch size / per-token decode time.",
        generation_tokens_per_s=(
            f"Tokens per second end to end, prefill included: batch × {new} / the time to generate them."
        ),
    )
    where = _device_name(subject.device)
    section.findings.append(
        Finding(
            "info",
            f"Greedy decoding makes {batch / per_token:,.1f} tokens/s ({per_token * 1e3:.2f} ms per step, batch "
            f"{batch}) on {where}; the first token of a {prompt}-token {source} takes {first * 1e3:.1f} ms.",
        )
    )
    fig, ax = new_figure(5.0, 3.2)
    bars = ax.bar(
        ["first token\n(prefill + 1 step)", "each further token\n(decode step)"],
        [first * 1e3, per_token * 1e3],
        color=["#457b9d", "#2a9d8f"],
    )
    ax.bar_label(bars, fmt="%.2f ms")
    ax.margins(y=0.15)
    ax.set_ylabel("milliseconds (median)")
    ax.set_title(f"{batch / per_token:,.1f} tokens/s decoding, batch {batch}, {prompt}-token {source}", fontsize=9)
    section.figures.append(
        Figure(
            "Generation latency",
            figure_png(fig),
            f"Median of {repeats} timed runs after a warm-up, on {where}: the time to the first token and the time of "
            "each further greedy step.",
        )
    )
    return (
        f"Latency: greedy generation through the library's decoding loop (KV cache), {batch} × a {prompt}-token "
        f"{source}, timed with time.perf_counter after one warm-up run; the median of {repeats} runs for 1 and for "
        f"{new} new tokens, the per-token decode time from their difference."
    )


def _forward_part(section: Section, subject: Subject, batch: int, tokens: int, repeats: int, progress: bool) -> str:
    model, config = subject.model, subject.config
    ids = torch.tensor([_prompt_ids(subject.tokenizer, tokens)] * batch, device=subject.device)

    @torch.inference_mode()
    def forward():
        return model.task_logits(ids) if config.task else model(ids)

    seconds = _median_seconds(forward, repeats, subject.device, progress, "forward pass")
    head = f"the {config.task} head" if config.task else "the MLM head"
    section.metrics.update(
        batch_size=batch,
        input_tokens=tokens,
        forward_ms=round(seconds * 1e3, 4),
        examples_per_s=round(batch / seconds, 3),
        tokens_per_s=round(batch * tokens / seconds, 3),
    )
    section.explain.update(
        batch_size="Examples per forward pass.",
        input_tokens="Tokens per example.",
        forward_ms=f"Milliseconds of one forward pass through the encoder and {head} (median of the runs).",
        examples_per_s="Examples per second: batch size / forward time.",
        tokens_per_s="Input tokens per second: batch size × tokens / forward time.",
    )
    where = _device_name(subject.device)
    section.findings.append(
        Finding(
            "info",
            f"A forward pass of {batch} × {tokens} tokens takes {seconds * 1e3:.2f} ms: {batch / seconds:,.1f} "
            f"examples/s on {where}.",
        )
    )
    fig, ax = new_figure(5.0, 3.2)
    bars = ax.bar(
        [f"forward pass\n(batch {batch})", "per example"],
        [seconds * 1e3, seconds * 1e3 / batch],
        color=["#457b9d", "#2a9d8f"],
    )
    ax.bar_label(bars, fmt="%.2f ms")
    ax.margins(y=0.15)
    ax.set_ylabel("milliseconds (median)")
    section.figures.append(
        Figure(
            "Forward-pass latency",
            figure_png(fig),
            f"Median of {repeats} timed runs after a warm-up, on {where}, {tokens} tokens per example.",
        )
    )
    return (
        f"Latency: one inference-mode forward pass through the encoder and {head}, {batch} × {tokens} tokens, timed "
        f"with time.perf_counter after a warm-up; the median of {repeats} runs."
    )


def _memory_part(section: Section, subject: Subject, batch: int, prompt: int, new: int) -> str:
    estimate = _memory_estimate(subject.model, batch, prompt, new)
    total = sum(estimate.values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )  # bytes on macOS, KiB on Linux
    section.metrics.update(
        memory_estimate_bytes=total,
        memory_weights_bytes=estimate["weights"],
        memory_kv_cache_bytes=estimate["kv_cache"],
        memory_activations_bytes=estimate["activations"],
        process_peak_rss_bytes=rss,
    )
    section.explain.update(
        memory_estimate_bytes="Estimated inference memory: weights + KV cache + activations (the three below).",
        memory_weights_bytes="Bytes of the weights and buffers as loaded.",
        memory_kv_cache_bytes="Bytes of the keys and values cached for the prompt and the new tokens (0 for encoders).",
        memory_activations_bytes=(
            "Estimated bytes of the widest activations alive at once in one layer of the prefill, plus fp32 logits."
        ),
        process_peak_rss_bytes=(
            "Peak resident memory of this whole process so far (Python, libraries, data and everything loaded "
            "before): an upper bound, not the model's alone."
        ),
    )
    text = f"Memory: estimated {total / 2**20:,.1f} MiB (weights {estimate['weights'] / 2**20:,.1f} MiB)"
    if subject.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(subject.device)
        section.metrics["cuda_peak_allocated_bytes"] = peak
        section.explain["cuda_peak_allocated_bytes"] = (
            "Peak GPU memory allocated by PyTorch while timing (torch.cuda.max_memory_allocated)."
        )
        text += f", measured peak on the GPU {peak / 2**20:,.1f} MiB"
    section.findings.append(Finding("info", text + "."))
    return (
        "Memory: the weights, KV cache and activations are computed from the sizes (an estimate); "
        + ("the GPU peak is torch.cuda.max_memory_allocated while timing; " if subject.device.type == "cuda" else "")
        + "the process's peak RSS covers everything the process holds."
    )


def _device_power(subject: Subject) -> tuple[float, str]:
    """Assumed power draw of the training device(s), and where the figure comes from: the device the
    checkpoint records (``train_device``: "cpu" or "N × <GPU name>"), else the one the critique runs on."""
    recorded = subject.meta.get("train_device")
    if recorded is None:
        recorded = "cpu" if subject.device.type != "cuda" else f"1 × {torch.cuda.get_device_name(subject.device)}"
        whose = "the device this critique runs on (the checkpoint records none)"
    else:
        whose = "the training device the checkpoint records"
    if recorded == "cpu":
        cores = os.cpu_count() or 1
        return (
            CPU_WATTS_PER_CORE * cores,
            f"{CPU_WATTS_PER_CORE:.0f} W per CPU core × {cores} cores of {whose} (a rough bound for CPU-only training)",
        )
    count, _, name = recorded.partition(" × ")
    count = int(count) if count.isdigit() else 1
    for key, watts in GPU_WATTS:
        if key in name:
            return count * watts, f"{count} × the board power (TDP) of an {name} from NVIDIA's datasheet, {whose}"
    return (
        count * UNKNOWN_GPU_WATTS,
        f"{count} × {UNKNOWN_GPU_WATTS:.0f} W assumed for an {name} (not in the TDP table), {whose}",
    )


def _energy_part(section: Section, subject: Subject, grid_intensity: float, power_watts: float | None) -> str:
    log = subject.run_dir / "log.jsonl" if subject.run_dir is not None else None
    timed = [r for r in read_jsonl_log(log) if "elapsed_s" in r] if log is not None else []
    if not timed:
        why = (
            "the checkpoint is not inside a training run folder with a log.jsonl"
            if log is None
            else f"{log} has no elapsed_s field (runs record their training time since lmlab added it)"
        )
        section.findings.append(
            Finding(
                "info",
                f"Training energy not estimated: {why}. Critique a checkpoint inside the run folder that trained it.",
            )
        )
        return f"Training energy was not estimated: {why}."
    seconds = max(r["elapsed_s"] for r in timed)
    steps = max(r["step"] for r in timed)
    if power_watts is not None:
        watts, power_source = float(power_watts), "given (power_watts)"
    else:
        watts, power_source = _device_power(subject)
    kwh = seconds / 3600 * watts / 1000 * PUE
    co2 = kwh * grid_intensity
    section.metrics.update(
        training_seconds=round(seconds, 3),
        training_steps=steps,
        power_watts=watts,
        pue=PUE,
        energy_kwh=kwh,
        grid_intensity_kg_per_kwh=grid_intensity,
        co2_kg=co2,
    )
    section.explain.update(_energy_explain(log))
    device = _device_name(subject.device)
    section.tables.append(_energy_table(device, log, seconds, (watts, power_source), kwh, co2, grid_intensity))
    level = "warn" if power_watts is None and "per CPU core" in power_source else "info"
    text = (
        f"Training ran {seconds / 3600:.3g} h for {steps} steps: ≈ {kwh:.3g} kWh and ≈ {co2:.3g} kg CO2e under the "
        "stated assumptions"
    )
    if level == "warn":
        text += " — assuming CPU training at a per-core wattage, a rough bound; give power_watts for a real figure"
    section.findings.append(Finding(level, text + "."))
    return (
        "Training energy (Lacoste et al., 2019; Strubell et al., 2019; Patterson et al., 2021): hours from the run "
        f"log's elapsed_s × power ({power_source}) × PUE {PUE:g}, CO2 = kWh × {grid_intensity:g} kg CO2e/kWh. The "
        "training device is not logged: it is assumed to be the kind this critique runs on. Board TDP is an upper "
        "bound on the draw, and the host, memory and network are left out."
    )


def _energy_explain(log: Path) -> dict[str, str]:
    return {
        "training_seconds": (
            f"Wall-clock seconds the run trained (the last elapsed_s of {log.name}, summed over resumes; evaluation "
            "and saving included)."
        ),
        "training_steps": "The last optimizer step the log records (the whole run, not only up to this checkpoint).",
        "power_watts": "Power drawn while training (an assumption: see the table).",
        "pue": (
            "Power usage effectiveness: the data centre's total energy per unit the computer uses (cooling, "
            "conversion)."
        ),
        "energy_kwh": "Training energy: hours × power × PUE / 1000.",
        "grid_intensity_kg_per_kwh": "Carbon intensity of the electricity, kg CO2-equivalent per kWh (an assumption).",
        "co2_kg": "Training emissions: energy × grid intensity.",
    }


def _energy_table(
    device: str, log: Path, seconds: float, power: tuple[float, str], kwh: float, co2: float, grid_intensity: float
) -> Table:
    watts, power_source = power
    return Table(
        "Training energy: inputs and assumptions",
        ["quantity", "value", "source"],
        [
            ["training time", f"{seconds / 3600:.4f} h", f"elapsed_s in {log} (measured)"],
            [
                "device",
                device,
                "assumed: the training device is not logged, so the device this critique runs on is taken",
            ],
            ["power", f"{watts:g} W", power_source],
            ["PUE", f"{PUE:g}", "assumed: a hyperscale cloud data centre (Google reports ≈ 1.1)"],
            ["energy", f"{kwh:.6g} kWh", "hours × power × PUE"],
            [
                "grid intensity",
                f"{grid_intensity:g} kg CO2e/kWh",
                "given"
                if grid_intensity != GRID_INTENSITY
                else "assumed: near the world average (≈ 0.45–0.48 in IEA and Ember data)",
            ],
            ["CO2", f"{co2:.6g} kg", "energy × grid intensity"],
        ],
        "Every factor but the training time is an assumption; pass power_watts and grid_intensity for your "
        "hardware and region.",
    )
