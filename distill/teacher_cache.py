"""The teacher cache as the student reads it (`python -m distill.cache` writes it; distill/cache.py): its
layout, its identity (which teacher, which windows) and `TeacherCache`, the reader the student's loop uses.

    OUT_DIR/meta.json               written last: its presence = complete
    OUT_DIR/train/shard-NNNNN.idx   token ids, [windows, seq_len, top_k] row-major, little-endian uint16
                                    (vocab <= 65,536) or int32
    OUT_DIR/train/shard-NNNNN.val   their logits, same shape: fp16, bf16 (its uint16 bits) or fp32
    OUT_DIR/train/shard-NNNNN.lse   log sum exp(logits / temperature) over the whole vocabulary, [windows, seq_len]
                                    float32: with it the top-k's true probabilities, and the mass beyond them, are known
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lmforge import checkpoint as ckpt
from lmforge.data.shards import split_digest

FORMAT = "lmforge-teacher-cache/2"  # 2: the log-normaliser per position (.lse)
SPLIT = "train"  # the student's evaluation scores itself on val: it needs no teacher there
LSE_DTYPE = np.dtype("<f4")  # the log-normaliser per position
KINDS = ("idx", "val", "lse")  # a shard's files
VALUE_DTYPES = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp32": np.dtype("<f4")}  # as stored on disk


class CacheError(Exception):
    """A teacher cache that is missing, incomplete, damaged, or built from another teacher or other data."""


def index_dtype(vocab_size: int) -> np.dtype:
    """The stored dtype of the token ids: uint16 up to 65,536 ids, else int32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def shard_windows(shard: int, windows: int, per_shard: int) -> range:
    """The window indices shard `shard` holds."""
    return range(shard * per_shard, min((shard + 1) * per_shard, windows))


def teacher_identity(folder: Path) -> dict:
    """What identifies a teacher, as `python -m distill` records it: its config's and its weights' digests."""
    from transformers import AutoConfig

    return {"config": ckpt.config_digest(AutoConfig.from_pretrained(folder)), "weights": ckpt.weights_digest(folder)}


def data_identity(meta: dict, seq_len: int) -> dict:
    """What identifies the windows a cache covers: the token shards' source and split (their meta.json), and
    seq_len. The cache and the student's stage both build it here, so they compare the same thing."""
    return {"source_fingerprint": meta["source_fingerprint"], "split_digest": split_digest(meta),
            "seq_len": int(seq_len)}


def differences(saved: dict, want: dict) -> list[str]:
    """How a cache's identity `saved` differs from `want` (keys teacher, data, and optionally top_k, dtype,
    windows_per_shard; a key absent from `want` or None there is not compared), in words."""
    out = []
    teacher, have = want.get("teacher"), saved.get("teacher") or {}
    if teacher is not None and (have.get("config"), have.get("weights")) != (teacher["config"], teacher["weights"]):
        out.append(f"built from another teacher (config {have.get('config')}, weights {have.get('weights')}; this "
                   f"teacher's: config {teacher['config']}, weights {teacher['weights']})")
    data, have = want.get("data"), saved.get("data") or {}
    if data is not None:
        keys = ("source_fingerprint", "split_digest")
        if any(have.get(k) != data[k] for k in keys):
            out.append("built from other data (" + ", ".join(f"{k} {have.get(k)} vs {data[k]}" for k in keys
                                                               if have.get(k) != data[k]) + ")")
        if saved.get("seq_len") != data["seq_len"]:
            out.append(f"built for another seq_len ({saved.get('seq_len')}, not {data['seq_len']})")
    for key, what in (("top_k", "another top_k"), ("dtype", "another value dtype"),
                      ("windows_per_shard", "another windows_per_shard")):
        if want.get(key) is not None and saved.get(key) != want[key]:
            out.append(f"built with {what} ({saved.get(key)}, not {want[key]})")
    return out


