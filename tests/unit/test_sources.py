"""Document sources and the bad-input policy: every case names the file and loses nothing."""

from __future__ import annotations

import codecs
import csv
import gzip
import json

import pytest

from lmforge.config.tokenize import FilesSource, HFSource, StdlibSource
from lmforge.data.sources import DataError, Policy, open_source, read_all, stdlib_files


def docs(spec, policy=None) -> list[str]:
    reader = open_source(spec)
    reader.check()
    return list(read_all([reader], policy or Policy()))


def files(*paths, **kw) -> FilesSource:
    return FilesSource(paths=[str(p) for p in paths], **kw)


def test_txt_one_document_per_file_or_per_block(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n")
    (tmp_path / "b.txt").write_text("block one\nstill one\n\n\n  \nblock two\n")
    assert docs(files(tmp_path / "*.txt")) == ["first doc\nline two\n", "block one\nstill one\n\n\n  \nblock two\n"]
    assert docs(files(tmp_path / "b.txt", txt_documents="blank_line")) == ["block one\nstill one", "block two"]


def test_folder_and_glob_order_is_stable_and_deduplicated(tmp_path):
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert docs(files(tmp_path, tmp_path / "a.txt")) == ["a.txt", "b.txt", "sub/c.txt"]
    assert docs(files(tmp_path / "**" / "*.txt")) == ["a.txt", "b.txt", "sub/c.txt"]


def test_jsonl_plain_and_gzipped_with_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two", "x": 1}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"body": "three"}\n')
    assert docs(files(tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", text_field="body")) == ["one", "two", "three"]


def test_csv_with_multiline_fields_and_missing_column(tmp_path):
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerow([1, "line one\nline two, with comma"])
        w.writerow([2, "x" * 200_000])  # longer than csv's default field limit
    assert docs(files(tmp_path / "a.csv")) == ["line one\nline two, with comma", "x" * 200_000]
    with pytest.raises(DataError, match=r"a\.csv: no column 'body'; columns are \['id', 'text'\]"):
        docs(files(tmp_path / "a.csv", text_field="body"))


def test_parquet_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    policy = Policy()
    assert docs(files(tmp_path / "a.parquet"), policy) == ["alpha", "beta"]
    assert policy.skipped["empty"] == 1
    with pytest.raises(DataError, match=r"no column 'content'"):
        docs(files(tmp_path / "a.parquet", text_field="content"))


def test_invalid_utf8_replace_counts_and_error_names_byte_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text\n" + b"bad \xff\xfe here\n")
    policy = Policy(utf8_errors="replace")
    assert docs(files(tmp_path / "bad.txt"), policy) == ["good text\nbad \ufffd\ufffd here\n"]
    assert policy.replaced_docs == 1
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 14 "):
        docs(files(tmp_path / "bad.txt"), Policy(utf8_errors="error"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid UTF-8 at byte offset 25 "):
        docs(files(tmp_path / "bad.jsonl"), Policy(utf8_errors="error"))


def test_lone_surrogates_from_json_escapes_follow_the_utf8_policy(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "a\\ud800b"}\n')
    policy = Policy()
    assert docs(files(tmp_path / "s.jsonl"), policy) == ["a\ufffdb"]
    assert policy.replaced_docs == 1
    with pytest.raises(DataError, match=r"s\.jsonl:1: invalid UTF-8"):
        docs(files(tmp_path / "s.jsonl"), Policy(utf8_errors="error"))


def test_empty_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "  \n"}) + "\n" + json.dumps({"text": "real"}) + "\n")
    (tmp_path / "e.txt").write_text("")
    policy = Policy()
    assert docs(files(tmp_path / "a.jsonl", tmp_path / "e.txt"), policy) == ["real"]
    assert policy.skipped == {"empty": 2}


def test_missing_field_and_malformed_json_error_or_skip(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n{"body": "no text"}\n{"text": 3}\n{not json\n["list"]\n{"text": "two"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: no 'text' field \(set text_field"):
        docs(files(path))
    policy = Policy(bad_records="skip")
    assert docs(files(path), policy) == ["one", "two"]
    assert policy.skipped == {"missing_field": 2, "not_text": 1, "malformed_json": 1}
    path.write_text('{"text": "one"}\n{not json\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        docs(files(path))


def test_binary_file_is_skipped_reported_at_once_and_listed_or_stops_the_run(tmp_path, capsys):
    (tmp_path / "img.txt").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (tmp_path / "ok.txt").write_text("fine")
    policy = Policy()
    assert docs(files(tmp_path / "img.txt", tmp_path / "ok.txt"), policy) == ["fine"]
    assert policy.skipped == {"binary_file": 1}
    assert policy.skipped_files == {str(tmp_path / "img.txt"): "looks binary (NUL bytes)"}
    assert f"[data] skipped {tmp_path / 'img.txt'}: looks binary" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"img\.txt: looks binary .*on_skipped_file: warn"):
        docs(files(tmp_path / "img.txt", tmp_path / "ok.txt"), Policy(on_skipped_file="error"))


def test_unreadable_paths_fail_before_any_work(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt': no such file or folder"):
        open_source(files(tmp_path / "nope.txt")).check()
    with pytest.raises(DataError, match=r"the pattern matches no data files"):
        open_source(files(tmp_path / "*.jsonl")).check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"the folder holds no data files"):
        open_source(files(tmp_path / "empty")).check()
    (tmp_path / "empty" / "README.md").write_text("# a dataset card")
    with pytest.raises(DataError, match=r"the folder holds no data files \(1 hidden or metadata files left out\)"):
        open_source(files(tmp_path / "empty")).check()
    (tmp_path / "link.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(DataError, match=r"link\.txt': no such file"):
        open_source(files(tmp_path / "link.txt")).check()
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        open_source(files(tmp_path / "x.parquet")).check()


def test_a_truncated_file_keeps_what_it_gave_and_is_reported(tmp_path):
    data = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(200_000)))
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "u.jsonl").write_text('{"text": "after"}\n')
    policy = Policy()
    got = docs(files(tmp_path / "t.jsonl.gz", tmp_path / "u.jsonl"), policy)
    assert 1000 < len(got) < 200_000 and got[:2] == ["doc 0", "doc 1"] and got[-1] == "after"
    assert policy.skipped_files[str(tmp_path / "t.jsonl.gz")].startswith("cannot read: Compressed file ended")
    with pytest.raises(DataError, match=r"t\.jsonl\.gz: cannot read"):
        docs(files(tmp_path / "t.jsonl.gz"), Policy(on_skipped_file="error"))


def test_a_folder_reads_data_not_metadata_and_equals_its_glob(tmp_path, capsys):
    """A dataset folder as the Hub or Spark leave it: hidden folders, a card, a checksum, a success marker."""
    data = tmp_path / "ds"
    for name, text in {"data/train-0.jsonl": '{"text": "a"}\n', "data/train-1.jsonl": '{"text": "b"}\n',
                       "README.md": "# card", ".gitattributes": "*.jsonl lfs", "_SUCCESS": "",
                       ".git/config": "[core]", ".cache/huggingface/x.jsonl": '{"text": "cached"}\n',
                       "data/.ipynb_checkpoints/train-0-checkpoint.jsonl": '{"text": "old"}\n',
                       "data/.train-1.jsonl.crc": "crc", "data/part-0.crc": "crc"}.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(text)
    reader = open_source(files(data))
    assert reader.files() == [data / "data" / "train-0.jsonl", data / "data" / "train-1.jsonl"]
    assert docs(files(data)) == docs(files(data / "**" / "*")) == ["a", "b"]
    assert "5 hidden or metadata files left out" in reader.describe()  # hidden folders are not walked into
    hidden_root = tmp_path / ".cache" / "hub" / "ds"  # a hidden folder the user names is fine
    (hidden_root).mkdir(parents=True)
    (hidden_root / "a.jsonl").write_text('{"text": "x"}\n')
    assert docs(files(hidden_root)) == docs(files(hidden_root / "*.jsonl")) == ["x"]


def test_unknown_extensions_are_reported_not_read_as_text(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "notes.docx").write_bytes(b"PK zip")
    policy = Policy()
    assert docs(files(tmp_path), policy) == ["text"]
    assert policy.skipped == {"unknown_extension": 2}
    assert "unknown extension '.safetensors'" in policy.skipped_files[str(tmp_path / "model.safetensors")]
    assert docs(files(tmp_path / "notes.docx", format="txt"), Policy()) == ["PK zip"]  # a format named: read as it


def test_every_compression_for_every_format_and_json_arrays(tmp_path):
    import bz2
    import lzma

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{"text": f"doc {i} \u00e9"} for i in range(3)]
    plain = {"t.txt": "doc 0 \u00e9", "t.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
             "t.json": json.dumps(rows, indent=1), "t.csv": "id,text\n" + "".join(f"{i},{r['text']}\n" for i, r in
                                                                              enumerate(rows))}
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
                ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}
    for name, text in plain.items():
        expected = [rows[0]["text"]] if name.endswith(".txt") else [r["text"] for r in rows]
        for suffix, fn in compress.items():
            (tmp_path / (name + suffix)).write_bytes(fn(text.encode()))
            assert docs(files(tmp_path / (name + suffix))) == expected, name + suffix
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "t.parquet")
    assert docs(files(tmp_path / "t.parquet")) == [r["text"] for r in rows]
    (tmp_path / "bad.json").write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(DataError, match=r"bad\.json:1: malformed JSON array"):
        docs(files(tmp_path / "bad.json"))


def test_byte_order_marks_decide_the_encoding_and_never_reach_the_text(tmp_path):
    import codecs

    text = "name,text\nx,h\u00e9llo \u4e16\u754c\n"
    for enc, bom in (("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE),
                     ("utf-16-be", codecs.BOM_UTF16_BE), ("utf-32-le", codecs.BOM_UTF32_LE),
                     ("utf-32-be", codecs.BOM_UTF32_BE)):
        (tmp_path / f"{enc}.csv").write_bytes(bom + text.encode(enc))  # the header's first column follows the BOM
        assert docs(files(tmp_path / f"{enc}.csv")) == ["h\u00e9llo \u4e16\u754c"], enc
        (tmp_path / f"{enc}.txt").write_bytes(bom + "h\u00e9llo".encode(enc))
        assert docs(files(tmp_path / f"{enc}.txt")) == ["h\u00e9llo"], enc  # UTF-16's NUL bytes: not "binary"
        (tmp_path / f"{enc}.jsonl").write_bytes(bom + '{"text": "h\u00e9llo"}\n'.encode(enc))
        assert docs(files(tmp_path / f"{enc}.jsonl")) == ["h\u00e9llo"], enc
    (tmp_path / "bom_header.csv").write_bytes(codecs.BOM_UTF8 + b"text,id\nfirst,1\n")  # the BOM once hid "text"
    assert docs(files(tmp_path / "bom_header.csv")) == ["first"]


def test_one_document_per_line_for_txt(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree")
    assert docs(files(tmp_path / "a.txt", txt_documents="line")) == ["one", "two", "three"]


def test_a_source_with_no_documents_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n\n")
    with pytest.raises(DataError, match=r"yielded no documents \(skipped so far: \{'empty': 1\}\)"):
        docs(files(tmp_path / "blank.txt"))


def test_stdlib_corpus_is_the_interpreters_own_sources():
    paths = stdlib_files()
    assert len(paths) > 500  # ~1,800 with test/ (python.org builds), ~650-750 where a distribution strips it
    assert not any("site-packages" in p.parts for p in paths)
    assert any(p.name == "argparse.py" for p in paths)
    assert len(stdlib_files(exclude_tests=True)) < len(paths)
    reader = open_source(StdlibSource())
    assert reader.total_bytes() > 5_000_000  # ~31 MB with test/, ~12 MB without


def test_hf_dataset_from_a_local_folder_and_missing_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a b", "", "c d"], "id": [1, 2, 3]}).save_to_disk(tmp_path / "saved")
    assert docs(HFSource(name=str(tmp_path / "saved"))) == ["a b", "c d"]
    assert docs(HFSource(name=str(tmp_path / "saved"), streaming=True)) == ["a b", "c d"]
    with pytest.raises(DataError, match=r"no column 'body'; columns are \['text', 'id'\]"):
        docs(HFSource(name=str(tmp_path / "saved"), text_field="body"))
    # a folder of data files goes through `load_dataset`, the same call a hub name takes
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "part.jsonl").write_text('{"text": "x y"}\n{"text": "z"}\n')
    assert docs(HFSource(name=str(tmp_path / "raw"))) == ["x y", "z"]
    assert docs(HFSource(name=str(tmp_path / "raw"), streaming=True)) == ["x y", "z"]


def test_hf_dataset_not_in_cache_offline_says_what_to_do():
    with pytest.raises(DataError, match=r"cannot load dataset 'lmforge-test/not-a-dataset'.*not in the local cache"):
        open_source(HFSource(name="lmforge-test/not-a-dataset")).check()


def test_a_document_over_the_cap_is_split_at_line_ends_or_characters_or_skipped(tmp_path):
    line = "x\u00e9\u4e16 " * 50 + "\n"  # multibyte characters, so a cut can fall inside one
    text = line * 300  # ~73 KB, one document in file mode
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "small.txt").write_text("small")
    policy = Policy(max_document_bytes=10_000)
    got = docs(files(tmp_path / "big.txt", tmp_path / "small.txt"), policy)
    assert "".join(got[:-1]) == text and got[-1] == "small"  # nothing lost, nothing added
    assert all(len(d.encode()) <= 10_000 for d in got) and len(got) >= 9
    assert all(d.endswith("\n") for d in got[:-2])  # cut at line ends where there are any
    assert policy.split_documents == 1
    (tmp_path / "one_line.txt").write_text(line.strip() * 400)  # ~100 KB without a line end: cut by character
    got = docs(files(tmp_path / "one_line.txt", txt_documents="line"), Policy(max_document_bytes=10_000))
    assert "".join(got) == line.strip() * 400 and max(len(d.encode()) for d in got) <= 10_000
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short"}) + "\n")
    got = docs(files(tmp_path / "r.jsonl"), Policy(max_document_bytes=10_000))
    assert "".join(got[:-1]) == text and got[-1] == "short"
    policy = Policy(max_document_bytes=10_000, long_documents="skip")
    assert docs(files(tmp_path / "big.txt", tmp_path / "small.txt", tmp_path / "r.jsonl"), policy) == ["small",
                                                                                                      "short"]
    assert policy.skipped == {"too_long": 2} and policy.split_documents == 0


def test_a_folder_follows_symlinked_folders_as_its_glob_does(tmp_path):
    """Project trees on shared filesystems link data in: `rglob` did not descend into a linked folder, so the folder
    source silently read less than the `**` glob of the same folder."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.jsonl").write_text('{"text": "linked"}\n')
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "y.jsonl").write_text('{"text": "own"}\n')
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "real")
    assert docs(files(tmp_path / "data")) == docs(files(tmp_path / "data" / "**" / "*.jsonl")) == ["linked", "own"]


def test_a_jsonl_line_past_the_cap_is_skipped_without_holding_it_and_bad_utf16_is_replaced(tmp_path):
    huge = json.dumps({"text": "x" * 3_000_000})
    (tmp_path / "a.jsonl").write_text('{"text": "before"}\n' + huge + '\n{"text": "after"}\n')
    policy = Policy(max_document_bytes=1024)  # lines longer than 2 x 1 KiB + 1 MiB are skipped, counted
    assert docs(files(tmp_path / "a.jsonl"), policy) == ["before", "after"]
    assert policy.skipped == {"too_long": 1}
    (tmp_path / "u.txt").write_bytes(b"\xff\xfe" + "ok ".encode("utf-16-le") + b"\x00\xd8" + "end".encode("utf-16-le"))
    assert docs(files(tmp_path / "u.txt")) == ["ok \ufffdend"]  # a lone surrogate: replaced, the run goes on
    (tmp_path / "c.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"c\.csv\.gz: cannot read"):
        open_source(files(tmp_path / "c.csv.gz")).check()


def test_byte_spans_read_every_line_exactly_once_and_only_where_splitting_is_safe(tmp_path):
    """Workers read large line-per-document files as byte spans side by side (issue 12, item 9): every cut, at a
    line end, inside a line, inside a multi-byte character, or right after a UTF-8 BOM, gives each line to exactly
    one span, and a line longer than a span belongs to the span where it begins. Compressed files, JSON arrays,
    UTF-16 and whole-file text documents are never cut."""
    from lmforge.data.files import FilesReader, lines, splittable

    rng = __import__("random").Random(0)
    texts = ["é" * rng.randint(0, 50) + "x" * rng.choice([1, 10, 3000]) + str(i) for i in range(400)]
    texts[200] = "y" * 200_000  # a line across many spans: the spans inside it read nothing
    path = tmp_path / "a.jsonl"
    data = codecs.BOM_UTF8 + "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    path.write_bytes(data)
    whole = [raw for _, _, raw in lines(path)]
    for cuts in ([0, len(data)], [0, 1, 2, 3, 4, len(data)], sorted({0, len(data), *rng.sample(range(len(data)), 40)}),
                 [0, data.index(b"\n") + 1, len(data)], [0, data.index(b"\n"), len(data)],
                 list(range(0, len(data), 1000)) + [len(data)]):
        got = [raw for start, end in zip(cuts, cuts[1:], strict=False) for _, _, raw in lines(path, span=(start, end))]
        assert got == whole, cuts
    reader = FilesReader(FilesSource(paths=[str(path)]))
    spans = list(reader.spans(20_000))
    assert len(spans) > 10 and all(span is not None for _, span, _ in spans)
    docs = [t for p, span, _ in spans for t in reader.read_file(p, Policy(), span)]
    assert docs == texts == list(reader.documents(Policy()))

    assert splittable(path, "auto", "file")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "d.txt").write_bytes("\n".join(texts).encode("utf-16"))
    (tmp_path / "e.txt").write_text("\n".join(texts))
    assert not any(splittable(tmp_path / n, "auto", "line") for n in ("b.jsonl.gz", "c.json", "d.txt"))
    assert splittable(tmp_path / "e.txt", "auto", "line") and not splittable(tmp_path / "e.txt", "auto", "file")
    arrays = FilesReader(FilesSource(paths=[str(tmp_path / "c.json")]))
    assert [span for _, span, _ in arrays.spans(1000)] == [None]  # read whole by one worker


def test_the_plan_stats_each_input_file_once(tmp_path, monkeypatch):
    """Listing changes, the progress bar's size, the spans and the plan digest all need a file's stat: one per file
    per run (at a million files on Lustre, each extra pass is a million metadata requests from the main process)."""
    from collections import Counter
    from pathlib import Path

    from lmforge.data.files import FilesReader
    from pretrain.chunks import input_listing, planned

    for i in range(20):
        (tmp_path / f"{i:02d}.jsonl").write_text(json.dumps({"text": f"document {i}"}) + "\n")
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(2000)))
    reader = FilesReader(FilesSource(paths=[str(tmp_path)]))
    reader.files()
    calls: Counter = Counter()
    original = Path.stat

    def counted(self, *args, **kwargs):
        calls[self.name] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", counted)
    assert len(input_listing([reader])) == 21 and reader.total_bytes() > 200_000
    units = list(planned([reader], 16_384))
    assert sum(1 for u in units for piece in u.pieces if piece[2]) > 10  # the big file came as spans
    assert set(calls) == {p.name for p in reader.files()} and max(calls.values()) == 1


def test_a_json_array_is_read_a_record_at_a_time_in_bounded_memory(tmp_path):
    """A .json file holding one array used to be read, decoded and parsed whole: a 10 GB array took ~30 GB. It is
    now parsed a record at a time from a window of the text: records longer than the window, numbers cut by its
    edge, other encodings and compression read the same, and a malformed element keeps what came before it."""
    import tracemalloc

    rows = [{"text": f"record {i} " + "\u00e9x" * (i % 400), "n": i} for i in range(4_000)]
    expected = [r["text"] for r in rows]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "one_line.json").write_text(json.dumps(rows))  # json.dump's default: the whole array on one line
    (tmp_path / "bad_early.json").write_text(json.dumps(rows[:2])[:-1] + ', {"text": oops}, ' + json.dumps(rows)[1:])
    for name, want in [("a.json", 4_000), ("one_line.json", 4_000), ("bad_early.json", 2)]:
        size = (tmp_path / name).stat().st_size
        tracemalloc.start()
        policy = Policy(bad_records="skip")
        count = sum(1 for _ in open_source(files(tmp_path / name)).documents(policy))  # nothing kept: its own memory
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # ~2.5x the file when parsed whole; now ~the window, and a bad element is not a reason to read on
        assert count == want and size > 5e6 and peak < 0.3 * size, name
    assert docs(files(tmp_path / "a.json")) == expected == docs(files(tmp_path / "one_line.json"))
    rows[3000]["text"] = "long " * 500_000  # 2.5 MB: longer than the window
    (tmp_path / "long.json").write_text(json.dumps(rows[2990:3010]))
    assert docs(files(tmp_path / "long.json")) == [r["text"] for r in rows[2990:3010]]
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(json.dumps(rows[:300]).encode("utf-16")))
    assert docs(files(tmp_path / "b.json.gz")) == expected[:300]
    numbers = "[" + ", ".join([json.dumps({"text": "a"})] + ["123456789"] * 300_000) + "]"  # numbers at every cut
    (tmp_path / "n.json").write_text(numbers)
    policy = Policy(bad_records="skip")
    assert docs(files(tmp_path / "n.json"), policy) == ["a"] and policy.skipped["missing_field"] == 300_000
    (tmp_path / "bad.json").write_text('[\n{"text": "kept"},\n{"text": "also"}\n{"text": "lost"}]')
    policy = Policy(bad_records="skip")
    assert docs(files(tmp_path / "bad.json"), policy) == ["kept", "also"] and policy.skipped["malformed_json"] == 1
    with pytest.raises(DataError, match=r"bad\.json:4: malformed JSON array: expected ',' or ']' after record 2"):
        docs(files(tmp_path / "bad.json"))
    (tmp_path / "trailing.json").write_text('[{"text": "a"}]\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"trailing\.json:2: malformed JSON array: data after the array's closing"):
        docs(files(tmp_path / "trailing.json"))
    (tmp_path / "huge.json").write_text(json.dumps([{"text": "a"}, {"text": "x" * 3_000_000}, {"text": "b"}]))
    policy = Policy(max_document_bytes=100_000)
    assert docs(files(tmp_path / "huge.json", tmp_path / "a.json"), policy)[:2] == ["a", expected[0]]
    assert policy.skipped["too_long"] == 1 and "longer than" in policy.skipped_files[str(tmp_path / "huge.json")]
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert docs(files(tmp_path / "empty.json", tmp_path / "bad.json"), Policy(bad_records="skip")) == ["kept", "also"]


def test_a_csv_line_longer_than_twice_the_document_cap_is_never_held_whole(tmp_path):
    """A CSV line used to be read whole however long (one 10 GB line: 10 GB of memory). Past twice
    max_document_bytes the rest of the file is skipped and reported, as a JSON array's record is."""
    import tracemalloc

    (tmp_path / "ok.csv").write_text('id,text\n1,"short"\n2,"two\nlines"\n')
    (tmp_path / "big.csv").write_text("id,text\n1,first\n2," + "x" * 20_000_000 + "\n3,lost\n")
    policy = Policy(max_document_bytes=100_000)
    tracemalloc.start()
    got = docs(files(tmp_path / "ok.csv", tmp_path / "big.csv"), policy)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == ["short", "two\nlines", "first"] and peak < 5e6  # the 20 MB line read past in pieces
    assert policy.skipped["too_long"] == 1 and "line 3 is longer than" in policy.skipped_files[str(tmp_path / "big.csv")]
