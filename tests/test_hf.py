"""lmlab ↔ HF Transformers: HF's GPT-2 and LLaMA are the oracle for logits, weights, configs and greedy decoding."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmlab.config import ModelConfig, preset  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.io.hf import (  # noqa: E402
    config_from_hf,
    from_hf_model,
    hf_config_from,
    max_logit_diff,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf_model,
)
from lmlab.model import build_model  # noqa: E402

VOCAB = 512
TOL = 1e-4

CONFIGS = {
    "gpt2-tiny": dict(name="gpt2-tiny"),  # tied embeddings, tanh GELU ("gelu_new")
    "gpt2-untied-exact-gelu": dict(name="gpt2-tiny", tie_embeddings=False, gelu_approximate="none"),
    "llama-tiny": dict(name="llama-tiny"),  # GQA: n_kv_heads=2 < n_head=4
    "llama-mha": dict(name="llama-tiny", n_kv_heads=4),
    "llama-tied-bias": dict(name="llama-tiny", tie_embeddings=True, bias=True, rope_theta=500000.0),
}


def make_config(case: str) -> ModelConfig:
    overrides = dict(CONFIGS[case])
    return preset(overrides.pop("name"), vocab_size=VOCAB, **overrides)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter: fresh models have zero biases and unit norms, which would hide a swapped mapping."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def lmlab_model(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config).eval()
    randomize_(model, seed)
    return model


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def assert_same_state_dict(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", CONFIGS)
def test_lmlab_to_hf_gives_the_same_logits(case):
    model = lmlab_model(make_config(case))
    hf_model = to_hf_model(model)
    assert not hf_model.training and hf_model.config._attn_implementation == "sdpa"
    assert max_logit_diff(model, hf_model, batch()) < TOL


@pytest.mark.parametrize("case", CONFIGS)
def test_hf_to_lmlab_gives_the_same_logits(case):
    torch.manual_seed(1)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config_from(make_config(case)), attn_implementation="sdpa").eval()
    randomize_(hf_model, 1)
    model = from_hf_model(hf_model)
    assert not model.training
    assert max_logit_diff(model, hf_model, batch(1)) < TOL


@pytest.mark.parametrize("case", CONFIGS)
def test_round_trip_lmlab_hf_lmlab_reproduces_the_state_dict(case):
    config = make_config(case)
    model = lmlab_model(config)
    original = model.state_dict()
    assert_same_state_dict(state_dict_from_hf(state_dict_to_hf(original, config), config), original)
    assert_same_state_dict(from_hf_model(to_hf_model(model)).state_dict(), original)


@pytest.mark.parametrize("case", ["gpt2-tiny", "llama-tiny"])
def test_hf_greedy_generate_matches_lmlab_greedy_loop(case):
    model = lmlab_model(make_config(case))
    hf_model = to_hf_model(model)
    hf_model.generation_config.eos_token_id = None  # random weights: never stop early on an EOS id
    hf_model.generation_config.pad_token_id = 0
    prompt = batch()[:, :5]
    steps = 10
    hf_tokens = hf_model.generate(prompt, max_new_tokens=steps, do_sample=False, attention_mask=torch.ones_like(prompt))
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):  # argmax over a full forward pass, no cache: the plainest greedy decoder
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(hf_tokens, ids)


@pytest.mark.parametrize("case", ["gpt2-tiny", "llama-tiny"])
def test_config_round_trip_through_hf_is_exact(case):
    config = make_config(case)
    back = config_from_hf(hf_config_from(config)).to_dict()
    expected = config.to_dict()
    back.pop("name"), expected.pop("name")
    assert back == expected


def test_hf_config_fields_match_the_lmlab_config():
    gpt2 = hf_config_from(make_config("gpt2-tiny"))
    assert (gpt2.n_positions, gpt2.n_embd, gpt2.n_inner, gpt2.activation_function) == (128, 64, 256, "gelu_new")
    assert gpt2.tie_word_embeddings is True and gpt2.layer_norm_epsilon == 1e-5
    llama = hf_config_from(make_config("llama-tiny"))
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.max_position_embeddings) == (2, 176, 128)
    assert llama.tie_word_embeddings is False and llama.attention_bias is False and llama.mlp_bias is False
    assert llama.rms_norm_eps == 1e-5


def test_gpt2_state_dict_without_prefix_and_with_buffers_loads():
    """Original GPT-2 checkpoints store bare ``h.0....`` keys and the ``attn.bias`` mask buffer."""
    config = make_config("gpt2-tiny")
    model = lmlab_model(config)
    hf = state_dict_to_hf(model.state_dict(), config)
    bare = {k.removeprefix("transformer."): v for k, v in hf.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool)
    bare["lm_head.weight"] = hf["transformer.wte.weight"]
    assert_same_state_dict(state_dict_from_hf(bare, config), model.state_dict())


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(name="gpt2-tiny", position="rope"), "norm"),  # layernorm + RoPE: neither family
        (dict(name="llama-tiny", position="learned"), "norm"),  # rmsnorm + learned positions
        (dict(name="gpt2-tiny", bias=False), "bias"),  # GPT-2's Conv1D always has a bias
        (dict(name="gpt2-tiny", n_kv_heads=1), "n_kv_heads"),  # GQA in GPT-2
        (dict(name="llama-tiny", mlp="gelu"), "mlp"),
    ],
)
def test_config_no_hf_family_expresses_raises(overrides, field):
    overrides = dict(overrides)
    config = preset(overrides.pop("name"), vocab_size=VOCAB, **overrides)
    with pytest.raises(LmlabError, match=f"'{field}'"):
        hf_config_from(config)
    with pytest.raises(LmlabError, match=f"'{field}'"):
        state_dict_to_hf({}, config)


def test_unsupported_hf_config_raises():
    with pytest.raises(LmlabError, match="'roberta'.*gpt2, llama, bert"):
        config_from_hf(transformers.RobertaConfig())
    with pytest.raises(LmlabError, match="position_embedding_type"):
        config_from_hf(transformers.BertConfig(position_embedding_type="relative_key"))
    scaled = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    )
    with pytest.raises(LmlabError, match="'linear'"):
        config_from_hf(scaled)
    gpt2 = hf_config_from(make_config("gpt2-tiny"))
    gpt2.activation_function = "relu"
    with pytest.raises(LmlabError, match="activation_function"):
        config_from_hf(gpt2)


def test_state_dict_with_wrong_keys_raises():
    config = make_config("llama-tiny")
    hf = state_dict_to_hf(lmlab_model(config).state_dict(), config)
    del hf["model.layers.1.mlp.up_proj.weight"]
    hf["model.layers.1.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(LmlabError, match="missing 1 key.*up_proj.*unexpected 1 key.*extra"):
        state_dict_from_hf(hf, config)
