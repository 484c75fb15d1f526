"""``lmlab prune``: a checkpoint with weights, attention heads or MLP neurons removed, measured before and after.

Four methods, two kinds:

- **unstructured** — ``magnitude``: global magnitude pruning of the blocks' Linear weights
  (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``: the ``sparsity`` fraction of smallest
  |w| over all those layers together); ``wanda`` (Sun et al., 2023): each weight scored |w| times the L2 norm of
  the input feature it multiplies over ``data``'s tokens, the ``sparsity`` fraction of lowest scores zeroed in every
  output row; ``2:4``: N:M semi-structured sparsity, in every group of 4 consecutive
  input weights of a row the 2 largest |w| kept (what NVIDIA's sparse tensor cores run). The result is an ordinary
  dense checkpoint holding zeros: every verb loads it, and on a CPU it runs exactly as fast as before (a dense
  matmul does not skip zeros). PyTorch's ``to_sparse_semi_structured`` turns a 2:4 weight into the compressed
  form its CUDA kernels use; it runs on CUDA only, so the checkpoint keeps the dense zeros.
- **structured** — ``heads``: attention heads ranked by importance (Michel et al., 2019, "Are Sixteen Heads Really
  Better than One?": I_h = Σ_batches |∂L/∂ξ_h|, the gradient of the loss with respect to a mask ξ multiplying each
  head's output, normalised per layer by its L2 norm), the ``sparsity`` fraction (rounded) of the least important
  removed in every layer; a grouped-query model loses whole key/value groups (a group's importance is the sum of
  its query heads'). ``neurons``: MLP hidden units ranked the same way (a mask on each unit's activation), the
  same number removed in every layer. ``heads+neurons`` does both. The result is a smaller dense model with a
  smaller config (``n_head``, ``n_kv_heads``, an explicit ``head_dim``, ``intermediate_size``): fewer parameters,
  fewer FLOPs per token, faster on every device. The loss whose gradient ranks the units is the LM loss on
  ``data`` for a decoder; for an encoder, the cross-entropy of its task head against its own predicted labels (no
  labels needed) or, without a task head, of its MLM head reconstructing the input tokens.

``finetune_steps`` continues training the pruned decoder on ``data`` (a prepared data folder) with
:func:`~lmlab.train.loop.train_loop` and the causal LM objective; unstructured masks stay fixed meanwhile
(``torch.nn.utils.prune`` keeps ``weight = weight_orig · weight_mask`` while training, made permanent at the end).
A pruned classifier recovers with ``lmlab finetune`` on its task data.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from lmlab.compress.measure import Compression, load_source, write_compressed
from lmlab.compress.quantization import calibration_sequences
from lmlab.data.pack import is_data_folder
from lmlab.errors import LmlabError
from lmlab.model import build_model
from lmlab.model.quant import quantizable

METHODS = ("magnitude", "wanda", "2:4", "heads", "neurons", "heads+neurons")
UNSTRUCTURED = ("magnitude", "wanda", "2:4")  # zeros in dense weights, masks kept fixed while recovery trains
NO_DATA = ("magnitude", "2:4")  # the methods that read nothing but the weights
IMPORTANCE_BATCH = 8  # sequences per backward pass when ranking heads and neurons
RECOVERY_BATCH = 8  # sequences per step of the recovery fine-tune
RECOVERY_SEQ_LEN = 256  # tokens per sequence of the recovery fine-tune (at most the model's context)


def prune(
    checkpoint: str | Path,
    out: str | Path,
    *,
    method: str = "magnitude",
    sparsity: float = 0.5,
    data: str | Path | None = None,
    samples: int = 64,
    finetune_steps: int = 0,
    lr: float = 1e-4,
    eval_data: str | Path | None = None,
    device: str = "cpu",
    verify: bool = True,
    overwrite: bool = False,
) -> Compression:
    """Prune a checkpoint and write the result as a new checkpoint with compression.json (before/after figures).
    A LoRA checkpoint is merged first; a quantized one is refused.

    Args:
        checkpoint: checkpoint folder (or run folder: its best checkpoint)
        out: folder for the pruned checkpoint and compression.json
        method: magnitude (global, unstructured: zeros), wanda (zeros by |weight| × input norm on data, per output
            row), 2:4 (two of every four input weights zeroed), heads (attention heads removed), neurons (MLP hidden
            units removed) or heads+neurons
        sparsity: the fraction removed: of the block Linear weights (magnitude, wanda; 2:4 is always 0.5), or of
            the heads and neurons of every layer (rounded to whole heads, key/value groups and neurons)
        data: a prepared data folder (its training tokens) or text files: wanda's input norms, and the loss that
            ranks heads and neurons; finetune_steps trains on it (a prepared data folder)
        samples: wanda, heads, neurons: sequences of up to 256 tokens of data that rank the weights or units
        finetune_steps: optimizer steps of recovery training on data after pruning (decoders; 0: none)
        lr: learning rate of the recovery training (constant after a short warm-up)
        eval_data: text files or a prepared data folder (its validation tokens): the task metric (perplexity for a
            decoder) and speed of the original and the pruned model
        device: auto, cpu, cuda, cuda:1, …
        verify: check the checkpoint's tokenizer
        overwrite: write into a folder that is not an lmlab checkpoint
    """
    check_settings(method, sparsity, data, samples, finetune_steps)
    options = dict(device=device, verify=verify, overwrite=overwrite, sources=(data,))
    path, out, tokenizer, original = load_source(checkpoint, out, "prune", **options)
    device = next(original.parameters()).device
    check_model(original.config, method, finetune_steps)
    batches = [] if method in NO_DATA else calibration_sequences(data, tokenizer, original, samples)
    model, fields = prune_model(copy.deepcopy(original), method, sparsity, batches)
    if finetune_steps:
        fields["recovery"] = recover(model, data, tokenizer, finetune_steps, lr, device)
    finish(model)
    fields["sparsity_achieved"] = linear_sparsity(model)
    model.eval()
    return write_compressed(path, out, original, model, tokenizer, eval_data=eval_data, overwrite=overwrite, **fields)


def check_settings(method: str, sparsity: float, data, samples: int, finetune_steps: int) -> None:
    """One-line errors, naming the parameter, for settings no model could take."""
    if method not in METHODS:
        raise LmlabError(f"method is {method!r}: expected one of {', '.join(METHODS)}", params="method")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        msg = f"sparsity is {sparsity!r}: expected a fraction between 0 and 1 (exclusive)"
        raise LmlabError(msg, params="sparsity")
    if method == "2:4" and sparsity != 0.5:
        raise LmlabError(f"sparsity is {sparsity}: method 2:4 zeroes exactly half (0.5)", params="sparsity method")
    if method not in NO_DATA and data is None:
        raise LmlabError(f"method {method} ranks by activations on data: give data", params="data")
    if finetune_steps and data is None:
        raise LmlabError("finetune_steps trains on data: give data", params="data finetune_steps")
    if finetune_steps and not is_data_folder(data):
        msg = f"finetune_steps trains on a prepared data folder (`lmlab prepare`); {data} is not one"
        raise LmlabError(msg, params="data")
    for name, value in (("samples", samples), ("finetune_steps", finetune_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (name == "samples"):
            raise LmlabError(f"{name} is {value!r}: expected an integer >= {int(name == 'samples')}", params=name)


def check_model(config, method: str, finetune_steps: int) -> None:
    """The architectures each method and the recovery training serve."""
    if method not in UNSTRUCTURED and config.arch == "seq2seq":
        raise LmlabError(
            f"method {method} prunes decoders and encoders; this checkpoint is an encoder–decoder (magnitude and 2:4 "
            "serve it)",
            params="method",
        )
    if method not in UNSTRUCTURED and config.arch == "encoder" and config.problem_type == "regression" and config.task:
        raise LmlabError(
            f"method {method} ranks units by the cross-entropy of the model's own predictions; a regression head has "
            "none (magnitude and 2:4 serve it)",
            params="method",
        )
    if finetune_steps and config.arch != "decoder":
        raise LmlabError(
            "finetune_steps continues causal LM training, for decoders; recover a pruned encoder with `lmlab "
            "finetune` on its task data",
            params="finetune_steps",
        )


def prune_model(model: nn.Module, method: str, sparsity: float, batches: list[Tensor] = ()) -> tuple[nn.Module, dict]:
    """``model`` pruned by ``method`` (``batches``: the sequences that rank heads and neurons) and the settings to
    record. Unstructured pruning leaves its masks in place (``torch.nn.utils.prune``'s reparametrization, so that
    training keeps them) until :func:`finish`; structured pruning returns a new, smaller model."""
    fields: dict[str, Any] = {"method": method, "sparsity": sparsity}
    if method == "magnitude":
        layers = [(model.get_submodule(name), "weight") for name in quantizable(model)]
        torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=float(sparsity))
        fields["title"] = f"magnitude pruning: {sparsity:.0%} of {len(layers)} block Linear layers' weights (global)"
        return model, fields
    if method == "wanda":
        masks = wanda_masks(model, batches, sparsity)
        for name, mask in masks.items():
            torch_prune.custom_from_mask(model.get_submodule(name), "weight", mask)
        fields.update(samples=len(batches), title=f"Wanda pruning: {sparsity:.0%} of each output row's weights in "
                      f"{len(masks)} block Linear layers, by |weight| × input norm")  # fmt: skip
        return model, fields
    if method == "2:4":
        names = quantizable(model)
        for name in names:
            module = model.get_submodule(name)
            torch_prune.custom_from_mask(module, "weight", two_four_mask(module.weight.detach()))
        fields["title"] = f"2:4 semi-structured sparsity: {len(names)} block Linear layers (dense zeros)"
        return model, fields
    kinds = method.split("+")
    scores = importance(model, batches)
    keep = {kind: keep_units(model.config, kind, scores[kind], sparsity) for kind in kinds}
    before = model.config
    model = shrink(model, keep.get("heads"), keep.get("neurons"))
    fields.update(samples=len(batches), kept=_kept(keep))
    if "heads" in kinds:  # (n_layer, n_head) scores; the neurons' would swamp compression.json
        fields["head_importance"] = scores["heads"].tolist()
    fields["title"] = f"{method} pruning: " + ", ".join(_change(before, model.config, kind) for kind in kinds)
    return model, fields


def _change(before, after, kind: str) -> str:
    if kind == "heads":
        return f"heads {before.n_head} → {after.n_head} per layer"
    return f"MLP neurons {before.intermediate_size} → {after.intermediate_size} per layer"


def _kept(keep: dict[str, Tensor]) -> dict[str, list[list[int]]]:
    return {kind: [row.tolist() for row in rows] for kind, rows in keep.items()}


@torch.no_grad()
def wanda_masks(model: nn.Module, batches: list[Tensor], sparsity: float) -> dict[str, Tensor]:
    """Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models"): each block
    Linear weight scored |W_ij| · ‖X_j‖₂, X_j the layer's j-th input over every token of ``batches``, and in every
    output row the ``sparsity`` fraction with the lowest scores masked (per row, as the paper compares). A weight
    that multiplies a large activation survives even when it is small — what magnitude pruning misses."""
    from lmlab.compress.quantization import run_model

    names = quantizable(model)
    squares = {name: 0.0 for name in names}

    def collect(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            squares[name] = squares[name] + x.reshape(-1, x.shape[-1]).pow(2).sum(0)

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(collect(name)) for name in names]
    try:
        for ids in batches:
            run_model(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    masks = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        score = weight.abs().float() * torch.as_tensor(squares[name]).sqrt()[None]
        drop = score.topk(int(weight.shape[1] * sparsity), dim=1, largest=False).indices
        masks[name] = torch.ones_like(weight).scatter_(1, drop, 0.0)
    return masks


def two_four_mask(weight: Tensor) -> Tensor:
    """The 2:4 mask of ``weight`` (out, in): in every group of 4 consecutive input columns of a row, 1 on the 2
    largest |w| and 0 on the other 2. ``in`` must be a multiple of 4."""
    rows, cols = weight.shape
    if cols % 4:
        raise LmlabError(f"2:4 sparsity needs input widths that are multiples of 4; a block Linear layer has {cols}")
    groups = weight.abs().reshape(rows, cols // 4, 4)
    top = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups).scatter_(-1, top, 1.0).reshape(rows, cols)


def finish(model: nn.Module) -> None:
    """Make unstructured pruning permanent (``torch.nn.utils.prune.remove``: the masked weight becomes the plain
    ``weight``, zeros and all); nothing for a structurally pruned model."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")


