"""Document sources: the built-in corpus, local files, Hugging Face datasets, behind one interface.

Every source streams documents (str) one at a time, so memory does not grow with corpus size, and
applies the same bad-input policy: invalid UTF-8 is replaced (and counted) or reported with file and
byte offset; empty documents are skipped and counted; a malformed record or a missing text field is
reported with file and line, or skipped and counted. `check()` runs before any work so that a wrong
path or a missing column is an error at start-up, not after an hour.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from lmforge.config.tokenize import FilesSource, HFSource, StdlibSource

SURROGATES = re.compile("[\ud800-\udfff]")


def doc_hash(data: bytes) -> bytes:
    """A document's content hash (its UTF-8 bytes): the split, the tokenizer's sample and shard digests use it."""
    return hashlib.blake2b(data, digest_size=16).digest()


def hash_fraction(digest: bytes) -> float:
    """A document's position in [0, 1), from its content hash. Tokenization holds out the documents below
    `split.val_fraction`; fine-tuning's built-in tasks hold out the same files, so a task's validation and
    test text is never in the pretraining train split."""
    return int.from_bytes(digest[:8], "big") / 2**64


def sample_fraction(digest: bytes) -> float:
    """A second position in [0, 1), from the other half of the hash: independent of `hash_fraction`, so the
    tokenizer's training sample (the smallest of these) is not the validation split (the smallest of those)."""
    return int.from_bytes(digest[8:16], "big") / 2**64


class DataError(Exception):
    """Bad input that stops the run; the message names the file (line, byte offset) and what to do."""


