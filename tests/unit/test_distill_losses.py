"""`distill.losses`: the distillation losses against their naive formulas (full fp32 softmaxes, autograd), block
by block without fp32 [tokens, vocab] tensors, NaN-free at the edges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill import losses
from distill.losses import class_kd_loss, hidden_loss, kd_loss, topk_kd_loss

KINDS = ("forward", "reverse", "jsd")


def xlogy_sum(prob, log_ratio):
    """sum prob x log_ratio with 0 x anything = 0 (only the edge tests reach a zero probability)."""
    return torch.where(prob > 0, prob * log_ratio, 0.0).sum(-1)


def naive_per_row(student, teacher, temperature=1.0, kind="forward", beta=0.5):
    """The per-position divergence from whole [rows, V] fp32 log-softmaxes, differentiated by autograd."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward":
        return xlogy_sum(log_p.exp(), log_p - log_q)
    if kind == "reverse":  # log p floored as the module documents (reached by the -inf edge test only)
        return xlogy_sum(log_q.exp(), log_q - log_p.clamp(min=losses.LOG_P_FLOOR))
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return beta * xlogy_sum(log_p.exp(), log_p - log_m) + (1 - beta) * xlogy_sum(log_q.exp(), log_q - log_m)


def naive(student, teacher, temperature=1.0, kind="forward", beta=0.5, mask=None):
    per_row = naive_per_row(student, teacher, temperature, kind, beta)
    return per_row.mean() if mask is None else per_row[mask].mean()


def naive_topk(student, indices, values, temperature=1.0, mask=None):
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(values.float() / temperature, dim=-1)
    per_row = xlogy_sum(log_p.exp(), log_p - log_q.gather(-1, indices.long()))
    return per_row.mean() if mask is None else per_row[mask].mean()


def loss_and_grad(fn, student, *args, **kwargs):
    leaf = student.detach().clone().requires_grad_(True)
    value = fn(leaf, *args, **kwargs)
    value.backward()
    return value.detach(), leaf.grad


def make(shape, vocab, seed=0, dtype=torch.float32, teacher_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype)  # a spread like a trained model's
    teacher = (torch.randn(*shape, vocab, generator=g) * 3).to(teacher_dtype)
    return student, teacher


def make_mask(shape, seed=0, dropped=0.3):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) >= dropped
    flat = mask.view(-1)
    flat[0], flat[-1] = True, False  # at least one position counts and one is dropped
    return mask


CASES = {"one-block": ((2, 5), 37, None), "blocks": ((2, 5), 37, 3),  # 3 rows a block: 4 blocks, a partial last
         "big-vocab": ((5,), (1 << 17) + 1, None)}  # the real constant: 3 rows a block, 2 blocks


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_matches_naive_formula(kind, temperature, case, monkeypatch):
    shape, vocab, block_rows = CASES[case]
    if block_rows is not None:
        monkeypatch.setattr(losses, "BLOCK_ELEMENTS", block_rows * vocab)
    beta = 0.3 if kind == "jsd" and temperature == 2.0 else 0.5  # an asymmetric beta too
    student, teacher = make(shape, vocab)
    mask = make_mask(shape)
    got, got_grad = loss_and_grad(kd_loss, student, teacher, temperature, kind, beta, mask)
    want, want_grad = loss_and_grad(naive, student, teacher, temperature, kind, beta, mask)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # 131,073 terms per row: fp32 sums differ by a few 1e-7 (this one's are the closer to fp64)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=want_grad.abs().max().item() * 1e-5)
    assert (got_grad[~mask] == 0).all()  # dropped positions get no gradient


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_student_gradient_stays_bf16_and_matches_fp32(kind, monkeypatch):
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 4 * 101)
    student, teacher = make((3, 6), 101, seed=1, dtype=torch.bfloat16, teacher_dtype=torch.float16)
    mask = make_mask((3, 6), seed=1)
    got, got_grad = loss_and_grad(kd_loss, student, teacher, 2.0, kind, mask=mask)
    want, want_grad = loss_and_grad(naive, student.float(), teacher, 2.0, kind, mask=mask)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # same bf16 inputs: only fp32 rounding differs
    torch.testing.assert_close(got_grad.float(), want_grad, rtol=2e-2, atol=want_grad.abs().max().item() * 1e-2)


