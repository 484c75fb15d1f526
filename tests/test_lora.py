"""LoRA through peft: parsing --lora, what trains, merging, checkpoints, decoding — on every architecture."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from lmlab.config import ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.generate.loop import decode
from lmlab.io.checkpoint import load_model, save_checkpoint
from lmlab.model import build_model
from lmlab.tokenizer import Tokenizer
from lmlab.train.lora import (
    LoraSpec,
    adapter_state,
    apply_lora,
    merge_checkpoint,
    merge_lora,
    parse_lora,
    trainable_summary,
)
from lmlab.train.optim import make_optimizer

V = 64
ARCHS = {  # preset, overrides, targets
    "gpt2": ("gpt2-tiny", {}, ("qkv", "attn.proj", "fc")),
    "llama": ("llama-tiny", {}, ("qkv", "mlp.proj")),
    "bert": ("bert-tiny", dict(task="classify", num_labels=3), ("qkv", "proj")),
    "t5": ("t5-tiny", {}, ("qkv", "q", "kv", "fc")),
}


def tiny(arch: str, **overrides) -> torch.nn.Module:
    name, extra, _ = ARCHS[arch]
    torch.manual_seed(0)
    return build_model(preset(name, vocab_size=V, **{**extra, **overrides})).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        if model.config.arch == "seq2seq":
            return model(x, torch.randint(0, V, (2, 5)))
        if model.config.task:
            return model.task_logits(x)
        return model(x)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """What training does to the adapters, cheaply: B away from zero, so they change the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.2)
    return model


def train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    model.train()
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    x = torch.randint(0, V, (2, 9))
    for _ in range(steps):
        out = model.task_logits(x) if model.config.task else model(x)
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def trainable(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# -- the --lora flag ----------------------------------------------------------------------------


def test_parse_lora_reads_keys_lists_and_defaults():
    assert parse_lora("") == parse_lora("default") == LoraSpec()
    assert parse_lora("r=4, alpha=8,dropout=0.1,targets=qkv,proj,fc") == LoraSpec(4, 8.0, 0.1, ("qkv", "proj", "fc"))
    assert parse_lora("targets=qkv+mlp.fc,r=2").targets == ("qkv", "mlp.fc")
    spec = parse_lora("r=16,targets=q,kv")
    assert LoraSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert LoraSpec.from_dict({"r": 2}) == LoraSpec(r=2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rank=8", "lora: unknown key 'rank'; expected r, alpha, dropout, targets"),
        ("r=0", "lora: r is 0; expected an integer >= 1"),
        ("r=2.5", "lora: r='2.5' is not an integer"),
        ("alpha=-1", "lora: alpha is -1.0; expected a number > 0"),
        ("dropout=1", r"lora: dropout is 1.0; expected a number in \[0, 1\)"),
        ("targets=", "lora: targets is \\[\\]; expected one or more module names"),
        ("r=8,16", "lora: '16' is not key=value; only targets takes a list"),
        ("r=8,r=4", "lora: r is given twice"),
    ],
)
def test_bad_lora_flags_are_one_line_errors(text, message):
    with pytest.raises(LmlabError, match=message):
        parse_lora(text)


def test_lora_settings_round_trip_through_the_model_config(tmp_path):
    config = preset("gpt2-tiny", vocab_size=V, lora=LoraSpec(r=4, targets=("qkv", "fc")).to_dict())
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config
    data = json.loads((tmp_path / "config.json").read_text())
    del data["lmlab_model_config"]["lora"]  # a config.json from before the field
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert ModelConfig.load(tmp_path / "config.json").lora == {}
    with pytest.raises(LmlabError, match="model config field 'lora': unknown key 'rank'"):
        preset("gpt2-tiny", lora={"rank": 4})


# -- what trains --------------------------------------------------------------------------------


def test_only_the_adapters_train_and_merging_keeps_the_function():
    model = tiny("gpt2")
    base = copy.deepcopy(model)
    apply_lora(model, LoraSpec(r=4, targets=("qkv", "mlp.proj")))
    assert model.config.lora == {"r": 4, "alpha": 16.0, "dropout": 0.05, "targets": ["qkv", "mlp.proj"]}
    assert not any(m.training for m in model.modules())  # peft's new dropout modules follow the eval() model
    assert torch.equal(logits(model), logits(base))  # B starts at zero: the adapted model is the base model
    keys = [k for k in model.state_dict() if k.startswith("blocks.0.attn.qkv.")]
    assert keys == [
        "blocks.0.attn.qkv.base_layer.weight",
        "blocks.0.attn.qkv.base_layer.bias",
        "blocks.0.attn.qkv.lora_A.default.weight",
        "blocks.0.attn.qkv.lora_B.default.weight",
    ]
    assert all(".lora_" in n for n in trainable(model)) and len(trainable(model)) == 8  # A, B × 2 targets × 2 blocks
    assert (
        trainable_summary(model) == "LoRA r=4 alpha=16 on qkv, mlp.proj: 4,608 trainable of 116,992 parameters (3.94%)"
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    after = model.state_dict()
    for name, value in before.items():
        if ".lora_B." in name:
            assert not torch.equal(after[name], value), name
        elif ".lora_" not in name:
            assert torch.equal(after[name], value), name  # bit-identical: frozen, and not in the optimizer
    trained = logits(model)
    assert not torch.allclose(trained, logits(base))

    merge_lora(model)
    assert model.config.lora == {} and not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model), trained, atol=1e-5, rtol=0)
    plain = build_model(model.config)
    plain.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(plain.eval()), logits(model))


