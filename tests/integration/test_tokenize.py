"""`lmforge tokenize` end to end: round trip, determinism, crash and resume, memory bound, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer

from lmforge.data.shards import ShardError, TokenShards
from lmforge.data.sources import doc_hash, hash_fraction
from pretrain import tokenize

from ..conftest import ROOT, sample_texts, write_jsonl, write_yaml

OUTPUT_FILES = ("*/*.bin", "*/*.idx", "meta.json", "tokenizer/*")


def output_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for pattern in OUTPUT_FILES for p in sorted(out.glob(pattern))}


def split_docs(out: Path, split: str) -> list[list[int]]:
    data = TokenShards(out, split)
    return [data.document(i).tolist() for i in range(data.num_documents)]


def both_readings(tmp_path: Path, tokenize_config, sources: list, common: dict) -> tuple[Path, Path, dict]:
    """Tokenize `sources` once with `reading: main` and once as the workers read: (workers' out, main's out, their
    summaries), having checked that both trained the same tokenizer and wrote the same documents in each split."""
    summaries = {}
    for reading in ("main", "workers"):
        cfg = tokenize_config(sources, out_dir=str(tmp_path / reading), reading=reading, **common)
        assert tokenize.main([str(cfg)]) == 0
        summaries[reading] = json.loads((tmp_path / reading / "summary.json").read_text())
    workers, main = tmp_path / "workers", tmp_path / "main"
    assert (workers / "tokenizer" / "tokenizer.json").read_bytes() == (main / "tokenizer" / "tokenizer.json").read_bytes()
    for split in ("train", "val"):
        assert split_docs(workers, split) == split_docs(main, split)
    return workers, main, summaries


def test_round_trip_gives_back_every_document_followed_by_eos(tmp_path, tokenize_config, tiny_tokenizer):
    texts = sample_texts(120)
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}], split={"val_fraction": 0.2})
    assert tokenize.main([str(cfg)]) == 0
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    eos = meta["tokenizer"]["eos_id"]
    decoded = {}
    for split in ("train", "val"):
        docs = split_docs(out, split)
        assert all(d[-1] == eos and eos not in d[:-1] for d in docs)  # EOS after every document, only there
        decoded[split] = [tok.decode(d[:-1], skip_special_tokens=False) for d in docs]
    want_val = [t for t in texts if hash_fraction(doc_hash(t.encode())) < 0.2]
    assert decoded["val"] == want_val and 0 < len(want_val) < len(texts)
    assert decoded["train"] == [t for t in texts if t not in want_val]  # source order kept within a split
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(texts)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 512
    assert len(meta["splits"]["train"]["shards"]) > 3  # 4 KiB shards: the run really was parallel work
    summary = json.loads((out / "summary.json").read_text())
    assert summary["documents"] == len(texts) and summary["encoder"] == "tiktoken"


def test_two_runs_are_byte_identical_and_rerun_is_a_no_op(tmp_path, tokenize_config, capsys):
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in sample_texts(80)])
    sources = [{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}]
    cfg = tokenize_config(sources, tokenizer={"train": {"vocab_size": 400}})
    assert tokenize.main([str(cfg), "workers=1"]) == 0
    assert tokenize.main([str(cfg), f"out_dir={tmp_path / 'again'}", "workers=2"]) == 0
    first, second = output_bytes(tmp_path / "out"), output_bytes(tmp_path / "again")
    assert first == second and "tokenizer/tokenizer.json" in first and "meta.json" in first
    capsys.readouterr()
    assert tokenize.main([str(cfg)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert tokenize.main([str(cfg), "split.val_fraction=0.5"]) == 1
    assert "holds finished output of a different config" in capsys.readouterr().err


def test_trained_tokenizer_loads_with_autotokenizer(tmp_path, tokenize_config):
    from transformers import AutoTokenizer

    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in sample_texts(80)])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}],
                          tokenizer={"train": {"vocab_size": 350, "special_tokens": ["<eos>", "<x>", "<pad>"],
                                               "pad_token": "<pad>"}})
    assert tokenize.main([str(cfg)]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    hf = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert hf.eos_token == "<eos>" == meta["tokenizer"]["eos_token"] and hf.eos_token_id == meta["tokenizer"]["eos_id"]
    assert hf.pad_token == "<pad>"  # the one named, not "the second special token"
    assert len(hf) == meta["tokenizer"]["vocab_size"] == 350
    first = TokenShards(tmp_path / "out").document(0).tolist()
    assert hf.decode(first[:-1]) == sample_texts(80)[0] or hf.decode(first[:-1]) in sample_texts(80)


def test_val_docs_holds_out_exactly_that_many(tmp_path, tokenize_config):
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in sample_texts(90)])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}], split={"val_docs": 7})
    assert tokenize.main([str(cfg)]) == 0
    assert TokenShards(tmp_path / "out", "val").num_documents == 7
    assert TokenShards(tmp_path / "out", "train").num_documents == 83


def test_vocab_over_65536_switches_to_uint32(tmp_path, tiny_tokenizer, tokenize_config):
    from lmforge.tokenizer import save_folder

    tok = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    tok.add_special_tokens([f"<extra_{i}>" for i in range(66_000)])
    save_folder(tok, tmp_path / "big", eos_token="<|endoftext|>")
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in sample_texts(30)])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}],
                          tokenizer={"pretrained": str(tmp_path / "big")})
    assert tokenize.main([str(cfg)]) == 0
    data = TokenShards(tmp_path / "out")
    assert data.dtype == np.uint32 and data.vocab_size == 66_512
    shard = data.meta["splits"]["train"]["shards"][0]
    assert (tmp_path / "out" / shard["file"]).stat().st_size == 4 * shard["tokens"]
    small = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert small["encoder"] == "tiktoken"  # special tokens do not stop the fast path


def test_crash_then_resume_is_byte_identical_to_an_uninterrupted_run(tmp_path, tiny_tokenizer):
    cfg = write_yaml(tmp_path / "t.yaml", {
        "out_dir": str(tmp_path / "crashed"), "sources": [{"type": "stdlib"}],
        "tokenizer": {"pretrained": str(tiny_tokenizer)}, "shard_bytes": 131072, "workers": 2, "progress": False})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.tokenize", str(cfg)], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks = tmp_path / "crashed" / "chunks"
    deadline = time.time() + 120
    while len(list(chunks.glob("0*.json"))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: main and workers, mid-write
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (tmp_path / "crashed" / "meta.json").exists()
    with pytest.raises(ShardError, match="has not finished"):
        TokenShards(tmp_path / "crashed")  # a half-finished folder is never read as data
    (tmp_path / "crashed" / "train" / ".000099.bin.x.tmp").write_bytes(b"\1\2\3")  # a half-written shard
    done_before = len(list(chunks.glob("0*.json")))

    assert tokenize.main([str(cfg)]) == 0
    summary = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert summary["shards_resumed"] >= done_before >= 4
    assert summary["shards_resumed"] < summary["shards"]
    assert not list((tmp_path / "crashed").glob("*/.*.tmp"))
    assert tokenize.main([str(cfg), f"out_dir={tmp_path / 'clean'}"]) == 0
    assert output_bytes(tmp_path / "crashed") == output_bytes(tmp_path / "clean")


def test_peak_memory_does_not_grow_with_corpus_size(tmp_path, tokenize_config):
    rng = np.random.default_rng(0)
    pieces = np.array(sample_texts(200, seed=3))
    peaks = {}
    for scale in (1, 10):
        folder = tmp_path / f"x{scale}"
        for part in range(scale):  # ~4 MB per part: 1,000 documents of ~4 KB
            docs = [" ".join(rng.choice(pieces, 12)) for _ in range(1000)]
            write_jsonl(folder / f"{part}.jsonl", [{"text": d} for d in docs])
        cfg = tokenize_config([{"type": "files", "paths": [str(folder)]}], out_dir=str(tmp_path / f"out{scale}"),
                              shard_bytes=1 << 18)  # 256 KiB: both runs reach the in-flight limit
        # a process of its own: peak RSS is a high-water mark over a process's whole life
        run = subprocess.run([sys.executable, "-m", "pretrain.tokenize", str(cfg)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr
        peaks[scale] = json.loads((tmp_path / f"out{scale}" / "summary.json").read_text())
    assert peaks[10]["bytes"] > 9 * peaks[1]["bytes"] > 30e6
    for key in ("peak_rss_main_bytes", "peak_rss_worker_bytes"):
        grew = peaks[10][key] - peaks[1][key]
        assert grew < 8e6, f"{key} grew by {grew / 1e6:.1f} MB for {peaks[10]['bytes'] / 1e6:.0f} MB of input"


def test_bad_input_stops_with_file_and_offset_and_leaves_nothing_readable(tmp_path, tokenize_config, capsys):
    (tmp_path / "ok.txt").write_text("fine text " * 500)
    (tmp_path / "zbad.txt").write_bytes(b"abc\n\xffdef")
    sources = [{"type": "files", "paths": [str(tmp_path / "*.txt")]}]
    cfg = tokenize_config(sources, utf8_errors="error")
    assert tokenize.main([str(cfg)]) == 1
    assert "zbad.txt: invalid UTF-8 at byte offset 4" in capsys.readouterr().err
    with pytest.raises(ShardError):
        TokenShards(tmp_path / "out")
    assert tokenize.main([str(cfg), "utf8_errors=replace"]) == 1  # same out_dir, different config
    assert "partial run of a different config" in capsys.readouterr().err
    (tmp_path / "zbad.txt").write_bytes(b"abc\ndef")  # fix the data, same config: resumes and finishes
    assert tokenize.main([str(cfg)]) == 0
    assert TokenShards(tmp_path / "out").num_documents + TokenShards(tmp_path / "out", "val").num_documents == 2


def test_missing_text_field_and_empty_source_are_errors_before_output(tmp_path, tokenize_config, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"content": "y"}])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "a.jsonl")]}])
    assert tokenize.main([str(cfg)]) == 1
    assert "a.jsonl:2: no 'text' field" in capsys.readouterr().err
    assert tokenize.main([str(cfg), "bad_records=skip", f"out_dir={tmp_path / 'o2'}"]) == 0
    assert json.loads((tmp_path / "o2" / "meta.json").read_text())["skipped"] == {"missing_field": 1}
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "nothing*.txt")]}],
                          out_dir=str(tmp_path / "o3"))
    assert tokenize.main([str(cfg)]) == 1
    assert "matches no data files" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()  # checked before anything was written


def test_lmforge_cli_dispatches_and_helps():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "lmforge.cli", "tokenize", "--help"], capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0 and "tokenizer.pretrained" in run.stdout
    run = subprocess.run([sys.executable, "-m", "lmforge.cli"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "tokenize" in run.stdout
    run = subprocess.run([sys.executable, "-m", "lmforge.cli", "tokenize", str(ROOT / "configs/tokenize/demo.yaml"),
                          "--dry-run"], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "vocab_size: 8192" in run.stdout


@pytest.mark.slow
def test_demo_on_the_whole_builtin_corpus_matches_tokenizers_id_for_id(tmp_path):
    """The shipped demo config: 8k BPE trained on the stdlib, every document's ids equal to what
    `tokenizers` gives, and every document decodes back to its source text."""
    from lmforge.config.tokenize import StdlibSource
    from lmforge.data.sources import Policy, open_source, read_all

    out = tmp_path / "demo"
    assert tokenize.main([str(ROOT / "configs/tokenize/demo.yaml"), f"out_dir={out}", "progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoder"] == "tiktoken" and summary["documents"] > 1500
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    tok.encode_special_tokens = True
    splits = {s: TokenShards(out, s) for s in ("train", "val")}
    next_doc = {"train": 0, "val": 0}
    texts = list(read_all([open_source(StdlibSource())], Policy()))
    val_fraction = yaml.safe_load((ROOT / "configs/tokenize/demo.yaml").read_text())["split"]["val_fraction"]
    reference = tok.encode_batch_fast(texts, add_special_tokens=False)
    for text, ref in zip(texts, reference, strict=True):
        split = "val" if hash_fraction(doc_hash(text.encode())) < val_fraction else "train"
        got = splits[split].document(next_doc[split]).tolist()
        next_doc[split] += 1
        assert got == ref.ids + [0], f"ids differ from tokenizers for a document starting {text[:60]!r}"
    assert next_doc == {s: d.num_documents for s, d in splits.items()}
    sample = texts[:: max(1, len(texts) // 200)]
    assert [tok.decode(e.ids) for e in tok.encode_batch_fast(sample, add_special_tokens=False)] == sample


def test_array_parts_then_a_plain_run_are_byte_identical_to_one_run(tmp_path, tokenize_config, capsys):
    """What a Slurm array tokenization runs: the tokenizer once, parts I/N in any order (each its chunks only,
    no meta.json), then a plain run that finds every chunk done and writes meta.json. The survey (val_docs cut,
    exact dedup) runs once, in the tokenizer job: the parts read its result instead of the whole corpus each."""
    texts = sample_texts(120)
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts + texts[:10]])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}], split={"val_docs": 12},
                          dedup="exact", tokenizer={"train": {"vocab_size": 400}}, workers=1)
    assert tokenize.main([str(cfg), f"out_dir={tmp_path / 'one'}"]) == 0
    parts = [str(cfg), f"out_dir={tmp_path / 'parts'}"]
    assert tokenize.main([*parts, "--part", "0/3"]) == 1  # before the tokenizer job
    assert "has no tokenizer yet" in capsys.readouterr().err
    assert tokenize.main([*parts, "--tokenizer-only"]) == 0
    chunks = tmp_path / "parts" / "chunks"
    (chunks / "survey.npz").rename(tmp_path / "survey.npz")
    assert tokenize.main([*parts, "--part", "1/3"]) == 1  # without the survey: each task would read everything
    assert "run `lmforge tokenize CONFIG --tokenizer-only` again first" in capsys.readouterr().err
    (tmp_path / "survey.npz").rename(chunks / "survey.npz")
    for i in (2, 0):
        assert tokenize.main([*parts, "--part", f"{i}/3"]) == 0
        assert "survey: the val cut and the duplicates from" in capsys.readouterr().out
    assert not (tmp_path / "parts" / "meta.json").exists()
    done = sorted(int(p.stem) for p in chunks.glob("[0-9]*.json") if p.stem.isdigit())
    assert done and all(i % 3 in (0, 2) for i in done)
    capsys.readouterr()
    assert tokenize.main([*parts, "--part", "0/3"]) == 0  # a rerun of a part skips its finished chunks
    mine = sum(1 for i in done if i % 3 == 0)
    assert f"part 0/3: {mine} chunks ({mine} already done)" in capsys.readouterr().out
    assert tokenize.main([*parts, "--part", "1/3"]) == 0
    assert tokenize.main(parts) == 0
    assert f"({len(list(chunks.glob('[0-9]*.json')))} resumed)" in capsys.readouterr().out
    assert output_bytes(tmp_path / "parts") == output_bytes(tmp_path / "one")
    with pytest.raises(SystemExit):
        tokenize.main([*parts, "--part", "3/3"])
    assert "expected I/N with 0 <= I < N" in capsys.readouterr().err


def test_the_tokenizer_sample_is_train_text_under_a_real_cap(tmp_path):
    """The BPE sample and the validation split used to take the same smallest-hash documents: the tokenizer was
    fitted to validation text first. The sample now comes from an independent hash, train documents only, and a
    huge document can neither fill it nor push it past `sample_bytes`. The workers' survey (each reading its own
    spans of the file) and the main process's own reading give the same sample and cut."""
    from lmforge.config.tokenize import TokenizeConfig
    from lmforge.data.sources import open_source
    from pretrain.chunks import planned
    from pretrain.survey import Wants

    texts = sample_texts(400)
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts] + [{"text": "z" * 300_000}])
    found = {}
    for reading, split in [(r, s) for s in ({"val_fraction": 0.3}, {"val_docs": 120}) for r in ("main", "workers")]:
        cfg = TokenizeConfig(out_dir=tmp_path / "o", sources=[{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}],
                             tokenizer={"train": {"vocab_size": 300, "sample_bytes": 20_000}}, split=split,
                             shard_bytes=48_000, progress=False)
        readers = [open_source(s) for s in cfg.sources]
        units = list(planned(readers, cfg.shard_bytes)) if reading == "workers" else None
        assert units is None or len(units) > 5  # the file cut in spans
        wants = Wants(20_000, cfg.split.val_fraction, cfg.split.val_docs or 0, False)
        survey = tokenize.take_survey(cfg, readers, units, wants, workers=2)
        cut = survey.val_cut()
        sample = survey.sample(cut)
        found.setdefault(str(split), []).append((sample, cut))
        val = {t for t in texts if hash_fraction(doc_hash(t.encode())) < cut}
        assert len(val) == 120 if "val_docs" in split else 90 < len(val) < 150  # ~30% of 400
        assert sample and not val & set(sample)  # no validation document in the tokenizer's sample
        held_out = len(val) / 400 if "val_docs" in split else 0.0  # the cut comes at the end: they leave then
        assert 0.9 * (1 - held_out) * 20_000 < sum(len(t.encode()) for t in sample) <= 20_000  # filled, capped
        assert max(len(t) for t in sample) <= 2_000  # a tenth of a small cap: the huge document is cut
    assert all(by_main == by_workers for by_main, by_workers in found.values())


