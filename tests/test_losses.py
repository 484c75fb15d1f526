"""The chunked cross-entropy (lmlab.objectives.losses): the plain loss and gradients to fp32 rounding, ignored
labels and an all-ignored chunk, autocast, no-grad evaluation, when it chunks, and that it holds one
chunk's logits instead of the whole batch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_peak_bytes

from lmlab.config import preset
from lmlab.model import build_model
from lmlab.objectives import CausalLM
from lmlab.objectives.losses import AUTO_VOCAB, IGNORE_INDEX, ce_chunk_rows, linear_cross_entropy, lm_loss


def plain(h, w, y, b=None):
    return F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=IGNORE_INDEX)


def loss_and_grads(fn, *inputs):
    loss = fn()
    return loss.detach(), torch.autograd.grad(loss, inputs)


def assert_close_rel(actual, expected, rel):
    """Equal up to ``rel`` of the expected tensor's largest magnitude (a relative error of the whole tensor)."""
    scale = expected.abs().max().clamp(min=1e-30)
    assert ((actual - expected).abs().max() / scale).item() <= rel, ((actual - expected).abs().max() / scale).item()


def case(N=300, d=32, V=1000, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.1).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = IGNORE_INDEX  # ignored rows everywhere
    y[64:128] = IGNORE_INDEX  # a chunk of 64 (rows 64..127) with nothing to learn
    return h, w, b, y


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 299])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk, bias):
    h, w, b, y = case(bias=bias)
    inputs = (h, w) + ((b,) if bias else ())
    ref_loss, ref_grads = loss_and_grads(lambda: plain(h, w, y, b), *inputs)
    loss, grads = loss_and_grads(lambda: linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk), *inputs)
    assert_close_rel(loss, ref_loss, 1e-6)
    for got, want in zip(grads, ref_grads):
        assert_close_rel(got, want, 5e-6)


def test_a_loss_scaled_after_it_scales_the_gradients_and_3d_inputs_flatten():
    h, w, _, y = case()
    ref_loss, ref_grads = loss_and_grads(lambda: plain(h, w, y) / 4, h, w)
    loss, grads = loss_and_grads(
        lambda: linear_cross_entropy(h.view(3, 100, -1), w, y.view(3, 100), chunk_size=32) / 4, h, w
    )
    assert_close_rel(loss, ref_loss, 1e-6)
    for got, want in zip(grads, ref_grads):
        assert_close_rel(got, want, 5e-6)


def test_nothing_labelled_gives_nan_and_zero_gradients_as_cross_entropy_does():
    h, w, _, y = case()
    y[:] = IGNORE_INDEX
    ref_loss, ref_grads = loss_and_grads(lambda: plain(h, w, y), h, w)
    loss, grads = loss_and_grads(lambda: linear_cross_entropy(h, w, y, chunk_size=50), h, w)
    assert torch.isnan(ref_loss) and torch.isnan(loss)
    for got, want in zip(grads, ref_grads):
        assert torch.equal(got, want) and not got.any()


def test_under_bf16_autocast_it_matches_the_plain_path_to_bf16_rounding():
    h, w, _, y = case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(h, w, y)
        chunked = linear_cross_entropy(h, w, y, chunk_size=64)
    assert chunked.dtype == torch.float32
    ref_grads = torch.autograd.grad(ref, (h, w))
    grads = torch.autograd.grad(chunked, (h, w))
    assert_close_rel(chunked.detach(), ref.detach(), 1e-3)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32
        assert_close_rel(got, want, 3e-2)


def test_without_gradients_it_computes_the_loss_alone():
    h, w, _, y = case()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk_size=64)
        ref = plain(h, w, y)
    assert loss.grad_fn is None
    assert_close_rel(loss, ref, 1e-6)


def test_when_it_chunks():
    assert ce_chunk_rows(None, 512, 10_000) == 0  # a small vocabulary: the plain path
    assert ce_chunk_rows(None, AUTO_VOCAB - 1, 10_000) == 0
    assert ce_chunk_rows(None, 50_257, 10_000) == 333  # GPT-2's: ~64 MiB of fp32 logits per chunk
    assert ce_chunk_rows(None, 50_257, 300) == 0  # everything fits in one chunk
    assert ce_chunk_rows(0, 50_257, 10_000) == 0  # never
    assert ce_chunk_rows(128, 512, 10_000) == 128  # asked for
    h, w, _, y = case(V=512)
    assert linear_cross_entropy(h, w, y).grad_fn.name() == "NllLossBackward0"  # the plain path, untouched


def test_the_causal_lm_objective_takes_the_plain_path_for_a_small_vocabulary(monkeypatch):
    import lmlab.objectives.losses as losses

    monkeypatch.setattr(losses, "linear_cross_entropy", lambda *a, **k: pytest.fail("chunked a 512-token vocabulary"))
    model = build_model(preset("gpt2-tiny", vocab_size=512))
    ids = torch.randint(0, 512, (2, 17))
    assert CausalLM().loss(model, CausalLM().batch(ids)).grad_fn.name() == "NllLossBackward0"


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "t5-tiny"])  # tied and untied heads, an encoder–decoder
def test_lm_objectives_chunked_train_as_the_plain_ones(name):
    torch.manual_seed(0)
    config = preset(name, vocab_size=700)
    model = build_model(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 700, (3, 21), generator=g)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    if config.arch == "seq2seq":

        def forward(hidden_only):
            return model(ids, ids, hidden_only=hidden_only)
    else:

        def forward(hidden_only):
            return model(ids, hidden_only=hidden_only)

    results = []
    for chunk in (0, 16):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same dropout masks (t5-tiny has dropout)
        loss = lm_loss(model, labels, forward, chunk)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss0, grads0), (loss1, grads1) = results
    assert_close_rel(loss1, loss0, 1e-6)
    for got, want in zip(grads1, grads0):
        assert_close_rel(got, want, 2e-5)


def test_chat_and_packed_chat_losses_chunk_as_well():
    from lmlab.tasks import task_objective as TaskObjective

    torch.manual_seed(0)
    model = build_model(preset("gpt2-tiny", vocab_size=600))
    ids = torch.randint(0, 600, (2, 12))
    labels = torch.where(torch.rand(2, 12) < 0.5, ids, IGNORE_INDEX)
    segments = torch.tensor([[1] * 5 + [2] * 7, [1] * 12])
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    for batch in (
        {"input_ids": ids, "labels": labels},
        {"input_ids": ids, "labels": labels, "segment_ids": segments, "position_ids": positions},
    ):
        objective = TaskObjective("chat", {}, 0, model_arch="decoder")
        losses = []
        for chunk in (0, 5):
            objective.ce_chunk_size = chunk
            losses.append(objective.loss(model, batch))
        assert losses[1].grad_fn.name() != losses[0].grad_fn.name()  # one chunked, one plain
        assert_close_rel(losses[1].detach(), losses[0].detach(), 1e-6)


def test_chunks_hold_far_less_memory_than_the_whole_batch_of_logits():
    """Measured on real CPU tensors (the profiler's allocation events): forward + backward of the head and the loss."""
    peak = cpu_peak_bytes
    h, w, _, y = case(N=512, d=32, V=40_000)
    logits = 512 * 40_000 * 4
    plain_peak = peak(lambda: plain(h, w, y).backward())
    chunked_peak = peak(lambda: linear_cross_entropy(h, w, y, chunk_size=64).backward())
    assert plain_peak >= 2 * logits  # the fp32 logits and their log-softmax, at least
    assert chunked_peak < logits / 2, (chunked_peak, plain_peak)
