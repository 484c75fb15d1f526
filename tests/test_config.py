import dataclasses

import pytest
import torch

from lmlab.config import PRESETS, ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.model import build_model


@pytest.mark.parametrize("name", [n for n in PRESETS if "tiny" in n or "mini" in n])
def test_num_params_from_config_equals_built_model(name):
    config = preset(name, vocab_size=300)
    model = build_model(config)
    assert config.num_params() == model.num_params()
    assert config.num_params(include_embeddings=False) == model.num_params(include_embeddings=False)


def test_gpt2_124m_and_llama_1b_have_their_published_sizes():
    assert preset("gpt2-124m").num_params() == 124_439_808  # GPT-2 small, vocab 50257
    assert abs(preset("llama-1b").num_params() - 1.1e9) < 0.01e9  # TinyLlama-1.1B


def test_flops_per_token_follows_nanogpt_formula():
    c = preset("gpt2-124m")
    n = c.num_params() - c.block_size * c.n_embd
    assert c.flops_per_token(1024) == 6 * n + 12 * c.n_layer * c.n_embd * 1024
    assert c.flops_per_token(1024, training=False) == pytest.approx(c.flops_per_token(1024) / 3)


@pytest.mark.parametrize("name", ["gpt2-tiny", "t5-tiny"])
def test_flops_per_token_matches_a_counted_forward_pass(name):
    """The formula against PyTorch's FLOP counter on a real forward pass (SDPA's math kernel, which it
    counts as matmuls): a decoder, and an encoder–decoder whose decoder adds self- and cross-attention
    (a T-token source beside a T-token target). Both models tie their embeddings, so every counted
    parameter is in a matmul; norms and biases make up the rest of the 2 %."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config, T = preset(name, vocab_size=97, block_size=64), 64
    model = build_model(config).eval()
    x = torch.randint(0, 97, (1, T))
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, x) if config.arch == "seq2seq" else model(x)
    assert counter.get_total_flops() / T == pytest.approx(config.flops_per_token(T, training=False), rel=0.02)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(LmlabError, match="unknown model preset 'gpt5'.*gpt2-tiny"):
        preset("gpt5")


def test_bad_field_values_name_the_field():
    with pytest.raises(LmlabError, match="'n_kv_heads'"):
        ModelConfig(n_head=4, n_kv_heads=3, n_embd=64)
    with pytest.raises(LmlabError, match="'norm'"):
        ModelConfig(norm="batchnorm")


def test_unknown_config_key_is_an_error(tmp_path):
    with pytest.raises(LmlabError, match="unknown model config key.*n_layers"):
        ModelConfig.from_dict({"n_layers": 2})


def test_save_load_round_trip(tmp_path):
    c = preset("llama-tiny", vocab_size=123)
    c.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == c
    assert dataclasses.asdict(c)["n_kv_heads"] == 2


def test_swiglu_default_hidden_size_follows_llama_rule():
    c = ModelConfig(mlp="swiglu", n_embd=4096, n_head=32, norm="rmsnorm", position="rope", bias=False)
    assert c.intermediate_size == 11008  # LLaMA-7B


# -- sizes past any model are refused before anything is allocated ------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 10**12),
        ("vocab_size", 2**24 + 1),
        ("n_layer", 10**6),
        ("n_embd", 2**20),
        ("intermediate_size", 10**9),
    ],
)
def test_a_checkpoint_config_with_an_absurd_size_names_the_field_and_file(field, value, tmp_path):
    import json

    from lmlab.io.checkpoint import load_model

    (tmp_path / "config.json").write_text(
        json.dumps({"lmlab_model_config": {**preset("gpt2-tiny").to_dict(), field: value}})
    )
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    with pytest.raises(LmlabError, match=rf"config\.json: model config field '{field}' is {value:,}: expected at most"):
        load_model(tmp_path)


def test_sizes_each_within_bounds_can_still_describe_too_many_parameters():
    with pytest.raises(
        LmlabError, match=r"describes 8\.8e\+14 parameters and RoPE table entries .* expected at most 1\.1e\+12"
    ):
        preset("llama-tiny", n_layer=4096, n_embd=65536, n_head=512, intermediate_size=2**20)
    assert preset("llama-1b").num_params() < 2**40  # real sizes pass


# -- a run's log.jsonl after a crash -------------------------------------------------------------------------


def test_a_torn_last_log_line_or_a_nul_tail_is_dropped_with_a_warning(tmp_path, caplog):
    from lmlab.config import read_jsonl_log

    log = tmp_path / "log.jsonl"
    for tail in ('{"step": 3, "lo', '{"step": 3, "lo\0\0\0\0', "\0" * 64):
        log.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n' + tail.encode())
        caplog.clear()
        assert read_jsonl_log(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
        assert caplog.records and all(
            r.levelname == "WARNING" and "log.jsonl" in r.getMessage() for r in caplog.records
        )
    log.write_text('{"step": 1}\n{"step": 2}', encoding="utf-8")  # a complete record that lost only its newline is kept
    assert read_jsonl_log(log) == [{"step": 1}, {"step": 2}]


def test_a_bad_log_line_before_the_end_names_file_and_line(tmp_path):
    from lmlab.config import read_jsonl_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r"log\.jsonl:2: invalid JSON"):
        read_jsonl_log(log)
    log.write_text('{"step": 1}\nnot json\n', encoding="utf-8")  # a complete last line is no crash's doing
    with pytest.raises(LmlabError, match=r"log\.jsonl:2: invalid JSON"):
        read_jsonl_log(log)
    log.write_text('{"step": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r"log\.jsonl:2: expected a JSON object, got list"):
        read_jsonl_log(log)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70, 1.5, True, "3"])
def test_a_seed_outside_a_signed_64_bit_integer_is_an_error(seed):
    from lmlab.config import check_seed

    with pytest.raises(LmlabError, match="seed is .*expected an integer from 0 to 2\\*\\*63 - 1"):
        check_seed(seed)


def test_the_largest_seed_seeds_torch():
    from lmlab.config import MAX_SEED, check_seed

    torch.manual_seed(check_seed(MAX_SEED))