def test_val_docs_that_hold_out_the_whole_corpus_is_an_error(tmp_path, tokenize_config, capsys):
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in sample_texts(20)])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}], split={"val_docs": 20})
    assert tokenize.main([str(cfg)]) == 1
    assert "split.val_docs is 20 but the sources hold 20 documents" in capsys.readouterr().err


@pytest.mark.parametrize("reading", ["workers", "main"])
def test_sources_with_no_document_left_are_an_error_before_a_tokenizer_is_trained(tmp_path, tokenize_config, capsys,
                                                                                   reading):
    """Every record skipped: with val_docs the workers' survey used to end in an IndexError, and with val_fraction
    a BPE was trained on nothing before the error."""
    (tmp_path / "c.jsonl").write_text('{broken\n{"text": "  "}\n')
    for n, split in enumerate(({"val_docs": 5}, {"val_fraction": 0.1})):
        cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "c.jsonl")]}], split=split, reading=reading,
                              bad_records="skip", tokenizer={"train": {"vocab_size": 300}}, out_dir=str(tmp_path / f"{n}"))
        assert tokenize.main([str(cfg)]) == 1
        assert "yielded no documents" in capsys.readouterr().err
        assert not (tmp_path / f"{n}" / "tokenizer").exists()


def test_a_resume_after_the_input_changed_redoes_what_is_stale_and_leaves_no_orphans(tmp_path, tokenize_config,
                                                                                    capsys):
    """With `split.val_docs` a changed input moves the val cut: chunks finished under the old cut must not be
    reused (they were, and the output mixed two splits). A shorter input leaves no shards of the longer run."""
    texts = sample_texts(200)
    for i in range(4):
        write_jsonl(tmp_path / "in" / f"{i}.jsonl", [{"text": t} for t in texts[50 * i:50 * i + 50]])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "in")]}], split={"val_docs": 15})
    assert tokenize.main([str(cfg)]) == 0
    (tmp_path / "out" / "meta.json").unlink()  # as if the run had stopped before its end...
    (tmp_path / "in" / "0.jsonl").unlink()  # ...and the input changed before the rerun (a shorter corpus)
    write_jsonl(tmp_path / "in" / "4.jsonl", [{"text": t + " (new)"} for t in texts[:10]])
    capsys.readouterr()
    assert tokenize.main([str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "the input changed since the partial run" in err and "1 file added" in err and "1 file removed" in err
    assert "unit records of the partial run were not reused" in err  # the cut moved: every unit encoded again
    assert tokenize.main([str(cfg), f"out_dir={tmp_path / 'fresh'}"]) == 0
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "fresh")
    assert TokenShards(tmp_path / "out", "val").num_documents == 15


def test_a_200_mb_document_is_split_and_memory_stays_bounded(tmp_path, tiny_tokenizer):
    """One 200 MB document (a file with no document breaks) used to be read, decoded, hashed and sent to a
    worker whole: ~1 GB in the main process. With max_document_bytes it streams in pieces of at most 4 MiB."""
    block = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "lmforge").glob("*.py")))
    block = block.encode()[:2**20]
    block = block[:block.rfind(b"\n") + 1]
    with open(tmp_path / "huge.txt", "wb") as f:
        for _ in range(200 * 2**20 // len(block)):
            f.write(block)
    size = (tmp_path / "huge.txt").stat().st_size
    cfg = write_yaml(tmp_path / "t.yaml", {
        "out_dir": str(tmp_path / "out"), "sources": [{"type": "files", "paths": [str(tmp_path / "huge.txt")]}],
        "tokenizer": {"pretrained": str(tiny_tokenizer)}, "max_document_bytes": 4 * 2**20, "workers": 2,
        "shard_bytes": 8 * 2**20, "progress": False, "split": {"val_fraction": 0.0}})
    # a process of its own: its peak memory (VmHWM) is this run's, not the pytest process's history
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenize", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["split_documents"] == 1 and summary["documents"] >= size // (4 * 2**20)
    assert summary["bytes"] == size  # every byte of it was encoded
    assert summary["peak_rss_main_bytes"] < 500 * 2**20, summary  # not the ~1 GB a whole 200 MB document costs
    assert summary["peak_rss_worker_bytes"] < 500 * 2**20, summary


def test_the_encoder_check_samples_every_source(tmp_path, tokenize_config, monkeypatch):
    """The fast path is checked against `tokenizers` on documents of every source, not only the first one's."""
    from lmforge.tokenizer import Encoder

    seen = []
    real = Encoder.verify
    monkeypatch.setattr(Encoder, "verify", lambda self, texts: seen.extend(texts) or real(self, texts))
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"first source {i} " + t} for i, t in enumerate(sample_texts(400))])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "second source " + t} for t in sample_texts(50)])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "a.jsonl")]},
                           {"type": "files", "paths": [str(tmp_path / "b.jsonl")]}])
    assert tokenize.main([str(cfg)]) == 0
    assert 0 < sum(t.startswith("first source") for t in seen) <= 128
    assert sum(t.startswith("second source") for t in seen) > 0