def test_backward_scales_by_the_incoming_gradient():
    student, teacher = make((4,), 23, seed=2)
    for kind in KINDS:
        _, once = loss_and_grad(kd_loss, student, teacher, kind=kind)
        _, thrice = loss_and_grad(lambda s, t, kind=kind: kd_loss(s, t, kind=kind) * 3.0, student, teacher)
        torch.testing.assert_close(thrice, once * 3.0)
    idx = teacher.topk(5, dim=-1).indices
    _, once = loss_and_grad(topk_kd_loss, student, idx, teacher.gather(-1, idx))
    _, thrice = loss_and_grad(lambda s: topk_kd_loss(s, idx, teacher.gather(-1, idx)) * 3.0, student)
    torch.testing.assert_close(thrice, once * 3.0)


@pytest.mark.parametrize("kind", KINDS)
def test_block_size_does_not_change_the_result(kind, monkeypatch):
    shape, vocab = (3, 7), 53
    student, teacher = make(shape, vocab, seed=3)
    mask = make_mask(shape, seed=3)
    idx = teacher.topk(9, dim=-1).indices
    kd, topk = [], []
    for block_rows in (1, 4, 21, 1000):  # one row, a partial last block, exactly one block, one big block
        monkeypatch.setattr(losses, "BLOCK_ELEMENTS", block_rows * vocab)
        kd.append(loss_and_grad(kd_loss, student, teacher, 1.5, kind, mask=mask))
        topk.append(loss_and_grad(topk_kd_loss, student, idx, teacher.gather(-1, idx), 1.5, mask=mask))
    for results in (kd, topk):
        for value, grad in results[1:]:
            torch.testing.assert_close(value, results[0][0], rtol=0, atol=1e-6)
            torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-6)


