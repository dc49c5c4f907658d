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

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

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


def survey_docs(texts: Iterable[str], wants: Wants, limit: int) -> dict:
    """One unit's part of the survey, over its documents in order (`limit`: sample keys at or above it are not
    sent; sample keys are `sample_fraction` x 2**64, and equal for identical documents, like dedup keys)."""
    keys, positions, candidates = [], [], []  # candidates: (sample key, place in the unit, position, text)
    count = 0
    for i, text in enumerate(texts):
        count += 1
        data = text.encode("utf-8")
        digest = doc_hash(data)
        pos = position(digest)
        if wants.dedup:
            keys.append(dedup_key(digest))
        if wants.val_docs:
            positions.append(pos)
        elif pos / 2**64 < wants.val_fraction:  # as hash_fraction compares
            continue  # a validation document: never in the sample
        key = int.from_bytes(digest[8:16], "big")
        if wants.sample_bytes and key < limit:
            if len(data) > wants.per_doc:  # cut at a character boundary
                text = data[:wants.per_doc].decode("utf-8", errors="ignore")
            candidates.append((key, i, pos, text))
    batch = {"count": count, "keys": np.array(keys, dtype=np.uint64) if wants.dedup else None}
    val = np.array(positions, dtype=np.uint64)
    if wants.dedup:
        val = np.unique(val)  # identical documents have one position: val_docs counts distinct documents
    batch["val"] = np.sort(val)[:wants.val_docs]  # the global val_docs smallest are among each unit's
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


@dataclass
class Survey:
    """The main process's side: merges the units' batches in unit order into the sample, the val cut and the
    duplicates. Memory: the sample's candidates (about 2 x sample_bytes), val_docs positions, and under dedup a
    set of 8-byte keys (~70 bytes per distinct document, as the encoding's dedup held before)."""

    wants: Wants
    limit: int = 2**64  # sample keys at or above this are not wanted (the seed, then the first that did not fit)
    seed: int = 2**64
    count: int = 0  # documents, duplicates not counted under dedup
    overflowed: bool = False  # the sample filled: the limit is the boundary, not the seed
    received: int = 0  # bytes of sample candidates received
    drops: dict[int, list[int]] = field(default_factory=dict)  # unit -> places of its documents that repeat
    val: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    kept: list = field(default_factory=list)  # (key, unit, place, position, bytes, text), sorted
    pending: list = field(default_factory=list)
    pending_bytes: int = 0
    seen: set = field(default_factory=set)

    def add(self, unit: int, batch: dict) -> None:
        """One unit's batch; units must come in order (the first copy of a document is the one kept)."""
        w = self.wants
        self.count += batch["count"]
        if w.dedup:
            local = []
            for i, key in enumerate(batch["keys"].tolist()):
                if key in self.seen:
                    local.append(i)
                else:
                    self.seen.add(key)
            self.drops[unit] = local
            self.count -= len(local)
        if w.val_docs:
            merged = np.concatenate([self.val, batch["val"]])
            self.val = (np.unique(merged) if w.dedup else np.sort(merged))[:w.val_docs]
        for key, place, pos, text in batch["sample"]:
            if key < self.limit:
                size = len(text.encode("utf-8"))
                self.pending.append((key, unit, place, pos, size, text))
                self.pending_bytes += size
                self.received += size
        if self.pending_bytes > max(w.sample_bytes, 2**20):
            self._compact()

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
        cut anything. Otherwise the survey must run again with `next_seed()`."""
        self._compact()
        return not self.wants.sample_bytes or self.overflowed or self.seed >= 2**64

    def next_seed(self) -> int:
        """A seed that should fill the sample, from what this one brought in (twice the bytes it lacked)."""
        grown = self.seed * 2 * self.wants.sample_bytes / max(self.received, 1)
        return 2**64 if grown >= 2**63 else max(int(grown), self.seed * 2)

    def val_cut(self) -> float:
        """The split position below which exactly `val_docs` documents lie (the next float after the largest held
        out), or val_fraction."""
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
