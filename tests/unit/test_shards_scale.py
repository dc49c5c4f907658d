"""Token data at real scale: thousands of shards read under a low descriptor limit, maps bounded by the LRU.

Eager mapping held two maps (and two descriptors) per shard and split in every rank: ~1 B tokens of 16 MiB
shards passed `ulimit -n 1024`, ~250 GB of text passed `vm.max_map_count`. 2,000 shards under
RLIMIT_NOFILE=256 is the same failure, small.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from lmforge import atomic
from lmforge.data.shards import FORMAT, write_shard

from ..conftest import ROOT

SHARDS = 2000
MAX_OPEN = 16
READER = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    from lmforge.data.sampler import GlobalOrder
    from lmforge.data.shards import TokenShards

    data_dir, max_open, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    expected = np.load(os.path.join(os.path.dirname(data_dir), "stream.npy"))

    def shard_maps():
        with open("/proc/self/maps") as f:
            return sum(data_dir in line for line in f)

    base_fds = len(os.listdir("/proc/self/fd"))
    data = TokenShards(data_dir, "train", max_open=max_open)
    val = TokenShards(data_dir, "val", max_open=max_open)
    most_fds, most_maps, windows = 0, 0, data.num_windows(seq)
    assert data.num_tokens == expected.size
    assert windows * seq + 1 > data.starts[-2]  # the last window reaches into the last shard
    # every window in order (every shard, every boundary), then all again in a seeded global order
    order = GlobalOrder(windows, seed=3)
    for i in [*range(windows), *(order.item_at(p) for p in range(windows))]:
        row = data.window(i, seq)
        assert (row == expected[i * seq:i * seq + seq + 1]).all(), i
        if i % 7 == 0:
            most_fds = max(most_fds, len(os.listdir("/proc/self/fd")) - base_fds)
            most_maps = max(most_maps, shard_maps())
    assert val.window(0, seq).size == seq + 1
    docs = [data.document(d) for d in range(0, data.num_documents, 97)]
    assert all(d[-1] == 0 for d in docs)
    after = shard_maps()
    data.close(), val.close()
    print(json.dumps({"windows": windows, "most_fds": most_fds, "most_maps": most_maps,
                      "maps_before_close": after, "maps_after_close": shard_maps(),
                      "fds_after_close": len(os.listdir("/proc/self/fd")) - base_fds}))
""")


def write_corpus(root, monkeypatch) -> np.ndarray:
    """2,000 shards of 2 to 12 tokens (1 to 3 documents of 2 to 4 tokens, EOS 0 included) and a meta.json
    like `tokenize`'s; returns the concatenated train tokens."""
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: None)  # 4,000 fsyncs of nothing this test needs
    rng = np.random.default_rng(0)
    records, pieces = [], []
    for i in range(SHARDS):
        docs = [[*rng.integers(1, 500, size=rng.integers(1, 4)), 0] for _ in range(rng.integers(1, 4))]
        tokens = np.array([t for d in docs for t in d], dtype=np.uint16)
        ends = np.cumsum([len(d) for d in docs]).astype(np.uint64)
        records.append(write_shard(root, "train", i, tokens, ends))
        pieces.append(tokens)
    val = np.array([5, 6, 7, 0] * 8, dtype=np.uint16)
    splits = {"train": records, "val": [write_shard(root, "val", 0, val, np.array([val.size], np.uint64))]}
    atomic.write_json(root / "meta.json", {
        "format": FORMAT, "dtype": "uint16", "source_fingerprint": "scale-v1",
        "tokenizer": {"vocab_size": 512, "eos_id": 0, "hash": "tiny", "eos_token": "<|endoftext|>"},
        "splits": {s: {"shards": v, "tokens": sum(r["tokens"] for r in v),
                       "documents": sum(r["documents"] for r in v)} for s, v in splits.items()}})
    stream = np.concatenate(pieces)
    np.save(root.parent / "stream.npy", stream)
    return stream


def test_two_thousand_shards_read_under_256_descriptors_with_bounded_maps(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    stream = write_corpus(data_dir, monkeypatch)
    seq = 7  # windows of 8 tokens over shards of 1 to 12: many start in one shard and end two shards later
    run = subprocess.run([sys.executable, "-c", READER, str(data_dir), str(MAX_OPEN), str(seq)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["windows"] == (stream.size - 1) // seq
    # one descriptor and one mapping per open shard (train and val each hold their own LRU)
    assert 0 < got["most_fds"] <= MAX_OPEN + 1 and got["fds_after_close"] <= 0, got
    assert 0 < got["most_maps"] <= MAX_OPEN + 1 and got["maps_after_close"] == 0, got
