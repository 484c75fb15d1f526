"""Pruning: lmlab.compress.pruning (magnitude, 2:4, heads, neurons, recovery) and `lmlab prune`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lmlab
from lmlab.cli import main
from lmlab.compress.pruning import (
    check_settings,
    finish,
    importance,
    keep_units,
    linear_sparsity,
    mask_hooks,
    prune_model,
    two_four_mask,
    wanda_masks,
)
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import load_model
from lmlab.model import build_model
from lmlab.model.quant import quantizable

TINY = {
    "gpt2-tiny": {},
    "llama-tiny": {},  # grouped-query: 4 query heads in 2 key/value groups
    "bert-tiny": {"task": "classify", "num_labels": 3},
}


def tiny(name: str, **fields) -> nn.Module:
    torch.manual_seed(0)
    config = lmlab.ModelConfig.from_dict({**lmlab.preset(name).to_dict(), **TINY[name], "dropout": 0.0, **fields})
    return build_model(config).eval()


def batches(n: int = 4, length: int = 24, vocab: int = 300) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (1, length), generator=g) for _ in range(n)]


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.task_logits(ids) if model.config.task else model(ids)


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- unstructured ---------------------------------------------------------------------------------


def test_magnitude_reaches_the_global_sparsity_on_block_linear_weights_only():
    model = tiny("gpt2-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, fields = prune_model(copy.deepcopy(model), "magnitude", 0.3)
    finish(pruned)
    achieved = linear_sparsity(pruned)
    assert achieved["fraction"] == pytest.approx(0.3, abs=1 / achieved["block_linear_weights"])
    names = {f"{n}.weight" for n in quantizable(model)}
    weights = torch.cat([before[n].abs().flatten() for n in names])
    threshold = weights.kthvalue(achieved["zeros"]).values  # global: one threshold across all the layers
    for name, value in pruned.state_dict().items():
        if name in names:  # zeros exactly where |w| was smallest, the rest unchanged
            assert torch.equal(value, torch.where(before[name].abs() <= threshold, 0.0, before[name]))
        else:
            assert torch.equal(value, before[name]), name
    assert not any("weight_orig" in k or "weight_mask" in k for k in pruned.state_dict())  # made permanent


def test_two_four_keeps_the_two_largest_of_every_group_of_four():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.0]])
    assert two_four_mask(w).tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    model = tiny("llama-tiny")
    pruned, _ = prune_model(copy.deepcopy(model), "2:4", 0.5)
    finish(pruned)
    for name in quantizable(model):
        old, new = model.get_submodule(name).weight, pruned.get_submodule(name).weight
        groups, old_groups = new.reshape(-1, 4), old.reshape(-1, 4)
        assert ((groups != 0).sum(-1) <= 2).all()
        kept = old_groups.abs().topk(2, dim=-1).indices
        assert torch.equal(groups.gather(1, kept), old_groups.gather(1, kept))
    assert linear_sparsity(pruned)["fraction"] == 0.5


def test_wanda_prunes_each_row_by_weight_times_input_norm_and_keeps_a_loud_input():
    model = tiny("llama-tiny")
    loud = 7  # one input feature of the first attention layer made 200× louder: its small weights must survive
    with torch.no_grad():
        model.blocks[0].norm_1.weight[loud] = 200.0
        model.blocks[0].attn.qkv.weight[:, loud] *= 0.1  # and its weights among the smallest: magnitude drops them
    pruned, fields = prune_model(copy.deepcopy(model), "wanda", 0.5, batches(4))
    finish(pruned)
    assert fields["samples"] == 4 and fields["title"].startswith("Wanda pruning: 50%")
    for name in quantizable(model):
        weight = pruned.get_submodule(name).weight
        assert ((weight == 0).sum(1) == weight.shape[1] // 2).all(), name  # exactly half of every row
    assert (pruned.blocks[0].attn.qkv.weight[:, loud] != 0).float().mean() > 0.9  # Wanda keeps the loud column
    magnitude, _ = prune_model(copy.deepcopy(model), "magnitude", 0.5)
    finish(magnitude)
    assert (magnitude.blocks[0].attn.qkv.weight[:, loud] == 0).all()  # magnitude alone drops all of it
    masks = wanda_masks(copy.deepcopy(model), batches(4), 0.5)
    assert set(masks) == set(quantizable(model))


# -- structured -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("method", ["heads", "neurons", "heads+neurons"])
def test_structured_pruning_equals_the_original_with_those_units_masked(name, method):
    model = tiny(name)
    pruned, fields = prune_model(copy.deepcopy(model), method, 0.5, batches())
    c, p = model.config, pruned.config
    kept = fields["kept"]
    heads = torch.zeros(c.n_layer, c.n_head)
    neurons = torch.zeros(c.n_layer, c.intermediate_size)
    for layer in range(c.n_layer):
        heads[layer, kept["heads"][layer] if "heads" in kept else slice(None)] = 1
        neurons[layer, kept["neurons"][layer] if "neurons" in kept else slice(None)] = 1
    ids = batches(2, 16)[0].repeat(2, 1)
    hooks = mask_hooks(model, heads, neurons)
    try:
        expected = outputs(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.allclose(outputs(pruned, ids), expected, atol=1e-5, rtol=0)
    assert (outputs(model, ids) - expected).abs().max() > 1e-4  # the masked units did matter
    assert p.head_dim == c.head_dim  # heads keep their width
    assert p.n_head == (c.n_head // 2 if "heads" in method else c.n_head)
    assert p.n_kv_heads == (c.n_kv_heads // 2 if "heads" in method else c.n_kv_heads)
    assert p.intermediate_size == (c.intermediate_size // 2 if "neurons" in method else c.intermediate_size)
    assert pruned.num_params() == p.num_params() < c.num_params()
    assert p.flops_per_token(training=False) < c.flops_per_token(training=False)


def test_importance_ranks_a_silenced_head_and_neuron_last():
    model = tiny("gpt2-tiny", n_head=4, n_kv_heads=4)
    hd = model.config.head_dim
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, 2 * hd : 3 * hd] = 0  # head 2 of layer 1 writes nothing
        model.blocks[0].mlp.proj.weight[:, 7] = 0  # neuron 7 of layer 0 too
    scores = importance(model, batches())
    assert scores["heads"][1, 2] == 0 and (scores["heads"][1, [0, 1, 3]] > 0).all()
    assert scores["neurons"][0, 7] == 0 and scores["neurons"][0].min() == 0
    assert scores["heads"].norm(dim=-1).allclose(torch.ones(2))  # normalised per layer (Michel et al.)
    kept = keep_units(model.config, "heads", scores["heads"], 0.25)
    assert 2 not in kept[1].tolist() and kept.shape == (2, 3)
    assert all(p.grad is None for p in model.parameters())


def test_grouped_query_heads_go_by_whole_key_value_groups():
    config = tiny("llama-tiny").config  # 4 heads, 2 groups of 2
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.1, 0.1, 0.5, 0.6]])  # group sums: (1.0, 0.5), (0.2, 1.1)
    assert keep_units(config, "heads", scores, 0.5).tolist() == [[0, 1], [2, 3]]


# -- the verb -------------------------------------------------------------------------------------


def test_prune_cli_magnitude_with_recovery_keeps_zeros_and_every_verb_loads_it(
    trained_run, data_dir, corpus_file, tmp_path, capsys
):
    out = tmp_path / "mag"
    argv = ["prune", trained_run, "--out", out, "--sparsity", 0.4, "--data", data_dir, "--finetune-steps", 3]
    code, text, err = run(capsys, *argv, "--eval-data", corpus_file)
    assert code == 0, err
    assert "nonzero parameters" in text and "perplexity" in text
    record = json.loads((out / "compression.json").read_text())
    assert record["method"] == "magnitude" and record["recovery"]["steps"] == 3
    assert record["sparsity_achieved"]["fraction"] == pytest.approx(0.4, abs=1e-3)
    before, after = record["original"], record["compressed"]
    assert after["parameters"] == before["parameters"]
    assert before["parameters"] - after["nonzero_parameters"] >= record["sparsity_achieved"]["zeros"]
    original, pruned = load_model(trained_run), load_model(out)
    changed = zeros = 0
    for name in quantizable(pruned):
        w = pruned.get_submodule(name).weight
        zeros += int((w == 0).sum())
        changed += int((w != original.get_submodule(name).weight).sum())
    assert zeros == record["sparsity_achieved"]["zeros"]  # training moved weights but kept the zeros zero
    assert changed > zeros
    code, text, err = run(capsys, "generate", out, "--prompt", "The", "--max-new-tokens", 5)
    assert code == 0 and text.startswith("The"), err
    code, text, err = run(capsys, "evaluate", out, "--data", corpus_file, "--task", "lm", "--n-resamples", 10)
    assert code == 0 and "perplexity" in text, err
    assert run(capsys, "info", out)[0] == 0


def test_prune_cli_heads_and_neurons_shrink_the_model_and_info_shows_it(trained_run, data_dir, tmp_path, capsys):
    out = tmp_path / "small"
    argv = ["prune", trained_run, "--out", out, "--method", "heads+neurons", "--sparsity", 0.5, "--data", data_dir]
    code, text, err = run(capsys, *argv, "--samples", 8)
    assert code == 0, err
    assert "heads 2 → 1 per layer, MLP neurons 256 → 128 per layer" in text
    record = json.loads((out / "compression.json").read_text())
    before, after = record["original"], record["compressed"]
    assert after["parameters"] < before["parameters"] and after["flops_per_token"] < before["flops_per_token"]
    assert after["weights_file_bytes"] < before["weights_file_bytes"]
    config = json.loads((out / "config.json").read_text())["lmlab_model_config"]
    assert (config["n_head"], config["head_dim"], config["intermediate_size"]) == (1, 32, 128)
    code, text, _ = run(capsys, "info", out)
    assert code == 0 and f"{after['parameters']:,}" in text
    code, text, err = run(capsys, "generate", out, "--prompt", "The", "--max-new-tokens", 5)
    assert code == 0 and text.startswith("The"), err
    code, _, err = run(capsys, "critique", out, "--out", tmp_path / "crit", "--lenses", "efficiency")
    assert code == 0, err
    report = json.loads((tmp_path / "crit" / "report.json").read_text())
    assert report["model"]["parameters"] == after["parameters"]
    code, _, err = run(capsys, "export", out, "--out", tmp_path / "hf")
    assert code == 1 and "only HF llama holds pruned heads" in err


@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny"])
def test_prune_api_on_a_grouped_query_decoder_and_a_classifier_saves_a_smaller_checkpoint(
    name, tmp_path, tokenizer_dir, corpus_file, capsys
):
    from lmlab.io.checkpoint import save_checkpoint
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    model = tiny(name, vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer=tok, meta={"tokenizer_sha256": tok.sha256})
    record = lmlab.prune(tmp_path / "ckpt", tmp_path / "out", method="heads+neurons", data=corpus_file, samples=4)
    loaded = load_model(tmp_path / "out")
    c, p = model.config, loaded.config
    assert (p.n_head, p.n_kv_heads, p.head_dim) == (c.n_head // 2, c.n_kv_heads // 2, c.head_dim)
    assert p.intermediate_size == c.intermediate_size // 2 and p.task == c.task
    assert record["compressed"]["parameters"] == loaded.num_params() == p.num_params()
    assert len(record["kept"]["neurons"][0]) == p.intermediate_size and len(record["head_importance"]) == c.n_layer
    ids = torch.randint(3, tok.vocab_size, (2, 12))
    assert torch.isfinite(outputs(loaded, ids)).all()
    assert run(capsys, "info", tmp_path / "out")[0] == 0


def test_a_head_pruned_llama_exports_to_hf_with_its_head_dim(tmp_path, tokenizer_dir):
    pytest.importorskip("transformers")
    from lmlab.io.checkpoint import save_checkpoint
    from lmlab.tokenizer import Tokenizer

    pruned, _ = prune_model(tiny("llama-tiny", vocab_size=512), "heads", 0.5, batches())
    tok = Tokenizer.load(tokenizer_dir)
    save_checkpoint(tmp_path / "ckpt", pruned, tokenizer=tok, meta={"tokenizer_sha256": tok.sha256})
    folder = lmlab.export_hf(tmp_path / "ckpt", tmp_path / "hf")  # checks the logits against transformers
    hf = json.loads((folder / "config.json").read_text())
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["hidden_size"]) == (2, 1, 16, 64)


# -- errors ---------------------------------------------------------------------------------------


def test_errors_are_one_line_and_name_the_parameter():
    cases = [
        (("prune3", 0.5, None), "method", "^method is 'prune3': expected one of magnitude, wanda, 2:4, heads"),
        (("magnitude", 1.0, None), "sparsity", r"^sparsity is 1.0: expected a fraction between 0 and 1"),
        (("magnitude", 0, None), "sparsity", r"^sparsity is 0: expected a fraction"),
        (("2:4", 0.3, None), "sparsity", "^sparsity is 0.3: method 2:4 zeroes exactly half"),
        (("heads", 0.5, None), "data", "^method heads ranks by activations on data: give data"),
        (("wanda", 0.5, None), "data", "^method wanda ranks by activations on data: give data"),
    ]
    for (method, sparsity, data), param, message in cases:
        with pytest.raises(LmlabError, match=message) as err:
            check_settings(method, sparsity, data, 8, 0)
        assert param in err.value.params and "\n" not in str(err.value)
    model = tiny("gpt2-tiny")  # 2 heads: 0.8 of them rounds to both
    with pytest.raises(LmlabError, match="^sparsity 0.8 would remove all 2 heads of every layer") as err:
        prune_model(model, "heads", 0.8, batches(1))
    with pytest.raises(LmlabError, match="^sparsity 0.1 of 2 heads per layer removes none"):
        prune_model(model, "heads", 0.1, batches(1))


def test_cli_errors_show_the_flags(trained_run, tmp_path, capsys):
    code, _, err = run(capsys, "prune", trained_run, "--out", tmp_path / "p", "--sparsity", 1.5)
    assert code == 1 and err.strip().startswith("lmlab: error: --sparsity is 1.5: expected a fraction")
    code, _, err = run(capsys, "prune", trained_run, "--out", tmp_path / "p", "--method", "heads")
    assert code == 1 and "give --data" in err
    code, _, err = run(capsys, "prune", trained_run, "--out", tmp_path / "p", "--method", "obd")
    assert code == 1 and "--method is 'obd'" in err


def test_an_encoder_decoder_takes_unstructured_pruning_only(tmp_path, tokenizer_dir, data_dir):
    from lmlab.compress.pruning import check_model

    config = lmlab.preset("t5-tiny")
    with pytest.raises(LmlabError, match="this checkpoint is an encoder–decoder") as err:
        check_model(config, "heads", 0)
    assert err.value.params == ("method",)
    check_model(config, "magnitude", 0)
    with pytest.raises(LmlabError, match="recover a pruned encoder with `lmlab finetune`"):
        check_model(tiny("bert-tiny").config, "magnitude", 5)
