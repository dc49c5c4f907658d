"""`lmforge tokenize CONFIG.yaml [key=value ...]`: text sources -> tokenizer -> token shards.

Reads top to bottom: config -> sources -> plan (units of files and byte spans) -> survey, when something needs
the whole corpus first (the tokenizer's sample, the val_docs cut, exact dedup) -> tokenizer (train or load) ->
encoder check -> units that N worker processes read, parse and encode, each shard published atomically ->
meta.json -> summary.

The main process only plans and merges; the workers read, for the survey and for encoding. Only a streaming
dataset (or `reading: main`) makes the main process read and send chunks of documents. Memory stays
bounded: at most 2 x workers units in flight, each worker holding one shard of `shard_bytes` at a time. A rerun
skips every unit whose completion record matches (the files, their sizes and times; or the documents, for read
chunks), so a crashed run resumes and ends byte-identical to an uninterrupted one. meta.json is written last; a
folder without it is never read as data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from lmforge import atomic
from lmforge.completion import older_match
from lmforge.config import save_config, to_yaml
from lmforge.config.base import DIGEST_VERSION
from lmforge.config.command import parse_command
from lmforge.config.tokenize import TokenizeConfig
from lmforge.data.shards import FORMAT, SPLITS, ShardError, read_meta, token_dtype
from lmforge.data.sources import (
    DataError,
    Policy,
    describe_bytes,
    open_source,
    read_all,
    read_sources,
)
from lmforge.throughput import peak_rss
from lmforge.tokenizer import (
    Encoder,
    TokenizerError,
    copy_pretrained,
    folder_hash,
    load_pretrained,
    save_folder,
    train_bpe,
)
from pretrain.chunks import (
    chunked,
    encode_chunk,
    encode_unit,
    finished_record,
    init_worker,
    input_listing,
    listing_change,
    merge_counts,
    per_source,
    planned,
    read_json,
    shards_of,
    survey_unit,
)
from pretrain.survey import Survey, Wants, load_result, save_result, seed_for, survey_docs

KEYS_HELD = 2**28  # bytes of dedup keys (8 per document) that may wait for a slow unit before the survey stops sending
VERIFY_DOCS = 256  # documents checked for fast-encoder/tokenizers id identity at start-up...
VERIFY_BYTES = 2 * 2**20  # ...up to this much text (bytes): ~0.4 s, a fixed cost of every run...
VERIFY_DOC_BYTES = 256 * 2**10  # ...each document cut to this: `tokenizers` holds ~140 bytes per character encoded


def part_arg(text: str) -> tuple[int, int]:
    import argparse

    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, e.g. 3/16; got {text!r}")
    return int(index), int(count)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_command("lmforge tokenize", TokenizeConfig, argv, __doc__.split("\n")[0], extra={
        "--tokenizer-only": {"action": "store_true", "help": "train or load the tokenizer into OUT_DIR/tokenizer "
                             "and stop: the first job of an array tokenization"},
        "--part": {"type": part_arg, "metavar": "I/N", "help": "encode only chunks I, I+N, I+2N, ... (a Slurm array "
                   "task; the tokenizer must be there already); a plain run afterwards writes meta.json"}})
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    try:
        return run(cfg, part=args.part, tokenizer_only=args.tokenizer_only)
    except (DataError, TokenizerError) as e:
        print(f"lmforge tokenize: error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print("lmforge tokenize: error: a worker process died (killed by the system: out of memory? lower "
              "`workers`, `shard_bytes` or `max_document_bytes`); finished chunks are kept: rerun the same command "
              "to resume", file=sys.stderr)
        return 1


def run(cfg: TokenizeConfig, part: tuple[int, int] | None = None, tokenizer_only: bool = False) -> int:
    """Tokenize. `part` (I, N): encode only the chunks whose index is I mod N, write no meta.json (array tasks,
    run side by side on one folder). `tokenizer_only`: stop once OUT_DIR/tokenizer is there."""
    started = time.time()
    out = Path(cfg.out_dir)
    digest = cfg.output_digest()

    # -- sources: everything that can be checked without reading it all fails now --------------
    readers = [open_source(spec) for spec in cfg.sources]
    for reader in readers:
        reader.check()
    if (out / "meta.json").exists():
        try:
            done = read_meta(out)
        except ShardError as e:
            raise DataError(f"{e}: out_dir {out} holds something else; choose another out_dir") from None
        if done.get("config_digest") == digest or older_match(done, out, cfg):
            print(f"[tokenize] {out} is already complete for this config; nothing to do")
            return 0
        raise DataError(f"{out} holds finished output of a different config; choose another out_dir "
                        "or delete that folder")
    state = out / "chunks" / "state.json"
    if state.exists() and read_json(state).get("config_digest") != digest and not older_match(read_json(state), out, cfg):
        raise DataError(f"{out} holds a partial run of a different config; choose another out_dir or delete "
                        "that folder")
    out.mkdir(parents=True, exist_ok=True)
    if part is None:  # array tasks share the folder: another task's files being written are not leftovers
        atomic.remove_leftovers(out)  # half-written files of a crashed run
    save_config(cfg, out / "config.yaml")
    listing = input_listing(readers)
    if state.exists():  # a resume: say whether the input moved under the partial run, and what that means
        change = listing_change(read_json(state).get("inputs"), listing)
        if change:
            print(f"[tokenize] the input changed since the partial run in {out} ({change}): chunks whose "
                  "documents, split or tokenizer differ are encoded again, the rest are kept", file=sys.stderr)
    atomic.write_json(state, {"config_digest": digest, "digest_version": DIGEST_VERSION, "inputs": listing})
    for reader in readers:
        print(f"[tokenize] source: {reader.describe()}")

    # -- the survey, when something needs the whole corpus before encoding: the tokenizer's training sample, the
    # cut that holds out exactly val_docs, exact dedup's decisions (pretrain/survey.py). The workers read for it
    # as they do for encoding; the main process merges what each unit sends back (a few bytes per document)
    tok_dir = out / "tokenizer"
    need_sample = cfg.tokenizer.train is not None and not (tok_dir / "tokenizer.json").exists()
    if part is not None and not (tok_dir / "tokenizer.json").exists():
        raise TokenizerError(f"{tok_dir} has no tokenizer yet: an array task encodes with the tokenizer the first "
                             "job made (`lmforge tokenize CONFIG --tokenizer-only`); run that first")
    workers = cfg.workers or len(os.sched_getaffinity(0))
    planned_reading = cfg.reading == "workers" and all(r.plannable() for r in readers)
    units = list(planned(readers, cfg.shard_bytes)) if planned_reading else None  # 100 bytes each: 1e6 for 16 TB
    wants = Wants(cfg.tokenizer.train.sample_bytes if need_sample else 0, cfg.split.val_fraction,
                  cfg.split.val_docs or 0, cfg.dedup == "exact")
    val_cut, drops, surveyed = cfg.split.val_fraction, {}, None
    kept_survey = out / "chunks" / "survey.npz"  # the cut and the drops for array tasks and resumes: one per plan
    plan = hashlib.blake2b(json.dumps([DIGEST_VERSION, [u.digest for u in units or ()], wants.val_fraction,
                                       wants.val_docs, wants.dedup]).encode()).hexdigest()
    saved = load_result(kept_survey, plan) if planned_reading else None
    if saved is not None and not wants.sample_bytes and (wants.val_docs or wants.dedup):
        val_cut, drops = saved
        print(f"[tokenize] survey: the val cut and the duplicates from {kept_survey} (the same files and config)")
    elif wants.sample_bytes or wants.val_docs or (wants.dedup and planned_reading):
        if part is not None and planned_reading:  # N tasks surveying the whole corpus each: N times the reading
            raise DataError(f"{kept_survey} is missing or was made for other files or settings: an array task reads "
                            "the survey (val_docs cut, dedup) the tokenizer job made; run `lmforge tokenize CONFIG "
                            "--tokenizer-only` again first")
        survey_start, survey_cpu = time.time(), cpu_seconds()
        survey = take_survey(cfg, readers, units, wants, workers)
        main_cpu, worker_cpu = (end - begin for end, begin in zip(cpu_seconds(), survey_cpu, strict=True))
        surveyed = {"seconds": round(time.time() - survey_start, 3),
                    "cpu_seconds": {"main": round(main_cpu, 3), "workers": round(worker_cpu, 3)},
                    "sample_bytes_received": survey.received}
        if survey.count == 0:
            raise DataError("the sources yielded no documents (every record empty or skipped?); check their paths, "
                            "text_field and bad_records")
        if wants.val_docs >= survey.count:
            raise DataError(f"split.val_docs is {wants.val_docs:,} but the sources hold {survey.count:,} documents: "
                            "nothing would be left to train on; hold out fewer (or use split.val_fraction)")
        val_cut, drops = survey.val_cut(), survey.drops
        sample = survey.sample(val_cut) if need_sample else []
        if planned_reading:
            save_result(kept_survey, plan, val_cut, drops, survey.count)
        del survey
    if planned_reading and wants.dedup:  # the drops join each unit's digest: reused only under the same decisions
        for unit in units:
            unit.hasher.update(json.dumps(drops[unit.index].tolist()).encode())
    # -- tokenizer ------------------------------------------------------------------------------
    if cfg.tokenizer.train is not None:
        t = cfg.tokenizer.train
        eos_token = t.special_tokens[0]
        if need_sample:
            print(f"[tokenize] training a {t.vocab_size}-token byte-level BPE on "
                  f"{describe_bytes(sum(len(s) for s in sample))} of text")
            tok = train_bpe(sample, t.vocab_size, t.special_tokens, t.min_frequency, show_progress=cfg.progress)
            save_folder(tok, tok_dir, eos_token=eos_token, pad_token=t.pad_token)
            del sample, tok
    else:
        hf = load_pretrained(cfg.tokenizer.pretrained)
        eos_token = cfg.tokenizer.eos_token or hf.eos_token
        if eos_token is None:
            raise TokenizerError(f"tokenizer '{cfg.tokenizer.pretrained}' has no EOS token; set tokenizer.eos_token")
        if not (tok_dir / "tokenizer.json").exists():
            if not hf.is_fast:
                raise TokenizerError(f"tokenizer '{cfg.tokenizer.pretrained}' has no tokenizer.json "
                                     "(a `tokenizers` backend); convert it or pick another")
            copy_pretrained(cfg.tokenizer.pretrained, hf, tok_dir)
    if tokenizer_only:
        print(f"[tokenize] tokenizer ready in {tok_dir}")
        return 0
    tokenizer_json = (tok_dir / "tokenizer.json").read_text(encoding="utf-8")
    encoder = Encoder(tokenizer_json, fast=cfg.tokenizer.fast)
    vocab_size = encoder.reference.get_vocab_size(with_added_tokens=True)
    eos_id = encoder.reference.token_to_id(eos_token)
    if eos_id is None:
        raise TokenizerError(f"EOS token {eos_token!r} is not in the tokenizer's vocabulary; set tokenizer.eos_token")
    dtype = token_dtype(vocab_size)
    # what a finished chunk's shards depend on besides its documents: reused only when all of it matches
    binding = {"tokenizer_hash": folder_hash(tok_dir), "val_cut": val_cut}

    # -- encoder check: the fast path must give identical ids on real documents ----------------
    probe = []
    for reader in readers:  # the first documents of every source, each its share of the budget
        taken = taken_bytes = 0
        for text in read_all([reader], Policy("replace", "skip", report=False, max_document_bytes=VERIFY_DOC_BYTES)):
            probe.append(text)
            taken, taken_bytes = taken + 1, taken_bytes + len(text)
            if taken >= VERIFY_DOCS // len(readers) or taken_bytes >= VERIFY_BYTES // len(readers):
                break
    problem = encoder.verify(probe)
    if problem:
        print(f"[tokenize] warning: {problem}; using tokenizers", file=sys.stderr)
    print(f"[tokenize] tokenizer: vocab {vocab_size}, EOS {eos_token!r} = {eos_id}, ids as {dtype.name}, "
          f"encoder {encoder.kind} ({encoder.reason})")

    # -- encode: units of files, byte spans or dataset row ranges that workers read, parse and encode themselves
    # (the main process only lists them: its serial share stays small at any worker count); or, for a streaming
    # dataset, chunks of documents the main process reads
    policy = Policy.of(cfg)
    if not planned_reading:
        units = chunked(read_sources(readers, policy), cfg.shard_bytes, val_cut, wants.dedup, policy)
    totals = [r.total_bytes() for r in readers]
    bar = tqdm(total=sum(totals) if None not in totals else None, unit="B", unit_scale=True, desc="tokenize",
               disable=not cfg.progress, dynamic_ncols=True, smoothing=0.1)
    records: dict[int, dict] = {}
    docs = nbytes = tokens = resumed = peak_worker = fallbacks = 0

    def collect(chunk_bytes: int, record: dict) -> None:
        nonlocal docs, nbytes, tokens, peak_worker, fallbacks
        peak_worker = max(peak_worker, record.pop("peak_rss", 0))
        fallbacks += record.pop("fallbacks", 0)
        records[record["index"]] = record
        docs += sum(s["documents"] for split in SPLITS for s in shards_of(record, split))
        tokens += sum(s["tokens"] for split in SPLITS for s in shards_of(record, split))
        nbytes += record.get("bytes", chunk_bytes)
        bar.update(chunk_bytes)
        elapsed = max(time.time() - encode_start, 1e-9)
        bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed / 1e6:.2f}M tok/s", refresh=False)

    earlier = sum(1 for p in (out / "chunks").glob("[0-9]*.json") if p.stem.isdigit())  # a partial run's units
    encode_start = time.time()
    cpu_start = cpu_seconds()
    context = multiprocessing.get_context("spawn")  # not fork: the parent may hold tokenizers' threads
    init = (tokenizer_json, encoder.kind == "tiktoken", eos_id, dtype.str, vocab_size, str(out), cfg.sources,
            policy_args(cfg))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=init) as pool:
        pending: dict = {}
        try:
            for chunk in units:
                if part is not None and chunk.index % part[1] != part[0]:
                    bar.update(chunk.nbytes)  # another array task's: passed over (read past, for read chunks)
                    continue
                done = finished_record(out, chunk, dtype, binding)
                if done is not None:
                    resumed += 1
                    collect(chunk.nbytes, done)
                    continue
                while len(pending) >= 2 * workers:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        collect(pending.pop(future), future.result())
                if planned_reading:
                    future = pool.submit(encode_unit, chunk.index, chunk.pieces, chunk.digest, binding,
                                         cfg.shard_bytes, drops[chunk.index].tolist() if chunk.index in drops else None)
                else:
                    future = pool.submit(encode_chunk, chunk.index, chunk.docs, chunk.val, chunk.digest, binding,
                                         chunk.sources)
                pending[future] = chunk.nbytes
            for future in as_completed(list(pending)):  # a failure surfaces as soon as it happens
                collect(pending.pop(future), future.result())
        except BaseException:
            stop_workers(pending)
            raise
        finally:
            if bar.total is not None:  # file sizes estimate the text: replaced bytes can make it longer
                bar.total = max(bar.total, bar.n)
            bar.close()
    encode_seconds = time.time() - encode_start
    if part is None and resumed < earlier:  # a rerun that redoes finished work says so, and why it can
        print(f"[tokenize] {earlier - resumed:,} of the {earlier:,} unit records of the partial run were not reused "
              "(their files, the split, the tokenizer or lmforge's unit layout changed): encoded again, or removed",
              file=sys.stderr)
    main_cpu, worker_cpu = (end - begin for end, begin in zip(cpu_seconds(), cpu_start, strict=True))
    if part is not None:
        print(f"[tokenize] part {part[0]}/{part[1]}: {len(records)} chunks ({resumed} already done), {tokens:,} "
              f"tokens in {encode_seconds:.1f} s; meta.json comes from a plain run once every part is done")
        return 0

    # -- meta.json last: its presence marks the output complete ---------------------------------
    count = len(records)
    for i in range(count):  # the workers' bad-input counts, in unit order (the files listed are the same each run)
        merge_counts(policy, records[i].get("policy"))
    for reader, entry in zip(readers, per_source(records, readers), strict=True):
        if entry["documents"] == 0:
            raise DataError(f"source {reader.describe()} yielded no documents (skipped: "
                            f"{dict(policy.skipped) or 'none'}); check its paths and text_field")
    fingerprint = hashlib.sha256(json.dumps(binding, sort_keys=True).encode())  # the data, its split, its ids
    for i in range(count):
        fingerprint.update(records[i].get("documents_digest", records[i]["digest"]).encode())
    for stale in (out / "chunks").glob("[0-9]*.json"):  # records from a longer earlier version of the data
        if int(stale.stem.partition("-")[0]) >= count:
            stale.unlink()
    splits = {}
    for split in SPLITS:
        shards = [shard for i in range(count) for shard in shards_of(records[i], split)]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
                         "shards": shards}
        kept = {Path(s["file"]).stem for s in shards}
        for orphan in sorted((out / split).glob("[0-9]*.*")):  # shards of an earlier, longer or other-split run
            if orphan.stem not in kept and orphan.suffix in (".bin", ".idx"):
                orphan.unlink()
    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": {"path": "tokenizer", "hash": folder_hash(tok_dir), "vocab_size": vocab_size,
                      "eos_id": eos_id, "eos_token": eos_token},
        "splits": splits,
        "source_fingerprint": fingerprint.hexdigest()[:32],
        "sources": [r.describe() for r in readers],
        "per_source": per_source(records, readers),
        "dedup": cfg.dedup,
        "bytes": nbytes,
        "skipped": dict(sorted(policy.skipped.items())),
        "skipped_files": dict(list(policy.skipped_files.items())[:1000]),  # all of them in summary.json
        "split_documents": policy.split_documents,
        "utf8_replaced_documents": policy.replaced_docs,
        "config_digest": digest,
        "digest_version": DIGEST_VERSION,
        "config": cfg.model_dump(mode="json", exclude={"out_dir", "workers", "progress"}),
    }
    atomic.write_json(out / "meta.json", meta)

    # -- summary ----------------------------------------------------------------------------------
    for warning in policy.warnings[:20]:
        print(f"[tokenize] warning: {warning}", file=sys.stderr)
    for path, why in list(policy.skipped_files.items())[:20]:
        print(f"[tokenize] skipped file {path}: {why}", file=sys.stderr)
    if len(policy.skipped_files) > 20:
        print(f"[tokenize] ... {len(policy.skipped_files) - 20:,} more skipped files: see {out / 'summary.json'}",
              file=sys.stderr)
    peak_main = peak_rss()
    summary = {
        "documents": docs, "tokens": tokens, "bytes": nbytes,
        "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
        "val_documents": splits["val"]["documents"], "shards": count, "shards_resumed": resumed,
        "skipped": meta["skipped"], "skipped_files": policy.skipped_files, "split_documents": policy.split_documents,
        "per_source": meta["per_source"],
        "utf8_replaced_documents": policy.replaced_docs,
        "encoder": encoder.kind, "encoder_fallbacks": fallbacks, "workers": workers,
        "encode_seconds": round(encode_seconds, 3), "total_seconds": round(time.time() - started, 3),
        "mb_per_s": round(nbytes / 1e6 / max(encode_seconds, 1e-9), 2),
        "tokens_per_s": round(tokens / max(encode_seconds, 1e-9)),
        "peak_rss_main_bytes": peak_main, "peak_rss_worker_bytes": peak_worker,
        # the serial share: what the main process spends (reading, parsing, hashing, sending) against the
        # workers' encoding; past workers_at_saturation more workers cannot go faster (Amdahl)
        "encode_cpu_seconds": {"main": round(main_cpu, 3), "workers": round(worker_cpu, 3)},
        "main_cpu_seconds_per_gb": round(main_cpu / max(nbytes / 1e9, 1e-12), 2),
        "serial_share": round(main_cpu / max(main_cpu + worker_cpu, 1e-9), 4),
        "workers_at_saturation": round(worker_cpu / max(main_cpu, 1e-9), 1),
        "survey": surveyed and {  # the pass before encoding (sample, val_docs, dedup), when one ran: its serial share
            **surveyed, "main_cpu_seconds_per_gb": round(surveyed["cpu_seconds"]["main"] / max(nbytes / 1e9, 1e-12), 2),
            "workers_at_saturation": round(
                surveyed["cpu_seconds"]["workers"] / max(surveyed["cpu_seconds"]["main"], 1e-9), 1)},
    }
    atomic.write_json(out / "summary.json", summary)
    skipped = ", ".join(f"{k} {v}" for k, v in meta["skipped"].items()) or "none"
    if len(readers) > 1:
        for entry in meta["per_source"]:
            print(f"[tokenize] source {entry['source']}: {entry['documents']:,} documents, {entry['tokens']:,} tokens")
    print(f"[tokenize] done: {docs:,} documents, {tokens:,} tokens (train {splits['train']['tokens']:,}, "
          f"val {splits['val']['tokens']:,}), {describe_bytes(nbytes)} in {count} shards "
          f"({resumed} resumed) -> {out}\n"
          f"[tokenize] skipped: {skipped}; invalid UTF-8 replaced in {policy.replaced_docs} documents; "
          f"{policy.split_documents} documents over max_document_bytes split\n"
          f"[tokenize] {summary['mb_per_s']} MB/s, {tokens / max(encode_seconds, 1e-9) / 1e6:.2f}M tokens/s "
          f"with {workers} workers ({encoder.kind}); peak RSS main {describe_bytes(peak_main)}, "
          f"worker {describe_bytes(peak_worker)}; {summary['total_seconds']:.1f} s in all")
    return 0


def cpu_seconds() -> tuple[float, float]:
    """(this process's CPU seconds, its reaped children's): user + system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def policy_args(cfg: TokenizeConfig) -> dict:
    """The bad-input policy a worker reads with (a Policy is built in each worker from these)."""
    return {"utf8_errors": cfg.utf8_errors, "bad_records": cfg.bad_records, "on_skipped_file": cfg.on_skipped_file,
            "max_document_bytes": cfg.max_document_bytes, "long_documents": cfg.long_documents}