def test_a_task_head_trains_with_the_adapters():
    model = apply_lora(tiny("gpt2", task="classify", num_labels=3), LoraSpec(targets=("fc",)))
    assert [n for n in trainable(model) if ".lora_" not in n] == [
        "task_head.out.weight"
    ]  # a decoder classifier has no head bias
    tagger = apply_lora(tiny("gpt2", task="tag", num_labels=3), LoraSpec(targets=("fc",)))
    assert [n for n in trainable(tagger) if ".lora_" not in n] == ["task_head.out.weight", "task_head.out.bias"]
    assert trainable_summary(model).startswith("LoRA r=8 alpha=16 on fc + task head: ")
    head = model.task_head.out.weight.clone()
    train_steps(model, steps=2)
    assert not torch.equal(model.task_head.out.weight, head)


def test_targets_that_reach_no_layer_are_errors():
    with pytest.raises(LmlabError, match="target 'attn' matches no Linear layer.*qkv.*mlp.proj"):
        apply_lora(tiny("gpt2"), LoraSpec(targets=("qkv", "attn")))
    with pytest.raises(
        LmlabError, match="target 'lm_head' matches no Linear layer.*the LM head and task head are never adapted"
    ):
        apply_lora(tiny("llama"), LoraSpec(targets=("lm_head",)))
    model = apply_lora(tiny("gpt2"), LoraSpec())
    with pytest.raises(LmlabError, match="already has LoRA adapters"):
        apply_lora(model, LoraSpec())
    with pytest.raises(LmlabError, match="no LoRA adapters"):
        merge_lora(tiny("gpt2"))


def test_without_peft_lora_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what an install without the 'lora' extra sees
    assert parse_lora("r=4").r == 4  # parsing the flag needs no peft
    with pytest.raises(LmlabError, match=r"LoRA needs peft, which is not installed: pip install 'lmlab\[lora\]'"):
        apply_lora(tiny("gpt2"), LoraSpec())


def test_adapter_state_holds_the_adapters_alone_under_peft_names():
    state = adapter_state(apply_lora(tiny("llama"), LoraSpec(r=2, targets=("qkv",))))
    assert sorted(state) == [f"blocks.{i}.attn.qkv.lora_{m}.weight" for i in range(2) for m in "AB"]


# -- every architecture: forward, checkpoints, merging ------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_checkpoints_load_back_exactly_and_merge_to_plain_ones(arch, tmp_path, tokenizer_dir):
    base = tiny(arch)
    model = apply_lora(copy.deepcopy(base), LoraSpec(r=2, targets=ARCHS[arch][2]))
    assert torch.equal(logits(model), logits(base))
    expected = logits(perturb(model))
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    save_checkpoint(tmp_path / "ck", model, tokenizer=Tokenizer.load(tokenizer_dir), meta={"step": 7})

    loaded = load_model(tmp_path / "ck")  # built on the meta device, adapters injected before the strict load
    assert torch.equal(logits(loaded), expected)
    assert trainable(loaded) == trainable(model)  # same set, same order: the saved optimizer state fits
    make_optimizer(loaded, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu")).load_state_dict(optimizer.state_dict())

    merged = load_model(tmp_path / "ck", merge_lora=True)
    assert merged.config.lora == {} and not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)

    out = merge_checkpoint(tmp_path / "ck", tmp_path / "merged")
    meta = json.loads((out / "config.json").read_text())
    assert (
        meta["lmlab_model_config"]["lora"] == {} and meta["step"] == 7 and meta["merged_from"] == str(tmp_path / "ck")
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert torch.equal(logits(load_model(out)), logits(merged))
    with pytest.raises(LmlabError, match="not a LoRA checkpoint"):
        merge_checkpoint(out, tmp_path / "again")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_decoding_with_adapters_equals_the_merged_model(arch):
    model = perturb(apply_lora(tiny(arch), LoraSpec(r=2, targets=("qkv", "proj", "fc"))))
    merged = merge_lora(copy.deepcopy(model))
    prompts = [[1, 2, 3, 4], [5, 6]]  # different lengths: left padding and the cache's masks

    def greedy(m):
        return torch.stack([step.tokens for step in decode(m, prompts, max_new_tokens=8)], dim=1)

    assert torch.equal(greedy(model), greedy(merged))
    assert not torch.equal(greedy(model), greedy(tiny(arch)))  # the adapters do steer the tokens


def test_merging_a_checkpoint_whose_tokenizer_is_not_the_one_it_trained_with_is_refused(
    tmp_path, tokenizer_dir, other_tokenizer_dir, caplog
):
    model = apply_lora(tiny("gpt2"), LoraSpec(r=2, targets=("qkv",)))
    trained_with = Tokenizer.load(
        other_tokenizer_dir
    ).sha256  # config.json records another tokenizer than the one beside it
    save_checkpoint(
        tmp_path / "ck", model, tokenizer=Tokenizer.load(tokenizer_dir), meta={"tokenizer_sha256": trained_with}
    )
    with pytest.raises(LmlabError, match=r"ck/tokenizer\.json does not match the tokenizer the model was trained with"):
        merge_checkpoint(tmp_path / "ck", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with caplog.at_level("WARNING", logger="lmlab"):
        merge_checkpoint(tmp_path / "ck", tmp_path / "merged", verify=False)
    assert "does not match" in caplog.text and (tmp_path / "merged" / "model.safetensors").is_file()