def linear_sparsity(model: nn.Module) -> dict[str, Any]:
    """The zeros of the block Linear layers' weights: their count, the weights' count and the fraction."""
    weights = [model.get_submodule(name).weight for name in quantizable(model)]
    total = sum(w.numel() for w in weights)
    zeros = total - sum(int(torch.count_nonzero(w)) for w in weights)
    return {"block_linear_weights": total, "zeros": zeros, "fraction": zeros / total if total else 0.0}


# -- importance (Michel et al., 2019) -----------------------------------------------------------


def importance(model: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """Heads' (n_layer, n_head) and MLP neurons' (n_layer, intermediate_size) importance: Σ over batches of
    |∂L/∂ξ| for a mask ξ = 1 on each head's output and each neuron's activation, each layer's row divided by its
    L2 norm (Michel et al., 2019, §4.2). The model's weights get no gradient and are left as they were."""
    config = model.config
    device = next(model.parameters()).device
    heads = torch.ones(config.n_layer, config.n_head, device=device, requires_grad=True)
    neurons = torch.ones(config.n_layer, config.intermediate_size, device=device, requires_grad=True)
    hooks = mask_hooks(model, heads, neurons)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    scores = {"heads": torch.zeros_like(heads), "neurons": torch.zeros_like(neurons)}
    try:
        for i in range(0, len(batches), IMPORTANCE_BATCH):
            ids = torch.cat(batches[i : i + IMPORTANCE_BATCH])
            mask_grads = torch.autograd.grad(importance_loss(model, ids), (heads, neurons))
            for kind, grad in zip(scores, mask_grads):
                scores[kind] += grad.abs()
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {kind: s / s.norm(dim=-1, keepdim=True).clamp_min(1e-20) for kind, s in scores.items()}


def mask_hooks(model: nn.Module, heads: Tensor, neurons: Tensor) -> list[Any]:
    """Forward pre-hooks multiplying each block's attention output projection input by ``heads[layer]`` (one value
    per head, repeated over its head_dim) and its MLP output projection input by ``neurons[layer]``: the masks
    whose gradients rank them, or (0/1 masks) the model with those units switched off."""
    hooks = []
    head_dim = model.config.head_dim

    def scale(mask: Callable[[], Tensor]) -> Callable:
        return lambda module, args: (args[0] * mask().to(args[0].dtype), *args[1:])

    for layer, block in enumerate(_blocks(model)):
        hooks.append(
            block.attn.proj.register_forward_pre_hook(scale(lambda i=layer: heads[i].repeat_interleave(head_dim)))
        )
        hooks.append(block.mlp.proj.register_forward_pre_hook(scale(lambda i=layer: neurons[i])))
    return hooks


def importance_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """The loss whose gradient ranks heads and neurons: a decoder's next-token cross-entropy on ``ids``; an
    encoder's task head against its own predicted labels, or its MLM head reconstructing ``ids``."""
    if model.config.arch == "decoder":
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, -2).float(), ids[:, 1:].flatten())
    if model.config.task:
        logits = model.task_logits(ids)
        return F.cross_entropy(logits.flatten(0, -2).float(), logits.detach().argmax(-1).flatten())
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, -2).float(), ids.flatten())


