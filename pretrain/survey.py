"""The survey of `lmforge tokenize`: the pass over the corpus before the tokenizer exists, run by the workers
over their own units (or by the main process over what it reads, for Hugging Face datasets and `reading: main`).

It finds, from each document's content hash alone:
- the tokenizer's training sample: train documents taken in the order of a hash independent of the split's
  (`sample_fraction`) until `sample_bytes`: uniform, order-free, deterministic, never fitted to validation text;
- the cut that holds out exactly `split.val_docs` documents (the smallest split positions);
- under `dedup: exact`, which documents repeat an earlier one (decided in corpus order).

Each unit sends back little: its documents' dedup keys (8 bytes each, only under `dedup: exact`), its
`val_docs` smallest positions, and the sample candidates below the current sample limit (the key of the first
document that did not fit so far: nothing above it can join). The main process merges these; the limit falls as
the sample fills, so a corpus T times larger than the sample sends about (1 + ln T) samples' worth of text in all.
Units sent before the sample has filled get a seed limit (4 x sample_bytes over the input's bytes) so that the
first wave does not carry whole units of text; if the seed was too low to fill the sample (text much smaller
than its files), the survey runs again with a higher one. The result is the same for any unit boundaries: the
main process's own reading and the workers' give the same sample, cut and duplicates.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge import atomic
from lmforge.data.sources import doc_hash


@dataclass(frozen=True)
class Wants:
    """What a survey collects (sent with each unit to the workers)."""

    sample_bytes: int  # the tokenizer's sample cap in UTF-8 bytes; 0 when no tokenizer is trained
    val_fraction: float  # documents below this split position are validation: never sampled (when val_docs is 0)
    val_docs: int  # hold out exactly this many documents (0: the split is val_fraction)
    dedup: bool  # decide exact duplicates

    @property
    def per_doc(self) -> int:
        """A document counts in the sample with at most this many bytes: 1% of the cap (a tenth, up to 1 MiB, for
        small caps), so one huge document can neither fill the sample nor push it past the cap."""
        cap = self.sample_bytes
        return max(cap // 100, min(cap // 10, 2**20))


def dedup_key(digest: bytes) -> int:
    """What `dedup: exact` compares: 8 bytes of a document's hash (a first false duplicate is unlikely below ~1e9
    documents). The same bytes as the sample key: identical documents share both."""
    return int.from_bytes(digest[8:16], "little")


def position(digest: bytes) -> int:
    """A document's split position as an integer: `hash_fraction` is this over 2**64."""
    return int.from_bytes(digest[:8], "big")


def survey_docs(texts: Iterable[str], wants: Wants, limit: int, val_limit: int = 2**64,
                sample_only: bool = False) -> dict:
    """One unit's part of the survey, over its documents in order. `limit`: sample keys at or above it are not
    sent (sample keys are `sample_fraction` x 2**64, and equal for identical documents, like dedup keys);
    `val_limit`: nor positions at or above it (once val_docs are held, only smaller ones can change the cut);
    `sample_only`: only the sample's candidates (a survey again with a higher seed)."""
    keys, positions, candidates = [], [], []  # candidates: (sample key, place in the unit, position, text)
    count = 0
    for i, text in enumerate(texts):
        count += 1
        data = text.encode("utf-8")
        digest = doc_hash(data)
        pos = position(digest)
        if wants.dedup and not sample_only:
            keys.append(dedup_key(digest))
        if wants.val_docs:
            if pos < val_limit and not sample_only:
                positions.append(pos)
        elif pos / 2**64 < wants.val_fraction:  # as hash_fraction compares
            continue  # a validation document: never in the sample
        key = int.from_bytes(digest[8:16], "big")
        if wants.sample_bytes and key < limit:
            if len(data) > wants.per_doc:  # cut at a character boundary
                text = data[:wants.per_doc].decode("utf-8", errors="ignore")
            candidates.append((key, i, pos, text))
    keys = np.array(keys, dtype=np.uint64) if wants.dedup and not sample_only else None
    batch = {"count": 0 if sample_only else count, "keys": keys,
             "val": smallest(np.array(positions, dtype=np.uint64), wants.val_docs, wants.dedup)}
    candidates.sort()
    if wants.dedup:  # one copy of a document in the unit's prefix (the first: places break the key's ties)
        candidates = [c for j, c in enumerate(candidates) if j == 0 or c[0] != candidates[j - 1][0]]
    total = 0
    for j, (_, _, _, text) in enumerate(candidates):  # the unit's own prefix up to the cap, and the one past it
        total += len(text.encode("utf-8"))
        if total > wants.sample_bytes:
            candidates = candidates[:j + 1]
            break
    batch["sample"] = candidates
    return batch


