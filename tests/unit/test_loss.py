"""`token_loss`: the loss and gradient of `F.cross_entropy(logits.float(), ...)` without its fp32
[tokens, vocab] tensors (DeepSpeed's chunked cross entropy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge import loss as loss_module
from lmforge.loss import token_loss


def reference(logits, targets, ignore_index=-100, reduction="mean"):
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction)


def loss_and_grad(fn, logits, targets, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    value = fn(leaf, targets, **kwargs)
    value.backward()
    return value.detach(), leaf.grad


def make(shape, vocab, dtype, ignored=0.0, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype)  # a spread like a trained model's
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignored] = ignore_index
    return logits, targets


@pytest.mark.parametrize("shape, vocab", [((2, 7), 11), ((1, 1), 5), ((3, 5), 50257), ((4,), 3)],
                         ids=["batch-seq", "one-token", "gpt2-vocab", "flat"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("small_blocks", [False, True], ids=["one-block", "blocks"])
def test_fp32_loss_and_gradient_match_cross_entropy(shape, vocab, reduction, small_blocks, monkeypatch):
    if small_blocks:  # 3 rows per block: several blocks and a partial last one
        monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 3 * vocab)
    logits, targets = make(shape, vocab, torch.float32, ignored=0.3)
    flat = targets.view(-1)
    flat[0] = 1  # at least one target counts
    if flat.numel() > 1:
        flat[-1] = -100  # and one is ignored
    got, got_grad = loss_and_grad(token_loss, logits, targets, reduction=reduction)
    want, want_grad = loss_and_grad(reference, logits, targets, reduction=reduction)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    assert (got_grad[targets == -100] == 0).all()  # ignored tokens get no gradient


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bf16_logits_keep_their_dtype_and_match_cross_entropy(reduction, monkeypatch):
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 5 * 257)
    logits, targets = make((3, 9), 257, torch.bfloat16, ignored=0.2)
    got, got_grad = loss_and_grad(token_loss, logits, targets, reduction=reduction)
    want, want_grad = loss_and_grad(reference, logits, targets, reduction=reduction)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # both in fp32 from the same bf16 values
    # the same fp32 gradient rounded to bf16 by both: at most a last-bit difference where it rounds
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=8e-3, atol=1e-6)


def test_another_ignore_index_and_all_ignored():
    logits, targets = make((2, 6), 13, torch.float32)
    targets[0, :4] = 0  # the pad id as ignore_index
    for reduction in ("mean", "sum"):
        got, grad = loss_and_grad(token_loss, logits, targets, ignore_index=0, reduction=reduction)
        want, want_grad = loss_and_grad(reference, logits, targets, ignore_index=0, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    everything = torch.full((2, 6), -100)
    assert torch.isnan(token_loss(logits, everything)) and torch.isnan(reference(logits, everything))
    assert token_loss(logits, everything, reduction="sum") == 0


def test_bad_arguments_are_named():
    logits, targets = make((2, 5), 7, torch.float32)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        token_loss(logits, targets, reduction="none")
    with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) must be targets' shape \+ \[vocab\]"):
        token_loss(logits, targets[:, :-1])
    with pytest.raises(ValueError, match="integer token ids"):
        token_loss(logits, targets.float())


def allocation_peak(fn) -> int:
    """Bytes of the highest point torch's CPU allocator reaches above where it was when `fn` starts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_fp32_tokens_by_vocab_tensors_are_held(dtype, monkeypatch):
    """Forward + backward of the loss from existing logits: the chunked loss allocates the gradient (one
    logits-sized tensor in the logits' dtype) and blocks; cross entropy on `logits.float()` at least three
    fp32 [tokens, vocab] tensors at once (log-softmax, its gradient, the logits' gradient)."""
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 1 << 14)  # 64 KiB fp32 blocks
    logits, targets = make((4, 64), 4099, dtype)
    size = logits.numel() * logits.element_size()  # 2 MiB in bf16, 4 MiB in fp32

    def step(fn):
        leaf = logits.detach().clone().requires_grad_(True)
        return allocation_peak(lambda: fn(leaf, targets).backward())

    chunked, full = step(token_loss), step(reference)
    assert chunked < 1.25 * size, (chunked, size)
    assert full >= 2.9 * logits.numel() * 4, (full, size)  # 3 fp32 [tokens, vocab] (and a few scalars)
