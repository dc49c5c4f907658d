"""The language-model loss: cross entropy over the vocabulary without fp32 [tokens, vocab] tensors.

`F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())` holds several [tokens, vocab] fp32
tensors at the start of backward: the fp32 copy of bf16 logits, the saved log-softmax, and in backward
the gradient of the log-softmax and of the logits (GPT-2's 50,257-token vocabulary at micro 16 x 1024:
3.3 GB each). `token_loss` computes the same loss with DeepSpeed's chunked cross entropy
(`engine.cross_entropy_rows`): it keeps the logits in their own dtype and one fp32 log-sum-exp per token,
and in backward writes the gradient straight into one tensor of the logits' dtype, working through the
rows a block at a time (a Triton kernel on CUDA).

`lm_loss` goes one step further where the model allows it: the logits are never materialised at all. The
model returns its last hidden states and `head_loss` projects and scores them a block of rows at a time,
computing both gradients in the same pass (GPT-2 124M at micro 4 x 1024: no 0.82 GB fp32 logits, and no
gradient of them).
"""

from __future__ import annotations

import torch

from lmforge import engine

# Rows per block of the torch backend (CPU): about this many fp32 elements (2 MiB) per temporary, whatever
# the vocabulary (GPT-2: 10 rows), so a block stays in a core's L2 cache. Measured on the demo model's shapes
# (2,048 x 8,192, one thread): forward + backward 98.5 ms at 2 MiB, 211 ms at 32 MiB, 155 ms for
# F.cross_entropy. DeepSpeed's default block is 2^26 elements (256 MiB). CUDA's Triton kernel ignores it.
BLOCK_ELEMENTS = 1 << 19


def token_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
               reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of next-token `logits` [batch, seq, vocab] (any leading shape; any float dtype, kept)
    against `targets` [batch, seq] (integer ids), in fp32, as `F.cross_entropy(logits.float(), ...)` gives
    it, with the same gradient. `reduction`: "mean" over the targets that are not `ignore_index` (NaN when
    every one is, like torch), or "sum" (evaluation, token-normalised losses). Pass contiguous logits (the
    model's own output is): a sliced view would be copied whole first."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"token_loss: reduction must be 'mean' or 'sum', not {reduction!r}")
    if logits.dim() < 2 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"token_loss: logits {tuple(logits.shape)} must be targets' shape + [vocab], targets are "
                         f"{tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"token_loss: targets must be integer token ids, not {targets.dtype}")
    vocab = logits.shape[-1]
    return engine.cross_entropy_rows(logits.reshape(-1, vocab), targets.reshape(-1).long(), ignore_index,
                                     reduction, block_rows=max(1, BLOCK_ELEMENTS // vocab))


# Model types whose logits are exactly `get_output_embeddings()(last hidden state)`: no bias, no soft-capping,
# no logit scale (Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling would be
# silently lost). Any other model keeps the logits path (`token_loss` over the model's own logits).
FUSED_HEAD_MODELS = frozenset({"llama", "gpt2", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3"})


def lm_loss(model, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
            reduction: str = "mean") -> torch.Tensor:
    """The next-token loss of a causal LM (a DeepSpeed engine or the bare transformers model) on `input_ids`
    [batch, seq] against `targets` [batch, seq], without the [tokens, vocab] logits where it can: the model
    returns its last hidden states (`logits_to_keep` keeps none) and `head_loss` projects and scores them a
    block of rows at a time. Same loss and gradients as `token_loss(model(input_ids).logits, targets)`, which
    it falls back to for models outside `FUSED_HEAD_MODELS` and for an output layer partitioned by ZeRO-3
    (its weight exists only inside its own forward)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the transformers model
    head = module.get_output_embeddings()
    fused = (module.config.model_type in FUSED_HEAD_MODELS and isinstance(head, torch.nn.Linear)
             and head.bias is None and not engine.is_partitioned(head.weight))
    if not fused:
        return token_loss(model(input_ids=input_ids, use_cache=False).logits, targets, ignore_index, reduction)
    none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=none)
    return head_loss(out.hidden_states[-1], head.weight, targets, ignore_index, reduction)


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
              reduction: str = "mean") -> torch.Tensor:
    """`token_loss(hidden @ weight.T, targets)` for `hidden` [..., H], `weight` [vocab, H], `targets` [...],
    holding only one block of logits at a time (fp32 temporaries of about hidden's own size). The gradients of
    `hidden` and `weight` are computed in the same pass when autograd needs them (no second projection in
    backward: the same FLOPs as the plain path), the weight's accumulated in fp32."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"head_loss: reduction must be 'mean' or 'sum', not {reduction!r}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head_loss: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets "
                         f"{tuple(targets.shape)} do not fit ([..., H], [vocab, H], [...])")
    return _HeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(),
                           ignore_index, reduction == "mean")


MIN_BLOCK_ROWS = 256  # rows of a fused block, at least: smaller matmuls re-read the [vocab, H] weight for little work


class _HeadLoss(torch.autograd.Function):
    """The projection and the cross entropy fused, a block of rows at a time (Liger's fused linear cross
    entropy, written for CPU and GPU in plain torch). Rows per block: tokens x H / vocab, so a block's logits
    are about as big as the hidden states, and at least MIN_BLOCK_ROWS so each matmul is a real GEMM (GPT-2,
    4,096 tokens: 256 rows, 51 MB fp32, against 0.82 GB for the whole logits)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, mean):
        rows, vocab = hidden.shape[0], weight.shape[0]
        block = max(MIN_BLOCK_ROWS, -(-rows * hidden.shape[1] // vocab))
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != ignore_index
        count = valid.sum()
        # mean: each token's gradient is 1/count (NaN with no counted token, as F.cross_entropy's loss)
        scale = 1.0 / count.clamp(min=1).float() if mean else torch.ones((), device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, rows, block):
            h, t, ok = hidden[start:start + block], targets[start:start + block], valid[start:start + block]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(ok, lse - picked, 0.0).sum()
            if not grads:
                continue
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(t), device=t.device)[ok], t[ok]] -= 1.0
            probs.mul_((ok.float() * scale).unsqueeze(1))  # ignored rows: no gradient
            g = probs.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + block] = g @ weight
            if grad_weight is not None:  # fp32 weights: accumulated in place, no [vocab, H] temporary per block
                grad_weight.addmm_(g.t(), h) if g.dtype == torch.float32 else grad_weight.add_(g.t() @ h)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count if mean else total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        # in place: these were made for this backward alone (a second one would need retain_graph anyway)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_out.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_out).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