def test_a_dead_worker_and_a_foreign_meta_json_get_a_message_not_a_traceback(tmp_path, tiny_tokenizer, capsys):
    import psutil

    cfg = write_yaml(tmp_path / "t.yaml", {
        "out_dir": str(tmp_path / "out"), "sources": [{"type": "stdlib"}],
        "tokenizer": {"pretrained": str(tiny_tokenizer)}, "shard_bytes": 131072, "workers": 2, "progress": False})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.tokenize", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    chunks, deadline = tmp_path / "out" / "chunks", time.time() + 120
    while len(list(chunks.glob("0*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "python" in c.name().lower()]
    assert workers, "no worker processes found"
    os.kill(workers[-1].pid, signal.SIGKILL)  # as the kernel's OOM killer would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "a worker process died" in err and "Traceback" not in err, err[-2000:]
    assert tokenize.main([str(cfg)]) == 0  # what finished is kept; the rerun completes

    for content in ("{not json", "[1, 2]", '{"format": "something-else"}'):
        (tmp_path / "foreign").mkdir(exist_ok=True)
        (tmp_path / "foreign" / "meta.json").write_text(content)
        capsys.readouterr()
        assert tokenize.main([str(cfg), f"out_dir={tmp_path / 'foreign'}"]) == 1
        err = capsys.readouterr().err
        assert "holds something else; choose another out_dir" in err and "Traceback" not in err


def test_exact_dedup_keeps_one_copy_across_sources_and_counts_per_source(tmp_path, tokenize_config):
    texts = sample_texts(60)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:40]] + [{"text": texts[0]}])  # one repeat
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[30:60]])  # ten shared with a.jsonl
    sources = [{"type": "files", "paths": [str(tmp_path / "a.jsonl")]},
               {"type": "files", "paths": [str(tmp_path / "b.jsonl")]}]
    cfg = tokenize_config(sources, dedup="exact", split={"val_docs": 5})
    assert tokenize.main([str(cfg)]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["duplicate"] == 11
    assert [s["documents"] for s in meta["per_source"]] == [40, 20]
    assert sum(s["tokens"] for s in meta["per_source"]) == sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
    assert meta["splits"]["val"]["documents"] == 5
    kept = split_docs(tmp_path / "out", "train") + split_docs(tmp_path / "out", "val")
    assert len(kept) == 60 and len({tuple(d) for d in kept}) == 60  # every text once
    assert tokenize.main([str(cfg), f"out_dir={tmp_path / 'all'}", "dedup=none"]) == 0
    assert json.loads((tmp_path / "all" / "meta.json").read_text())["splits"]["train"]["documents"] + 5 == 71


def test_lmforge_inspect_reports_counts_sources_and_a_decoded_sample(tmp_path, tokenize_config, capsys):
    from lmforge import cli

    texts = sample_texts(30)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:20]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[20:]])
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "a.jsonl")]},
                           {"type": "files", "paths": [str(tmp_path / "b.jsonl")]}], split={"val_docs": 3})
    assert tokenize.main([str(cfg)]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "out"), "--split", "val", "--document", "1", "--tokens", "100000"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    train = meta["splits"]["train"]
    assert f"train{train['documents']:>14,}{train['tokens']:>18,}" in out.replace("train   ", "train")
    assert f"a.jsonl: {meta['per_source'][0]['documents']} documents" in out and "b.jsonl: " in out
    sample = out.split("text:\n", 1)[1]
    assert sample.rstrip("\n").removesuffix("<|endoftext|>") in texts  # the whole document, decoded
    assert cli.main(["inspect", str(tmp_path / "out"), "--document", "999"]) == 1
    assert "the train split has documents 0.." in capsys.readouterr().err