class LargestFloat32(TorchDispatchMode):
    """Records the element count of the largest fp32 tensor any op returns (views included: never bigger than
    their base), forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("loss", ["forward", "reverse", "jsd", "topk"])
def test_no_fp32_tensor_bigger_than_a_block(loss, monkeypatch):
    rows, vocab, block_rows = 64, 512, 4
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", block_rows * vocab)
    student, teacher = make((rows,), vocab, seed=4, dtype=torch.bfloat16, teacher_dtype=torch.bfloat16)
    student.requires_grad_(True)
    idx = teacher.topk(vocab // 2, dim=-1).indices
    values = teacher.gather(-1, idx)
    with LargestFloat32() as record:
        if loss == "topk":
            value = topk_kd_loss(student, idx, values)
        else:
            value = kd_loss(student, teacher, kind=loss)
        value.backward()
    assert student.grad.dtype == torch.bfloat16 and student.grad.abs().sum() > 0
    assert 0 < record.largest <= block_rows * vocab < rows * vocab
    # the check itself: the naive formula does hold whole fp32 [rows, vocab] tensors
    with LargestFloat32() as naive_record:
        naive(student, teacher, kind="forward").backward()
    assert naive_record.largest == rows * vocab


@pytest.mark.parametrize("kind", KINDS + ("topk",))
def test_all_masked_gives_zero_loss_and_zero_gradient(kind):
    student, teacher = make((2, 3), 19, seed=5)
    teacher[0, 0] = float("nan")  # a masked position's contents never matter
    leaf = student.clone().requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    if kind == "topk":
        idx = torch.arange(4).expand(2, 3, 4)
        value = topk_kd_loss(leaf, idx, teacher[..., :4], mask=mask)
    else:
        value = kd_loss(leaf, teacher, kind=kind, mask=mask)
    assert value.grad_fn is not None and value.item() == 0.0
    value.backward()
    assert torch.equal(leaf.grad, torch.zeros_like(student))


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_never_reach_the_result(kind):
    student, teacher = make((2, 4), 29, seed=6)
    mask = make_mask((2, 4), seed=6)
    want, want_grad = loss_and_grad(kd_loss, student, teacher, kind=kind, mask=mask)
    dirty_student, dirty_teacher = student.clone(), teacher.clone()
    dirty_teacher[~mask] = float("nan")
    dirty_student[~mask] = 1e4
    got, got_grad = loss_and_grad(kd_loss, dirty_student, dirty_teacher, kind=kind, mask=mask)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    # an attention mask's 0/1 integers are a mask too
    got_int, _ = loss_and_grad(kd_loss, student, teacher, kind=kind, mask=mask.long())
    assert torch.equal(got_int, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_give_finite_loss_and_gradient(kind, dtype):
    student, teacher = make((3, 4), 31, seed=7)
    student[0, :, :5], student[1, :, 3] = -1e4, 1e4  # q underflows to exact zeros, or is one-hot
    teacher[0, :, 4:9], teacher[1, :, 0] = -float("inf"), 1e4  # p has exact zeros; the student's +1e4 is not its top
    teacher[2, 0, 1:] = -float("inf")  # a one-hot teacher
    student = student.to(dtype)
    mask = make_mask((3, 4), seed=7, dropped=0.0)
    for temperature in (1.0, 2.0):
        got, got_grad = loss_and_grad(kd_loss, student, teacher, temperature, kind, mask=mask)
        assert torch.isfinite(got) and got >= 0 and torch.isfinite(got_grad).all()
        want, want_grad = loss_and_grad(naive, student.float(), teacher, temperature, kind, mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad.float(), want_grad, rtol=2e-2, atol=1e-4)
    if kind == "reverse":  # a token the teacher rules out costs the student LOG_P_FLOOR, not infinity
        s = torch.tensor([[0.0, 0.0]])
        t = torch.tensor([[0.0, -float("inf")]])
        want = 0.5 * math.log(0.5) + 0.5 * (math.log(0.5) - losses.LOG_P_FLOOR)
        assert kd_loss(s, t, kind="reverse").item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero(kind):
    student, _ = make((2, 3), 17, seed=8)
    student[0, 0, :3] = -float("inf")  # zeros on both sides
    value, grad = loss_and_grad(kd_loss, student.clamp(min=-1e4), student + 5.0, kind=kind)  # a shift is no change
    assert abs(value.item()) < 1e-6 and grad.abs().max() < 1e-6


def test_jsd_is_symmetric_at_half_and_bounded():
    student, teacher = make((4, 5), 43, seed=9)
    forth = kd_loss(student, teacher, kind="jsd", beta=0.5)
    back = kd_loss(teacher, student, kind="jsd", beta=0.5)
    torch.testing.assert_close(forth, back, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(back, naive(teacher, student, kind="jsd", beta=0.5), rtol=1e-5, atol=1e-7)
    # not at any other beta: beta weighs the teacher's side
    assert not torch.allclose(kd_loss(student, teacher, kind="jsd", beta=0.2),
                              kd_loss(teacher, student, kind="jsd", beta=0.2))
    # disjoint distributions reach the bound, the binary entropy of beta (log 2 at 0.5), without passing it
    s, t = torch.full((1, 8), -1e4), torch.full((1, 8), -1e4)
    s[0, 0], t[0, 1] = 0.0, 0.0
    for beta in (0.5, 0.2, 0.9):
        entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert kd_loss(s, t, kind="jsd", beta=beta).item() == pytest.approx(entropy, rel=1e-5)
        assert kd_loss(student, teacher, kind="jsd", beta=beta).item() < entropy


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_invalid_beta_raises(beta):
    student, teacher = make((2,), 5)
    with pytest.raises(ValueError, match="beta.*" + ("nan" if math.isnan(beta) else str(beta))):
        kd_loss(student, teacher, kind="jsd", beta=beta)


def test_invalid_arguments_raise():
    student, teacher = make((2, 3), 5)
    with pytest.raises(ValueError, match="'kl'"):
        kd_loss(student, teacher, kind="kl")
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(student, teacher, temperature)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(student, teacher[..., :4])
    with pytest.raises(ValueError, match="mask"):
        kd_loss(student, teacher, mask=torch.ones(3, 2, dtype=torch.bool))
    idx = teacher.topk(2, dim=-1).indices
    with pytest.raises(ValueError, match="integer"):
        topk_kd_loss(student, idx.float(), teacher.gather(-1, idx))
    with pytest.raises(ValueError, match="do not fit"):
        topk_kd_loss(student, idx, teacher.gather(-1, idx)[..., :1])
    with pytest.raises(ValueError, match="'l1'"):
        hidden_loss(student, teacher, kind="l1")


def test_inputs_are_left_unchanged():
    student, teacher = make((2, 3), 11, seed=24)
    top = teacher.topk(4, dim=-1)
    inputs = (student, teacher, top.indices, top.values)
    before = [x.clone() for x in inputs]
    leaf = student.requires_grad_(True)
    for kind in KINDS:
        kd_loss(leaf, teacher, 2.0, kind).backward()
    topk_kd_loss(leaf, top.indices, top.values, 2.0).backward()
    for x, y in zip(inputs, before, strict=True):
        assert torch.equal(x.detach(), y)


def test_no_gradient_work_under_no_grad():
    student, teacher = make((2, 3), 11)
    student.requires_grad_(True)
    with torch.no_grad():
        value = kd_loss(student, teacher)
    assert value.grad_fn is None
    torch.testing.assert_close(value, naive(student, teacher).detach())


def test_non_contiguous_logits_give_the_same_result():
    student, teacher = make((3, 4), 13, seed=10)
    want, want_grad = loss_and_grad(kd_loss, student, teacher, kind="reverse")
    got, got_grad = loss_and_grad(lambda s, t: kd_loss(s.transpose(0, 1), t.transpose(0, 1), kind="reverse"),
                                  student, teacher)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_the_whole_vocabulary_is_forward_kd(temperature, index_dtype, monkeypatch):
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 3 * 41)
    student, teacher = make((2, 5), 41, seed=11)
    mask = make_mask((2, 5), seed=11)
    order = torch.rand(2, 5, 41, generator=torch.Generator().manual_seed(0)).argsort(dim=-1)  # any order
    values = teacher.gather(-1, order).to(torch.bfloat16)
    got, got_grad = loss_and_grad(topk_kd_loss, student, order.to(index_dtype), values, temperature, mask)
    want, want_grad = loss_and_grad(kd_loss, student, teacher.to(torch.bfloat16), temperature, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("case", ["one-block", "blocks"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_matches_the_truncated_renormalised_formula(temperature, case, monkeypatch):
    if case == "blocks":
        monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 3 * 37)
    student, teacher = make((2, 5), 37, seed=12)
    mask = make_mask((2, 5), seed=12)
    top = teacher.topk(6, dim=-1)
    values = top.values.half()
    got, got_grad = loss_and_grad(topk_kd_loss, student, top.indices, values, temperature, mask)
    want, want_grad = loss_and_grad(naive_topk, student, top.indices, values, temperature, mask)
    assert got.dtype == torch.float32 and got > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-8)
    assert (got_grad[~mask] == 0).all()
    # the student's mass outside the top-k is pushed down: every other logit's gradient is >= 0 (q > 0)
    outside = torch.ones_like(student, dtype=torch.bool).scatter_(-1, top.indices, False)
    assert (got_grad[mask.unsqueeze(-1).expand_as(student) & outside] > 0).all()


def test_topk_loss_is_nonnegative_and_zero_when_the_student_matches():
    for seed in range(5):
        student, teacher = make((3, 4), 29, seed=13 + seed)
        top = teacher.topk(1 + seed * 3, dim=-1)
        assert topk_kd_loss(student, top.indices, top.values, 1.0 + seed / 2).item() >= 0
    # the teacher's top-k logits (plus any shift) and nothing elsewhere: q is p~ exactly
    _, teacher = make((3, 4), 29, seed=20)
    top = teacher.topk(7, dim=-1)
    for elsewhere in (-float("inf"), -1e4):
        student = torch.full_like(teacher, elsewhere).scatter_(-1, top.indices, top.values + 2.0)
        for temperature in (1.0, 2.0):
            value, grad = loss_and_grad(topk_kd_loss, student, top.indices, top.values, temperature)
            assert abs(value.item()) < 1e-6 and torch.isfinite(grad).all() and grad.abs().max() < 1e-6


def test_topk_padding_with_minus_inf_values_carries_nothing():
    student, teacher = make((2, 3), 23, seed=21)
    top = teacher.topk(5, dim=-1)
    padded_idx = torch.cat([top.indices, top.indices[..., :2]], dim=-1)  # padding may repeat any index
    padded_values = torch.cat([top.values, torch.full_like(top.values[..., :2], -float("inf"))], dim=-1)
    want, want_grad = loss_and_grad(topk_kd_loss, student, top.indices, top.values)
    got, got_grad = loss_and_grad(topk_kd_loss, student, padded_idx, padded_values)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_hidden_loss_cosine_and_mse():
    g = torch.Generator().manual_seed(22)
    s, t = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    assert hidden_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_loss(s, -3.0 * s).item() == pytest.approx(2.0, abs=1e-6)
    assert hidden_loss(s, 3.0 * s).item() == pytest.approx(0.0, abs=1e-6)  # the scale does not count
    mask = make_mask((2, 5), seed=22)
    want = (1 - F.cosine_similarity(s[mask], t[mask], dim=-1)).mean()
    torch.testing.assert_close(hidden_loss(s, t, "cosine", mask), want)
    torch.testing.assert_close(hidden_loss(s, t, "mse"), F.mse_loss(s, t))
    torch.testing.assert_close(hidden_loss(s.bfloat16(), t, "mse", mask), F.mse_loss(s.bfloat16().float()[mask],
                                                                                     t[mask]))
    leaf = s.clone().requires_grad_(True)
    value = hidden_loss(leaf, t, "cosine", torch.zeros(2, 5, dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(s))
    assert hidden_loss(s, t, "cosine").dtype == torch.float32


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_class_kd_loss_matches_kl_div(temperature):
    student, teacher = make((8,), 3, seed=23)

    def reference(s, t):
        return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                        reduction="batchmean")

    got, got_grad = loss_and_grad(class_kd_loss, student, teacher, temperature)
    want, want_grad = loss_and_grad(reference, student, teacher)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    with pytest.raises(ValueError, match="batch, classes"):
        class_kd_loss(student.unsqueeze(0), teacher.unsqueeze(0))


def test_blocks_are_cache_sized_on_cpu_and_large_on_a_gpu():
    """4 rows of Llama 3's vocabulary per block on CPU (L2-sized), ~130 on a GPU (launch-bound otherwise)."""
    assert losses.block_rows(128_256, torch.device("cpu")) == 4
    assert losses.block_rows(128_256, torch.device("cuda")) == 130
    assert losses.block_rows(10 ** 9, torch.device("cuda")) == 1


