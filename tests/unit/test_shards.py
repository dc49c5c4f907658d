"""Token shard format: dtype choice, atomic files, windows across shard boundaries, damage detection."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge import atomic
from lmforge.data.shards import FORMAT, ShardError, TokenShards, token_dtype, write_shard


def test_dtype_switches_at_65536():
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(8192) == np.uint16


def make_dataset(tmp_path, shards: list[list[list[int]]], dtype=np.uint16, eos=0) -> None:
    """shards: per shard, a list of documents (token lists without EOS)."""
    records = []
    for i, documents in enumerate(shards):
        tokens = np.array([t for d in documents for t in [*d, eos]], dtype=dtype)
        ends = np.cumsum([len(d) + 1 for d in documents]).astype(np.uint64)
        records.append(write_shard(tmp_path, "train", i, tokens, ends))
    atomic.write_json(tmp_path / "meta.json", {
        "format": FORMAT, "dtype": np.dtype(dtype).name,
        "tokenizer": {"vocab_size": 100, "eos_id": eos},
        "splits": {"train": {"shards": records}, "val": {"shards": []}}})


def test_windows_cross_shard_boundaries(tmp_path):
    make_dataset(tmp_path, [[[1, 2, 3]], [[4, 5], [6]], [[7, 8, 9, 10]]])
    data = TokenShards(tmp_path)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 0, 7, 8, 9, 10, 0]
    assert len(data) == len(stream) and data.num_documents == 4
    assert data.tokens(0, len(stream)).tolist() == stream
    assert data.num_windows(4) == 3  # (14 - 1) // 4
    for i in range(3):
        assert data.window(i, 4).tolist() == stream[i * 4:i * 4 + 5]
    assert data.document(2).tolist() == [6, 0] and data.document(3).tolist() == [7, 8, 9, 10, 0]
    with pytest.raises(IndexError):
        data.window(3, 4)
    assert TokenShards(tmp_path, "val").num_tokens == 0


def test_uint32_round_trip(tmp_path):
    make_dataset(tmp_path, [[[70_000, 1]]], dtype=np.uint32)
    data = TokenShards(tmp_path)
    assert data.dtype == np.uint32 and data.tokens(0, 3).tolist() == [70_000, 1, 0]
    assert (tmp_path / "train/000000.bin").stat().st_size == 12


def test_missing_meta_is_an_incomplete_run(tmp_path):
    (tmp_path / "chunks").mkdir()
    with pytest.raises(ShardError, match="has not finished: rerun `lmforge tokenize`"):
        TokenShards(tmp_path)


def test_truncated_shard_is_detected(tmp_path):
    make_dataset(tmp_path, [[[1, 2, 3]], [[4, 5]]])
    path = tmp_path / "train/000001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"000001\.bin: expected 6 bytes, found 4"):
        TokenShards(tmp_path)
    with pytest.raises(ShardError, match="no split 'test'"):
        make_dataset(tmp_path, [[[1]]])
        TokenShards(tmp_path, "test")
