"""Token shards on disk: the format `lmforge tokenize` writes and `pretrain` reads.

    DATA_DIR/meta.json            written last: its presence means the output is complete
    DATA_DIR/tokenizer/           Hugging Face tokenizer folder
    DATA_DIR/{train,val}/NNNNNN-KKK.bin   token ids, little-endian uint16 (vocab <= 65,536) or uint32
    DATA_DIR/{train,val}/NNNNNN-KKK.idx   uint64 end offset (in tokens, EOS included) of each document
    DATA_DIR/chunks/NNNNNN.json   per-unit completion record (resume reads these); NNNNNN-KKK.json for
                                  each shard of a unit of several (a large compressed file)

Shards are named by unit N and shard K within it (NNNNNN alone where the main process read the documents,
or for data tokenized before units existed); readers take the list and order from meta.json.

Every document is followed by the EOS id. Files are written under a temporary name and renamed,
so a crash leaves either a complete file or a `.tmp` one that nothing reads.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections import OrderedDict
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


def write_shard(out_dir: Path, split: str, name: int | str, tokens: np.ndarray, doc_ends: np.ndarray) -> dict:
    """Write one split's shard (tokens + document index) atomically; returns its record for meta.json."""
    stem = f"{split}/{name:06d}" if isinstance(name, int) else f"{split}/{name}"
    little = np.ascontiguousarray(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False))
    atomic.write_bytes(out_dir / f"{stem}.bin", little.data)
    atomic.write_bytes(out_dir / f"{stem}.idx", np.ascontiguousarray(doc_ends, dtype="<u8").data)
    return {"file": f"{stem}.bin", "tokens": int(tokens.size), "documents": int(doc_ends.size)}


