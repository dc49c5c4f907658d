"""The tiktoken fast path gives the same ids as `tokenizers`, and falls back when it cannot."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.tokenizer import GPT2_PATTERN, Encoder, TokenizerError, folder_hash, load_pretrained

from ..conftest import sample_texts

TRICKY = ["hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n\n", "don't we'll THEY'RE",
          "naïve café über 数据处理 🙂🙂 👩‍👩‍👧", "x1 = 42 ** 3.14e-5", "<|endoftext|> is just text here",
          "", " ", "\u200b zero width", "a" * 3000, "def f(self):\n    return {'k': [1, 2]}\n"]


def reference_ids(tokenizer_json: str, text: str) -> list[int]:
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    return tok.encode(text, add_special_tokens=False).ids


def test_fast_path_matches_tokenizers_on_tricky_text(tiny_tokenizer):
    spec = (tiny_tokenizer / "tokenizer.json").read_text()
    enc = Encoder(spec)
    assert enc.kind == "tiktoken"
    for text in TRICKY + sample_texts(100, seed=1):
        assert enc.encode(text).tolist() == reference_ids(spec, text), text
    assert enc.verify(TRICKY) is None and enc.kind == "tiktoken"


def test_special_token_text_is_never_a_control_token(tiny_tokenizer):
    for fast in (True, False):
        enc = Encoder((tiny_tokenizer / "tokenizer.json").read_text(), fast=fast)
        eos = enc.reference.token_to_id("<|endoftext|>")
        assert eos not in enc.encode("a <|endoftext|> b").tolist()
        assert enc.encode_many(["<|endoftext|>"])[0].size > 1


def test_regex_split_then_bytelevel_form_also_takes_the_fast_path():
    """Llama-3/Qwen-style pre-tokenizer: an explicit regex Split followed by ByteLevel without regex."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample_texts(200), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    enc = Encoder(tok.to_str())
    assert enc.kind == "tiktoken"
    for text in TRICKY:
        assert enc.encode(text).tolist() == reference_ids(tok.to_str(), text)


def test_normalizer_means_no_fast_path_but_same_ids(tiny_tokenizer):
    tok = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    tok.normalizer = normalizers.Lowercase()
    enc = Encoder(tok.to_str())
    assert enc.kind == "tokenizers" and enc.reason == "has a normalizer"
    assert enc.encode("Hello World").tolist() == reference_ids(tok.to_str(), "Hello World")
    assert [a.tolist() for a in enc.encode_many(["A b", "C"])] == [reference_ids(tok.to_str(), t) for t in ("A b", "C")]


def test_non_bytelevel_bpe_falls_back():
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sample_texts(50), trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"],
                                                                  show_progress=False))
    enc = Encoder(tok.to_str())
    assert enc.kind == "tokenizers" and "ByteLevel" in enc.reason


def test_verify_falls_back_on_any_disagreement(tiny_tokenizer):
    enc = Encoder((tiny_tokenizer / "tokenizer.json").read_text())
    enc._lut = np.roll(enc._lut, 1)  # a fast path that is wrong
    problem = enc.verify(["hello world"])
    assert problem and "disagreed" in problem
    assert enc.kind == "tokenizers"
    assert enc.encode("hello world").tolist() == reference_ids((tiny_tokenizer / "tokenizer.json").read_text(),
                                                               "hello world")


def test_saved_folder_loads_with_autotokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    assert hf.eos_token_id == 0 and len(hf) == 512
    enc = Encoder((tiny_tokenizer / "tokenizer.json").read_text())
    assert hf("def f(x): return x", add_special_tokens=False)["input_ids"] == enc.encode("def f(x): return x").tolist()
    assert hf.decode(enc.encode("naïve café 🙂").tolist()) == "naïve café 🙂"
    assert len(folder_hash(tiny_tokenizer)) == 16


def test_load_pretrained_names_the_problem(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer folder not found: .*nothing-here"):
        load_pretrained(str(tmp_path / "nothing-here"))
    with pytest.raises(TokenizerError, match=r"(?s)cannot load tokenizer 'lmforge-test/no-such-tok'.*local cache"):
        load_pretrained("lmforge-test/no-such-tok")


def test_a_local_pretrained_folder_is_copied_byte_for_byte_without_weights(tmp_path, tiny_tokenizer):
    import shutil

    from lmforge.tokenizer import copy_pretrained

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_tokenizer, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"\0" * 1024)  # a model folder also holds weights
    (model_dir / "config.json").write_text("{}")
    hf = load_pretrained(str(model_dir))
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    copy_pretrained(str(model_dir), hf, tmp_path / "out")
    copied = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert copied == sorted(p.name for p in tiny_tokenizer.iterdir())
    assert all((tmp_path / "out" / n).read_bytes() == (tiny_tokenizer / n).read_bytes() for n in copied)


