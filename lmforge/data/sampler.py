"""The order in which training items are read: global, seeded, and free of ranks.

`GlobalOrder` is the order over any number of items (pretraining windows, fine-tuning examples).
Epoch `e` visits every item once in the order of a permutation seeded by (seed, e). A run's position
is one integer, the number of items consumed so far by all ranks together; step `k` consumes the
global batch at positions [k x G, (k + 1) x G), and rank `r` of `W` takes its micro-batches out of
that range. Nothing depends on the rank count but the slicing, so a resume on another world size
continues in the same global order, with no item seen twice or skipped.

`WindowSampler` is the pretraining case: the items are the `seq_len + 1`-token slices of the train
split that `TokenShards.window` returns.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.shards import ShardError, TokenShards


class GlobalOrder:
    """A seeded, epoch-by-epoch permutation of `num_items` items, addressed by global position."""

    def __init__(self, num_items: int, seed: int, stream: int = 0):
        """`stream` tells apart orders drawn with one seed (the sources of a blend); stream 0 is the plain order."""
        if num_items < 1:
            raise ValueError(f"GlobalOrder needs at least one item, got {num_items}")
        self.num_items, self.seed, self.stream = int(num_items), seed, stream
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of item indices for `epoch` (memory: 4 bytes per item, 8 past 2**32 items).

        The same permutation as `default_rng([seed, epoch]).permutation(num_items)` (which shuffles an
        `arange` the same way), built in the narrow dtype: no int64 copy of the whole order on the way."""
        if epoch != self._epoch:
            order = np.arange(self.num_items, dtype=np.uint32 if self.num_items < 2**32 else np.int64)
            np.random.default_rng([self.seed, epoch] + ([self.stream] if self.stream else [])).shuffle(order)
            self._order, self._epoch = order, epoch
        return self._order

    def epoch_of(self, position: int) -> int:
        """The epoch that global `position` falls in (positions run on across epochs)."""
        return position // self.num_items

    def item_at(self, position: int) -> int:
        """The item index read at global `position`."""
        epoch, offset = divmod(position, self.num_items)
        return int(self.order(epoch)[offset])

    @staticmethod
    def rank_positions(step_start: int, micro: int, accum: int, rank: int, world: int, micro_step: int
                       ) -> range:
        """Global positions of rank `rank`'s micro-batch `micro_step` in the step starting at `step_start`.

        A step covers `micro x accum x world` positions; micro-step `m` covers the `micro x world` of them
        that follow the earlier micro-steps', rank by rank. `accum` fixes the step's size, not the slice."""
        first = step_start + micro_step * micro * world + rank * micro
        return range(first, first + micro)


class WindowSampler:
    def __init__(self, data: TokenShards, seq_len: int, seed: int):
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.num_windows = data.num_windows(seq_len)
        if self.num_windows < 1:
            raise ShardError(f"{data.dir}: the {data.split} split has {data.num_tokens:,} tokens, fewer than one "
                             f"window of data.seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")
        self.global_order = GlobalOrder(self.num_windows, seed)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of window indices for `epoch` (memory: 4 or 8 bytes per window)."""
        return self.global_order.order(epoch)

    def window_at(self, position: int) -> int:
        """The window index read at global `position` (positions run on across epochs)."""
        return self.global_order.item_at(position)

    rank_positions = staticmethod(GlobalOrder.rank_positions)

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
