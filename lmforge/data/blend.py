"""Several token folders read as one training stream, each by its weight (Megatron's `--data-path 0.7 A 0.3 B`).

The order stays global and rank-free: a run's position is still one integer. Positions are cut into blocks of
`BLOCK` items; inside a block every source has its fixed number of slots (its weight x BLOCK, rounded so they sum
to BLOCK), spread by a greedy schedule that keeps each source's running share within one item of its weight at
every point of the block. Position p is block p // BLOCK, slot p % BLOCK: the slot says the source s and how many
of s's items came before it, k. Source s reads its k-th item in its own seeded epoch-by-epoch order, so within
each source's epoch every window is read exactly once (a small source with a large weight starts its next epoch
sooner: it is repeated, a large one with a small weight is not read to its end). Any position maps to its item in
O(1), so a resume, on any number of ranks, continues exactly where the run stopped.

One folder with weight 1 is the plain `WindowSampler` order, window for window.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from lmforge.data.sampler import GlobalOrder, eval_windows
from lmforge.data.shards import ShardError, TokenShards, read_meta, split_digest

BLOCK = 65_536  # slots per schedule block: each source's share is its weight to within 1/(2 x BLOCK)


def slots(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Each source's slots per block: proportional to its weight, at least one, summing to `block`."""
    if len(weights) > block // 2:
        raise ShardError(f"a blend of {len(weights)} sources: at most {block // 2} (each needs a slot per block)")
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    raw = w * block
    counts = np.maximum(np.floor(raw).astype(np.int64), 1)
    while counts.sum() < block:  # largest remainders first
        counts[int(np.argmax(raw - counts))] += 1
    while counts.sum() > block:  # raising tiny weights to one slot overshot: take from those that keep one
        counts[int(np.argmax(np.where(counts > 1, counts - raw, -np.inf)))] -= 1
    return counts


def schedule(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source of each slot, how many slots of that source precede it in the block): the greedy order that
    always serves the source furthest behind its share."""
    block = int(counts.sum())
    share = counts / block
    taken = np.zeros(len(counts), dtype=np.int64)
    source = np.empty(block, dtype=np.int32)
    before = np.empty(block, dtype=np.int64)
    for o in range(block):
        s = int(np.argmax(share * (o + 1) - taken))
        source[o], before[o] = s, taken[s]
        taken[s] += 1
    return source, before


def vocabulary(folder: Path) -> str:
    """The identity of a token folder's vocabulary (its tokenizer/tokenizer.json, canonically), or its meta hash."""
    from lmforge.tokenizer import vocabulary_hash

    try:
        return vocabulary_hash(Path(folder) / "tokenizer")
    except FileNotFoundError:
        return read_meta(folder)["tokenizer"]["hash"]


