"""Schema of `lmforge tokenize`: where text comes from, which tokenizer, how shards are cut."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from lmforge.config.base import StrictModel


class StdlibSource(StrictModel):
    """The running interpreter's standard-library sources (~1,800 .py files, ~31 MB): a corpus every machine has."""

    type: Literal["stdlib"] = "stdlib"
    """Source kind."""
    exclude_tests: bool = False
    """Leave out the `test/` package, `tests/` folders and `idlelib` (about 60% of the bytes)."""


class FilesSource(StrictModel):
    """Local files: .txt, .jsonl, .json, .csv, .parquet, each also .gz/.bz2/.xz/.zst, by path, folder or glob."""

    type: Literal["files"] = "files"
    """Source kind."""
    paths: list[str] = Field(min_length=1)
    """Files, folders or globs (`**` recurses), relative to the working directory; a folder or glob means its data
    files (hidden paths and README/LICENSE/_SUCCESS-style metadata left out)."""
    format: Literal["auto", "txt", "jsonl", "csv", "parquet"] = "auto"
    """File format; `auto` goes by extension (.txt .text .md, .jsonl .ndjson .json, .csv, .parquet); others are
    skipped and reported. jsonl also reads a .json file holding one array of records."""
    text_field: str = "text"
    """Column or JSON key holding the document text (jsonl, csv, parquet)."""
    txt_documents: Literal["file", "blank_line", "line"] = "file"
    """In .txt files: one document per file, per block separated by blank lines, or per line."""


class HFSource(StrictModel):
    """A Hugging Face dataset by hub name (from the local cache when offline) or local folder."""

    type: Literal["hf"] = "hf"
    """Source kind."""
    name: str
    """Hub name (`org/dataset`) or a local dataset folder (a `save_to_disk` folder or data files)."""
    config: str | None = None
    """Dataset configuration (subset) name."""
    split: str = "train"
    """Split to read."""
    text_field: str = "text"
    """Column holding the document text."""
    streaming: bool = False
    """Stream the dataset instead of materialising its Arrow cache (for very large datasets)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""


Source = Annotated[StdlibSource | FilesSource | HFSource, Field(discriminator="type")]


class TrainTokenizer(StrictModel):
    """Train a byte-level BPE (GPT-2 pre-tokenization) on a deterministic sample of the sources."""

    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    """Vocabulary size, special tokens included."""
    min_frequency: int = Field(2, ge=1)
    """A merge must occur at least this often in the sample."""
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"], min_length=1)
    """Special tokens; the first one is the end-of-document (EOS) token."""
    pad_token: str | None = "<|pad|>"
    """The special token that pads batches (one of special_tokens), or null for none (fine-tuning then pads with
    EOS). Left unset with special_tokens that lack `<|pad|>`: the second special token, if any (as before
    pad_token existed); the resolved config says which."""
    sample_bytes: int = Field(256_000_000, ge=1)
    """Cap on the text used for training, in UTF-8 bytes (train documents only, by a hash independent of the
    split's)."""

    @model_validator(mode="after")
    def _pad_is_special(self) -> TrainTokenizer:
        if "pad_token" not in self.model_fields_set and self.pad_token not in self.special_tokens:
            self.pad_token = self.special_tokens[1] if len(self.special_tokens) > 1 else None
        if self.pad_token is not None and self.pad_token not in self.special_tokens:
            raise ValueError(f"pad_token {self.pad_token!r} is not one of special_tokens {self.special_tokens}; "
                             "add it there or set pad_token: null")
        if self.pad_token == self.special_tokens[0]:
            raise ValueError("pad_token is the EOS token (the first of special_tokens): pad with another token, or "
                             "set pad_token: null")
        return self


class TokenizerConfig(StrictModel):
    """Which tokenizer: train one (`train:`) or load one (`pretrained:`), exactly one of the two."""

    train: TrainTokenizer | None = None
    """Train a new byte-level BPE with these settings."""
    pretrained: str | None = None
    """Hugging Face tokenizer folder or hub name (from the local cache when offline)."""
    eos_token: str | None = None
    """End-of-document token for a pretrained tokenizer; default: the tokenizer's own EOS."""
    fast: bool = True
    """Use the tiktoken encoder for byte-level BPE where it gives identical ids (checked at start-up)."""

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if (self.train is None) == (self.pretrained is None):
            raise ValueError("set exactly one of `tokenizer.train` (train a BPE) or `tokenizer.pretrained`")
        return self


class SplitConfig(StrictModel):
    """Train/validation split by document hash: stable, order-free, and duplicates never straddle it."""

    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    """Fraction of documents held out for validation."""
    val_docs: int | None = Field(None, ge=1)
    """Hold out exactly this many documents instead (those with the smallest hashes)."""

    @model_validator(mode="after")
    def _one_rule(self) -> SplitConfig:
        if self.val_docs is not None and "val_fraction" in self.model_fields_set:
            raise ValueError("set `split.val_fraction` or `split.val_docs`, not both")
        return self


class TokenizeConfig(StrictModel):
    """`lmforge tokenize`: text sources -> tokenizer -> uint16/uint32 token shards + meta.json."""

    out_dir: Path
    """Output folder: tokenizer/, train/ and val/ shards, meta.json, config.yaml."""
    sources: list[Source] = Field(min_length=1)
    """Where the text comes from, read in this order."""
    tokenizer: TokenizerConfig
    """The tokenizer to train or load."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """How documents are split between train and val."""
    dedup: Literal["none", "exact"] = "none"
    """`exact`: a document identical to an earlier one (in any source) is kept once, the rest counted as skipped
    duplicates (8-byte hashes: 8 bytes of memory per distinct document as the workers read, ~90 when the main
    process reads)."""
    shard_bytes: int = Field(16 * 2**20, ge=1024)
    """Text per shard (one unit of parallel work), in UTF-8 bytes."""
    workers: int = Field(0, ge=0)
    """Worker processes for encoding; 0 means one per CPU core."""
    reading: Literal["workers", "main"] = "workers"
    """Who reads: the workers, each its own files, byte spans or dataset row ranges (the main process only plans),
    or the main process, which reads and sends documents (always so when a source is a streaming dataset)."""
    utf8_errors: Literal["replace", "error"] = "replace"
    """Invalid UTF-8: replace bad bytes with U+FFFD (counted), or stop naming file and byte offset."""
    bad_records: Literal["error", "skip"] = "error"
    """A malformed JSON line or a record without a text field: stop naming file and line, or skip it (counted)."""
    max_document_bytes: int | None = Field(64 * 2**20, ge=1024)
    """Longest document, in UTF-8 bytes: a longer one is split into pieces of at most this (or skipped, see
    long_documents), counted; memory stays bounded by it whatever a file holds. null: no cap."""
    long_documents: Literal["split", "skip"] = "split"
    """A document longer than max_document_bytes: split it into several, or skip it."""
    on_skipped_file: Literal["warn", "error"] = "warn"
    """A file that cannot be read as data (binary, unknown extension, corrupt): skip it, said at once and listed
    by path in summary.json and meta.json, or stop the run."""
    progress: bool = True
    """Show a progress bar."""

    def output_digest(self) -> str:
        """Hash of every setting that changes the bytes written (resume refuses a mismatch)."""
        return self.digest(exclude={"out_dir", "workers", "progress"})
