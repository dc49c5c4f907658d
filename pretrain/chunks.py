"""The units of work of `lmforge tokenize`: files, byte spans of one or row ranges of a dataset that a worker reads,
parses and encodes itself, or chunks of documents the main process read (streaming datasets, `reading: main`);
each is encoded into its train and val shards and recorded as finished, so that a rerun reuses exactly the units whose files (or
documents), split and tokenizer are unchanged (pretrain/tokenize.py reads top to bottom around these)."""

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
from pretrain.survey import Wants, dedup_key, survey_docs


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
            key = dedup_key(digest)
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


@dataclass
class Unit:
    """Files (or byte spans of one) that a worker reads, parses and encodes itself: the main process only lists
    them. Its digest is the plan's (paths, spans, sizes, modification times): a rerun knows a finished unit
    without reading it."""
    index: int
    pieces: list[tuple[int, str, tuple[int, int] | None]] = field(default_factory=list)  # (source, path, span)
    nbytes: int = 0  # input bytes (file sizes): the progress bar's unit
    hasher: object = field(default_factory=lambda: hashlib.blake2b(digest_size=16))

    @property
    def digest(self) -> str:
        return self.hasher.hexdigest()


UNITS_VERSION = b"units-2"  # in every unit's digest: a reader or layout change in lmforge redoes a partial run's units


def planned(readers, target: int):
    """Units of about `target` input bytes over the files of every source, in order: small files grouped, a large
    line-per-document file cut into spans, a large compressed file whole (its worker writes several shards)."""
    unit = Unit(0)
    unit.hasher.update(UNITS_VERSION)
    for source, reader in enumerate(readers):
        for path, span, size in reader.spans(target):
            unit.pieces.append((source, str(path), span))
            unit.nbytes += size
            unit.hasher.update(json.dumps([source, str(path), span, *reader.identity(path)]).encode())
            if unit.nbytes >= target:
                yield unit
                unit = Unit(unit.index + 1)
                unit.hasher.update(UNITS_VERSION)
    if unit.pieces:
        yield unit


def shards_of(record: dict, split: str) -> list[dict]:
    """A record's shards of one split (records of lmforge before 0.x held one shard or None)."""
    entry = record.get(split)
    return [] if entry is None else [entry] if isinstance(entry, dict) else entry


def finished_record(out: Path, chunk: Chunk | Unit, dtype: np.dtype, binding: dict) -> dict | None:
    """The completion record of a chunk or unit a previous run finished, if it holds exactly these documents (a
    read chunk) or these files unchanged (a unit: paths, spans, sizes, times, inodes), split by the same cut and
    encoded by the same tokenizer (an input that changed moves `split.val_docs`' cut)."""
    path = out / "chunks" / f"{chunk.index:06d}.json"
    if not path.exists():
        return None
    record = read_json(path)
    if record.get("digest") != chunk.digest or any(record.get(k) != v for k, v in binding.items()):
        return None
    return record if shards_present(out, record, dtype) else None


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
                st = reader.stat(path)
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


