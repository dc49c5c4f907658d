"""The chunks of `lmforge tokenize`: documents grouped into units of parallel work, each encoded by a worker
process into its train and val shards and recorded as finished, so that a rerun reuses exactly the chunks that
still hold the same documents, split and tokenizer (pretrain/tokenize.py reads top to bottom around these)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge import atomic
from lmforge.data.shards import SPLITS, write_shard
from lmforge.data.sources import DataError, Policy, doc_hash, hash_fraction
from lmforge.throughput import peak_rss
from lmforge.tokenizer import Encoder


@dataclass
class Chunk:
    index: int
    docs: list[str] = field(default_factory=list)
    val: list[bool] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)  # the source each document came from (per-source counts)
    nbytes: int = 0
    hasher: object = field(default_factory=lambda: hashlib.blake2b(digest_size=16))

    @property
    def digest(self) -> str:
        return self.hasher.hexdigest()


def chunked(documents, shard_bytes: int, val_cut: float, dedup: bool = False, policy: Policy | None = None):
    """Group (source, document) pairs into chunks of about `shard_bytes` UTF-8 bytes; the same input always gives
    the same chunks, which is what makes resume and parallel encoding deterministic. With `dedup`, a document
    whose hash was seen before is dropped (counted in `policy.skipped["duplicate"]`): the first copy stays."""
    chunk = Chunk(0)
    seen: set[int] = set()
    for source, text in documents:
        data = text.encode("utf-8")
        digest = doc_hash(data)
        if dedup:
            key = int.from_bytes(digest[8:16], "little")  # 8 bytes: a first false duplicate is unlikely below ~1e9
            if key in seen:
                policy.skipped["duplicate"] += 1
                continue
            seen.add(key)
        chunk.docs.append(text)
        chunk.sources.append(source)
        chunk.val.append(hash_fraction(digest) < val_cut)
        chunk.nbytes += len(data)
        chunk.hasher.update(digest)
        if chunk.nbytes >= shard_bytes:
            yield chunk
            chunk = Chunk(chunk.index + 1)
    if chunk.docs:
        yield chunk


def finished_record(out: Path, chunk: Chunk, dtype: np.dtype, binding: dict) -> dict | None:
    """The completion record of a chunk a previous run finished, if it holds exactly these documents, split by
    the same cut and encoded by the same tokenizer (an input that changed moves `split.val_docs`' cut)."""
    path = out / "chunks" / f"{chunk.index:06d}.json"
    if not path.exists():
        return None
    record = read_json(path)
    if record.get("digest") != chunk.digest or any(record.get(k) != v for k, v in binding.items()):
        return None
    for split in SPLITS:
        shard = record.get(split)
        if shard and (not (out / shard["file"]).exists()
                      or (out / shard["file"]).stat().st_size != shard["tokens"] * dtype.itemsize):
            return None
    return record


def per_source(records: dict[int, dict], readers) -> list[dict]:
    """Documents and tokens (EOS included) each source contributed, summed over the chunk records."""
    out = [{"source": r.describe(), "documents": 0, "tokens": 0} for r in readers]
    for record in records.values():
        for source, (documents, tokens) in record.get("sources", {}).items():
            out[int(source)]["documents"] += documents
            out[int(source)]["tokens"] += tokens
    return out


def input_listing(readers) -> dict[str, list[int]]:
    """Every input file with its size and modification time (ns): how a resume sees that the input changed."""
    out = {}
    for reader in readers:
        for path in reader.files() if hasattr(reader, "files") else []:
            try:
                st = path.stat()
            except OSError:  # gone since it was listed: the reading reports it
                continue
            out[str(path)] = [st.st_size, st.st_mtime_ns]
    return out


def listing_change(before: dict | None, now: dict) -> str:
    """'3 files added, 1 changed, 2 removed', or '' when the listing is the same (or was not recorded)."""
    if before is None:
        return ""
    counts = {"added": len(now.keys() - before.keys()), "removed": len(before.keys() - now.keys()),
              "changed": sum(1 for k in now.keys() & before.keys() if list(before[k]) != list(now[k]))}
    return ", ".join(f"{n:,} file{'s' * (n != 1)} {what}" for what, n in counts.items() if n)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# -- worker processes ----------------------------------------------------------------------------
_WORKER: dict = {}


def init_worker(tokenizer_json: str, fast: bool, eos_id: int, dtype: str, vocab_size: int, out: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested threads
    _WORKER.update(encoder=Encoder(tokenizer_json, fast=fast), eos=eos_id, dtype=np.dtype(dtype),
                   vocab=vocab_size, out=Path(out))


def encode_chunk(index: int, docs: list[str], val: list[bool], digest: str, binding: dict,
                 sources: list[int] | None = None) -> dict:
    """Encode one chunk, write its train and val shards, then its completion record (in that order)."""
    w = _WORKER
    try:
        encoded = w["encoder"].encode_many(docs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a panic in the Rust encoder is a BaseException: name the document
        for i, text in enumerate(docs):
            try:
                w["encoder"].encode(text)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001
                raise DataError(f"the tokenizer failed on document {i + 1} of chunk {index} ({len(text):,} "
                                f"characters, starting {text[:60]!r}): {type(e).__name__}: {e}; leave it out of the "
                                "input, or set max_document_bytes lower") from None
        raise DataError(f"the tokenizer failed on chunk {index}: {type(e).__name__}: {e}") from None
    record = {"index": index, "digest": digest, **binding}
    by_source: dict[str, list[int]] = {}  # source index -> [documents, tokens with their EOS]
    for ids, source in zip(encoded, sources or [0] * len(docs), strict=True):
        counts = by_source.setdefault(str(source), [0, 0])
        counts[0] += 1
        counts[1] += ids.size + 1
    record["sources"] = by_source
    for split, want in (("train", False), ("val", True)):
        pieces = [ids for ids, is_val in zip(encoded, val, strict=True) if is_val == want]
        if not pieces:
            record[split] = None
            continue
        ends = np.cumsum([p.size + 1 for p in pieces], dtype=np.uint64)
        tokens = np.empty(int(ends[-1]), dtype=w["dtype"])
        start = 0
        for ids, end in zip(pieces, ends, strict=True):
            tokens[start:start + ids.size] = ids
            tokens[int(end) - 1] = w["eos"]
            start = int(end)
        top = max((int(p.max()) for p in pieces if p.size), default=0)
        if top >= w["vocab"]:
            raise DataError(f"token id {top} >= vocab size {w['vocab']}: the tokenizer is inconsistent")
        record[split] = write_shard(w["out"], split, index, tokens, ends)
    atomic.write_json(w["out"] / "chunks" / f"{index:06d}.json", record)
    fallbacks, w["encoder"].fallbacks = w["encoder"].fallbacks, 0
    return {**record, "peak_rss": peak_rss(), "fallbacks": fallbacks}
