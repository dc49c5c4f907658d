"""The LR schedule and the global, rank-free order of windows and of any items."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.data.sampler import GlobalOrder, WindowSampler, eval_windows
from lmforge.data.shards import ShardError, TokenShards
from lmforge.schedule import lr_at


def test_warmup_then_cosine_to_min_lr():
    lrs = [lr_at(s, 100, 1.0, 0.1, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup, never 0
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # then decays monotonically
    assert lrs[-1] == pytest.approx(0.1) and lr_at(54, 100, 1.0, 0.1, 10) == pytest.approx(0.55 + 0.45 * np.cos(np.pi * 45 / 90), rel=1e-6)


def test_wsd_holds_then_decays_linearly_and_constant_holds():
    lrs = [lr_at(s, 100, 1.0, 0.0, 10, "wsd", 0.2) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70
    assert lrs[80] == pytest.approx(1 - 1 / 20) and lrs[99] == pytest.approx(0.0)
    assert lr_at(99, 100, 1.0, 0.0, 10, "constant") == 1.0


def make_shards(tmp_path, n_tokens: int) -> TokenShards:
    from lmforge import atomic
    from lmforge.data.shards import FORMAT, write_shard

    tokens = np.arange(n_tokens, dtype=np.uint32)  # each token is its own position
    half = n_tokens // 2
    shards = [write_shard(tmp_path, "train", i, tokens[s], np.array([len(tokens[s])], dtype=np.uint64))
              for i, s in enumerate((slice(0, half), slice(half, None)))]
    atomic.write_json(tmp_path / "meta.json", {
        "format": FORMAT, "dtype": "uint32", "tokenizer": {"vocab_size": 70000, "eos_id": 0},
        "splits": {"train": {"shards": shards}, "val": {"shards": []}}})
    return TokenShards(tmp_path, "train")


def test_every_window_once_per_epoch_in_an_order_no_world_size_changes(tmp_path):
    data = make_shards(tmp_path, 1001)
    sampler = WindowSampler(data, seq_len=10, seed=7)
    assert sampler.num_windows == 100
    epoch = [sampler.window_at(p) for p in range(100)]
    assert sorted(epoch) == list(range(100)) and epoch != list(range(100))
    assert [sampler.window_at(p) for p in range(100, 200)] != epoch  # a new permutation each epoch
    for world, micro, accum in ((1, 4, 4), (2, 2, 4), (4, 4, 1), (8, 1, 2)):
        global_batch = micro * accum * world
        if 16 % global_batch:
            continue
        positions = [p for step_start in range(0, 48, 16) for r in range(world) for m in range(accum)
                     for p in sampler.rank_positions(step_start, micro, accum, r, world, m)]
        assert sorted(positions) == list(range(48)), (world, micro, accum)  # each position exactly once
    x = sampler.batch(range(3))
    assert x.shape == (3, 11) and (x[:, 1:] - x[:, :-1] == 1).all()  # windows are contiguous tokens
    assert x[0, 0] == epoch[0] * 10


def test_too_little_data_is_a_clear_error(tmp_path):
    data = make_shards(tmp_path, 12)
    with pytest.raises(ShardError, match="fewer than one window"):
        WindowSampler(data, seq_len=64, seed=0)
    assert eval_windows(make_shards(tmp_path / "b", 1001), 10, 8) == [0, 14, 28, 42, 56, 70, 84, 99]


def test_window_order_is_the_seeded_permutation_resumed_runs_depend_on(tmp_path):
    sampler = WindowSampler(make_shards(tmp_path, 1001), seq_len=10, seed=7)
    for epoch in (0, 1, 5):  # the permutation checkpoints of earlier versions were trained in
        want = np.random.default_rng([7, epoch]).permutation(100)
        assert sampler.order(epoch).dtype == np.uint32 and sampler.order(epoch).tolist() == want.tolist()
        assert [sampler.window_at(epoch * 100 + p) for p in range(100)] == want.tolist()


def global_items(order: GlobalOrder, steps: int, micro: int, accum: int, world: int) -> list[list[int]]:
    """Per step, the items all ranks read, micro-step by micro-step and within one rank by rank."""
    size = micro * accum * world
    return [[order.item_at(p) for m in range(accum) for r in range(world)
             for p in order.rank_positions(k * size, micro, accum, r, world, m)] for k in range(steps)]


@pytest.mark.parametrize("num_items", [48, 37])  # a whole number of steps per epoch, and epochs mid-step
def test_global_order_reads_every_item_once_per_epoch_whatever_the_world_size(num_items):
    order = GlobalOrder(num_items, seed=11)
    steps = 3 * num_items // 8 + 1  # global batch 8: a little over three epochs
    by_world = {world: global_items(order, steps, micro, accum, world)
                for world, micro, accum in ((1, 2, 4), (2, 2, 2), (4, 1, 2), (8, 1, 1))}
    for world, per_step in by_world.items():
        # the same multiset each step on every world size (the order within a step is the slicing's)
        assert [sorted(s) for s in per_step] == [sorted(s) for s in by_world[1]], world
        read = [i for s in per_step for i in s]
        for e in range(3):  # positions run on across epochs: epoch e is positions [e N, (e + 1) N)
            assert sorted(read[e * num_items:(e + 1) * num_items]) == list(range(num_items)), (world, e)
    read = [order.item_at(p) for p in range(3 * num_items)]
    epochs = [read[e * num_items:(e + 1) * num_items] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(num_items))  # reshuffled per epoch
    assert [order.epoch_of(p) for p in (0, num_items - 1, num_items, 3 * num_items - 1)] == [0, 0, 1, 2]
    assert epochs[2] == GlobalOrder(num_items, seed=11).order(2).tolist()  # resumable: a fresh object agrees
    assert GlobalOrder(num_items, seed=12).order(0).tolist() != epochs[0]
    with pytest.raises(ValueError, match="at least one item"):
        GlobalOrder(0, seed=0)