def stop_workers(pending) -> None:
    """After an error: a worker still on a long unit (a large compressed file) would hold it back for hours."""
    for future in pending:
        future.cancel()
    if pending:
        for child in multiprocessing.active_children():
            child.terminate()


def take_survey(cfg: TokenizeConfig, readers, units, wants: Wants, workers: int) -> Survey:
    """The survey (pretrain/survey.py): by the workers over `units`, at most 2 x workers in flight, the sample's and
    the cut's parts merged as they come and the dedup keys in unit order (up to KEYS_HELD bytes of them waiting for
    a slow unit); again for the sample alone, with a higher seed, when the first seed did not fill it. With no units
    (a streaming dataset, `reading: main`) the main process surveys what it reads, a batch per MiB."""
    totals = [r.total_bytes() for r in readers]
    total = sum(totals) if None not in totals else None
    if units is None:
        survey = Survey(wants)
        batch, size, count = [], 0, 0
        bar = tqdm(desc="survey", unit=" docs", disable=not cfg.progress, dynamic_ncols=True)
        quiet = Policy.of(cfg, report=False)  # the encoding pass says what it skips
        for text in itertools.chain(read_all(readers, quiet), [None]):
            if text is not None:
                batch.append(text)
                size += len(text)
            if size >= 2**20 or (text is None and batch):
                part = survey_docs(batch, wants, survey.limit, survey.val_limit)
                survey.add(count, part)
                if wants.dedup:
                    survey.keys(count, part["keys"])
                bar.update(len(batch))
                batch, size, count = [], 0, count + 1
        bar.close()
        survey.complete()
        return survey
    survey = Survey(wants, limit=seed_for(wants, total), seed=seed_for(wants, total))
    init = (None, False, 0, "uint16", 0, str(cfg.out_dir), cfg.sources, policy_args(cfg))
    sample_only = False
    while True:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="survey", disable=not cfg.progress,
                   dynamic_ncols=True)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                                 initargs=init) as pool:
            pending: dict = {}  # future -> unit
            waiting: dict = {}  # unit -> its dedup keys, until the units before it are in
            held = merged = 0  # bytes of keys waiting; units whose keys are in
            try:
                for unit in [*units, None]:
                    while pending and (unit is None or len(pending) >= 2 * workers or held > KEYS_HELD):
                        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in finished:
                            index, batch = pending.pop(future), future.result()
                            survey.add(index, batch)
                            bar.update(units[index].nbytes)
                            if batch["keys"] is not None:
                                waiting[index] = batch["keys"]
                                held += batch["keys"].nbytes
                        while merged in waiting:
                            keys = waiting.pop(merged)
                            held -= keys.nbytes
                            survey.keys(merged, keys)
                            merged += 1
                    if unit is not None:
                        future = pool.submit(survey_unit, unit.pieces, wants, survey.limit, survey.val_limit,
                                             sample_only)
                        pending[future] = unit.index
            except BaseException:
                stop_workers(pending)
                raise
            finally:
                bar.close()
        if survey.complete() or survey.count == 0:
            return survey
        print(f"[tokenize] the tokenizer's sample did not fill ({describe_bytes(survey.received)} of text below "
              f"the first limit, for {describe_bytes(wants.sample_bytes)}): surveying the sample again with a higher "
              "limit", file=sys.stderr)
        survey.again()
        sample_only = True


if __name__ == "__main__":
    raise SystemExit(main())