class Policy:
    """What to do with bad input, and the counters that the summary reports."""

    def __init__(self, utf8_errors: str = "replace", bad_records: str = "error", on_skipped_file: str = "warn",
                 report: bool = True, max_document_bytes: int | None = None, long_documents: str = "split"):
        self.utf8_errors, self.bad_records, self.on_skipped_file = utf8_errors, bad_records, on_skipped_file
        self.max_document_bytes, self.long_documents = max_document_bytes, long_documents
        self.split_documents = 0  # documents longer than max_document_bytes, cut into several
        self.report = report  # say each skipped file as it happens (the pass that encodes; not the pre-passes)
        self.skipped: Counter[str] = Counter()  # reason -> documents (or files) skipped
        self.skipped_files: dict[str, str] = {}  # path -> why it was skipped
        self.replaced_docs = 0  # documents in which invalid UTF-8 was replaced by U+FFFD
        self.warnings: list[str] = []

    def decode(self, data: bytes, where: str, offset: int = 0) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.utf8_errors == "error":
                raise DataError(f"{where}: invalid UTF-8 at byte offset {offset + e.start} "
                                f"(set utf8_errors: replace to substitute U+FFFD and go on)") from None
            self.replaced_docs += 1
            return data.decode("utf-8", errors="replace")

    def clean(self, text: str, where: str) -> str:
        """Text that came decoded (JSON escapes, datasets) may hold lone surrogates: not encodable."""
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError as e:
            if self.utf8_errors == "error":
                raise DataError(f"{where}: invalid UTF-8: lone surrogate U+{ord(text[e.start]):04X} at character "
                                f"{e.start} (set utf8_errors: replace to substitute U+FFFD and go on)") from None
            self.replaced_docs += 1
            return SURROGATES.sub("\ufffd", text)

    def bad_record(self, where: str, problem: str, reason: str) -> None:
        if self.bad_records == "error":
            raise DataError(f"{where}: {problem} (set bad_records: skip to skip such records and count them)")
        self.skipped[reason] += 1

    def skip_file(self, path, reason: str, why: str) -> None:
        """A file that cannot be read as data (binary, unknown extension, corrupt): reported now and in the
        summary, or the end of the run under `on_skipped_file: error`."""
        if self.on_skipped_file == "error":
            raise DataError(f"{path}: {why} (set on_skipped_file: warn to skip such files, reported, and go on)")
        self.skipped[reason] += 1
        self.skipped_files[str(path)] = why
        if self.report:
            print(f"[data] skipped {path}: {why}", file=sys.stderr)

    @classmethod
    def of(cls, cfg, report: bool = True) -> Policy:
        """The policy a tokenize config asks for."""
        return cls(cfg.utf8_errors, cfg.bad_records, cfg.on_skipped_file, report, cfg.max_document_bytes,
                   cfg.long_documents)

    def gather(self, where: str, strip: bool = False) -> Gather:
        return Gather(self, where, strip)

    def limit(self, text: str) -> Iterator[str]:
        """`text`, or its pieces when it is longer than max_document_bytes (or nothing, for long_documents: skip)."""
        cap = self.max_document_bytes
        if cap is None or len(text) * 4 <= cap:  # a character is at most 4 UTF-8 bytes: no need to count
            yield text
            return
        data = text.encode("utf-8")
        if len(data) <= cap:
            yield text
            return
        if self.long_documents == "skip":
            self.skipped["too_long"] += 1
            return
        self.split_documents += 1
        start = 0  # cut with a moving offset: linear in the document, one piece copied at a time
        while start < len(data):
            window = data[start:start + cap]
            cut = len(window) if start + cap >= len(data) else (
                window.rfind(b"\n", cap // 2) + 1 or utf8_boundary(window) or cap)
            piece = window[:cut].decode("utf-8", errors="replace")
            start += cut
            if self.keep(piece):
                yield piece

    def keep(self, text: str) -> bool:
        if text.strip():
            return True
        self.skipped["empty"] += 1
        return False


class Gather:
    """One document gathered from the pieces a file is read in, held to `max_document_bytes`: past it the
    document is cut into documents of at most that size (at a line end in the last half of the window where there
    is one, else at a character boundary) or skipped whole (long_documents: skip), and counted either way."""

    def __init__(self, policy: Policy, where: str, strip: bool):
        self.policy, self.where, self.strip = policy, where, strip
        self.parts: list[bytes] = []
        self.size = self.start = 0
        self.over = False  # this document passed the cap

    def add(self, piece: bytes, where: str, offset: int) -> Iterator[str]:
        p, cap = self.policy, self.policy.max_document_bytes
        if not self.parts and not self.over:
            self.where, self.start = where, offset
        if self.over and p.long_documents == "skip":
            return
        self.parts.append(piece)
        self.size += len(piece)
        while cap is not None and self.size > cap:
            if not self.over:
                self.over = True
                if p.long_documents == "skip":
                    p.skipped["too_long"] += 1
                    self.parts, self.size = [], 0
                    return
                p.split_documents += 1
            data = b"".join(self.parts)
            cut = data.rfind(b"\n", cap // 2, cap) + 1 or utf8_boundary(data[:cap]) or cap
            yield from self._emit(data[:cut])
            self.parts, self.size, self.start = [data[cut:]], len(data) - cut, self.start + cut

    def end(self) -> Iterator[str]:
        if self.parts and not (self.over and self.policy.long_documents == "skip"):
            yield from self._emit(b"".join(self.parts), last=True)
        self.parts, self.size, self.over = [], 0, False

    def _emit(self, data: bytes, last: bool = False) -> Iterator[str]:
        text = self.policy.decode(data.rstrip(b"\r\n") if self.strip and last else data, self.where, self.start)
        if self.policy.keep(text):
            yield text


def utf8_boundary(data: bytes) -> int:
    """The length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    end = len(data)
    for back in range(min(4, end)):
        byte = data[end - 1 - back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the lead of the last character (or ASCII)
            need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return end if back + 1 >= need else end - 1 - back
    return end


class Reader:
    """One configured source: `check()` up front, then `documents()` as a stream."""

    def describe(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        """Fail now, before work starts, on what can be seen without reading everything."""

    def total_bytes(self) -> int | None:
        """Input size for the progress bar's ETA, when it is known cheaply."""
        return None

    def documents(self, policy: Policy) -> Iterator[str]:
        raise NotImplementedError

    def plannable(self) -> bool:
        """Whether workers can read this source in pieces of their own (`spans`, `read_file`), the main process
        only planning them; otherwise the main process reads it and sends the documents."""
        return False

    def spans(self, target: int) -> Iterator[tuple[str | Path, tuple[int, int] | None, int]]:
        """(path, span or None for all of it, bytes) pieces of about `target` bytes, in order."""
        raise NotImplementedError

    def identity(self, path: str | Path) -> list:
        """What a piece's data is, for the plan's digest: a change means its units are read and encoded again."""
        raise NotImplementedError

    def read_file(self, path: str | Path, policy: Policy, span: tuple[int, int] | None = None) -> Iterator[str]:
        """The documents of one piece."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# The built-in corpus


def stdlib_files(exclude_tests: bool = False) -> list[Path]:
    """The interpreter's standard-library .py files in a stable order, installed packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for folder, subdirs, names in os.walk(root):
        # installed packages are not the standard library; pruned, not filtered (saves a walk of them)
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        parts = Path(folder).relative_to(root).parts
        if exclude_tests and parts and (parts[0] in ("test", "idlelib") or "tests" in parts):
            continue
        out += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(out)


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets


class HFReader(Reader):
    def __init__(self, spec: HFSource):
        self.spec = spec
        self._dataset = None
        self._identity: list | None = None

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("config", self.spec.config), ("split", self.spec.split)) if v)
        return f"dataset {self.spec.name}{extra}"

    def dataset(self):
        if self._dataset is None:
            import datasets

            s = self.spec
            try:
                local = Path(s.name)
                if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
                    ds = datasets.load_from_disk(str(local))
                    if isinstance(ds, datasets.DatasetDict):
                        if s.split not in ds:
                            raise DataError(f"{local}: no split '{s.split}'; splits are {list(ds)}")
                        ds = ds[s.split]
                    ds = ds.to_iterable_dataset() if s.streaming else ds
                else:
                    ds = datasets.load_dataset(s.name, s.config, split=s.split, streaming=s.streaming,
                                               revision=s.revision)
            except DataError:
                raise
            except Exception as e:
                offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
                hint = (" It is not in the local cache; download it on a machine with network "
                        "(`hf download --repo-type dataset NAME`) or point `name` at a local folder.") if offline else ""
                raise DataError(f"cannot load dataset '{s.name}' ({self.describe()}): "
                                f"{type(e).__name__}: {e}.{hint}") from None
            self._dataset = ds
        return self._dataset

    def check(self) -> None:
        columns = self.dataset().column_names
        if columns is not None and self.spec.text_field not in columns:
            raise DataError(f"dataset '{self.spec.name}': no column '{self.spec.text_field}'; columns are "
                            f"{columns} (set text_field to the column holding the text)")

    def total_bytes(self) -> int | None:
        table = getattr(self.dataset(), "data", None)  # an Arrow table, unless streaming
        return table.column(self.spec.text_field).nbytes if table is not None else None

    def documents(self, policy: Policy) -> Iterator[str]:
        yield from self._rows(self.dataset(), policy, 0)

    def plannable(self) -> bool:
        """A dataset in Arrow files (not streaming) is read by the workers in row ranges, memory-mapped by each."""
        return not self.spec.streaming and bool(self.dataset().cache_files)

    def spans(self, target: int) -> Iterator[tuple[str, tuple[int, int], int]]:
        """Row ranges of about `target` bytes of text (the text column's Arrow size over its rows)."""
        rows, size = len(self.dataset()), self.total_bytes() or 0
        step = max(1, rows * target // max(size, 1))
        for start in range(0, rows, step):
            end = min(rows, start + step)
            yield self.spec.name, (start, end), size * (end - start) // max(rows, 1)

    def identity(self, path: str) -> list:
        """The dataset's fingerprint, rows and Arrow files (names and sizes, not their folder: two nodes' caches
        of one dataset are the same data); taken once, as every row range asks."""
        if self._identity is None:
            ds = self.dataset()
            files = [Path(f["filename"]) for f in ds.cache_files]
            self._identity = [getattr(ds, "_fingerprint", None), len(ds), [[f.name, f.stat().st_size] for f in files]]
        return self._identity

    def read_file(self, path: str, policy: Policy, span: tuple[int, int] | None = None) -> Iterator[str]:
        start, end = span or (0, len(self.dataset()))
        yield from self._rows(self.dataset().select(range(start, end)), policy, start)

    def _rows(self, ds, policy: Policy, first: int) -> Iterator[str]:
        """The documents of `ds`, rows numbered from `first + 1` in messages."""
        row = first
        for batch in ds.select_columns([self.spec.text_field]).iter(batch_size=1024):
            for value in batch[self.spec.text_field]:
                row += 1
                where = f"dataset '{self.spec.name}' row {row}"
                if not isinstance(value, str):
                    policy.bad_record(where, f"'{self.spec.text_field}' is {type(value).__name__}, not text",
                                      "not_text")
                    continue
                value = policy.clean(value, where)
                if policy.keep(value):
                    yield value


def open_source(spec: StdlibSource | FilesSource | HFSource) -> Reader:
    from lmforge.data.files import FilesReader, StdlibReader  # it builds on this module

    return {"stdlib": StdlibReader, "files": FilesReader, "hf": HFReader}[spec.type](spec)


def read_all(readers: list[Reader], policy: Policy) -> Iterator[str]:
    """All sources in order; a source that yields no document at all is an error."""
    for _, text in read_sources(readers, policy):
        yield text


def read_sources(readers: list[Reader], policy: Policy) -> Iterator[tuple[int, str]]:
    """(index of the source, document) of all sources in order; a source that yields no document is an error."""
    for index, reader in enumerate(readers):
        count = 0
        for text in reader.documents(policy):
            for piece in policy.limit(text):
                count += 1
                yield index, piece
        if count == 0:
            raise DataError(f"source {reader.describe()} yielded no documents "
                            f"(skipped so far: {dict(policy.skipped) or 'none'}); check its paths and text_field")


def describe_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


__all__ = ["DataError", "Policy", "Reader", "open_source", "read_all", "stdlib_files", "describe_bytes"]