class TeacherCache:
    """A finished cache (its meta.json exists), read by window index: `rows(windows)` gives the teacher's top-k
    indices (int64) and values (float32), [len(windows), seq_len, top_k] each.

    Nothing is read at construction but meta.json; a shard's file is memory-mapped when first read, its size
    checked then (a short or missing file is a CacheError naming it), and at most `max_open` maps (one file
    descriptor each; a shard has two files) are held, the least recently used closed first. Rows are copies: no
    caller's tensor pins a map. Thread-safe (a prefetching thread may read while the loop does)."""

    def __init__(self, folder: str | os.PathLike, seq_len: int, max_open: int = 32):
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.dir = Path(folder)
        path = self.dir / "meta.json"
        if not path.is_file():
            hint = (" (it was not finished: rerun `python -m distill.cache` on its config to complete it)"
                    if (self.dir / "state.json").is_file() else " (write it with `python -m distill.cache`)")
            raise CacheError(f"{self.dir}: not a finished teacher cache, no meta.json{hint}")
        try:
            self.meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"{path}: unreadable ({type(e).__name__}: {e}); rewrite the cache") from None
        if self.meta.get("format") != FORMAT:
            raise CacheError(f"{path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if self.meta["seq_len"] != seq_len:
            raise CacheError(f"{self.dir}: built for another seq_len ({self.meta['seq_len']}, not {seq_len}); "
                             f"set data.seq_len={self.meta['seq_len']} or write a cache for {seq_len}")
        self.seq_len, self.top_k = int(seq_len), int(self.meta["top_k"])
        self.num_windows, self.per_shard = int(self.meta["windows"]), int(self.meta["windows_per_shard"])
        self.index_dtype = np.dtype(self.meta["index_dtype"]).newbyteorder("<")
        self.value_kind = self.meta["dtype"]
        self.value_dtype = VALUE_DTYPES[self.value_kind]
        self.max_open = max_open
        self._maps: OrderedDict[tuple[int, str], tuple[np.ndarray, mmap.mmap]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, teacher_id: dict | None, data_identity: dict) -> None:
        """CacheError naming what differs when this cache was built from another teacher (`teacher_id` as
        `teacher_identity` gives it; None: not checked), other data or another seq_len (`data_identity`)."""
        found = differences(self.meta, {"teacher": teacher_id, "data": data_identity})
        if found:
            raise CacheError(f"the teacher cache {self.dir} was {'; '.join(found)}; write a cache for this teacher "
                             "and data (`python -m distill.cache`, another out_dir) or point data.cache at it")

    def __len__(self) -> int:
        return self.num_windows

    def verify(self) -> None:
        """Every shard file present with its size (one directory listing: a look at the shared filesystem for
        rank 0 before a run starts, so that a damaged cache stops every rank at once, not one rank mid-run)."""
        sizes = {e.name: e.stat().st_size for e in os.scandir(self.dir / SPLIT) if e.is_file()}
        for shard in range((self.num_windows + self.per_shard - 1) // self.per_shard):
            rows = len(shard_windows(shard, self.num_windows, self.per_shard))
            for kind in KINDS:
                dtype, width = self._layout(kind)
                name, expected = f"{shard_name(shard)}.{kind}", rows * self.seq_len * width * dtype.itemsize
                if sizes.get(name) != expected:
                    raise CacheError(f"{self.dir / SPLIT / name}: " + (
                        "missing" if name not in sizes else f"expected {expected} bytes, found {sizes[name]}")
                        + "; the teacher cache is damaged (delete that shard's two files and rerun `python -m "
                          "distill.cache` on its config)")

    @property
    def open_maps(self) -> int:
        return len(self._maps)

    def _array(self, shard: int, kind: str) -> np.ndarray:
        """Shard `shard`'s `kind` ("idx" or "val") file as [windows, seq_len, top_k]; caller holds the lock."""
        key = (shard, kind)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key][0]
        path = self.dir / SPLIT / f"{shard_name(shard)}.{kind}"
        rows = len(shard_windows(shard, self.num_windows, self.per_shard))
        dtype, width = self._layout(kind)
        expected = rows * self.seq_len * width * dtype.itemsize
        try:
            with open(path, "rb") as f:
                found = os.fstat(f.fileno()).st_size
                if found != expected:
                    raise CacheError(f"{path}: expected {expected} bytes, found {found}; the teacher cache is "
                                     "damaged (delete that shard's two files and rerun `python -m distill.cache`)")
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # keeps its own descriptor
        except FileNotFoundError:
            raise CacheError(f"{path}: missing; the teacher cache is damaged (rerun `python -m distill.cache` on "
                             "its config)") from None
        array = np.frombuffer(mapped, dtype=dtype).reshape((rows, self.seq_len, width)[:3 if kind != "lse" else 2])
        self._maps[key] = (array, mapped)
        while len(self._maps) > self.max_open:
            self._evict(next(iter(self._maps)))
        return array

    def _evict(self, key: tuple[int, str]) -> None:
        array, mapped = self._maps.pop(key)
        del array  # a buffer export of the map: it must go before the map can close
        try:
            mapped.close()
        except BufferError:  # a view is still alive (rows are copies, so none should be): it unmaps with it
            pass

    def close(self) -> None:
        with self._lock:
            for key in list(self._maps):
                self._evict(key)

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _layout(self, kind: str) -> tuple[np.dtype, int]:
        """A file kind's element dtype and its values per position (top_k, or one log-normaliser)."""
        return {"idx": (self.index_dtype, self.top_k), "val": (self.value_dtype, self.top_k),
                "lse": (LSE_DTYPE, 1)}[kind]

    def lse(self, windows: list[int]) -> torch.Tensor:
        """The teacher's log-normaliser at the cache's temperature at every input position of `windows`: float32
        [len(windows), seq_len]. With the top-k logits it gives their true probabilities and the tail's mass."""
        out = np.empty((len(windows), self.seq_len), dtype=LSE_DTYPE)
        with self._lock:
            for row, w in enumerate(windows):
                shard, local = divmod(self._window(w), self.per_shard)
                out[row] = self._array(shard, "lse")[local]
        return torch.from_numpy(out.astype(np.float32))

    def _window(self, w) -> int:
        w = int(w)
        if not 0 <= w < self.num_windows:
            raise CacheError(f"window {w} is outside the teacher cache {self.dir} (0..{self.num_windows - 1})")
        return w

    def rows(self, windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k at every input position of `windows` (window indices of the train split):
        indices int64 and values float32, each [len(windows), seq_len, top_k], values sorted largest first."""
        n = len(windows)
        idx = np.empty((n, self.seq_len, self.top_k), dtype=self.index_dtype)
        val = np.empty((n, self.seq_len, self.top_k), dtype=self.value_dtype)
        with self._lock:
            for row, w in enumerate(windows):
                shard, local = divmod(self._window(w), self.per_shard)
                idx[row] = self._array(shard, "idx")[local]
                val[row] = self._array(shard, "val")[local]
        indices = torch.from_numpy(idx.astype(np.int64))
        if self.value_kind == "bf16":  # bf16 is the top half of an fp32
            values = torch.from_numpy((val.astype(np.uint32) << 16).view(np.float32))
        else:
            values = torch.from_numpy(val.astype(np.float32))
        return indices, values