def _tail_kl(s, t, idx, temperature):
    """The KL over the teacher's top-k plus one category for the rest, from full softmaxes (the reference)."""
    p, q = torch.softmax(t.double() / temperature, -1), torch.softmax(s.double() / temperature, -1)
    p_top, q_top = p.gather(-1, idx), q.gather(-1, idx)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    per = (p_top * (p_top.log() - q_top.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return per.mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_the_teachers_normaliser_is_the_exact_kl_over_the_topk_and_the_tail(monkeypatch, temperature):
    torch.manual_seed(3)
    s = torch.randn(3, 5, 41, dtype=torch.float64).float().requires_grad_(True)
    t = torch.randn(3, 5, 41) * 2
    values, idx = t.topk(6, dim=-1)
    lse = torch.logsumexp(t / temperature, dim=-1)
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 4 * 41)  # several blocks
    got = losses.topk_kd_loss(s, idx, values, temperature, teacher_lse=lse)
    (grad,) = torch.autograd.grad(got, s)
    ref_s = s.detach().double().requires_grad_(True)
    want = _tail_kl(ref_s, t, idx, temperature)
    (ref_grad,) = torch.autograd.grad(want, ref_s)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    # k = V: no tail, the full forward KL
    all_values, all_idx = t.topk(41, dim=-1)
    full = losses.topk_kd_loss(s, all_idx, all_values, temperature, teacher_lse=lse)
    assert full.item() == pytest.approx(losses.kd_loss(s, t, temperature).item(), rel=1e-5)
    # renormalising instead distorts a flat teacher: a different, larger loss here
    renormalised = losses.topk_kd_loss(s, idx, values, temperature)
    assert abs(renormalised.item() - got.item()) > 1e-2


def test_topk_with_the_normaliser_refuses_a_misshapen_one():
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    values, idx = t.topk(4, dim=-1)
    with pytest.raises(ValueError, match="teacher_lse"):
        losses.topk_kd_loss(s, idx, values, 1.0, teacher_lse=torch.zeros(2))