def split_digest(meta: dict) -> str:
    """A digest of how the data was split into train/val and how much each holds: re-splitting changes
    which windows exist, and a resume across it would break "exactly once"."""
    import hashlib

    split = {"split": meta.get("config", {}).get("split"),
             "tokens": {s: v["tokens"] for s, v in meta["splits"].items()}}
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        hint = " (tokenization has not finished: rerun `lmforge tokenize` on its config to resume it)" \
            if (Path(data_dir) / "chunks").exists() else " (run `lmforge tokenize` first)"
        raise ShardError(f"{path}: not found{hint}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not a readable meta.json ({e}); is this an lmforge token folder?") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise ShardError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class TokenShards:
    """One split of a tokenized dataset, read through memory maps, as one global stream of tokens.

    `window(i, seq_len)` gives `seq_len + 1` tokens starting at token `i * seq_len` (inputs and
    shifted targets), crossing shard boundaries where needed. Nothing is loaded into memory.

    Built for corpora of tens of thousands of shards read by hundreds of ranks: construction reads
    only meta.json (sizes and document counts are recorded there), so it opens and stats no shard
    file; a `.bin` is mapped when first read, its size checked then, and at most `max_open` maps
    (one descriptor each) are held, least recently used closed first. `.idx` files are only read by
    `document()`, a few at a time. Reads return copies, so no caller's array pins a map.
    """

    IDX_CACHE = 8  # document indexes held in memory (8 bytes per document each); training reads none

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", max_open: int = 64):
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        if split not in self.meta["splits"]:
            raise ShardError(f"{self.dir}: no split '{split}' (have {list(self.meta['splits'])})")
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
        self.eos_id = int(self.meta["tokenizer"]["eos_id"])
        records = self.meta["splits"][split]["shards"]
        try:
            self._files = [str(r["file"]) for r in records]
            sizes = np.array([int(r["tokens"]) for r in records], dtype=np.int64)
            doc_counts = np.array([int(r["documents"]) for r in records], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{self.dir / 'meta.json'}: splits.{split}.shards has a record without a "
                             f"valid 'file', 'tokens' and 'documents' ({type(e).__name__}: {e}); the data "
                             "folder is damaged or from another tool (delete it and rerun `lmforge tokenize`)"
                             ) from None
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # global offset of each shard
        self._doc_starts = np.concatenate([[0], np.cumsum(doc_counts)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self.num_documents = int(self._doc_starts[-1])
        self.max_open = max_open
        self._maps: OrderedDict[int, tuple[np.ndarray, mmap.mmap | None]] = OrderedDict()  # shard: array, map
        self._idx: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # a prefetching thread may read while the main thread does

    def __len__(self) -> int:
        return self.num_tokens

    def _damaged(self, path: Path, expected: int, found) -> ShardError:
        return ShardError(f"{path}: expected {expected} bytes, found {found}; the data folder is damaged "
                          "(delete it and rerun `lmforge tokenize`)")

    def _shard(self, shard: int) -> np.ndarray:
        """Shard `shard`'s tokens, mapped on first use; the caller holds `self._lock`."""
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard][0]
        path = self.dir / self._files[shard]
        expected = int(self.starts[shard + 1] - self.starts[shard]) * self.dtype.itemsize
        try:
            with open(path, "rb") as f:
                found = os.fstat(f.fileno()).st_size  # checked here, not at construction: no stat storm
                if found != expected:
                    raise self._damaged(path, expected, found)
                # mmap cannot map an empty file; the map keeps its own descriptor, `f`'s closes here
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if expected else None
        except FileNotFoundError:
            raise self._damaged(path, expected, "missing") from None
        little = self.dtype.newbyteorder("<")  # the file's byte order (module doc)
        array = np.frombuffer(mapped, dtype=little) if mapped else np.empty(0, self.dtype)
        self._maps[shard] = (array, mapped)
        while len(self._maps) > self.max_open:
            self._evict(next(iter(self._maps)))  # the least recently used
        return array

    def _evict(self, shard: int) -> None:
        """Unmap shard `shard` and close its descriptor now, not whenever the garbage collector runs."""
        array, mapped = self._maps.pop(shard)
        del array  # it holds a buffer export of the map: the map can only close once it is gone
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:  # a view of it is still alive (reads return copies, so none should be):
                pass  # it unmaps when the last view goes

    def close(self) -> None:
        """Release every map and cached index (reading again reopens what it needs)."""
        with self._lock:
            for shard in list(self._maps):
                self._evict(shard)
            self._idx.clear()

    def __enter__(self) -> TokenShards:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def verify(self) -> None:
        """Check every shard file's size against meta.json (one stat per file; `ShardError` if damaged).

        Reading checks each shard when it is first mapped; this checks them all up front, for a
        caller that wants damage found before any work (one rank, not all of them: on a parallel
        filesystem, a stat per shard per rank is a metadata storm)."""
        for shard, file in enumerate(self._files):
            path = self.dir / file
            tokens = int(self.starts[shard + 1] - self.starts[shard])
            documents = int(self._doc_starts[shard + 1] - self._doc_starts[shard])
            expect = ((path, tokens * self.dtype.itemsize), (path.with_suffix(".idx"), 8 * documents))
            for p, expected in expect:
                try:
                    found = p.stat().st_size
                except FileNotFoundError:
                    found = "missing"
                if found != expected:
                    raise self._damaged(p, expected, found)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Global tokens [start, stop) as a new array (native byte order)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside 0..{self.num_tokens}")
        out = np.empty(stop - start, dtype=self.dtype)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        with self._lock:
            while pos < stop:
                lo, hi = pos - self.starts[shard], min(stop, self.starts[shard + 1]) - self.starts[shard]
                out[pos - start:pos - start + hi - lo] = self._shard(shard)[lo:hi]
                pos += hi - lo
                shard += 1
        return out

    def num_windows(self, seq_len: int) -> int:
        """How many `seq_len + 1`-token windows fit, stepping `seq_len` tokens (no overlap of targets)."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def window(self, index: int, seq_len: int) -> np.ndarray:
        if not 0 <= index < self.num_windows(seq_len):
            raise IndexError(f"window {index} outside 0..{self.num_windows(seq_len) - 1} (seq_len {seq_len})")
        return self.tokens(index * seq_len, index * seq_len + seq_len + 1)

    def _ends(self, shard: int) -> np.ndarray:
        """Shard `shard`'s document end offsets, read whole on first use; the caller holds `self._lock`."""
        if shard in self._idx:
            self._idx.move_to_end(shard)
            return self._idx[shard]
        path = (self.dir / self._files[shard]).with_suffix(".idx")
        count = int(self._doc_starts[shard + 1] - self._doc_starts[shard])
        try:
            ends = np.fromfile(path, dtype="<u8")
        except FileNotFoundError:
            raise self._damaged(path, count * 8, "missing") from None
        if ends.size != count:
            raise self._damaged(path, count * 8, path.stat().st_size)
        self._idx[shard] = ends
        while len(self._idx) > self.IDX_CACHE:
            self._idx.popitem(last=False)
        return ends

    def document(self, index: int) -> np.ndarray:
        """Document `index` (global), its trailing EOS included."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} outside 0..{self.num_documents - 1}")
        shard = int(np.searchsorted(self._doc_starts, index, side="right")) - 1
        local = index - self._doc_starts[shard]
        with self._lock:
            ends = self._ends(shard)
            start = int(ends[local - 1]) if local > 0 else 0
            return self._shard(shard)[start:int(ends[local])].copy()
