"""Tokenizers: train a byte-level BPE, load any Hugging Face one, save a folder, encode fast.

Document text is always encoded as plain text: a document that happens to contain `<|endoftext|>`
gets the ids of those characters, never the special token (nanoGPT's `encode_ordinary`), so data
cannot inject control tokens. EOS is appended by the caller between documents.

The fast path: a byte-level BPE (what we train; GPT-2, Llama-3 and Qwen style) is rebuilt as a
`tiktoken` encoding (same pre-tokenization regex, mergeable ranks in merge order, and a lookup from
rank to the Hugging Face id). On the built-in corpus this gives identical ids at ~3.5x the speed of
`tokenizers`. Identity is checked on a sample before use; anything else falls back to `tokenizers`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge import atomic

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(Exception):
    """A tokenizer that cannot be loaded or used as asked."""


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str], min_frequency: int = 2,
              show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenization, all 256 bytes in the alphabet, so no UNK)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


# The files of a Hugging Face tokenizer folder (a model folder may also hold weights: never copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def local_tokenizer_folder(name_or_path: str) -> Path | None:
    """The folder, when `name_or_path` is a local folder holding a tokenizer.json."""
    path = Path(name_or_path).expanduser()
    return path if (path / "tokenizer.json").is_file() else None


def load_pretrained(name_or_path: str):
    """A `transformers` tokenizer from a folder or hub name (the local cache when offline).

    A local folder with a tokenizer.json loads as `PreTrainedTokenizerFast`: the same vocabulary and
    special tokens as `AutoTokenizer` gives, without the model-class lookup that imports torch (~1 s).
    """
    if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise TokenizerError(f"tokenizer folder not found: {name_or_path}")
    local = local_tokenizer_folder(name_or_path)
    try:  # transformers is a heavy import: made only when a pretrained tokenizer is used
        if local is not None:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(local)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # transformers raises OSError, ValueError, HF hub errors...
        raise TokenizerError(
            f"cannot load tokenizer '{name_or_path}': {e}\n"
            "Give a folder with tokenizer files, or a hub name already in the local cache "
            "(download it once with `hf download NAME` on a machine with network)."
        ) from None


def save_folder(tok: Tokenizer, out: Path, eos_token: str, pad_token: str | None = None) -> None:
    """Save as a folder that `AutoTokenizer.from_pretrained` loads, published atomically."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, bos_token=eos_token,
                                 pad_token=pad_token, model_max_length=int(1e30), clean_up_tokenization_spaces=False)
    write_folder(hf, out)


def copy_pretrained(name_or_path: str, hf_tokenizer, out: Path) -> None:
    """Publish a loaded pretrained tokenizer into `out`, atomically: a local folder's own tokenizer
    files byte for byte (its tokenizer class and settings kept as they were), else `save_pretrained`."""
    local = local_tokenizer_folder(name_or_path)
    if local is None:
        write_folder(hf_tokenizer, out)
        return
    atomic.publish_folder(out, lambda tmp: [shutil.copyfile(local / n, tmp / n) for n in TOKENIZER_FILES if (local / n).is_file()])


def write_folder(hf_tokenizer, out: Path) -> None:
    atomic.publish_folder(out, hf_tokenizer.save_pretrained)


def folder_hash(folder: Path) -> str:
    """Identity of a saved tokenizer: sha256 over its tokenizer.json (vocab, merges, specials, pipeline)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = Path(folder) / name
        if p.exists():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def vocabulary_hash(folder: Path) -> str:
    """Identity of a tokenizer's vocabulary: sha256 over its tokenizer.json (vocab, merges, specials, pipeline),
    parsed and written back canonically (a re-save that only reformats it is the same tokenizer), without the
    truncation and padding settings (encoding options, not the vocabulary). Two models share a tokenizer when
    this agrees, whatever else their folders say (a fine-tuned model's chat template or pad token live in
    tokenizer_config.json). Raises FileNotFoundError without one."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (a fast tokenizer's file); lmforge compares "
                                "tokenizers by it")
    content = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k not in ("truncation", "padding")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Encoding