@pytest.fixture(scope="module")
def llama3_style_bpe() -> str:
    """A 4,000-token BPE with Llama-3's split pattern (digit groups of up to 3, case-insensitive contractions),
    trained on stdlib source: larger and closer to the tokenizers users bring than the 512-token GPT-2 one."""
    from lmforge.data.sources import stdlib_files

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[:150]]
    tok.train_from_iterator(texts + sample_texts(300), trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<|end_of_text|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok.to_str()


def test_a_llama3_style_bpe_takes_the_fast_path_with_identical_ids(llama3_style_bpe):
    from lmforge.data.sources import stdlib_files

    enc = Encoder(llama3_style_bpe)
    assert enc.kind == "tiktoken"
    texts = TRICKY + ["12345678 1,000,000 3.14159", "I'M HERE, YOU'LL SEE, it'S"] + \
        [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[150:190]]
    for text in texts:
        assert enc.encode(text).tolist() == reference_ids(llama3_style_bpe, text), text[:80]


def test_long_runs_and_blobs_encode_in_seconds_with_the_reference_ids(llama3_style_bpe, tiny_tokenizer):
    """tiktoken's regex gives up on a 1 MB whitespace run (ValueError "Max stack size exceeded for backtracking"):
    such a document now goes through `tokenizers`, with the same ids, instead of ending the run with a traceback."""
    import base64
    import random
    import time

    blob = base64.b64encode(random.Random(0).randbytes(750_000)).decode()
    for spec in (llama3_style_bpe, (tiny_tokenizer / "tokenizer.json").read_text()):
        enc = Encoder(spec)
        for text in ("a" * 2**20, " " * 2**20, "\n" * 2**20, blob, ("x = 1" + " " * 5000) * 100):
            started = time.perf_counter()
            ids = enc.encode_many([text])[0]
            assert time.perf_counter() - started < 10, text[:10]
            assert ids.tolist() == reference_ids(spec, text), text[:10]
        assert enc.fallbacks >= 1 and enc.kind == "tiktoken"  # a whitespace run; the rest stayed fast


def test_an_encoder_failure_names_the_document(tiny_tokenizer, tmp_path):
    from lmforge.data.sources import DataError
    from pretrain import chunks

    class Panics(Encoder):
        def encode(self, text):
            if "boom" in text:
                raise BaseException("called `Result::unwrap()` on an `Err` value")  # as pyo3 raises a panic
            return super().encode(text)

        def encode_many(self, texts):
            return [self.encode(t) for t in texts]

    chunks.init_worker((tiny_tokenizer / "tokenizer.json").read_text(), True, 0, "<u2", 512, str(tmp_path))
    chunks._WORKER["encoder"] = Panics((tiny_tokenizer / "tokenizer.json").read_text())
    with pytest.raises(DataError, match=r"document 2 of chunk 7 \(9 characters, starting 'boom here'\)"):
        chunks.encode_chunk(7, ["fine", "boom here"], [False, False], "d", {})
    # a worker that reads its own files names the file as well
    from lmforge.config.tokenize import FilesSource

    (tmp_path / "in.txt").write_text("fine\nboom here\n")
    chunks.init_worker((tiny_tokenizer / "tokenizer.json").read_text(), True, 0, "<u2", 512, str(tmp_path),
                       [FilesSource(paths=[str(tmp_path / "in.txt")], txt_documents="line")], {})
    chunks._WORKER["encoder"] = Panics((tiny_tokenizer / "tokenizer.json").read_text())
    with pytest.raises(DataError, match=rf"document 2 of unit 3 from {tmp_path / 'in.txt'} \(9 characters"):
        chunks.encode_unit(3, [(0, str(tmp_path / "in.txt"), None)], "d", {"val_cut": 0.0}, 1 << 20)


def test_ignore_merges_decides_whether_a_whole_token_piece_may_skip_the_merges():
    """vocab a b c bc ab abc, merges "b c" then "a b" then "ab c": the merges make "abc" into a|bc, while the
    token abc exists. tiktoken returns a whole-vocabulary piece as itself, which is what `tokenizers` does only with
    ignore_merges (Llama-3 sets it); without it the fast path would give other ids, so it is not used."""
    import json

    from tokenizers.pre_tokenizers import ByteLevel

    def spec(ignore: bool) -> str:
        tok = Tokenizer(models.BPE(vocab={**{c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))},
                                          "bc": 256, "ab": 257, "abc": 258},
                                   merges=[("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=ignore))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        return tok.to_str()

    assert json.loads(spec(False))["model"]["ignore_merges"] is False
    strict, ignoring = Encoder(spec(False)), Encoder(spec(True))
    assert strict.kind == "tokenizers" and "ignore_merges is false" in strict.reason
    assert strict.encode("abc").tolist() == reference_ids(spec(False), "abc") and len(strict.encode("abc")) == 2
    assert ignoring.kind == "tiktoken" and ignoring.encode("abc").tolist() == reference_ids(spec(True), "abc") == [258]


def test_a_pattern_tiktoken_cannot_compile_falls_back_with_the_reason(tiny_tokenizer):
    """`\\X` (a grapheme cluster) is Oniguruma syntax `tokenizers` takes and tiktoken's regex engine refuses: the
    Encoder used to raise at construction; now it says why and encodes through `tokenizers`."""
    import json

    spec = json.loads((tiny_tokenizer / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\X"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    enc = Encoder(json.dumps(spec))
    assert enc.kind == "tokenizers" and enc.reason.startswith("tiktoken cannot build it: ValueError")
    assert enc.encode("ab x12 c").tolist() == reference_ids(json.dumps(spec), "ab x12 c")
