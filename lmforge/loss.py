"""The language-model loss: cross entropy over the vocabulary without fp32 [tokens, vocab] tensors.

`F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())` holds several [tokens, vocab] fp32
tensors at the start of backward: the fp32 copy of bf16 logits, the saved log-softmax, and in backward
the gradient of the log-softmax and of the logits (GPT-2's 50,257-token vocabulary at micro 16 x 1024:
3.3 GB each). `token_loss` computes the same loss with DeepSpeed's chunked cross entropy
(`engine.cross_entropy_rows`): it keeps the logits in their own dtype and one fp32 log-sum-exp per token,
and in backward writes the gradient straight into one tensor of the logits' dtype, working through the
rows a block at a time (a Triton kernel on CUDA).
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