def smallest(values: np.ndarray, k: int, distinct: bool) -> np.ndarray:
    """The k smallest of `values`, sorted; each value once when `distinct` (identical documents share a position:
    val_docs counts distinct documents under dedup). Sorting and a neighbour mask: np.unique is ~40x slower."""
    values = np.sort(values)
    if distinct and values.size:
        values = values[np.concatenate(([True], values[1:] != values[:-1]))]
    return values[:k]


class Seen:
    """The dedup keys seen so far, as sorted uint64 runs merged like a binary counter: 8 bytes per distinct
    document (a Python set of ints takes ~96) and vectorised lookups, log2(documents) runs at most."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(r.size for r in self.runs)

    def drops(self, keys: np.ndarray) -> np.ndarray:
        """The places of `keys` (one unit's, in order) that repeat an earlier key, this unit's included; the new
        keys join."""
        unique, first = np.unique(keys, return_index=True)  # sorted, with each key's first place in the unit
        known = np.zeros(unique.size, dtype=bool)
        for run in self.runs:
            at = np.searchsorted(run, unique).clip(max=run.size - 1)
            known |= run[at] == unique
        keep = np.zeros(keys.size, dtype=bool)
        keep[first[~known]] = True
        fresh = unique[~known]
        if fresh.size:
            self.runs.append(fresh)
            while len(self.runs) > 1 and self.runs[-1].size * 8 >= self.runs[-2].size:
                # a stable sort is timsort here: a linear merge of the two sorted runs
                self.runs[-2:] = [np.sort(np.concatenate(self.runs[-2:]), kind="stable")]
        return np.flatnonzero(~keep)


@dataclass
class Survey:
    """The main process's side: merges the units' batches into the sample, the val cut and the duplicates. The
    sample and the val positions merge in any order (a slow unit does not hold the others back); the dedup keys
    in unit order (`keys`), the first copy of a document being the one kept. Memory: the sample's candidates
    (up to ~2 x sample_bytes of text, plus ~150 bytes per candidate), 2 x val_docs positions, and under dedup 8
    bytes per distinct document."""

    wants: Wants
    limit: int = 2**64  # sample keys at or above this are not wanted (the seed, then the first that did not fit)
    seed: int = 2**64
    count: int = 0  # documents, duplicates not counted under dedup
    overflowed: bool = False  # the sample filled: the limit is the boundary, not the seed
    received: int = 0  # bytes of sample candidates received
    drops: dict[int, np.ndarray] = field(default_factory=dict)  # unit -> places of its documents that repeat
    val: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    val_pending: list = field(default_factory=list)
    val_pending_size: int = 0
    val_batch: int = 2**16  # val positions gathered before they merge (and lower val_limit)
    kept: list = field(default_factory=list)  # (key, unit, place, position, bytes, text), sorted
    pending: list = field(default_factory=list)
    pending_bytes: int = 0
    seen: Seen = field(default_factory=Seen)

    @property
    def val_limit(self) -> int:
        """Positions at or above this cannot move the cut (val_docs smaller ones are held already)."""
        w = self.wants
        return int(self.val[-1]) if w.val_docs and self.val.size == w.val_docs else 2**64

    def add(self, unit: int, batch: dict) -> None:
        """One unit's sample candidates, val positions and document count: in any order."""
        w = self.wants
        self.count += batch["count"]
        if w.val_docs and batch["val"].size:
            below = batch["val"][batch["val"] < self.val_limit]
            if below.size:
                self.val_pending.append(below)
                self.val_pending_size += below.size
            if self.val_pending_size >= max(w.val_docs, self.val_batch) or len(self.val_pending) >= 1024:
                self._merge_val()
        for key, place, pos, text in batch["sample"]:
            if key < self.limit:
                size = len(text.encode("utf-8"))
                self.pending.append((key, unit, place, pos, size, text))
                self.pending_bytes += size
                self.received += size
        if self.pending_bytes > max(w.sample_bytes, 2**20):
            self._compact()

    def keys(self, unit: int, keys: np.ndarray) -> None:
        """One unit's dedup keys: in unit order."""
        self.drops[unit] = self.seen.drops(keys)
        self.count -= self.drops[unit].size

    def _merge_val(self) -> None:
        if self.val_pending:
            self.val = smallest(np.concatenate([self.val, *self.val_pending]), self.wants.val_docs, self.wants.dedup)
        self.val_pending, self.val_pending_size = [], 0

    def _compact(self) -> None:
        """Merge what came in into the sample: the longest prefix in key order (corpus order breaking ties) within
        sample_bytes; the first candidate that does not fit sets the limit."""
        merged = sorted(self.kept + self.pending)
        self.pending, self.pending_bytes = [], 0
        if self.wants.dedup:
            merged = [c for j, c in enumerate(merged) if j == 0 or c[0] != merged[j - 1][0]]
        total = 0
        for j, entry in enumerate(merged):
            total += entry[4]
            if total > self.wants.sample_bytes:
                self.overflowed = True
                self.limit = min(self.limit, entry[0])
                merged = merged[:j]
                break
        self.kept = merged

    def complete(self) -> bool:
        """Whether the sample is exact: it filled (every unit sent everything below the final limit), or no seed
        cut anything. Otherwise `again()` and survey the sample once more."""
        self._compact()
        self._merge_val()
        return not self.wants.sample_bytes or self.overflowed or self.seed >= 2**64

    def again(self) -> None:
        """Start the sample over with a seed that should fill it (twice the bytes it lacked); the count, the cut and
        the duplicates stay."""
        grown = self.seed * 2 * self.wants.sample_bytes / max(self.received, 1)
        self.seed = 2**64 if grown >= 2**63 else max(int(grown), self.seed * 2)
        self.limit, self.received, self.kept, self.pending, self.pending_bytes = self.seed, 0, [], [], 0

    def val_cut(self) -> float:
        """The split position below which exactly `val_docs` documents lie (the next float after the largest held
        out), or val_fraction."""
        self._merge_val()
        if not self.wants.val_docs:
            return self.wants.val_fraction
        return float(np.nextafter(int(self.val[-1]) / 2**64, 1.0))

    def sample(self, val_cut: float) -> list[str]:
        """The sample's texts in corpus order, validation documents left out (with val_docs the cut is known only
        at the end: the sample comes out smaller by the held-out share)."""
        self._compact()
        return [text for _, _, _, pos, _, text in sorted(self.kept, key=lambda c: (c[1], c[2])) if pos / 2**64 >= val_cut]


def seed_for(wants: Wants, input_bytes: int | None) -> int:
    """The first limit: 4 x sample_bytes over the input's bytes (the whole key range when that is unknown or
    the input is small), so that the first units do not send their whole text."""
    if not wants.sample_bytes or not input_bytes or 4 * wants.sample_bytes >= input_bytes:
        return 2**64
    return int(2**64 * 4 * wants.sample_bytes / input_bytes)


def save_result(path: Path, plan: str, val_cut: float, drops: dict[int, np.ndarray], documents: int) -> None:
    """The survey's result for array tasks and resumes of the same plan: the cut and each unit's drops (4 bytes
    per duplicate, binary: a billion duplicates is 4 GB, not the ~12 GB and minutes of JSON)."""
    ids = np.array(sorted(drops), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([drops[i].size for i in ids.tolist()], dtype=np.int64)])
    places = np.concatenate([drops[i] for i in ids.tolist()] or [np.empty(0)])
    places = places.astype(np.uint32 if places.max(initial=0) < 2**32 else np.uint64)  # a unit of 4e9 documents
    buffer = io.BytesIO()
    np.savez(buffer, plan=np.array(plan), val_cut=np.float64(val_cut), documents=np.int64(documents), ids=ids,
             offsets=offsets.astype(np.int64), places=places)
    atomic.write_bytes(path, buffer.getbuffer())


def load_result(path: Path, plan: str) -> tuple[float, dict[int, np.ndarray]] | None:
    """(val cut, drops) that `save_result` kept for this plan, or None (no file, or another plan's)."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as saved:
        if str(saved["plan"]) != plan:
            return None
        offsets, places = saved["offsets"], saved["places"]
        drops = {int(i): places[offsets[k]:offsets[k + 1]] for k, i in enumerate(saved["ids"].tolist())}
        return float(saved["val_cut"]), drops
