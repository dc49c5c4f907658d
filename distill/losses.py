"""The knowledge-distillation losses: divergences between a teacher's and a student's next-token distributions
without fp32 [tokens, vocab] tensors.

The plain KL term, `F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1), ...)`, holds
several [tokens, vocab] fp32 tensors at the start of backward: the fp32 copies of both logits, both log-softmaxes
(saved), the product, and in backward the gradients of the log-softmax and of the logits (Llama 3's 128,256-token
vocabulary at micro 8 x 2048: 8.4 GB each, five or more at once, against 4.2 GB for the bf16 student logits
themselves). `kd_loss` and `topk_kd_loss` compute the same losses a block of rows at a time, like
`lmforge.loss`: fp32 temporaries exist for one block only (about BLOCK_ELEMENTS elements each), the loss and the
gradient of the student logits come out of the same pass, and the gradient is written straight into ONE tensor
of the student logits' dtype, which backward scales by the incoming gradient (no second softmax in backward).
Extra memory: that gradient (the student logits' size) and a few block temporaries (2 MiB each).

Conventions shared by every loss here: the result is an fp32 scalar, the MEAN over the counted positions
(`mask` True, or nonzero as an attention mask is; None: all count), 0 (still connected to the student, zero
gradient) when no position counts, and it is NOT multiplied by T^2: the caller scales it (Hinton et al.'s
T^2 keeps the gradient's size independent of the temperature). A masked position's logits are never read into
the result: they may hold anything, NaN included. The teacher never gets a gradient from `kd_loss` or
`topk_kd_loss` (its logits are detached).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements per fp32 temporary of a block on CPU (2 MiB): rows per block = BLOCK_ELEMENTS // vocab (Llama 3: 4
# rows, GPT-2: 10), so a block stays in a core's L2 cache; see `lmforge.loss.BLOCK_ELEMENTS` for the measurements.
BLOCK_ELEMENTS = 1 << 19
# On a GPU a block is a few kernel launches whatever its size, so blocks are large: 2^24 elements (64 MiB per fp32
# temporary, ~5 of them live) is 130 rows at Llama 3's 128k vocabulary, 126 blocks for micro 4 x seq 4096 (the
# CPU size would be 4,096 blocks of ~20 launches each: more time in launches than in the student's step).
BLOCK_ELEMENTS_GPU = 1 << 24


def block_rows(vocab: int, device: torch.device) -> int:
    """Rows of [rows, vocab] logits per block on `device`."""
    return max(1, (BLOCK_ELEMENTS if device.type == "cpu" else BLOCK_ELEMENTS_GPU) // vocab)

KINDS = ("forward", "reverse", "jsd")

# A cached teacher's mass beyond its top-k below this is rounding (1 - the sum of k fp32 probabilities), not a tail.
TAIL_FLOOR = 1e-5

# Reverse KL reads log p where the student has mass: a token the teacher rules out (a -inf logit: a masked or
# padded vocabulary entry) would cost an infinite loss and a NaN gradient. Below fp32's smallest normal number
# (1.18e-38) the teacher's probability is not representable anyway (exp(-1e4) and exp(-inf) are both 0 in fp32),
# so its log is floored there: such a token costs the student 87.3 nats per unit of its probability, a strong
# but finite push towards zero. Ordinary teachers never reach it (it takes a logit about 87 below the top one
# at T = 1).
LOG_P_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # -87.34


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            kind: str = "forward", beta: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over counted positions of a divergence between the teacher's p = softmax(teacher_logits / T)
    and the student's q = softmax(student_logits / T), in fp32, not times T^2 (see the module docstring).

    `student_logits` [..., V] any float dtype, kept (the gradient comes back in it); `teacher_logits` the same
    shape, any float dtype (detached); `mask` [...] or None. `kind`:
      "forward": KL(p || q) = sum p (log p - log q), Hinton's KD, mass-covering;
      "reverse": KL(q || p), mode-seeking (MiniLLM); log p is floored at LOG_P_FLOOR, so a teacher's -inf
          logit costs a finite loss;
      "jsd": the generalised Jensen-Shannon divergence of weight `beta` in (0, 1), with m = beta p + (1-beta) q:
          beta KL(p || m) + (1-beta) KL(q || m), as TRL's GKD `generalized_jsd_loss`; bounded by the binary
          entropy of beta (log 2 at 0.5).
    Terms with a zero probability count 0 (0 log 0 = 0), so -inf teacher logits are safe in every kind.
    Non-contiguous logits are copied whole first; the model's own output is contiguous."""
    if kind not in KINDS:
        raise ValueError(f"kd_loss: kind must be one of {KINDS}, not {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"kd_loss: beta must be in (0, 1) for kind 'jsd', not {beta!r}")
    _check_temperature("kd_loss", temperature)
    if student_logits.dim() < 1 or tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape [..., vocab]")
    _check_float("kd_loss", student_logits=student_logits, teacher_logits=teacher_logits)
    vocab = student_logits.shape[-1]
    valid = _flat_mask("kd_loss", mask, student_logits)
    # under torch.no_grad autograd.Function still reports needs_input_grad: decide here, not in forward
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _KDLoss.apply(student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab), valid,
                         float(temperature), kind, float(beta), need_grad)