def merge_counts(policy: Policy, counts: dict | None) -> None:
    """Add a worker's bad-input counts (a unit's record) to the run's."""
    if counts:
        policy.skipped.update(counts["skipped"])
        policy.skipped_files.update(counts["skipped_files"])
        policy.split_documents += counts["split_documents"]
        policy.replaced_docs += counts["replaced_docs"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# -- worker processes ----------------------------------------------------------------------------
_WORKER: dict = {}


def init_worker(tokenizer_json: str | None, fast: bool, eos_id: int, dtype: str, vocab_size: int, out: str,
                sources: list | None = None, policy: dict | None = None) -> None:
    from lmforge.data.sources import open_source

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested threads
    encoder = Encoder(tokenizer_json, fast=fast) if tokenizer_json else None  # none for the survey's workers
    _WORKER.update(encoder=encoder, eos=eos_id, dtype=np.dtype(dtype),
                   vocab=vocab_size, out=Path(out), readers=[open_source(s) for s in sources or []],
                   policy=policy or {})


def encode_chunk(index: int, docs: list[str], val: list[bool], digest: str, binding: dict,
                 sources: list[int] | None = None) -> dict:
    """Encode one chunk the main process read, write its train and val shards, then its completion record."""
    record = {"index": index, "digest": digest, **binding, "sources": {}, "train": [], "val": []}
    encode_group(record, f"{index:06d}", docs, val, sources or [0] * len(docs), f"chunk {index}")
    record["bytes"] = sum(len(d.encode("utf-8")) for d in docs)
    return finish(record)


def unit_documents(pieces: list, policy: Policy):
    """(source, path, document) of a unit's files or spans in order, each document held to max_document_bytes: what
    the survey and the encoding both read, so that a document's place in its unit means the same to both."""
    for source, path, span in pieces:
        for text in _WORKER["readers"][source].read_file(path, policy, tuple(span) if span else None):
            for piece in policy.limit(text):
                yield source, path, piece


def survey_unit(pieces: list, wants: Wants, limit: int, val_limit: int, sample_only: bool) -> dict:
    """A unit's part of the survey before encoding (pretrain/survey.py): its dedup keys, its smallest split
    positions below `val_limit` and its tokenizer-sample candidates below `limit`."""
    policy = Policy(**{**_WORKER["policy"], "report": False})  # the encoding pass reports
    return survey_docs((text for _, _, text in unit_documents(pieces, policy)), wants, limit, val_limit, sample_only)


def encode_unit(index: int, pieces: list, digest: str, binding: dict, shard_bytes: int,
                drops: list[int] | None = None) -> dict:
    """Read, parse and encode one unit of files or spans (this worker's own reading: the main process only
    planned it), a shard of about `shard_bytes` at a time; then the unit's completion record, which carries the
    documents' digest and the bad-input counts of its reading (a rerun that keeps the unit reports them too)."""
    w = _WORKER
    policy = Policy(**w["policy"])
    record = {"index": index, "digest": digest, **binding, "sources": {}, "train": [], "val": []}
    hasher = hashlib.blake2b(digest_size=16)
    docs, val, sources, origins, size, total, part = [], [], [], [], 0, 0, 0
    dropped = set(drops or ())
    for place, (source, path, piece) in enumerate(unit_documents(pieces, policy)):
        if place in dropped:
            policy.skipped["duplicate"] += 1
            continue
        if size >= shard_bytes:  # a full shard and more to come: this unit has several
            encode_part(record, part, docs, val, sources, origins, part_record=True)
            docs, val, sources, origins, total, size, part = [], [], [], [], total + size, 0, part + 1
        data = piece.encode("utf-8")
        key = doc_hash(data)
        hasher.update(key)
        docs.append(piece)
        val.append(hash_fraction(key) < binding["val_cut"])
        sources.append(source)
        origins.append(path)
        size += len(data)
    if docs:
        encode_part(record, part, docs, val, sources, origins, part_record=part > 0)
    record["bytes"] = total + size
    record["documents_digest"] = hasher.hexdigest()
    record["policy"] = {"skipped": dict(policy.skipped), "skipped_files": policy.skipped_files,
                        "split_documents": policy.split_documents, "replaced_docs": policy.replaced_docs}
    return finish(record)


def encode_part(record: dict, part: int, docs: list[str], val: list[bool], sources: list[int], origins: list[str],
                part_record: bool) -> None:
    """Shard `part` of a unit. A unit of several shards (a large compressed file, read whole by one worker) records
    each as it is written: a rerun after a crash reads the unit again but does not encode its finished shards."""
    w = _WORKER
    name = f"{record['index']:06d}-{part:03d}"
    path = w["out"] / "chunks" / f"{name}.json"
    binding = {k: v for k, v in record.items() if k not in ("index", "sources", "train", "val")}
    done = read_json(path) if part_record and path.exists() else None
    if not (done and all(done.get(k) == v for k, v in binding.items()) and shards_present(w["out"], done, w["dtype"])):
        done = {**binding, "sources": {}, "train": [], "val": []}
        encode_group(done, name, docs, val, sources, f"unit {record['index']}", origins)
        if part_record:
            atomic.write_json(path, done)
    for split in SPLITS:
        record[split] += done[split]
    for source, (documents, tokens) in done["sources"].items():
        counts = record["sources"].setdefault(source, [0, 0])
        counts[0] += documents
        counts[1] += tokens


def shards_present(out: Path, record: dict, dtype: np.dtype) -> bool:
    """Every shard a record names is on disk at its full size."""
    return all((out / shard["file"]).exists() and (out / shard["file"]).stat().st_size == shard["tokens"] * dtype.itemsize
               for split in SPLITS for shard in shards_of(record, split))


def finish(record: dict) -> dict:
    """Write the completion record (after the shards it names); what goes back to the main process."""
    w = _WORKER
    atomic.write_json(w["out"] / "chunks" / f"{record['index']:06d}.json", record)
    fallbacks, w["encoder"].fallbacks = w["encoder"].fallbacks, 0
    return {**record, "peak_rss": peak_rss(), "fallbacks": fallbacks}


def encode_group(record: dict, name: str, docs: list[str], val: list[bool], sources: list[int], label: str,
                 origins: list[str] | None = None) -> None:
    """Encode documents into shards `name` of the train and val splits, added to `record` with per-source counts;
    a tokenizer failure names the document by its place in `label` and the file it came from (`origins`)."""
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
                origin = f" from {origins[i]}" if origins else ""
                raise DataError(f"the tokenizer failed on document {i + 1} of {label}{origin} ({len(text):,} "
                                f"characters, starting {text[:60]!r}): {type(e).__name__}: {e}; leave it out of the "
                                "input, or set max_document_bytes lower") from None
        raise DataError(f"the tokenizer failed on {label}: {type(e).__name__}: {e}") from None
    by_source = record["sources"]  # source index -> [documents, tokens with their EOS]
    for ids, source in zip(encoded, sources, strict=True):
        counts = by_source.setdefault(str(source), [0, 0])
        counts[0] += 1
        counts[1] += ids.size + 1
    for split, want in (("train", False), ("val", True)):
        pieces = [ids for ids, is_val in zip(encoded, val, strict=True) if is_val == want]
        if not pieces:
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
        record[split].append(write_shard(w["out"], split, name, tokens, ends))
