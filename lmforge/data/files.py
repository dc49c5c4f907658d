"""Local files as a document source: which files a path, folder or glob means, how they open, how they parse.

A folder (or glob) means its data files: hidden paths (`.git/`, `.cache/`, `.ipynb_checkpoints/`) and the
metadata that dataset folders carry (README, LICENSE, `_SUCCESS`, `dataset_info.json`) are left out, so a folder
downloaded from the Hub and the glob of its files read the same. A file named explicitly is always read.

Every format opens through the same door: `.gz`, `.bz2`, `.xz` and `.zst` are decompressed as they stream, a
UTF-8 byte-order mark is dropped and a UTF-16/UTF-32 one decides the decoding. With `format: auto` the extension
decides (.txt .text .md, .jsonl .ndjson .json, .csv, .parquet, each also compressed); a file with another
extension is skipped and reported, never read as text by guess.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import zstandard

from lmforge.config.tokenize import FilesSource, StdlibSource
from lmforge.data.sources import DataError, Policy, Reader, stdlib_files

READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)  # gzip's BadGzipFile is an OSError
LINE_PIECE_BYTES = 2**20  # a .txt file is read at most this much of a line at a time
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a file as binary (as git does)
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
FORMATS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".csv": "csv", ".parquet": "parquet"}
# names (compression suffix and case aside) that dataset folders carry beside their data
NOT_DATA = {"readme", "readme.md", "readme.txt", "readme.rst", "license", "license.md", "license.txt", "copying",
            "notice", "citation.cff", "_success", "dataset_info.json", "dataset_infos.json", "dataset_dict.json",
            "state.json"}
NOT_DATA_SUFFIXES = (".crc", ".lock")  # Spark/Hadoop checksums, download locks
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32 LE starts like UTF-16 LE: first


WINDOW = 2**18  # characters of a JSON array's text parsed from at a time (more while a record is longer)


def compression(path: Path) -> str:
    name = path.name.lower()
    return next((c for c in COMPRESSED if name.endswith(c)), "")


def format_of(path: Path, fmt: str) -> str | None:
    """The format a file is read as; None for an unknown extension under `format: auto`."""
    if fmt != "auto":
        return fmt
    return FORMATS.get(Path(path.name.lower().removesuffix(compression(path))).suffix)


def glob_root(pattern: str) -> Path:
    """The folder a glob searches from: its leading parts without wildcards (a hidden folder named there is fine)."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path(".")


def is_data(path: Path, root: Path) -> bool:
    """False for hidden paths below `root` and for the metadata files of dataset folders."""
    if any(part.startswith(".") for part in path.relative_to(root).parts):
        return False
    name = path.name.lower().removesuffix(compression(path))
    return name not in NOT_DATA and not name.endswith(NOT_DATA_SUFFIXES)


def open_binary(path: Path):
    """The file's bytes, decompressed as they are read."""
    kind = compression(path)
    if kind == ".zst":  # its reader has no line iteration of its own
        return io.BufferedReader(zstandard.open(path, "rb"), buffer_size=1 << 20)
    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(kind, open)(path, "rb")


def byte_order_mark(path: Path) -> tuple[str | None, int]:
    """(encoding, BOM length) from the first bytes: ('utf-16', 2), ('utf-8', 3), or (None, 0) for none."""
    with open_binary(path) as f:
        head = f.read(4)
    return next(((enc, len(bom)) for bom, enc in BOMS if head.startswith(bom)), (None, 0))


