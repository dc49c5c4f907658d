"""Token shards on disk: the format `lmforge tokenize` writes and `pretrain` reads.

    DATA_DIR/meta.json            written last: its presence means the output is complete
    DATA_DIR/tokenizer/           Hugging Face tokenizer folder
    DATA_DIR/{train,val}/NNNNNN.bin   token ids, little-endian uint16 (vocab <= 65,536) or uint32
    DATA_DIR/{train,val}/NNNNNN.idx   uint64 end offset (in tokens, EOS included) of each document
    DATA_DIR/chunks/NNNNNN.json   per-shard completion record (resume reads these)

Every document is followed by the EOS id. Files are written under a temporary name and renamed,
so a crash leaves either a complete file or a `.tmp` one that nothing reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lmforge import atomic

FORMAT = "lmforge-tokens/1"
SPLITS = ("train", "val")


class ShardError(Exception):
    """Token data that is missing, incomplete or inconsistent; the message says what to rerun."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(out_dir: Path, split: str, index: int, tokens: np.ndarray, doc_ends: np.ndarray) -> dict:
    """Write one split's shard (tokens + document index) atomically; returns its record for meta.json."""
    stem = f"{split}/{index:06d}"
    little = np.ascontiguousarray(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False))
    atomic.write_bytes(out_dir / f"{stem}.bin", little.data)
    atomic.write_bytes(out_dir / f"{stem}.idx", np.ascontiguousarray(doc_ends, dtype="<u8").data)
    return {"file": f"{stem}.bin", "tokens": int(tokens.size), "documents": int(doc_ends.size)}


def read_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        hint = " (tokenization has not finished: rerun `lmforge tokenize` on its config to resume it)" \
            if (Path(data_dir) / "chunks").exists() else " (run `lmforge tokenize` first)"
        raise ShardError(f"{path}: not found{hint}")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ShardError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class TokenShards:
    """One split of a tokenized dataset, memory-mapped, as one global stream of tokens.

    `window(i, seq_len)` gives `seq_len + 1` tokens starting at token `i * seq_len` (inputs and
    shifted targets), crossing shard boundaries where needed. Nothing is loaded into memory.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        if split not in self.meta["splits"]:
            raise ShardError(f"{self.dir}: no split '{split}' (have {list(self.meta['splits'])})")
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
        self.eos_id = int(self.meta["tokenizer"]["eos_id"])
        self._tokens, self._ends = [], []
        for shard in self.meta["splits"][split]["shards"]:
            path = self.dir / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.exists() or path.stat().st_size != expected:
                size = path.stat().st_size if path.exists() else "missing"
                raise ShardError(f"{path}: expected {expected} bytes, found {size}; the data folder is damaged "
                                 "(delete it and rerun `lmforge tokenize`)")
            self._tokens.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self._ends.append(np.memmap(path.with_suffix(".idx"), dtype="<u8", mode="r"))
        sizes = [t.size for t in self._tokens]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # global offset of each shard
        doc_counts = [e.size for e in self._ends]
        self._doc_starts = np.concatenate([[0], np.cumsum(doc_counts)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self.num_documents = int(self._doc_starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Global tokens [start, stop) as one array (a copy only when it spans shards)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside 0..{self.num_tokens}")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, pos = [], start
        for shard in range(max(first, 0), len(self._tokens)):
            if pos >= stop:
                break
            lo, hi = pos - self.starts[shard], min(stop, self.starts[shard + 1]) - self.starts[shard]
            pieces.append(self._tokens[shard][lo:hi])
            pos = self.starts[shard] + hi
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def num_windows(self, seq_len: int) -> int:
        """How many `seq_len + 1`-token windows fit, stepping `seq_len` tokens (no overlap of targets)."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def window(self, index: int, seq_len: int) -> np.ndarray:
        if not 0 <= index < self.num_windows(seq_len):
            raise IndexError(f"window {index} outside 0..{self.num_windows(seq_len) - 1} (seq_len {seq_len})")
        return self.tokens(index * seq_len, index * seq_len + seq_len + 1)

    def document(self, index: int) -> np.ndarray:
        """Document `index` (global), its trailing EOS included."""
        shard = int(np.searchsorted(self._doc_starts, index, side="right")) - 1
        local = index - self._doc_starts[shard]
        ends = self._ends[shard]
        start = int(ends[local - 1]) if local > 0 else 0
        return self._tokens[shard][start:int(ends[local])]
