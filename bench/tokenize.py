"""Tokenization benchmark: lmforge tokenize beside the alternatives, on the built-in corpus, in one run.

    python bench/tokenize.py [--workers N] [--scale K] [--limit-docs D] [--out DIR]

Every method uses the same 8k byte-level BPE (trained here on the corpus) and the same number of
workers, and each runs in a process of its own so that its peak memory is its own:

  encode_batch   `tokenizers.Tokenizer.encode_batch_fast` over every document already in memory, on N
                 threads: the tokenizer's own limit (no reading, no writing)
  fast path      lmforge's tiktoken encoder, one thread, ids checked equal to `tokenizers` on the
                 whole corpus (its per-core rate is compared with encode_batch on one thread)
  lmforge        `python -m pretrain.tokenize` end to end: read files, encode on N workers, write shards
  lmforge-slow   the same with `tokenizer.fast=false`: the pipeline's own overhead on `tokenizers`
  lmforge-jsonl  the same documents as one JSONL file; with every lmforge run, the main process's CPU per GB
                 and the worker count at which it saturates (workers' CPU / main's: Amdahl's limit); once as
                 lmforge runs by default (workers read their own byte spans) and once with `reading: main`
                 (the main process reads and sends documents: how it was before); and twice more with the survey
                 before encoding (a tokenizer trained on a 2 MB sample, val_docs, exact dedup), its own serial share
  datasets.map   what a user writes today (nanoGPT's prepare.py shape): `load_dataset("text")`,
                 `map(tokenizer, batched=True, num_proc=N)`, then concatenate into one uint16 file
  lmforge xK     lmforge on K copies of the corpus: peak memory must not grow with the input

Rates are UTF-8 megabytes of text per second and tokens per second. End-to-end times are measured
inside the process (interpreter start-up and imports excluded) for lmforge and datasets.map alike.
Writes DIR/tokenize.json (default bench/results) and, for a full run, the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/tokenize.py`, this file's folder comes first on sys.path, where this file would
# shadow the standard library's `tokenize` module; the project root takes that place instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

from bench.report import write_section  # noqa: E402

BEGIN, END = "<!-- bench:tokenize:begin -->", "<!-- bench:tokenize:end -->"
TARGETS = {  # from the tokenization issue: what "fast enough" means
    "lmforge_vs_encode_batch": 0.9,
    "lmforge_vs_datasets_map": 1.0,
    "fast_path_vs_encode_batch_per_core": 3.0,
}


def peak_rss() -> int:
    """This process's peak resident memory, bytes (VmHWM: a spawned child's own pages only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def corpus_files(limit_docs: int | None) -> list[Path]:
    from lmforge.data.sources import stdlib_files

    files = stdlib_files()
    return files[:limit_docs] if limit_docs else files


def corpus_texts(files: list[Path]) -> list[str]:
    """The documents exactly as lmforge reads them (invalid UTF-8 replaced, empty files skipped)."""
    from lmforge.config.tokenize import FilesSource
    from lmforge.data.sources import Policy, open_source

    return list(open_source(FilesSource(paths=[str(p) for p in files], format="txt")).documents(Policy()))


# --------------------------------------------------------------------------------------------------
# Children: each prints one JSON line as the last line of its output


def child_encode_batch(work: Path, files: list[Path]) -> dict:
    from tokenizers import Tokenizer

    texts = corpus_texts(files)
    tok = Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json"))
    tok.encode_special_tokens = True  # document text is plain text, as lmforge encodes it
    start = time.perf_counter()
    encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(len(e.ids) for e in encoded) + len(texts),
            "bytes": sum(len(t.encode()) for t in texts), "documents": len(texts),
            "threads": int(os.environ["RAYON_NUM_THREADS"]), "peak_rss_bytes": peak_rss()}


def child_fast_path(work: Path, files: list[Path]) -> dict:
    import numpy as np
    from tokenizers import Tokenizer

    from lmforge.tokenizer import Encoder

    texts = corpus_texts(files)
    tokenizer_json = (work / "tokenizer" / "tokenizer.json").read_text()
    encoder = Encoder(tokenizer_json, fast=True)
    assert encoder.kind == "tiktoken", encoder.reason
    start = time.perf_counter()
    fast = encoder.encode_many(texts)
    seconds = time.perf_counter() - start
    reference = Tokenizer.from_str(tokenizer_json)
    reference.encode_special_tokens = True
    ref = reference.encode_batch_fast(texts, add_special_tokens=False)
    mismatches = sum(not np.array_equal(f, r.ids) for f, r in zip(fast, ref, strict=True))
    return {"seconds": seconds, "tokens": sum(f.size for f in fast) + len(texts),
            "bytes": sum(len(t.encode()) for t in texts), "documents": len(texts), "threads": 1,
            "identical_ids": mismatches == 0, "documents_differing": mismatches, "peak_rss_bytes": peak_rss()}


