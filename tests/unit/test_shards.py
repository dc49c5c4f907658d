"""Token shard format: dtype choice, atomic files, windows across shard boundaries, damage detection."""

from __future__ import annotations

import json

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


def test_truncated_shard_is_detected_when_first_read(tmp_path):
    make_dataset(tmp_path, [[[1, 2, 3]], [[4, 5]]])
    path = tmp_path / "train/000001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    data = TokenShards(tmp_path)  # construction reads meta.json only: no stat per shard on every rank
    assert data.window(0, 3).tolist() == [1, 2, 3, 0]  # the intact shard still reads
    with pytest.raises(ShardError, match=r"000001\.bin: expected 6 bytes, found 4; the data folder is dama"):
        data.tokens(3, 6)
    with pytest.raises(ShardError, match=r"000001\.bin: expected 6 bytes, found 4"):
        data.verify()  # the up-front check, for one rank to run before any work
    path.unlink()
    with pytest.raises(ShardError, match=r"000001\.bin: expected 6 bytes, found missing"):
        TokenShards(tmp_path).tokens(0, 6)
    with pytest.raises(ShardError, match="no split 'test'"):
        make_dataset(tmp_path, [[[1]]])
        TokenShards(tmp_path, "test")


def test_damaged_index_and_meta_records_are_clear_errors(tmp_path):
    make_dataset(tmp_path, [[[1, 2], [3]]])
    idx = tmp_path / "train/000000.idx"
    idx.write_bytes(idx.read_bytes()[:8])
    data = TokenShards(tmp_path)
    assert data.window(0, 4).tolist() == [1, 2, 0, 3, 0]  # training never reads .idx
    with pytest.raises(ShardError, match=r"000000\.idx: expected 16 bytes, found 8"):
        data.document(0)
    with pytest.raises(ShardError, match=r"000000\.idx: expected 16 bytes, found 8"):
        data.verify()
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["splits"]["train"]["shards"][0]["documents"]
    atomic.write_json(tmp_path / "meta.json", meta)
    with pytest.raises(ShardError, match=r"meta\.json: splits\.train\.shards has a record without a valid"):
        TokenShards(tmp_path)


def test_construction_opens_no_shard_file_and_reads_pin_no_map(tmp_path):
    make_dataset(tmp_path, [[[1, 2, 3]], [[4, 5], [6]], [[7, 8, 9, 10]]])
    hidden = tmp_path.with_name(tmp_path.name + "-hidden")
    (tmp_path / "train").rename(hidden)  # sizes and document counts come from meta.json alone
    data = TokenShards(tmp_path, max_open=2)
    assert (data.num_tokens, data.num_documents, data.starts.tolist()) == (14, 4, [0, 4, 9, 14])
    hidden.rename(tmp_path / "train")
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 0, 7, 8, 9, 10, 0]
    held = [data.tokens(0, 14), data.window(0, 4), data.document(1)]  # callers may keep these for good
    for _ in range(3):  # over and over through a 2-map LRU: every shard is evicted and remapped
        assert [data.tokens(i, i + 1)[0] for i in (13, 0, 5)] == [0, 1, 5]
    assert len(data._maps) == 2
    assert held[0].tolist() == stream and held[1].tolist() == stream[:5] and held[2].tolist() == [4, 5, 0]
    held[0][0] = 99  # a copy: writing it changes nothing on disk
    assert data.tokens(0, 1).tolist() == [1]
    data.close()
    assert not data._maps and data.document(3).tolist() == [7, 8, 9, 10, 0]  # reads reopen what they need