def keep_units(config, kind: str, scores: Tensor, sparsity: float) -> Tensor:
    """(n_layer, kept) indices, ascending, of the heads or neurons each layer keeps: the most important, the
    same number in every layer. Heads of a grouped-query model go by key/value group (the group's summed score)."""
    if kind == "heads":
        group = config.n_head // config.n_kv_heads
        units, what = config.n_kv_heads, "heads" if group == 1 else f"key/value groups ({group} heads each)"
        scores = scores.reshape(config.n_layer, units, group).sum(-1)
    else:
        units, what = config.intermediate_size, "MLP neurons"
    removed = round(sparsity * units)
    if removed >= units:
        raise LmlabError(
            f"sparsity {sparsity} would remove all {units} {what} of every layer: expected less", params="sparsity"
        )
    if removed == 0:
        raise LmlabError(
            f"sparsity {sparsity} of {units} {what} per layer removes none: expected at least {1 / units:.3g}",
            params="sparsity",
        )
    kept = scores.topk(units - removed, dim=-1).indices.sort(dim=-1).values
    if kind == "heads" and group > 1:  # a kept group keeps its query heads
        kept = (kept[..., None] * group + torch.arange(group, device=kept.device)).flatten(1)
    return kept.cpu()


# -- the smaller model --------------------------------------------------------------------------


