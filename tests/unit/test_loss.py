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


# -- head_loss / lm_loss: the projection fused with the loss (no [tokens, vocab] logits) --------------------

def head_reference(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    return reference(hidden @ weight.t(), targets, ignore_index, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows, hidden_size, vocab", [(37, 16, 101), (1, 8, 5), (64, 4, 4096)],
                         ids=["blocks", "one-row", "one-row-blocks"])
def test_head_loss_matches_cross_entropy_of_the_projection(reduction, rows, hidden_size, vocab, monkeypatch):
    from lmforge.loss import head_loss

    monkeypatch.setattr(loss_module, "MIN_BLOCK_ROWS", 1)  # several blocks and a partial last one
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.5
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::3] = -100
    targets[0] = 1
    results = []
    for fn in (head_loss, head_reference):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        value = fn(h, w, targets, reduction=reduction)
        (value * 2.5).backward()  # an upstream factor (gradient accumulation's 1/steps) reaches both gradients
        results.append((value.detach(), h.grad, w.grad))
    (got, got_h, got_w), (want, want_h, want_w) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    assert (got_h[targets == -100] == 0).all()


def test_head_loss_in_bf16_keeps_the_dtypes_and_is_nan_when_nothing_counts():
    from lmforge.loss import head_loss

    hidden = torch.randn(9, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(33, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 33, (9,))
    value = head_loss(hidden, weight, targets)
    value.backward()
    assert value.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, head_reference(hidden.float(), weight.float(), targets), rtol=2e-2, atol=2e-2)
    assert head_loss(hidden, weight, torch.full((9,), -100)).isnan()  # like F.cross_entropy's mean


def _tiny(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":  # an untied output layer
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    else:  # GPT-2: the output layer is the embedding (tied): both uses' gradients must add up
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                           eos_token_id=0))
    return model.eval()  # no dropout: both paths see the same forward


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lm_loss_never_builds_the_logits_and_matches_the_logits_path(kind, monkeypatch):
    from lmforge.loss import lm_loss

    model = _tiny(kind)
    x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(2))
    want = token_loss(model(input_ids=x[:, :-1], use_cache=False).logits, x[:, 1:])
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    shapes = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    monkeypatch.setattr(loss_module, "token_loss", lambda *a, **k: pytest.fail("took the logits path"))
    got = lm_loss(model, x[:, :-1], x[:, 1:])
    got.backward()
    assert shapes == [(2, 0, 300)]  # the model's own head ran on no position: no [tokens, vocab] logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation: the sum, no gradient work
        torch.testing.assert_close(lm_loss(model, x[:, :-1], x[:, 1:], reduction="sum"),
                                   want.detach() * x[:, 1:].numel(), rtol=1e-5, atol=1e-4)


def test_lm_loss_keeps_the_logits_path_for_a_model_it_does_not_know(monkeypatch):
    from lmforge.loss import lm_loss

    model = _tiny("llama")
    monkeypatch.setattr(loss_module, "FUSED_HEAD_MODELS", frozenset())  # as for Gemma 2's soft-capped logits
    called = []
    monkeypatch.setattr(loss_module, "head_loss", lambda *a, **k: called.append(1))
    x = torch.randint(0, 300, (1, 9))
    want = token_loss(model(input_ids=x[:, :-1], use_cache=False).logits, x[:, 1:])
    torch.testing.assert_close(lm_loss(model, x[:, :-1], x[:, 1:]), want)
    assert not called