@pytest.mark.parametrize("dedup", ["none", "exact"])
def test_workers_read_their_own_spans_and_files_into_the_same_documents_as_the_main_process(tmp_path, dedup,
                                                                                             tokenize_config, capsys):
    """Issue 12, item 9: by default the workers read, parse and encode their own files and byte spans; the main
    process only lists them. The documents, their order, their split and the bad-input counts equal those of
    `reading: main` (the main process reading); a large JSONL file is cut into spans, a large compressed one is read
    whole by one worker that writes several shards; a rerun keeps every finished unit without reading it, and still
    reports what the first run skipped. The survey before encoding (the tokenizer's sample, the val_docs cut, exact
    dedup's decisions) is read by the workers too, and finds the same sample, cut and copies."""
    import gzip

    from lmforge.config.tokenize import FilesSource
    from lmforge.data.files import FilesReader

    texts = sample_texts(400)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in texts[:250]])
    repeats = texts[10:40] + texts[300:310]  # duplicates of a span's and of the compressed file's documents
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[250:] + repeats) + "{broken\n"
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "in" / "c.bin").write_bytes(b"\0" * 100)
    sources = [{"type": "files", "paths": [str(tmp_path / "in")]}]
    common = {"split": {"val_fraction": 0.2} if dedup == "none" else {"val_docs": 60}, "bad_records": "skip",
              "shard_bytes": 8192, "dedup": dedup,
              "tokenizer": {"train": {"vocab_size": 400, "sample_bytes": 40_000}}}  # from the survey: the same
    workers, main, summaries = both_readings(tmp_path, tokenize_config, sources, common)
    assert dedup == "none" or TokenShards(workers, "val").num_documents == 60
    for key in ("documents", "tokens", "bytes", "skipped", "skipped_files", "per_source"):
        assert summaries["workers"][key] == summaries["main"][key], key
    assert summaries["workers"]["skipped"] == {"malformed_json": 1, "unknown_extension": 1,
                                               **({"duplicate": 40} if dedup == "exact" else {})}
    assert summaries["workers"]["documents"] == 400 + 40 * (dedup == "none")
    records = [json.loads(p.read_text()) for p in sorted((workers / "chunks").glob("[0-9]*.json")) if p.stem.isdigit()]
    assert len(records) > 10 and all("documents_digest" in r for r in records)
    plan = list(FilesReader(FilesSource(**sources[0])).spans(8192))
    assert sum(1 for path, span, _ in plan if path.name == "a.jsonl" and span) > 10  # 117 KB: cut into spans
    files = [Path(s["file"]).name for s in json.loads((workers / "meta.json").read_text())["splits"]["train"]["shards"]]
    assert any(name.endswith("-001.bin") for name in files)  # the gzipped file: one unit, several shards

    # a crash inside the compressed file's unit: its finished shards are kept (not encoded again), the rest resumes
    big = next(r for r in records if len(r["train"]) > 1)
    (workers / "chunks" / f"{big['index']:06d}.json").unlink()
    (workers / "meta.json").unlink()
    kept = {s["file"]: (workers / s["file"]).stat().st_ino for s in big["train"]}
    before = output_bytes(workers)
    capsys.readouterr()
    cfg = tokenize_config(sources, out_dir=str(workers), reading="workers", **common)
    assert tokenize.main([str(cfg)]) == 0
    assert f"({len(records) - 1} resumed)" in capsys.readouterr().out
    assert output_bytes(workers) == {**before, "meta.json": (workers / "meta.json").read_bytes()}
    assert {f: (workers / f).stat().st_ino for f in kept} == kept
    assert json.loads((workers / "summary.json").read_text())["skipped"] == summaries["workers"]["skipped"]