def topk_kd_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor, teacher_values: torch.Tensor,
                 temperature: float = 1.0, mask: torch.Tensor | None = None,
                 teacher_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL from a teacher cached as its top-k logits (offline distillation, DistillKit's sparse
    logits): the mean over counted positions of sum over the k entries of p~ (log p~ - log q), in fp32, not
    times T^2, where p~ = softmax(teacher_values / T) over the k entries (zero elsewhere) and
    log q = log_softmax(student_logits / T) over the FULL vocabulary.

    The renormalisation is one-sided on purpose: the truncated teacher is renormalised because its top-k is
    all we know of it, and the best estimate of where its mass goes; the student is not, so the mass it puts
    outside the teacher's top-k stays in the loss (log q_i shrinks as that mass grows) and is pushed down, as a
    full-vocabulary teacher would push it. Renormalising the student over the same k tokens would leave its
    other logits free. With k = V this is `kd_loss(..., kind="forward")`.

    `student_logits` [..., V] any float dtype, kept; `teacher_indices` [..., k] integer token ids (int32 or
    int64), distinct within a position (torch.topk's are; a repeated id would count that token twice);
    `teacher_values` [..., k] the teacher's logits there (fp16, bf16 or fp32); a cache that pads a position to k
    entries may give the padding -inf values (any index): they carry no probability. Gradient of the student
    logits: (q - p~ scattered over the vocabulary) / T.

    With `teacher_lse` [...] (the teacher's log sum exp(logits / T) over the whole vocabulary, as
    `python -m distill.cache` keeps it) nothing is renormalised: the teacher's top-k keep their true
    probabilities p_i = exp(v_i / T - lse) and the rest of its mass, p_tail = 1 - sum p_i, is one more category,
    matched by the student's mass outside those k tokens, Q_tail: the loss is the exact KL between the two
    distributions over k + 1 categories. A teacher whose top-k hold little of its mass (a flat teacher, a high
    T: the demo teacher's top-64 hold 13% at T = 2) is then not sharpened into another distribution.
    Gradient: (q_i - p_i) / T on the top-k, q_j (1 - p_tail / Q_tail) / T elsewhere."""
    _check_temperature("topk_kd_loss", temperature)
    lead = tuple(student_logits.shape[:-1])
    if (student_logits.dim() < 1 or teacher_indices.dim() != student_logits.dim()
            or tuple(teacher_indices.shape) != tuple(teacher_values.shape) or tuple(teacher_indices.shape[:-1]) != lead
            or teacher_indices.shape[-1] == 0):
        raise ValueError(f"topk_kd_loss: student logits {tuple(student_logits.shape)}, teacher indices "
                         f"{tuple(teacher_indices.shape)} and values {tuple(teacher_values.shape)} do not fit "
                         "([..., V], [..., k], [..., k], k >= 1)")
    index_dtype = teacher_indices.dtype
    if index_dtype.is_floating_point or index_dtype.is_complex or index_dtype == torch.bool:
        raise ValueError(f"topk_kd_loss: teacher_indices must be integer token ids, not {teacher_indices.dtype}")
    _check_float("topk_kd_loss", student_logits=student_logits, teacher_values=teacher_values)
    vocab, k = student_logits.shape[-1], teacher_indices.shape[-1]
    valid = _flat_mask("topk_kd_loss", mask, student_logits)
    if teacher_lse is not None and tuple(teacher_lse.shape) != lead:
        raise ValueError(f"topk_kd_loss: teacher_lse {tuple(teacher_lse.shape)} must be the logits' leading shape {lead}")
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _TopKKDLoss.apply(student_logits.reshape(-1, vocab), teacher_indices.reshape(-1, k),
                             teacher_values.detach().reshape(-1, k), valid, float(temperature), need_grad,
                             None if teacher_lse is None else teacher_lse.detach().reshape(-1).float())


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "cosine",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """A loss between hidden states [..., H] of the same width (project the student's first when the widths
    differ), in fp32: "cosine", the mean over counted positions of 1 - cos(s, t) (DistilBERT's cosine embedding
    loss: 0 for parallel vectors, 2 for opposite ones, 1 for a zero vector); "mse", the mean over counted
    positions of the mean over H of (s - t)^2. Plain autograd ([tokens, H] is small next to [tokens, vocab]);
    the gradient reaches both inputs where they require it."""
    if kind not in ("cosine", "mse"):
        raise ValueError(f"hidden_loss: kind must be 'cosine' or 'mse', not {kind!r}")
    if student_hidden.dim() < 1 or tuple(student_hidden.shape) != tuple(teacher_hidden.shape):
        raise ValueError(f"hidden_loss: student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same shape [..., H]")
    width = student_hidden.shape[-1]
    s, t = student_hidden.reshape(-1, width).float(), teacher_hidden.reshape(-1, width).float()
    valid = _flat_mask("hidden_loss", mask, student_hidden)
    if kind == "cosine":
        per_row = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        per_row = (s - t).square().mean(dim=-1)
    # where, not a product: a masked row's NaN would survive x 0
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)


def class_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) summed over the classes, mean over the batch, in fp32,
    not times T^2: a classifier's KD term for logits [B, C] (F.kl_div(..., log_target=True,
    reduction="batchmean") on the log-softmaxes, NaN-free where the teacher has a -inf logit)."""
    if student_logits.dim() != 2 or tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(f"class_kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must both be [batch, classes]")
    return kd_loss(student_logits, teacher_logits, temperature, kind="forward")


def _check_temperature(name: str, temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name}: temperature must be a finite number > 0, not {temperature!r}")


def _check_float(name: str, **tensors: torch.Tensor) -> None:
    for what, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{name}: {what} must be floating point, not {tensor.dtype}")


def _flat_mask(name: str, mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """The counted positions as a flat bool [rows]: `mask` True or nonzero (an attention mask's 1), None: all."""
    lead = tuple(logits.shape[:-1])
    if mask is None:
        return torch.ones(math.prod(lead), dtype=torch.bool, device=logits.device)
    if tuple(mask.shape) != lead:
        raise ValueError(f"{name}: mask {tuple(mask.shape)} must have the logits' leading shape {lead}")
    return mask.reshape(-1).to(device=logits.device) != 0


def _fp32_over(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in a new fp32 tensor (one temporary; `.float()` of fp32 logits is the caller's tensor itself)."""
    return logits.to(torch.float32, copy=True).div_(temperature)


def _row_sum(prob: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of prob x log_ratio, a zero probability's term 0 whatever its log ratio (the
    xlogy convention: 0 x -inf, 0 x inf and 0 x NaN would be NaN)."""
    return torch.where(prob > 0, prob * log_ratio, 0.0).sum(dim=-1)


def _softmax_grad(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """q (g - sum_k q_k g_k): d loss / d s through q = softmax(s) when d loss / d q = g (+ any constant per row,
    which this cancels); an entry of zero probability is 0 whatever its g (which may be +-inf there)."""
    g = torch.where(q > 0, g, 0.0)
    return q * (g - (q * g).sum(dim=-1, keepdim=True))


class _KDLoss(torch.autograd.Function):
    """`kd_loss`, a block of rows at a time (rows per block: BLOCK_ELEMENTS // vocab). Per block, with
    s = student / T and t = teacher / T in fp32, log q = log_softmax(s), log p = log_softmax(t), the loss per row
    and its gradient with respect to the student logits z (through q = softmax(z / T)):
      forward: sum p (log p - log q);              grad (q - p) / T
      reverse: sum q r, r = log q - log p;         grad q (r - sum q r) / T
      jsd:     beta sum p (log p - log m) + (1-beta) sum q (log q - log m), log m from logaddexp;
               grad q (g - sum q g) / T, g = (1-beta) (log q - log m)   (the p-terms' d/dq cancel the +1s)
    The gradient is scaled by 1 / (counted rows) (the mean) and 0 on masked rows, then cast into one tensor of
    the student's dtype, which is saved for backward."""

    @staticmethod
    def forward(ctx, student, teacher, valid, temperature, kind, beta, need_grad):
        rows, vocab = student.shape
        block = block_rows(vocab, student.device)
        count = valid.sum()
        # mean: each counted row's gradient is 1 / count, over T from the chain rule through z / T
        row_scale = valid.float() / (count.clamp(min=1).float() * temperature)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student) if need_grad else None
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            ok = valid[start:stop]
            log_q = torch.log_softmax(_fp32_over(student[start:stop], temperature), dim=-1)
            log_p = torch.log_softmax(_fp32_over(teacher[start:stop], temperature), dim=-1)
            if kind == "forward":
                p = log_p.exp()
                per_row = _row_sum(p, log_p - log_q)
                g = log_q.exp_().sub_(p) if need_grad else None  # q - p, in place of log q
            elif kind == "reverse":
                q = log_q.exp()
                ratio = log_q.sub_(log_p.clamp_(min=LOG_P_FLOOR))  # r, in place of log q
                per_row = _row_sum(q, ratio)
                g = _softmax_grad(q, ratio) if need_grad else None
            else:
                p, q = log_p.exp(), log_q.exp()
                # log(beta p + (1-beta) q) without 0 x -inf: finite wherever p > 0 or q > 0
                log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
                per_row = beta * _row_sum(p, log_p - log_m) + (1.0 - beta) * _row_sum(q, log_q - log_m)
                g = _softmax_grad(q, log_q.sub_(log_m).mul_(1.0 - beta)) if need_grad else None
            total += torch.where(ok, per_row, 0.0).sum()
            if g is not None:
                # where, not a product: a masked row's NaN (a fully -inf teacher row) would survive x 0
                g = torch.where(ok.unsqueeze(1), g * row_scale[start:stop].unsqueeze(1), 0.0)
                grad[start:stop] = g
        ctx.save_for_backward(grad)
        return total / count.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if grad is not None:  # in place: made for this backward alone (a second one needs retain_graph anyway)
            grad = grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None, None, None


class _TopKKDLoss(torch.autograd.Function):
    """`topk_kd_loss`, a block of rows at a time like `_KDLoss`: per block log q = log_softmax(student / T)
    over the vocabulary, log p~ = log_softmax(values / T) over the k entries, the loss sum p~ (log p~ - log q at
    the indices), the gradient (q - p~ scattered) / T in place of log q."""

    @staticmethod
    def forward(ctx, student, indices, values, valid, temperature, need_grad, lse=None):
        rows, vocab = student.shape
        block = block_rows(vocab, student.device)
        count = valid.sum()
        row_scale = valid.float() / (count.clamp(min=1).float() * temperature)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student) if need_grad else None
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            ok, idx = valid[start:stop], indices[start:stop].long()
            log_q = torch.log_softmax(_fp32_over(student[start:stop], temperature), dim=-1)
            if lse is None:  # the top-k renormalised
                log_p = torch.log_softmax(_fp32_over(values[start:stop], temperature), dim=-1)  # [block, k]
            else:  # their true probabilities; the tail is a category of its own
                log_p = _fp32_over(values[start:stop], temperature) - lse[start:stop].unsqueeze(1)
            p = log_p.exp()
            log_q_top = log_q.gather(1, idx)
            per_row = _row_sum(p, log_p - log_q_top)
            if lse is not None:
                # 1 - sum p carries the rounding of k fp32 terms (~1e-6): a tail below TAIL_FLOOR is none (k = V)
                p_tail = 1.0 - p.sum(dim=1)
                log_q_tail = torch.logsumexp(log_q.scatter(1, idx, float("-inf")), dim=1)  # exact, not 1 - sum
                p_tail = torch.where((p_tail > TAIL_FLOOR) & (log_q_tail > float("-inf")), p_tail, 0.0)
                per_row = per_row + torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-38).log() - log_q_tail), 0.0)
            total += torch.where(ok, per_row, 0.0).sum()
            if need_grad:
                if lse is None:
                    g = log_q.exp_().scatter_add_(1, idx, -p)  # q - p~, in place of log q
                else:  # q (1 - p_tail / Q_tail) everywhere, then q - p on the top-k
                    ratio = torch.where(p_tail > 0, p_tail / log_q_tail.exp().clamp(min=1e-30), 0.0)
                    g = log_q.exp_().mul_((1.0 - ratio).unsqueeze(1)).scatter_(1, idx, log_q_top.exp() - p)
                grad[start:stop] = torch.where(ok.unsqueeze(1), g * row_scale[start:stop].unsqueeze(1), 0.0)
        ctx.save_for_backward(grad)
        return total / count.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if grad is not None:
            grad = grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None, None, None