def pad_token_id(folder: Path) -> int | None:
    """The id of the pad token a tokenizer folder's tokenizer_config.json names (None if it names none)."""
    config = Path(folder) / "tokenizer_config.json"
    pad = json.loads(config.read_text()).get("pad_token") if config.is_file() else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).token_to_id(pad) if pad else None


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _merged(piece: bytes, merges: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """Byte-pair merging of one piece as `tokenizers` does it: the adjacent pair with the earliest merge first."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        rank, i = min((merges.get((parts[i], parts[i + 1]), 1 << 62), i) for i in range(len(parts) - 1))
        if rank == 1 << 62:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _fast_plan(spec: dict) -> tuple[str, dict[bytes, int], np.ndarray] | str:
    """(regex, mergeable ranks, rank->id table) for a byte-level BPE, or why it does not apply."""
    model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        return "not a plain BPE model"
    if norm is not None:
        return "has a normalizer"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = GPT2_PATTERN
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        if split.get("type") != "Split" or "Regex" not in (split.get("pattern") or {}) \
                or split.get("behavior") != "Isolated" or split.get("invert") \
                or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") \
                or byte_level.get("add_prefix_space"):
            return "pre-tokenizer is not a regex split followed by ByteLevel"
        pattern = split["pattern"]["Regex"]
    else:
        return "pre-tokenizer is not ByteLevel"
    if any(not t.get("special") for t in spec.get("added_tokens", [])):
        return "has non-special added tokens"
    decode = _byte_decoder()
    try:
        to_bytes = {s: bytes(decode[c] for c in s) for s in model["vocab"]}
    except KeyError:
        return "vocabulary is not byte-level"
    ids = {to_bytes[s]: i for s, i in model["vocab"].items()}
    if any(bytes([b]) not in ids for b in range(256)):
        return "not every byte is in the vocabulary"
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; giving each merge's
    # product the merge's index reproduces the BPE merge order (single bytes rank below every merge).
    ranks = {bytes([b]): b for b in range(256)}
    merges: dict[tuple[bytes, bytes], int] = {}
    for i, merge in enumerate(model["merges"]):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        if a not in to_bytes or b not in to_bytes:
            return "a merge uses a token missing from the vocabulary"
        ranks.setdefault(to_bytes[a] + to_bytes[b], 256 + i)
        merges.setdefault((to_bytes[a], to_bytes[b]), i)
    if any(r not in ids for r in ranks):
        return "a merge produces a token missing from the vocabulary"
    if not model.get("ignore_merges"):
        # tiktoken returns a pre-token that is itself in the vocabulary as that token; `tokenizers` does so only
        # with ignore_merges, else it applies the merges, which can end elsewhere ("b c" before "a b" leaves
        # "abc" as a|bc): identical only if every token is what the merges make of its own bytes
        odd = [piece for piece in ranks if len(piece) > 1 and _merged(piece, merges) != [piece]]
        if odd:
            return (f"ignore_merges is false and {len(odd)} vocabulary tokens are not what the merges make of their "
                    f"own bytes (e.g. {odd[0]!r})")
    lut = np.zeros(max(ranks.values()) + 1, dtype=np.int64)
    for piece, rank in ranks.items():
        lut[rank] = ids[piece]
    return pattern, ranks, lut


class Encoder:
    """Text -> token ids, through tiktoken when that is proven identical, else through `tokenizers`.

    Built from a tokenizer.json string so that worker processes can rebuild it cheaply.
    """

    def __init__(self, tokenizer_json: str, fast: bool = True):
        self.reference = Tokenizer.from_str(tokenizer_json)
        self.reference.encode_special_tokens = True  # document text is plain text (module doc)
        self.kind, self.reason, self._tiktoken, self._lut = "tokenizers", "disabled by config", None, None
        self.fallbacks = 0  # documents the fast path could not encode, encoded by `tokenizers` instead
        if fast:
            plan = _fast_plan(json.loads(tokenizer_json))
            if isinstance(plan, str):
                self.reason = plan
            else:
                import tiktoken

                pattern, ranks, lut = plan
                try:  # a pattern tiktoken's regex engine does not take, say
                    self._tiktoken = tiktoken.Encoding("lmforge", pat_str=pattern, mergeable_ranks=ranks,
                                                       special_tokens={})
                    self._lut, self.kind, self.reason = lut, "tiktoken", "byte-level BPE"
                except Exception as e:
                    self.reason = f"tiktoken cannot build it: {type(e).__name__}: {e}"

    def encode(self, text: str) -> np.ndarray:
        if self._tiktoken is not None:
            try:
                return self._lut[self._tiktoken.encode_to_numpy(text, disallowed_special=())]
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 - a Rust panic is a BaseException
                # tiktoken's regex gives up on a long whitespace run ("Max stack size exceeded for
                # backtracking"): this document goes through `tokenizers`, the reference, so its ids are the same
                self.fallbacks += 1
        return np.asarray(self.reference.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        if self._tiktoken is not None:
            return [self.encode(t) for t in texts]
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self.reference.encode_batch_fast(texts, add_special_tokens=False)]

    def verify(self, texts: Sequence[str]) -> str | None:
        """Check the fast path against `tokenizers` on `texts`; on any difference fall back and say why."""
        if self._tiktoken is None:
            return None
        for i, text in enumerate(texts):  # one at a time: a batch's Encoding objects cost ~140 bytes per character
            if not np.array_equal(self.encode(text), self.reference.encode(text, add_special_tokens=False).ids):
                self._tiktoken, self.kind = None, "tokenizers"
                self.reason = f"fast path disagreed with tokenizers on sample document {i}"
                return self.reason
        return None