def test_a_bad_record_stops_the_run_without_waiting_for_a_long_unit(tmp_path, tokenize_config, capsys):
    """A worker's error ends the run at once: the other workers' running units (here a large compressed file that
    one worker reads whole, ~10 s) are stopped, not waited for; their half-written files are cleared next run."""
    import gzip

    texts = sample_texts(200)
    (tmp_path / "in").mkdir()
    big = "".join(json.dumps({"text": f"{i} {texts[i % 200]}"}) + "\n" for i in range(150_000))
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress(big.encode(), compresslevel=1))
    (tmp_path / "in" / "b.jsonl").write_text('{"text": "fine"}\n{broken\n')
    cfg = tokenize_config([{"type": "files", "paths": [str(tmp_path / "in")]}], shard_bytes=1 << 20)  # two units
    started = time.time()
    assert tokenize.main([str(cfg)]) == 1
    assert time.time() - started < 6
    assert "b.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert tokenize.main([str(cfg), "bad_records=skip", f"out_dir={tmp_path / 'whole'}"]) == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["documents"] == 150_001 and summary["encode_seconds"] > 8  # what the failing run did not wait for


def test_a_saved_hugging_face_dataset_is_read_by_the_workers_in_row_ranges(tmp_path, tokenize_config, capsys):
    """A Hugging Face dataset in Arrow files (`save_to_disk`, or the cache `load_dataset` builds) used to be read
    by the main process alone. Its workers now read row ranges of their own, memory-mapped, for the survey and the
    encoding: the same documents, split, tokenizer, duplicates and bad-record counts as the main process reading,
    and a bad record is named by its row either way."""
    import datasets

    texts = sample_texts(300)
    datasets.Dataset.from_dict({"text": texts + texts[:20] + [None] + texts[40:45]}).save_to_disk(tmp_path / "ds")
    sources = [{"type": "hf", "name": str(tmp_path / "ds")}]
    common = {"split": {"val_docs": 30}, "dedup": "exact", "bad_records": "skip", "shard_bytes": 8192,
              "tokenizer": {"train": {"vocab_size": 400, "sample_bytes": 30_000}}}
    workers, main, summaries = both_readings(tmp_path, tokenize_config, sources, common)
    for key in ("documents", "tokens", "skipped", "per_source"):
        assert summaries["workers"][key] == summaries["main"][key], key
    assert summaries["workers"]["skipped"] == {"duplicate": 25, "not_text": 1}
    assert TokenShards(workers, "val").num_documents == 30
    records = [json.loads(p.read_text()) for p in sorted((workers / "chunks").glob("[0-9]*.json")) if p.stem.isdigit()]
    assert len(records) > 5 and all("documents_digest" in r for r in records)  # units the workers read
    assert not any("documents_digest" in json.loads(p.read_text()) for p in (main / "chunks").glob("[0-9]*.json")
                   if p.stem.isdigit())  # chunks the main process read and sent
    for reading in ("main", "workers"):
        cfg = tokenize_config(sources, out_dir=str(tmp_path / f"strict-{reading}"), reading=reading,
                              **{**common, "bad_records": "error"})
        assert tokenize.main([str(cfg)]) == 1
        assert f"dataset '{tmp_path / 'ds'}' row 321: 'text' is NoneType, not text" in capsys.readouterr().err