def lines(path: Path, limit: int = -1, span: tuple[int, int] | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset, line as UTF-8 bytes) of any file this module opens. Offsets count the
    decompressed bytes (for UTF-16/32 files, the UTF-8 bytes they become). With `limit`, a longer line comes in
    pieces of at most that many bytes (characters for UTF-16/32), so memory stays bounded; only its last piece
    ends in a newline. With `span` (start, end) of a plain UTF-8 file (see `splittable`): the lines that begin in
    [start, end), numbered 0 (unknown without reading what comes before), so that spans side by side read each line
    exactly once."""
    if span is not None:
        yield from _span_lines(path, limit, *span)
        return
    encoding, skip = byte_order_mark(path)
    with open_binary(path) as raw:
        if encoding in (None, "utf-8"):
            raw.read(skip)
            offset, number = skip, 1
            while line := raw.readline(limit):
                yield number, offset, line
                offset += len(line)
                number += line.endswith(b"\n")
            return
        offset, number = 0, 1
        # the codec reads and drops the BOM; a bad code unit becomes U+FFFD (as invalid UTF-8 does by default)
        text = io.TextIOWrapper(raw, encoding=encoding, newline="", errors="replace")
        try:
            while line := text.readline(limit):
                data = line.encode("utf-8", errors="surrogatepass")
                yield number, offset, data
                offset += len(data)
                number += line.endswith("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid {encoding.upper()} after its byte-order mark: {e.reason}") from None


def _span_lines(path: Path, limit: int, start: int, end: int) -> Iterator[tuple[int, int, bytes]]:
    with open(path, "rb") as f:
        first = 3 if f.read(3) == codecs.BOM_UTF8 else 0  # where the first line begins
        if start <= first:
            f.seek(first)
            offset = first
        else:  # the line holding byte start - 1 belongs to the span before: read past its end
            f.seek(start - 1)
            offset = start - 1
            while (piece := f.readline(LINE_PIECE_BYTES)) and not piece.endswith(b"\n"):
                offset += len(piece)
                if offset >= end:  # a line longer than the span: it began before it, no line begins in it
                    return
            offset += len(piece)
        at_start = True  # the next piece begins a line
        while (at_start and offset < end or not at_start) and (line := f.readline(limit)):
            yield 0, offset, line
            offset += len(line)
            at_start = line.endswith(b"\n")


def splittable(path: Path, fmt: str, txt_documents: str) -> bool:
    """Whether a file can be read as byte spans by workers side by side: a plain (uncompressed) UTF-8 file of one
    document or record per line (JSONL; text with txt_documents: line) that is not binary and not one JSON array."""
    kind = format_of(path, fmt)
    if compression(path) or not (kind == "jsonl" or kind == "txt" and txt_documents == "line"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(BINARY_SNIFF_BYTES)
    except OSError:
        return False  # the worker that reads it whole reports it
    if any(head.startswith(bom) for bom, enc in BOMS if enc != "utf-8") or b"\0" in head:
        return False
    text = head.removeprefix(codecs.BOM_UTF8).lstrip()
    return kind != "jsonl" or bool(text) and not text.startswith(b"[")  # (8 KiB of blanks: read it whole)


def whole_lines(path: Path, cap: int, span: tuple[int, int] | None = None) -> Iterator[tuple[int, int, bytes | None]]:
    """(number, offset, line) of each line of at most `cap` bytes; for a longer line, (number, offset, None), read
    past in pieces and never held whole."""
    held: list[bytes] | None = None
    size = start = 0
    for number, offset, piece in lines(path, limit=cap + 1 if cap > 0 else -1, span=span):
        if held is None:
            held, size, start = [], 0, offset
        size += len(piece)
        if cap <= 0 or size <= cap:
            held.append(piece)
        else:
            held = held and []  # over the cap: drop what was held, keep reading to the line's end
        if piece.endswith(b"\n"):
            yield number, start, (b"".join(held) if cap <= 0 or size <= cap else None)
            held = None
    if held is not None:
        yield number, start, (b"".join(held) if cap <= 0 or size <= cap else None)


def located(path: Path, number: int, offset: int) -> str:
    """'path:line', or 'path (line at byte N)' where the line number is unknown (a span read by a worker)."""
    return f"{path}:{number}" if number else f"{path} (line at byte {offset})"


class FilesReader(Reader):
    def __init__(self, spec: FilesSource):
        self.spec = spec
        self._files: list[Path] | None = None
        self.left_out: list[Path] = []  # hidden and metadata files of folders and globs
        self._stats: dict[Path, os.stat_result] = {}

    def describe(self) -> str:
        paths = self.spec.paths
        more = f" and {len(paths) - 3:,} more" if len(paths) > 4 else ""
        out = f"files {', '.join(paths[:3] if more else paths)}{more}"
        if self._files is not None and self.left_out:
            names = ", ".join(p.name for p in self.left_out[:4]) + (" ..." if len(self.left_out) > 4 else "")
            out += f" ({len(self._files):,} files; {len(self.left_out):,} hidden or metadata files left out: {names})"
        return out

    def files(self) -> list[Path]:
        if self._files is None:
            found: dict[Path, None] = {}
            for pattern in self.spec.paths:
                pattern = os.path.expanduser(pattern)
                if glob.has_magic(pattern):
                    matches = self._data([Path(p) for p in glob.glob(pattern, recursive=True)], glob_root(pattern),
                                         f"source '{pattern}': the pattern matches no data files")
                elif Path(pattern).is_dir():  # listed as its `**` glob is: the same files (symlinked folders too)
                    below = glob.glob(os.path.join(glob.escape(pattern), "**", "*"), recursive=True)
                    hidden = [p for p in Path(pattern).rglob(".*")]  # glob leaves these out: counted as left out
                    matches = self._data([Path(p) for p in below] + hidden, Path(pattern),
                                         f"source '{pattern}': the folder holds no data files")
                elif Path(pattern).exists():
                    matches = [Path(pattern)]
                else:
                    raise DataError(f"source '{pattern}': no such file or folder")
                found.update(dict.fromkeys(matches))
            self._files = list(found)
        return self._files

    def _data(self, candidates: list[Path], root: Path, empty: str) -> list[Path]:
        """The data files among a folder's or glob's matches, in one order (by path parts) for both."""
        files, left = [], []
        for p in candidates:
            if p.is_file():
                (files if is_data(p, root) else left).append(p)
        if not files:
            raise DataError(empty + (f" ({len(left)} hidden or metadata files left out)" if left else ""))
        self.left_out += sorted(left)
        return sorted(files)

    def check(self) -> None:
        for path in self.files():
            if not os.access(path, os.R_OK):
                raise DataError(f"{path}: file is not readable (permission denied)")
            kind = format_of(path, self.spec.format)
            if kind == "csv":
                try:
                    header = next(csv.reader(line.decode("utf-8", errors="replace") for _, _, line in lines(path)),
                                  None)
                except READ_ERRORS as e:
                    raise DataError(f"{path}: cannot read: {e}") from None
                if header is not None and self.spec.text_field not in header:
                    raise DataError(f"{path}: no column '{self.spec.text_field}'; columns are {header} "
                                    f"(set text_field to the column holding the text)")
            elif kind == "parquet":
                import pyarrow.parquet as pq

                try:
                    names = pq.ParquetFile(path).schema_arrow.names
                except Exception as e:
                    raise DataError(f"{path}: not a readable Parquet file: {e}") from None
                if self.spec.text_field not in names:
                    raise DataError(f"{path}: no column '{self.spec.text_field}'; columns are {names} "
                                    f"(set text_field to the column holding the text)")

    def stat(self, path: Path) -> os.stat_result:
        """A file's stat, taken once per run: listing, sizes, spans and the plan all ask (at a million files on a
        shared filesystem, each extra pass is a million metadata requests)."""
        st = self._stats.get(path)
        if st is None:
            st = self._stats[path] = path.stat()
        return st

    def total_bytes(self) -> int:
        return sum(self.stat(p).st_size for p in self.files())

    def plannable(self) -> bool:
        return True

    def identity(self, path: Path) -> list:
        """Size, modification time, inode and change time: a file rewritten at the same size within a second
        (Lustre) changes inode or ctime."""
        st = self.stat(path)
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]

    def documents(self, policy: Policy) -> Iterator[str]:
        for path in self.files():
            yield from self.read_file(path, policy)

    def spans(self, target: int) -> Iterator[tuple[Path, tuple[int, int] | None, int]]:
        """(path, byte span or None for the whole file, bytes) of every file in order: what workers read side by
        side. A plain line-per-document file (`splittable`) larger than 2 x `target` comes as spans of ~`target`."""
        for path in self.files():
            size = self.stat(path).st_size
            if size <= 2 * target or not splittable(path, self.spec.format, self.spec.txt_documents):
                yield path, None, size
                continue
            n = size // target
            cuts = [size * i // n for i in range(n + 1)]
            for start, end in itertools.pairwise(cuts):
                yield path, (start, end), end - start

    def read_file(self, path: str | Path, policy: Policy, span: tuple[int, int] | None = None) -> Iterator[str]:
        """The documents of one file (or of the lines that begin in `span`, for a `splittable` file)."""
        path = Path(path)
        kind = format_of(path, self.spec.format)
        if kind is None:
            policy.skip_file(path, "unknown_extension", f"unknown extension '{''.join(path.suffixes)}' "
                             "(name a format with `format:`, or leave the file out)")
            return
        try:
            yield from getattr(self, f"_{kind}")(path, policy, *([span] if span else []))
        except READ_ERRORS as e:  # a truncated or corrupt file: what it gave so far stays, the rest is skipped
            policy.skip_file(path, "unreadable", f"cannot read: {e}")

    def _txt(self, path: Path, policy: Policy, span: tuple[int, int] | None = None) -> Iterator[str]:
        encoding, _ = byte_order_mark(path)
        if encoding is None and span is None:  # (a span's file was sniffed when it was split)
            with open_binary(path) as f:
                if b"\0" in f.read(BINARY_SNIFF_BYTES):
                    policy.skip_file(path, "binary_file", "looks binary (NUL bytes)")
                    return
        # Read at most 1 MiB of a line at a time: a document (a file, a block, a line) is gathered up to the
        # document cap and no further, whatever its lines' length (Gather splits or skips what is longer).
        mode = self.spec.txt_documents
        gather = policy.gather(str(path), strip=mode != "file")
        if mode == "file" and not any(True for _ in lines(path, limit=1)):
            policy.skipped["empty"] += 1  # an empty file: an empty document, as any other format counts it
            return
        for number, offset, piece in lines(path, limit=LINE_PIECE_BYTES, span=span):
            if mode == "blank_line" and not piece.strip():
                yield from gather.end()
            else:
                yield from gather.add(piece, located(path, number, offset) if mode == "line" else str(path), offset)
                if mode == "line" and piece.endswith(b"\n"):
                    yield from gather.end()
        yield from gather.end()

    def _jsonl(self, path: Path, policy: Policy, span: tuple[int, int] | None = None) -> Iterator[str]:
        if span is None:  # (a span's file holds no array: see `splittable`)
            numbered = lines(path, limit=2**16)  # the first non-blank bytes: a one-line array is not read whole here
            first = next(((n, o, raw) for n, o, raw in numbered if raw.strip()), None)
            numbered.close()
            if first is None:
                return
            if first[2].lstrip().startswith(b"["):  # a .json file holding one array of records
                yield from self._array(path, policy)
                return
        cap = policy.max_document_bytes
        # a record is not split: a line longer than twice the document cap (JSON escapes lengthen text) is
        # skipped whole, never held whole in memory
        for number, offset, raw in whole_lines(path, 2 * cap + 2**20 if cap else -1, span):
            if raw is None:
                policy.skipped["too_long"] += 1
            elif raw.strip():
                yield from self._line(number, offset, raw, path, policy)

    def _array(self, path: Path, policy: Policy) -> Iterator[str]:
        """The records of a file holding one JSON array, parsed one at a time from a window of the text: memory
        is bounded by the largest record (a 10 GB array used to be held as bytes, text and objects at once). A
        record longer than twice max_document_bytes skips the rest of the file (reported); a malformed element
        ends the file, the records before it kept."""
        pieces = lines(path, limit=2**16)  # UTF-8 bytes, a line (at most 64 KiB of one) at a time, whatever the encoding
        utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        decoder = json.JSONDecoder()
        space = re.compile(r"[ \t\n\r]*")
        longest = 2 * policy.max_document_bytes + 2**20 if policy.max_document_bytes else None
        window, at, line, eof, want, record = "", 0, 1, False, WINDOW, 0

        def fill(more: int) -> None:  # at least `more` characters past the window's end, or the end of the file
            nonlocal window, eof, utf8
            got, size = [], 0
            while not eof and size < more:
                piece = next(pieces, None)
                if piece is None:
                    eof = True
                    got.append(utf8.decode(b"", final=True))
                    break
                state = utf8.getstate()  # bytes of a character cut by the last piece, kept if we switch decoders
                try:
                    got.append(utf8.decode(piece[2]))
                except UnicodeDecodeError as e:
                    if policy.utf8_errors == "error":
                        raise DataError(f"{path}: invalid UTF-8 at byte offset {piece[1] + e.start - len(state[0])} "
                                        "(set utf8_errors: replace to substitute U+FFFD and go on)") from None
                    policy.replaced_docs += 1  # counted once per file, as a whole-file decode counted it
                    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
                    utf8.setstate(state)
                    got.append(utf8.decode(piece[2]))
                size += len(got[-1])
            window += "".join(got)

        def drop() -> None:  # what is parsed leaves the window (once it is most of it: no copy per small record)
            nonlocal window, at, line
            if at > max(WINDOW, len(window) // 2):
                line += window.count("\n", 0, at)
                window, at = window[at:], 0

        def token() -> str:  # the next non-space character ('' at the end of the file), `at` moved to it
            nonlocal at
            while True:
                at = space.match(window, at).end()
                if at < len(window) or eof:
                    return window[at:at + 1]
                drop()
                fill(want)

        def malformed(problem: str, where: int | None = None) -> None:
            where = at if where is None else where
            policy.bad_record(f"{path}:{line + window.count(chr(10), 0, where)}", f"malformed JSON array: {problem}",
                              "malformed_json")

        if token() != "[":
            return malformed("expected '['")
        at += 1
        if token() == "]":
            at += 1
        else:
            while True:
                drop()
                token()
                try:
                    value, end = decoder.raw_decode(window, at)
                    if end > len(window) - 64 and not eof:  # a number cut by the window's end parses as a shorter one
                        raise json.JSONDecodeError("cut", window, len(window))
                except json.JSONDecodeError as e:
                    cut = e.pos >= len(window) - 8 or e.msg.startswith("Unterminated string")  # not yet all read
                    if eof or not cut:
                        return malformed(e.msg, e.pos)
                    if longest and len(window) - at > longest:
                        policy.skip_file(path, "too_long", f"record {record + 1} of its JSON array is longer than "
                                         f"{longest:,} characters (2 x max_document_bytes): the rest of the file is "
                                         "not read")
                        return
                    fill(want)
                    want *= 2  # a record longer than the window: read twice as much before parsing it again
                    continue
                want = WINDOW
                record += 1
                yield from self._record(value, f"{path}: record {record}", policy)
                at = end
                following = token()
                if following == "]":
                    at += 1
                    break
                if following != ",":
                    return malformed(f"expected ',' or ']' after record {record}")
                at += 1
        if token() != "":
            malformed("data after the array's closing ']'")

    def _line(self, number: int, offset: int, raw: bytes, path: Path, policy: Policy) -> Iterator[str]:
        where = located(path, number, offset)
        try:
            record = json.loads(policy.decode(raw, where, offset))
        except json.JSONDecodeError as e:
            policy.bad_record(where, f"malformed JSON: {e.msg} at column {e.colno}", "malformed_json")
            return
        yield from self._record(record, where, policy)

    def _record(self, record, where: str, policy: Policy) -> Iterator[str]:
        field = self.spec.text_field
        if not isinstance(record, dict) or field not in record:
            policy.bad_record(where, f"no '{field}' field (set text_field to the key holding the text)",
                              "missing_field")
            return
        text = record[field]
        if not isinstance(text, str):
            policy.bad_record(where, f"'{field}' is {type(text).__name__}, not text", "not_text")
            return
        text = policy.clean(text, where)
        if policy.keep(text):
            yield text

    def _csv(self, path: Path, policy: Policy) -> Iterator[str]:
        csv.field_size_limit(sys.maxsize)  # a document can be far longer than csv's 128 KiB default
        cap = policy.max_document_bytes
        longest = 2 * cap + 2**20 if cap else -1  # a line is never held whole past this (a row is not split)

        def decoded() -> Iterator[str]:
            for number, offset, raw in whole_lines(path, longest):
                if raw is None:  # the csv reader's place in a quoted field is lost: the rest of the file with it
                    policy.skip_file(path, "too_long", f"line {number} is longer than {longest:,} bytes (2 x "
                                     "max_document_bytes): the rest of the file is not read")
                    return
                yield policy.decode(raw, f"{path}:{number}", offset)

        reader = csv.reader(decoded())
        header = next(reader, None)
        if header is None:
            return
        column = header.index(self.spec.text_field)
        for row in reader:
            if len(row) <= column:
                policy.bad_record(f"{path}:{reader.line_num}", f"row has {len(row)} fields, no '{self.spec.text_field}'",
                                  "missing_field")
                continue
            if policy.keep(row[column]):
                yield row[column]

    def _parquet(self, path: Path, policy: Policy) -> Iterator[str]:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[self.spec.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                where = f"{path}: row {row}"
                if isinstance(value, bytes):
                    value = policy.decode(value, where)
                if not isinstance(value, str):
                    policy.bad_record(where, f"'{self.spec.text_field}' is {type(value).__name__}, not text",
                                      "not_text")
                    continue
                if policy.keep(value):
                    yield value


class StdlibReader(FilesReader):
    def __init__(self, spec: StdlibSource):
        super().__init__(FilesSource(paths=["<stdlib>"], format="txt"))
        self.stdlib = spec

    def describe(self) -> str:
        import sysconfig

        return f"Python {sys.version.split()[0]} standard library ({sysconfig.get_paths()['stdlib']})"

    def files(self) -> list[Path]:
        if self._files is None:
            import sysconfig

            self._files = stdlib_files(self.stdlib.exclude_tests)
            if not self._files:
                raise DataError(f"no .py files under {sysconfig.get_paths()['stdlib']}: "
                                "this interpreter ships without its standard-library sources")
        return self._files