class Blend:
    """The training windows of one or more token folders, blended by weight; checks that they share a tokenizer."""

    def __init__(self, parts: list[tuple[Path, float]], seq_len: int, seed: int):
        self.paths = [Path(p) for p, _ in parts]
        self.weights = [float(w) for _, w in parts]
        self.seq_len, self.seed = seq_len, seed
        self.metas = [read_meta(p) for p in self.paths]
        first = self.metas[0]["tokenizer"]
        for path, meta in zip(self.paths[1:], self.metas[1:], strict=True):
            # the vocabulary decides (a tokenizer saved twice may differ in its tokenizer_config.json)
            if (vocabulary(path), meta["tokenizer"]["eos_id"]) != (vocabulary(self.paths[0]), first["eos_id"]):
                raise ShardError(f"{path} was tokenized with another tokenizer (hash {meta['tokenizer']['hash']}) "
                                 f"than {self.paths[0]} ({first['hash']}): a blend needs one tokenizer; tokenize both "
                                 "with the same `tokenizer.pretrained`")
        self.train = [TokenShards(p, "train") for p in self.paths]
        self.val = [TokenShards(p, "val") for p in self.paths]
        self.windows = [t.num_windows(seq_len) for t in self.train]
        for path, shards, n in zip(self.paths, self.train, self.windows, strict=True):
            if n < 1:
                raise ShardError(f"{path}: the train split has {shards.num_tokens:,} tokens, fewer than one window of "
                                 f"data.seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")
        # source 0 keeps the single-folder order (stream 0): one folder blends to exactly the WindowSampler's order
        self.orders = [GlobalOrder(n, seed, stream=i) for i, n in enumerate(self.windows)]
        self.counts = slots(self.weights) if len(parts) > 1 else np.array([BLOCK])
        self.source, self.before = schedule(self.counts) if len(parts) > 1 else (None, None)

    @property
    def meta(self) -> dict:
        return self.metas[0]

    def locate(self, position: int) -> tuple[int, int]:
        """(source, its own item count) read at global `position`."""
        if self.source is None:
            return 0, position
        block, slot = divmod(position, BLOCK)
        s = int(self.source[slot])
        return s, block * int(self.counts[s]) + int(self.before[slot])

    def consumed(self, position: int) -> list[int]:
        """Items each source has given in positions [0, position)."""
        block, slot = divmod(position, BLOCK)
        out = self.counts * block
        if self.source is not None and slot:
            out = out + np.bincount(self.source[:slot], minlength=len(self.counts))
        elif self.source is None:
            out = np.array([position])
        return [int(x) for x in out]

    rank_positions = staticmethod(GlobalOrder.rank_positions)

    def batch(self, positions) -> torch.Tensor:
        """(len(positions), seq_len + 1) int64 token ids: inputs are [:, :-1], targets [:, 1:]."""
        rows = []
        for p in positions:
            s, k = self.locate(p)
            rows.append(self.train[s].window(self.orders[s].item_at(k), self.seq_len))
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def eval_set(self, count: int) -> list[tuple[int, int]]:
        """A fixed validation set, (source, window), `count` windows shared by weight (at least one per source with
        a val split), each source's spread evenly over its split."""
        total = sum(self.weights)
        out = []
        for s, val in enumerate(self.val):
            if val.num_windows(self.seq_len) < 1 and len(self.val) > 1:
                continue  # too little validation text in this source: the others are evaluated
            share = count if len(self.val) == 1 else max(1, round(count * self.weights[s] / total))
            out += [(s, w) for w in eval_windows(val, self.seq_len, share)]
        if not out:
            raise ShardError("no source has a validation split of at least one window; hold out more text")
        return out

    def val_window(self, item: tuple[int, int]) -> np.ndarray:
        s, w = item
        return self.val[s].window(w, self.seq_len)

    # -- what a resume checks and lineage records: one folder keeps its own values ------------------

    def fingerprint(self) -> str:
        if len(self.paths) == 1:
            return self.meta["source_fingerprint"]
        total = sum(self.weights)  # normalised: weights 7 and 3 are the blend 0.7 and 0.3
        parts = [[m["source_fingerprint"], round(w / total, 9)] for m, w in zip(self.metas, self.weights, strict=True)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    def split_digest(self) -> str:
        if len(self.paths) == 1:
            return split_digest(self.meta)
        return hashlib.sha256(" ".join(split_digest(m) for m in self.metas).encode()).hexdigest()[:16]

    def train_tokens(self) -> int:
        return sum(m["splits"]["train"]["tokens"] for m in self.metas)

    def describe(self, positions_in_run: int) -> list[dict]:
        """Each source: path, weight, train tokens and windows, and the epochs of it a run of this many positions
        reads."""
        total = sum(self.weights)
        out = []
        for s, (path, meta) in enumerate(zip(self.paths, self.metas, strict=True)):
            share = self.weights[s] / total
            out.append({"path": str(path), "weight": round(share, 6), "train_tokens": meta["splits"]["train"]["tokens"],
                        "train_windows": self.windows[s],
                        "epochs": round(positions_in_run * share / self.windows[s], 3)})
        return out