def child_datasets_map(work: Path, files: list[Path], workers: int) -> dict:
    """nanoGPT's prepare.py, pointed at text files and an HF tokenizer: the usual way today."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    cache = work / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)  # a warm Arrow cache would skip the work being measured
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    ds = datasets.load_dataset("text", data_files=[str(p) for p in files], sample_by="document",
                               encoding_errors="replace", cache_dir=str(cache), split="train")

    def process(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids], "len": [len(x) + 1 for x in ids]}

    ds = ds.map(process, batched=True, num_proc=workers, remove_columns=["text"])
    total = int(np.sum(ds["len"], dtype=np.uint64))
    out = np.memmap(work / "datasets_map.bin", dtype=np.uint16, mode="w+", shape=(total,))
    pos = 0
    shards = max(1, min(64, len(ds)))
    for i in range(shards):
        part = ds.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
        ids = np.concatenate(part["ids"]) if len(part) else np.empty(0, np.uint16)
        out[pos:pos + ids.size] = ids
        pos += ids.size
    out.flush()
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    shutil.rmtree(cache, ignore_errors=True)
    (work / "datasets_map.bin").unlink()
    return {"seconds": seconds, "tokens": total, "documents": len(ds), "workers": workers,
            "peak_rss_bytes": peak_rss(), "peak_rss_worker_bytes": children}


SURVEY = {"tokenizer": {"train": {"vocab_size": 8192, "sample_bytes": 2_000_000}}, "split": {"val_docs": 20},
          "dedup": "exact"}


def run_child(name: str, work: Path, args: argparse.Namespace, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--workers", str(args.workers)]
    if args.limit_docs:
        cmd += ["--limit-docs", str(args.limit_docs)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if run.returncode != 0:
        raise SystemExit(f"bench child '{name}' failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_lmforge(work: Path, name: str, sources: list, workers: int, fast: bool = True, **extra) -> dict:
    """`python -m pretrain.tokenize` on a config written here; its summary.json has the figures."""
    import yaml

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "out_dir": str(out), "sources": sources, "workers": workers, "progress": False,
        "tokenizer": {"pretrained": str(work / "tokenizer"), "fast": fast}, "split": {"val_fraction": 0.02},
        "shard_bytes": 4 * 2**20, **extra}))
    run = subprocess.run([sys.executable, "-m", "pretrain.tokenize", str(config)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if run.returncode != 0:
        raise SystemExit(f"lmforge tokenize ({name}) failed:\n{run.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out)
    return {"seconds": summary["total_seconds"], "encode_seconds": summary["encode_seconds"],
            "tokens": summary["tokens"], "bytes": summary["bytes"], "documents": summary["documents"],
            "workers": workers, "encoder": summary["encoder"],
            "peak_rss_bytes": summary["peak_rss_main_bytes"], "peak_rss_worker_bytes": summary["peak_rss_worker_bytes"],
            "encode_cpu_seconds": summary["encode_cpu_seconds"], "serial_share": summary["serial_share"],
            "main_cpu_seconds_per_gb": summary["main_cpu_seconds_per_gb"],
            "workers_at_saturation": summary["workers_at_saturation"], "survey": summary["survey"]}


def jsonl_corpus(work: Path, files: list[Path]) -> Path:
    """The corpus as one JSONL file of {"text": ...} records: how most downloaded corpora come."""
    path = work / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in corpus_texts(files):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def scaled_jsonl(work: Path, copies: int) -> Path:
    """`copies` distinct copies of corpus.jsonl in one file: each document prefixed with its copy's number, so that
    none is a duplicate of another."""
    path = work / f"corpus_x{copies}.jsonl"
    lines = (work / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    with open(path, "w", encoding="utf-8") as f:
        for k in range(copies):
            for line in lines:
                f.write(json.dumps({"text": f"copy {k}\n" + json.loads(line)["text"]}, ensure_ascii=False) + "\n")
    return path


def scaled_corpus(work: Path, files: list[Path], copies: int) -> Path:
    """`copies` folders of links to every corpus file: K times the input, same documents."""
    root = work / f"corpus_x{copies}"
    shutil.rmtree(root, ignore_errors=True)
    for k in range(copies):
        folder = root / f"copy{k}"
        folder.mkdir(parents=True)
        for i, path in enumerate(files):
            (folder / f"{i:05d}.txt").symlink_to(path)
    return root


# --------------------------------------------------------------------------------------------------


def rates(result: dict, nbytes: int) -> dict:
    return {**result, "mb_per_s": round(nbytes / 1e6 / result["seconds"], 3),
            "tokens_per_s": round(result["tokens"] / result["seconds"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="worker processes / threads for every method (default: all cores)")
    parser.add_argument("--scale", type=int, default=4, help="copies of the corpus for the memory-bound run")
    parser.add_argument("--limit-docs", type=int, default=None, help="use only the first D corpus files (smoke runs)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for tokenize.json")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "tokenize")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = corpus_files(args.limit_docs)

    if args.child:
        fn = {"encode_batch": lambda: child_encode_batch(args.work, files),
              "fast_path": lambda: child_fast_path(args.work, files),
              "datasets_map": lambda: child_datasets_map(args.work, files, args.workers)}[args.child]
        print(json.dumps(fn()))
        return 0

    import datasets
    import tiktoken
    import tokenizers
    import transformers

    from lmforge.tokenizer import save_folder, train_bpe

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    texts = corpus_texts(files)
    nbytes = sum(len(t.encode()) for t in texts)
    print(f"[bench] corpus: {len(texts):,} documents, {nbytes / 1e6:.1f} MB; {args.workers} workers")
    started = time.perf_counter()
    tok = train_bpe(texts, args.vocab_size, ["<|endoftext|>", "<|pad|>"], show_progress=False)
    save_folder(tok, work / "tokenizer", eos_token="<|endoftext|>", pad_token="<|pad|>")
    print(f"[bench] trained a {args.vocab_size}-token BPE in {time.perf_counter() - started:.1f} s")
    del texts, tok

    # the built-in corpus as a user names it; a --limit-docs slice as a list of the same files
    sources = ([{"type": "files", "format": "txt", "paths": [str(p) for p in files]}] if args.limit_docs
               else [{"type": "stdlib"}])
    threads = {"TOKENIZERS_PARALLELISM": "true"}
    results = {}
    steps = [
        ("encode_batch", lambda: run_child("encode_batch", work, args, {**threads, "RAYON_NUM_THREADS": str(args.workers)})),
        ("encode_batch_1thread", lambda: run_child("encode_batch", work, args, {**threads, "RAYON_NUM_THREADS": "1"})),
        ("fast_path_1thread", lambda: run_child("fast_path", work, args)),
        ("lmforge", lambda: run_lmforge(work, "lmforge", sources, args.workers)),
        ("lmforge_tokenizers", lambda: run_lmforge(work, "lmforge_slow", sources, args.workers, fast=False)),
        ("lmforge_jsonl", lambda: run_lmforge(work, "lmforge_jsonl", [
            {"type": "files", "paths": [str(jsonl_corpus(work, files))]}], args.workers)),
        # before issue 12's item 9: the main process reads, parses and hashes, the workers only encode
        ("lmforge_jsonl_main_reading", lambda: run_lmforge(work, "lmforge_jsonl_main", [
            {"type": "files", "paths": [str(work / "corpus.jsonl")]}], args.workers, reading="main")),
        # the pass before encoding (a tokenizer trained on a 2 MB sample, 20 documents held out, exact dedup): the
        # workers read for it, or (before) the main process read the whole corpus for it
        ("lmforge_jsonl_survey", lambda: run_lmforge(work, "lmforge_jsonl_survey", [
            {"type": "files", "paths": [str(work / "corpus.jsonl")]}], args.workers, **SURVEY)),
        ("lmforge_jsonl_survey_main_reading", lambda: run_lmforge(work, "lmforge_jsonl_survey_main", [
            {"type": "files", "paths": [str(work / "corpus.jsonl")]}], args.workers, reading="main", **SURVEY)),
        ("datasets_map", lambda: run_child("datasets_map", work, args, {"TOKENIZERS_PARALLELISM": "false"})),
    ]
    for name, step in steps:
        results[name] = rates(step(), nbytes)
        r = results[name]
        print(f"[bench] {name:22s} {r['seconds']:7.2f} s  {r['mb_per_s']:7.2f} MB/s  "
              f"{r['tokens_per_s'] / 1e6:6.2f}M tok/s  peak RSS {r['peak_rss_bytes'] / 1e6:7.1f} MB")
    if args.scale > 1:
        corpus = scaled_corpus(work, files, args.scale)
        scaled = run_lmforge(work, f"lmforge_x{args.scale}", [{"type": "files", "paths": [str(corpus)]}], args.workers)
        results[f"lmforge_x{args.scale}"] = rates(scaled, scaled["bytes"])
        shutil.rmtree(corpus)
        # the survey's serial share past its fixed costs (pool start-up, the first wave of sample candidates): K
        # distinct copies of the JSONL corpus (each document prefixed with its copy's number)
        big_jsonl = scaled_jsonl(work, args.scale)
        survey = run_lmforge(work, f"lmforge_jsonl_survey_x{args.scale}", [{"type": "files", "paths": [str(big_jsonl)]}],
                             args.workers, **SURVEY)
        results[f"lmforge_jsonl_survey_x{args.scale}"] = rates(survey, survey["bytes"])
        big_jsonl.unlink()
        r = results[f"lmforge_x{args.scale}"]
        print(f"[bench] {f'lmforge x{args.scale}':22s} {r['seconds']:7.2f} s  {r['mb_per_s']:7.2f} MB/s  "
              f"peak RSS main {r['peak_rss_bytes'] / 1e6:.1f} MB, worker {r['peak_rss_worker_bytes'] / 1e6:.1f} MB")

    assert results["fast_path_1thread"]["identical_ids"], "fast path ids differ from tokenizers"
    assert results["encode_batch"]["tokens"] == results["lmforge"]["tokens"], "lmforge and tokenizers token counts differ"
    mb = {k: v["mb_per_s"] for k, v in results.items()}
    ratios = {
        "lmforge_vs_encode_batch": round(mb["lmforge"] / mb["encode_batch"], 2),
        "lmforge_vs_datasets_map": round(mb["lmforge"] / mb["datasets_map"], 2),
        "fast_path_vs_encode_batch_per_core": round(mb["fast_path_1thread"] / mb["encode_batch_1thread"], 2),
        "lmforge_tokenizers_vs_encode_batch": round(mb["lmforge_tokenizers"] / mb["encode_batch"], 2),
        "lmforge_jsonl_vs_encode_batch": round(mb["lmforge_jsonl"] / mb["encode_batch"], 2),
        # the main process's CPU per GB of input and where more workers stop helping (issue 12, item 9)
        "main_cpu_seconds_per_gb_files": results["lmforge"]["main_cpu_seconds_per_gb"],
        "main_cpu_seconds_per_gb_jsonl": results["lmforge_jsonl"]["main_cpu_seconds_per_gb"],
        "workers_at_saturation_files": results["lmforge"]["workers_at_saturation"],
        "workers_at_saturation_jsonl": results["lmforge_jsonl"]["workers_at_saturation"],
        "main_cpu_seconds_per_gb_jsonl_main_reading": results["lmforge_jsonl_main_reading"]["main_cpu_seconds_per_gb"],
        "workers_at_saturation_jsonl_main_reading": results["lmforge_jsonl_main_reading"]["workers_at_saturation"],
        # the same for the survey before encoding (tokenizer sample, val_docs cut, dedup decisions)
        "survey_main_cpu_seconds_per_gb_jsonl": results["lmforge_jsonl_survey"]["survey"]["main_cpu_seconds_per_gb"],
        "survey_main_cpu_seconds_per_gb_jsonl_main_reading":
            results["lmforge_jsonl_survey_main_reading"]["survey"]["main_cpu_seconds_per_gb"],
        "survey_workers_at_saturation_jsonl": results["lmforge_jsonl_survey"]["survey"]["workers_at_saturation"],
        "survey_seconds_jsonl": results["lmforge_jsonl_survey"]["survey"]["seconds"],
        "survey_seconds_jsonl_main_reading": results["lmforge_jsonl_survey_main_reading"]["survey"]["seconds"],
    }
    if args.scale > 1:
        big, small = results[f"lmforge_x{args.scale}"], results["lmforge"]
        # the rate past start-up (tokenizer load, id check, worker spawn): what a terabyte corpus sees
        marginal = (big["bytes"] - small["bytes"]) / 1e6 / max(big["seconds"] - small["seconds"], 1e-9)
        ratios["lmforge_marginal_mb_per_s"] = round(marginal, 2)
        ratios["lmforge_marginal_vs_encode_batch"] = round(marginal / mb["encode_batch"], 2)
        ratios["peak_rss_main_growth_at_scale"] = round(big["peak_rss_bytes"] / small["peak_rss_bytes"], 2)
        ratios["peak_rss_worker_growth_at_scale"] = round(big["peak_rss_worker_bytes"] / small["peak_rss_worker_bytes"], 2)
        big, small = results[f"lmforge_jsonl_survey_x{args.scale}"], results["lmforge_jsonl_survey"]
        grown = {who: big["survey"]["cpu_seconds"][who] - small["survey"]["cpu_seconds"][who] for who in ("main", "workers")}
        # the survey's main-process CPU per GB past its fixed costs, and where it would saturate (Amdahl)
        ratios["survey_marginal_main_cpu_seconds_per_gb"] = round(grown["main"] / ((big["bytes"] - small["bytes"]) / 1e9), 2)
        ratios["survey_marginal_workers_at_saturation"] = round(grown["workers"] / max(grown["main"], 1e-9), 1)
    report = {
        "benchmark": "tokenize",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "workers": args.workers, "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "versions": {"tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__,
                     "datasets": datasets.__version__, "transformers": transformers.__version__},
        "corpus": {"documents": results["lmforge"]["documents"], "bytes": nbytes, "files": len(files),
                   "vocab_size": args.vocab_size, "scale": args.scale},
        "results": results,
        "ratios": ratios,
        "targets": {k: {"target": t, "measured": ratios[k], "met": ratios[k] >= t} for k, t in TARGETS.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenize.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {args.out / 'tokenize.json'}")
    for key, t in report["targets"].items():
        print(f"[bench] {key}: {t['measured']}x (target >= {t['target']}x) {'met' if t['met'] else 'NOT MET'}")
    if not args.limit_docs:
        write_table(report, ROOT / "BENCHMARKS.md")
    return 0


def write_table(report: dict, path: Path) -> None:
    """Replace the tokenize section of BENCHMARKS.md (between its markers) with this run's table."""
    r, ratio, c, m = report["results"], report["ratios"], report["corpus"], report["machine"]
    scale = c["scale"]

    def row(name: str, key: str, what: str) -> str:
        x = r[key]
        worker = f" / {x['peak_rss_worker_bytes'] / 1e6:.0f}" if "peak_rss_worker_bytes" in x else ""
        return (f"| {name} | {what} | {x['seconds']:.2f} | {x['mb_per_s']:.2f} | {x['tokens_per_s'] / 1e6:.2f} | "
                f"{x['mb_per_s'] / r['encode_batch']['mb_per_s']:.2f}x | {x['peak_rss_bytes'] / 1e6:.0f}{worker} |")

    lines = [
        BEGIN,
        f"Measured {report['date']} by `make bench` (`python bench/tokenize.py`) on {m['cpus']} CPU cores "
        f"({m['processor']}, Python {m['python']}), {m['workers']} workers for every method. Corpus: the built-in "
        f"one, {c['documents']:,} documents, {c['bytes'] / 1e6:.1f} MB; an {c['vocab_size']:,}-token byte-level BPE "
        "trained on it. Raw figures: `bench/results/tokenize.json`.",
        "",
        "| method | what it does | seconds | MB/s | M tokens/s | vs encode_batch | peak RSS MB (main / worker) |",
        "|---|---|---:|---:|---:|---:|---:|",
        row("`tokenizers` encode_batch", "encode_batch", f"encode in memory, {m['workers']} threads (the tokenizer's limit)"),
        row("`tokenizers` encode_batch", "encode_batch_1thread", "encode in memory, 1 thread"),
        row("lmforge fast path", "fast_path_1thread", "encode in memory, 1 thread, identical ids"),
        row("**lmforge tokenize**", "lmforge", "read files, encode, write shards (end to end)"),
        row("lmforge tokenize, `fast=false`", "lmforge_tokenizers", "the same on `tokenizers`"),
        row("lmforge tokenize, JSONL", "lmforge_jsonl", "the same documents as one JSONL file (end to end)"),
        row("lmforge tokenize, JSONL, `reading: main`", "lmforge_jsonl_main_reading",
            "the same, the main process reading (before workers read)"),
        row("lmforge tokenize, JSONL, with the survey", "lmforge_jsonl_survey",
            "training its tokenizer (2 MB sample), val_docs, exact dedup"),
        row("lmforge tokenize, JSONL, with the survey, `reading: main`", "lmforge_jsonl_survey_main_reading",
            "the same, the main process reading for the survey and the encoding (before)"),
        row("`datasets.map` + concatenate", "datasets_map", "nanoGPT `prepare.py` shape (end to end)"),
    ]
    if f"lmforge_x{scale}" in r:
        lines.append(row(f"lmforge tokenize, {scale}x corpus", f"lmforge_x{scale}", f"{scale}x the input, end to end"))
        lines.append(row(f"lmforge tokenize, JSONL with the survey, {scale}x", f"lmforge_jsonl_survey_x{scale}",
                         f"{scale} distinct copies of the JSONL corpus, training its tokenizer, val_docs, exact dedup"))
    lines += [
        "",
        "| ratio | measured | target |",
        "|---|---:|---:|",
        f"| lmforge end to end / raw encode_batch ({m['workers']} threads) | {ratio['lmforge_vs_encode_batch']:.2f}x | >= 0.9x |",
        f"| lmforge end to end / `datasets.map` | {ratio['lmforge_vs_datasets_map']:.2f}x | >= 1.0x |",
        f"| fast path / encode_batch, per core (ids identical on every document) | "
        f"{ratio['fast_path_vs_encode_batch_per_core']:.2f}x | >= 3.0x |",
        f"| lmforge on `tokenizers` / raw encode_batch (pipeline overhead) | "
        f"{ratio['lmforge_tokenizers_vs_encode_batch']:.2f}x | |",
    ]
    lines += [
        f"| the main process's CPU per GB of input, built-in corpus (files) | "
        f"{ratio['main_cpu_seconds_per_gb_files']:.1f} s | |",
        f"| the main process's CPU per GB of input, JSONL: workers read / main reads (before) | "
        f"{ratio['main_cpu_seconds_per_gb_jsonl']:.1f} s / {ratio['main_cpu_seconds_per_gb_jsonl_main_reading']:.1f} s"
        " | |",
        f"| workers before the main process saturates (workers' CPU / main's), files | "
        f"{ratio['workers_at_saturation_files']:.1f} | |",
        f"| workers before the main process saturates, JSONL: workers read / main reads (before) | "
        f"{ratio['workers_at_saturation_jsonl']:.1f} / {ratio['workers_at_saturation_jsonl_main_reading']:.1f} | |",
        f"| the survey before encoding (2 MB tokenizer sample, val_docs, exact dedup), JSONL: the main process's CPU "
        f"per GB, workers read / main reads (before) | {ratio['survey_main_cpu_seconds_per_gb_jsonl']:.1f} s / "
        f"{ratio['survey_main_cpu_seconds_per_gb_jsonl_main_reading']:.1f} s | |",
        f"| the survey: seconds, workers read / main reads; workers before the main process saturates | "
        f"{ratio['survey_seconds_jsonl']:.1f} s / {ratio['survey_seconds_jsonl_main_reading']:.1f} s; "
        f"{ratio['survey_workers_at_saturation_jsonl']:.1f} | |",
    ]
    if "peak_rss_main_growth_at_scale" in ratio:
        lines += [f"| lmforge past start-up ({ratio['lmforge_marginal_mb_per_s']:.1f} MB/s, from the 1x and {scale}x runs) "
                  f"/ raw encode_batch | {ratio['lmforge_marginal_vs_encode_batch']:.2f}x | |",
                  f"| the survey past its fixed costs (from the 1x and {scale}x JSONL runs): the main process's CPU per "
                  f"GB; workers before it saturates | {ratio['survey_marginal_main_cpu_seconds_per_gb']:.2f} s; "
                  f"{ratio['survey_marginal_workers_at_saturation']:.0f} | |",
                  f"| peak RSS at {scale}x input / at 1x: main process | {ratio['peak_rss_main_growth_at_scale']:.2f}x | ~1x |",
                  f"| peak RSS at {scale}x input / at 1x: worker | {ratio['peak_rss_worker_growth_at_scale']:.2f}x | ~1x |"]
    lines.append(END)
    write_section(path, BEGIN, END, "Tokenization", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
