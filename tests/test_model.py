import copy
import platform

import pytest
import torch

from lmlab import kernels as decoder  # the CPU decode head's kernels and caches
from lmlab.config import preset
from lmlab.model import build_model

FAMILIES = ["gpt2-tiny", "llama-tiny"]


def tiny(name: str, **kw):
    torch.manual_seed(0)
    return build_model(preset(name, vocab_size=97, **kw)).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_causal_mask_changing_a_later_token_never_changes_earlier_logits(name):
    model = tiny(name)
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 15] = (y[:, 15] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_decode_equals_full_forward(name):
    model = tiny(name)
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(3, 32)
        steps = [model(x[:, :7], kv_cache=cache, input_pos=torch.arange(7), cache_len=7)]
        for t in range(7, 20):
            steps.append(model(x[:, t : t + 1], kv_cache=cache, input_pos=torch.tensor([t]), cache_len=t + 1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_static_cache_without_cache_len_equals_full_forward(name):
    model = tiny(name)
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(1, 64)
        steps = [model(x[:, :1], kv_cache=cache, input_pos=torch.tensor([0]))]
        for t in range(1, 12):
            steps.append(model(x[:, t : t + 1], kv_cache=cache, input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padding_with_mask_and_positions_matches_unpadded(name):
    model = tiny(name)
    x = torch.randint(1, 97, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
    real = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], dim=1)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(x)
        out = model(padded, key_padding_mask=real, position_ids=positions)
    torch.testing.assert_close(out[:, 4:], ref, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    g = tiny("gpt2-tiny")
    assert g.lm_head.weight is g.tok_emb.weight
    llama = tiny("llama-tiny")
    assert llama.lm_head.weight is not llama.tok_emb.weight


def test_grouped_query_attention_has_fewer_key_value_heads():
    model = tiny("llama-tiny")
    c = model.config
    assert c.n_kv_heads < c.n_head
    assert model.blocks[0].attn.qkv.out_features == c.n_embd + 2 * c.n_kv_heads * c.head_dim


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    model = build_model(preset(name, vocab_size=50)).train()
    x = torch.randint(0, 50, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # from ln(50) ≈ 3.9


def test_logits_to_keep_returns_the_last_positions_only():
    model = tiny("gpt2-tiny")
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits_to_keep=1), model(x)[:, -1:])


def test_dropout_acts_in_training_only():
    model = tiny("gpt2-tiny", dropout=0.3)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        plain = tiny("gpt2-tiny")
        plain.load_state_dict(model.state_dict())
        assert torch.equal(model(x), model(x)) and torch.equal(model(x), plain(x))


def _loss_grads_and_next_draw(model, x, checkpointing: bool):
    """One training forward + backward with or without activation checkpointing (same seed), its
    gradients, and the next random number (checkpointing must not change the RNG stream either)."""
    model.gradient_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    if model.config.arch == "seq2seq":
        out = model(x, x[:, :7])
    elif model.config.arch == "encoder":
        out = model(x, attention_mask=torch.ones_like(x))
    else:
        out = model(x)
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, torch.rand(1)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny"])
def test_activation_checkpointing_gives_the_same_gradients_with_dropout(name):
    """Checkpointed blocks are recomputed in backward with the RNG state of the forward: the same dropout
    masks, so the same loss and gradients, bit for bit, and the same random stream afterwards."""
    model = tiny(name, dropout=0.2).train()
    x = torch.randint(0, 97, (2, 13))
    loss, grads, draw = _loss_grads_and_next_draw(model, x, False)
    loss_ckpt, grads_ckpt, draw_ckpt = _loss_grads_and_next_draw(model, x, True)
    assert torch.equal(loss, loss_ckpt) and torch.equal(draw, draw_ckpt)
    assert grads.keys() == grads_ckpt.keys() and any(n.startswith(("blocks.", "enc_blocks.")) for n in grads)
    for n in grads:
        assert torch.equal(grads[n], grads_ckpt[n]), n


def test_activation_checkpointing_stays_out_of_evaluation_and_decoding(monkeypatch):
    import torch.utils.checkpoint

    model = tiny("gpt2-tiny")
    model.gradient_checkpointing = True
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: pytest.fail("checkpointed outside training")
    )
    x = torch.randint(0, 97, (2, 9))
    model.eval()
    model(x).sum().backward()  # eval mode: no recomputation
    model.train()
    with torch.no_grad():
        model(x)  # no gradients: nothing to save


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (8, 1), (2, 4)])
def test_decode_head_equals_the_plain_lm_head(shape):
    """Decoding on CPU (inference mode, ≤ 64 rows) takes the cached-copy kernels of cpu_decode_head;
    they must give the LM head's logits, for one row and for a batch (oneDNN on x86-64)."""
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=300)).eval()
    x = torch.randn(*shape, model.config.n_embd)
    want = torch.nn.functional.linear(x, model.lm_head.weight).detach()
    with torch.inference_mode():
        torch.testing.assert_close(model.lm_logits(x), want, atol=1e-5, rtol=1e-5)
    if x.shape[:-1].numel() > 1 and platform.machine().lower() in ("x86_64", "amd64"):
        assert decoder._ONEDNN is True  # the fast path ran, not the fallback


def test_decode_head_follows_new_weights():
    """The cached copies follow the weight: an in-place update, new weights loaded, a dtype change."""
    model = tiny("gpt2-tiny")
    torch.manual_seed(1)
    other = build_model(preset("gpt2-tiny", vocab_size=97)).eval()
    x = torch.randn(4, model.config.n_embd)
    for rows in (x[:1], x):
        with torch.inference_mode():
            model.lm_logits(rows)  # fills the caches
        with torch.no_grad():
            model.lm_head.weight.mul_(2)
        with torch.inference_mode():
            torch.testing.assert_close(
                model.lm_logits(rows), rows @ model.lm_head.weight.detach().T, atol=1e-5, rtol=1e-5
            )
        model.load_state_dict(other.state_dict())
        with torch.inference_mode():
            torch.testing.assert_close(
                model.lm_logits(rows), rows @ other.lm_head.weight.detach().T, atol=1e-5, rtol=1e-5
            )


def test_a_model_that_has_decoded_still_copies_and_pickles(tmp_path):
    model = tiny("gpt2-tiny")
    with torch.inference_mode():
        model.lm_logits(torch.randn(8, model.config.n_embd))
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    assert torch.equal(clone.lm_head.weight, model.lm_head.weight)


def test_decode_head_falls_back_without_onednn(monkeypatch):
    """A PyTorch build whose oneDNN linear fails (or is missing) decodes through the plain product."""

    def broken(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(decoder, "_ONEDNN", None)
    monkeypatch.setattr(decoder, "_onednn_pack", broken)
    model = tiny("gpt2-tiny")
    x = torch.randn(8, model.config.n_embd)
    with torch.inference_mode():
        out = model.lm_logits(x)
    assert decoder._ONEDNN is False
    torch.testing.assert_close(out, x @ model.lm_head.weight.detach().T, atol=1e-5, rtol=1e-5)


def test_a_model_built_in_inference_mode_decodes():
    """Inference tensors keep no version counter: the head takes the plain product, no cached copy."""
    with torch.inference_mode():
        model = tiny("gpt2-tiny")
        x = torch.randn(4, model.config.n_embd)
        torch.testing.assert_close(model.lm_logits(x), x @ model.lm_head.weight.T)