def shrink(model: nn.Module, heads: Tensor | None, neurons: Tensor | None) -> nn.Module:
    """A new model of a smaller config holding ``model``'s weights of the kept ``heads`` and ``neurons`` ((n_layer,
    kept) indices each; None: all kept): its outputs equal ``model``'s with the others masked out."""
    config = model.config
    changes: dict[str, Any] = {"head_dim": config.head_dim}
    if heads is not None:
        group = config.n_head // config.n_kv_heads
        changes.update(n_head=heads.shape[1], n_kv_heads=heads.shape[1] // group)
    if neurons is not None:
        changes["intermediate_size"] = neurons.shape[1]
    state = model.state_dict()
    for layer, block in enumerate(_blocks(model)):
        prefix = f"blocks.{layer}."
        if heads is not None:
            _slice_attention(state, prefix + "attn.", config, heads[layer])
        if neurons is not None:
            _slice_mlp(state, prefix + "mlp.", config, neurons[layer])
    param = next(model.parameters())
    smaller = build_model(dataclasses.replace(config, **changes)).to(device=param.device, dtype=param.dtype)
    smaller.load_state_dict(state)
    return smaller.train(model.training)


def _slice_attention(state: dict[str, Tensor], prefix: str, config, kept: Tensor) -> None:
    """Keep query heads ``kept`` (whole groups) in ``[q | k | v]`` and the output projection's input columns."""
    hd, group, q_dim = config.head_dim, config.n_head // config.n_kv_heads, config.attn_dim
    rows = lambda heads: (heads[:, None] * hd + torch.arange(hd)).flatten()  # noqa: E731
    kv = kept[::group] // group
    qkv_rows = torch.cat((rows(kept), q_dim + rows(kv), q_dim + config.n_kv_heads * hd + rows(kv)))
    _take(state, prefix + "qkv.weight", qkv_rows)
    _take(state, prefix + "qkv.bias", qkv_rows)
    _take(state, prefix + "proj.weight", rows(kept), dim=1)


def _slice_mlp(state: dict[str, Tensor], prefix: str, config, kept: Tensor) -> None:
    """Keep hidden units ``kept``: rows of ``fc`` (gate and up for SwiGLU), input columns of ``proj``."""
    rows = torch.cat((kept, config.intermediate_size + kept)) if config.mlp == "swiglu" else kept
    _take(state, prefix + "fc.weight", rows)
    _take(state, prefix + "fc.bias", rows)
    _take(state, prefix + "proj.weight", kept, dim=1)


def _take(state: dict[str, Tensor], key: str, index: Tensor, dim: int = 0) -> None:
    """``state[key]`` cut to ``index`` along ``dim``, where the model has that tensor (a bias may be absent)."""
    if key in state:
        state[key] = state[key].index_select(dim, index.to(state[key].device))


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.blocks  # decoders and encoders (an encoder–decoder is refused by check_model)


# -- recovery -----------------------------------------------------------------------------------


def recover(model: nn.Module, data: str | Path, tokenizer, steps: int, lr: float, device: torch.device) -> dict:
    """Train the pruned decoder ``model`` in place for ``steps`` optimizer steps on ``data``'s training tokens (the
    causal LM objective, :func:`~lmlab.train.loop.train_loop`; checkpoints in a temporary folder, dropped), masks of
    unstructured pruning kept fixed. Returns what compression.json records of it."""
    from lmlab.objectives import get_objective
    from lmlab.train.loop import TrainConfig, train_loop

    seq_len = min(RECOVERY_SEQ_LEN, model.config.block_size)
    cfg = TrainConfig(
        max_steps=steps,
        micro_batch_size=RECOVERY_BATCH,
        seq_len=seq_len,
        lr=lr,
        min_lr=lr,
        warmup_steps=max(1, steps // 10),
        schedule="constant",
        eval_interval=steps,
        eval_batches=4,
        device=str(device),
        progress=False,
        tensorboard=False,
    )
    train, valid = _windows(data, tokenizer, cfg)
    objective = get_objective("clm", tokenizer, model.config)
    meta = {"objective": "clm", "tokenizer_sha256": tokenizer.sha256}
    with tempfile.TemporaryDirectory(prefix="lmlab-prune-") as tmp:
        result = train_loop(
            model.train(), objective, train, valid, cfg, tmp, device=device, tokenizer=tokenizer, meta=meta
        )
    return {"steps": steps, "lr": lr, "data": str(data), "train_loss": result.train_loss, "val_loss": result.val_loss}


def _windows(data: str | Path, tokenizer, cfg) -> tuple[Callable[[int, int], Tensor], list[Tensor]]:
    """The recovery run's training windows (shuffled epochs, a pure function of the step) and validation windows."""
    from lmlab.data.pack import PackedTokens, load_manifest
    from lmlab.train.data import EpochWindows, fixed_windows

    tokens = PackedTokens(data, "train")
    if tokens.tokenizer_sha256 != tokenizer.sha256:
        raise LmlabError(f"data {data} was prepared with another tokenizer than the checkpoint's", params="data")
    train = EpochWindows(tokens, cfg.seq_len, cfg.micro_batch_size, cfg.seed, source=f"{data} (train split)")
    if "valid" not in load_manifest(data)["splits"]:
        return train, []
    return train, fixed_windows(PackedTokens(data, "valid"), cfg.seq_len, cfg.micro_batch_size, cfg.eval_batches)
