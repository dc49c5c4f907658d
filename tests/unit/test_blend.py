"""Several token folders blended by weight: shares, exactly-once per source epoch, resume, one tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmforge.data.blend import BLOCK, Blend, schedule, slots
from lmforge.data.sampler import WindowSampler
from lmforge.data.shards import FORMAT, ShardError, TokenShards, write_shard


def folder(path: Path, n_tokens: int, base: int, tokenizer: str = "tok-a") -> Path:
    """A token folder whose train token i is `base + i` (so a window tells its source) and a small val split."""
    from lmforge import atomic

    train = (base + np.arange(n_tokens)).astype(np.uint32)
    val = (base + np.arange(400)).astype(np.uint32)
    shards = {"train": [write_shard(path, "train", 0, train, np.array([n_tokens], dtype=np.uint64))],
              "val": [write_shard(path, "val", 0, val, np.array([400], dtype=np.uint64))]}
    atomic.write_json(path / "meta.json", {
        "format": FORMAT, "dtype": "uint32", "source_fingerprint": f"fp-{base}", "config": {"split": {}},
        "tokenizer": {"vocab_size": 10_000_000, "eos_id": 0, "hash": tokenizer, "eos_token": "<e>", "path": "t"},
        "splits": {s: {"tokens": int(sum(x["tokens"] for x in v)), "documents": 1, "shards": v}
                   for s, v in shards.items()}})
    return path


def test_one_folder_is_the_plain_window_order(tmp_path):
    a = folder(tmp_path / "a", 5001, 0)
    blend, plain = Blend([(a, 1.0)], seq_len=10, seed=3), WindowSampler(TokenShards(a, "train"), 10, 3)
    positions = list(range(0, 2000, 7))
    assert (blend.batch(positions) == plain.batch(positions)).all()  # a run made before blends resumes the same
    # and that order is still the one every earlier run used: epoch e is default_rng([seed, e]).permutation
    for epoch in (0, 3):
        expected = np.random.default_rng([3, epoch]).permutation(500)
        assert [blend.locate(p)[1] % 500 for p in range(500 * epoch, 500 * epoch + 5)] == list(range(5))
        assert [blend.orders[0].item_at(500 * epoch + i) for i in range(500)] == expected.tolist()


def test_shares_follow_the_weights_and_each_source_reads_each_window_once_per_epoch(tmp_path):
    a, b = folder(tmp_path / "a", 20_001, 0), folder(tmp_path / "b", 3_001, 1_000_000)
    blend = Blend([(a, 0.7), (b, 0.3)], seq_len=10, seed=5)
    assert blend.windows == [2000, 300]
    n = 6000
    located = [blend.locate(p) for p in range(n)]
    sources = np.array([s for s, _ in located])
    for prefix in (100, 1000, n):  # within 1% of the weight over a run, and already early in it
        assert abs(np.mean(sources[:prefix] == 1) - 0.3) < 0.01, prefix
    running = np.cumsum(sources == 1) - 0.3 * np.arange(1, n + 1)
    assert np.abs(running).max() <= 1.0  # the greedy schedule: never more than one window off its share
    assert blend.consumed(n) == [int((sources == 0).sum()), int((sources == 1).sum())]
    # source b (300 windows) is read 6 times over: each of its epochs holds every window exactly once
    b_items = [blend.orders[1].item_at(k) for s, k in located if s == 1]
    for e in range(len(b_items) // 300):
        assert sorted(b_items[300 * e:300 * (e + 1)]) == list(range(300))
    assert b_items[:300] != b_items[300:600]  # a new order each epoch
    rows = blend.batch(range(40)).numpy()
    assert ((rows[:, 0] >= 1_000_000) == (sources[:40] == 1)).all()  # the row comes from the source located
    assert (np.diff(rows, axis=1) == 1).all()


def test_resume_at_any_position_continues_the_same_stream(tmp_path):
    a, b = folder(tmp_path / "a", 20_001, 0), folder(tmp_path / "b", 3_001, 1_000_000)
    whole = Blend([(a, 0.7), (b, 0.3)], seq_len=10, seed=5).batch(range(BLOCK - 20, BLOCK + 20))
    again = Blend([(a, 0.7), (b, 0.3)], seq_len=10, seed=5).batch(range(BLOCK - 20, BLOCK + 20))
    assert (whole == again).all()  # a pure function of the position, across a block boundary too


def test_slots_and_schedule_cover_the_block():
    counts = slots([0.5, 0.3, 0.2, 1e-9])
    assert counts.sum() == BLOCK and counts[-1] == 1  # a tiny weight still gets a slot
    for weights in ([0.9999] + [1e-6] * 100, [2**15, 2**15 - 1, 0.5, 0.5]):  # raising them once took slots back
        counts = slots(weights)
        assert counts.sum() == BLOCK and counts.min() >= 1, weights
    source, before = schedule(np.array([3, 1]))
    assert source.tolist() == [0, 0, 1, 0]  # the source furthest behind its share goes next
    assert [b for s, b in zip(source, before, strict=True) if s == 0] == [0, 1, 2]


def test_a_blend_needs_one_tokenizer_and_enough_data(tmp_path):
    a, b = folder(tmp_path / "a", 5001, 0), folder(tmp_path / "b", 5001, 10_000, tokenizer="tok-b")
    with pytest.raises(ShardError, match=r"b was tokenized with another tokenizer \(hash tok-b\)"):
        Blend([(a, 0.5), (b, 0.5)], seq_len=10, seed=0)
    c = folder(tmp_path / "c", 5, 20_000)
    with pytest.raises(ShardError, match="fewer than one window"):
        Blend([(a, 0.5), (c, 0.5)], seq_len=10, seed=0)


def test_the_eval_set_shares_windows_by_weight(tmp_path):
    a, b = folder(tmp_path / "a", 5001, 0), folder(tmp_path / "b", 5001, 1_000_000)
    blend = Blend([(a, 3), (b, 1)], seq_len=10, seed=0)
    items = blend.eval_set(16)
    assert sum(s == 0 for s, _ in items) == 12 and sum(s == 1 for s, _ in items) == 4
    assert blend.val_window(items[-1])[0] >= 1_000_000
    assert blend.fingerprint() != Blend([(a, 1), (b, 1)], seq_len=10, seed=0).fingerprint()  # weights count
    assert blend.fingerprint() == Blend([(a, 0.75), (b, 0.25)], seq_len=10, seed=0).fingerprint()  # normalised
