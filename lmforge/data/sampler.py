"""The order in which training windows are read: global, seeded, and free of ranks.

Windows are the `seq_len + 1`-token slices of the train split that `TokenShards.window` returns. Epoch
`e` visits every window once in the order of a permutation seeded by (seed, e). A run's position is
one integer, the number of windows consumed so far by all ranks together; step `k` consumes the
global batch at positions [k x G, (k + 1) x G), and rank `r` of `W` takes its micro-batches out of
that range. Nothing depends on the rank count but the slicing, so a resume on another world size
continues in the same global order, with no window seen twice or skipped.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.shards import ShardError, TokenShards


class WindowSampler:
    def __init__(self, data: TokenShards, seq_len: int, seed: int):
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.num_windows = data.num_windows(seq_len)
        if self.num_windows < 1:
            raise ShardError(f"{data.dir}: the {data.split} split has {data.num_tokens:,} tokens, fewer than one "
                             f"window of data.seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of window indices for `epoch` (memory: 4 or 8 bytes per window)."""
        if epoch != self._epoch:
            dtype = np.uint32 if self.num_windows < 2**32 else np.int64
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._epoch = rng.permutation(self.num_windows).astype(dtype, copy=False), epoch
        return self._order

    def window_at(self, position: int) -> int:
        """The window index read at global `position` (positions run on across epochs)."""
        epoch, offset = divmod(position, self.num_windows)
        return int(self.order(epoch)[offset])

    def rank_positions(self, step_start: int, micro: int, accum: int, rank: int, world: int, micro_step: int
                       ) -> range:
        """Global positions of rank `rank`'s micro-batch `micro_step` within the step starting at `step_start`."""
        first = step_start + micro_step * micro * world + rank * micro
        return range(first, first + micro)

    def batch(self, positions) -> torch.Tensor:
        """(len(positions), seq_len + 1) int64 token ids: inputs are [:, :-1], targets [:, 1:]."""
        rows = [self.data.window(self.window_at(p), self.seq_len) for p in positions]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def eval_windows(data: TokenShards, seq_len: int, count: int) -> list[int]:
    """`count` window indices spread evenly over a split (fewer if the split is short): a fixed eval set."""
    total = data.num_windows(seq_len)
    if total < 1:
        raise ShardError(f"{data.dir}: the {data.split} split has {data.num_tokens:,} tokens, fewer than one "
                         f"window of {seq_len + 1}; hold out more validation data (split.val_fraction)")
    return sorted({int(i) for i in np.linspace(0, total - 1, min(count, total))})
