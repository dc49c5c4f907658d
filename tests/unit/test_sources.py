"""Document sources and the bad-input policy: every case names the file and loses nothing."""

from __future__ import annotations

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


def test_binary_file_is_skipped_with_a_warning(tmp_path):
    (tmp_path / "img.txt").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (tmp_path / "ok.txt").write_text("fine")
    policy = Policy()
    assert docs(files(tmp_path / "img.txt", tmp_path / "ok.txt"), policy) == ["fine"]
    assert policy.skipped == {"binary_file": 1}
    assert "img.txt: looks binary" in policy.warnings[0]


def test_unreadable_paths_fail_before_any_work(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt': no such file or folder"):
        open_source(files(tmp_path / "nope.txt")).check()
    with pytest.raises(DataError, match=r"the pattern matches no files"):
        open_source(files(tmp_path / "*.jsonl")).check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"the folder holds no files"):
        open_source(files(tmp_path / "empty")).check()
    (tmp_path / "link.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(DataError, match=r"link\.txt': no such file"):
        open_source(files(tmp_path / "link.txt")).check()
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        open_source(files(tmp_path / "x.parquet")).check()


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(b'{"text": "a"}\n' * 1000)
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.jsonl\.gz: cannot read"):
        docs(files(tmp_path / "t.jsonl.gz"))


def test_a_source_with_no_documents_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n\n")
    with pytest.raises(DataError, match=r"yielded no documents \(skipped so far: \{'empty': 1\}\)"):
        docs(files(tmp_path / "blank.txt"))


def test_stdlib_corpus_is_the_interpreters_own_sources():
    paths = stdlib_files()
    assert len(paths) > 1000
    assert not any("site-packages" in p.parts for p in paths)
    assert any(p.name == "argparse.py" for p in paths)
    assert len(stdlib_files(exclude_tests=True)) < len(paths)
    reader = open_source(StdlibSource())
    assert reader.total_bytes() > 10_000_000


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
