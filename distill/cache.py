"""`python -m distill.cache CONFIG.yaml [key=value ...]`: a teacher's top-k logits over token shards, written once.

    torchrun --nproc_per_node=N -m distill.cache configs/distill/cache_demo.yaml   # as many ranks as devices
    python -m distill.cache CONFIG.yaml --dry-run                              # resolved config and sizes; no work

Offline distillation (DistillKit's sparse logits): the teacher runs once over the train split and keeps, for each
window the student trains on (window k of data.seq_len, as `TokenShards.window(k, seq_len)`: its first seq_len
tokens are the inputs), the `top_k` largest logits at every input position; `python -m distill` with
`data.cache: OUT_DIR` then trains without the teacher in memory (forward KL on the top-k, `losses.topk_kd_loss`).

    OUT_DIR/meta.json               written last, by rank 0, once every shard exists: its presence = complete
    OUT_DIR/state.json              what the cache is being built from (a rerun with another teacher is refused)
    OUT_DIR/train/shard-NNNNN.idx   token ids, [windows, seq_len, top_k] row-major, little-endian uint16
                                    (vocab <= 65,536) or int32
    OUT_DIR/train/shard-NNNNN.val   their logits, same shape: fp16, bf16 (its uint16 bits) or fp32
    OUT_DIR/train/shard-NNNNN.lse   log sum exp(logits / temperature) per position, [windows, seq_len] float32

Shard s holds windows [s x windows_per_shard, (s + 1) x windows_per_shard); the shards left to write are dealt
out to the ranks in turn (the i-th to rank i mod world); each
file is written under a temporary name, fsynced and renamed, so a killed run leaves whole shards (a rerun skips
them) and temporaries (a rerun deletes them). A shard's bytes depend on its windows alone, not on the rank count:
a cache written on 2 ranks, or resumed after a crash, equals one written in one go on 1.

`TeacherCache` reads a finished cache for the student's loop: memory maps opened lazily, at most `max_open` at a
time (one file descriptor each: at 512 ranks, none holds thousands).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.teacher_cache import (
    FORMAT,
    KINDS,
    LSE_DTYPE,
    SPLIT,
    VALUE_DTYPES,
    CacheError,
    data_identity,
    differences,
    index_dtype,
    shard_name,
    shard_windows,
)
from lmforge import atomic
from lmforge import checkpoint as ckpt
from lmforge.config import to_yaml
from lmforge.config.command import parse_command
from lmforge.config.distill import CacheConfig
from lmforge.data.shards import ShardError, TokenShards, read_meta, split_digest
from lmforge.models import ModelError, folder_config, human
from lmforge.run import Run, RunError, fail
from lmforge.tokenizer import vocabulary_hash

PROG = "python -m distill.cache"
STAGE = "distill.cache"
COLLECTIVE_TIMEOUT = 1800.0  # seconds a rank waits for the slowest at the end (its share of the shards)

# --------------------------------------------------------------------------------------------------
# The writer


@dataclass
class Plan:
    """What a launch will write, known (and every input checked) before any work."""

    teacher_config: object
    teacher_id: dict
    data_meta: dict
    train: TokenShards
    val: TokenShards
    eval_ids: list[int]
    windows: int
    shards: int
    index_dtype: np.dtype
    value_dtype: np.dtype
    dtype: torch.dtype  # the teacher's forward
    k: int

    @property
    def bytes_per_token(self) -> int:
        return (self.index_dtype.itemsize + self.value_dtype.itemsize) * self.k + LSE_DTYPE.itemsize

    def identity(self, cfg: CacheConfig) -> dict:
        return {"teacher": self.teacher_id, "data": data_identity(self.data_meta, cfg.data.seq_len),
                "seq_len": cfg.data.seq_len, "top_k": cfg.top_k, "dtype": cfg.dtype,
                "windows_per_shard": cfg.windows_per_shard, "temperature": cfg.temperature}

    def shard_bytes(self, cfg: CacheConfig, shard: int) -> tuple[int, int, int]:
        """The sizes of shard `shard`'s .idx, .val and .lse files."""
        positions = len(shard_windows(shard, self.windows, cfg.windows_per_shard)) * cfg.data.seq_len
        return (positions * cfg.top_k * self.index_dtype.itemsize, positions * cfg.top_k * self.value_dtype.itemsize,
                positions * LSE_DTYPE.itemsize)


def plan(cfg: CacheConfig) -> Plan:
    """Check every input (teacher folder, tokenizer, positions, data) and size the cache; raises ModelError,
    ShardError, CheckpointError, EngineError or OSError with a message that says what to do."""
    from transformers import AutoConfig

    from lmforge import engine as eng
    from lmforge.data.sampler import eval_windows

    seq_len = cfg.data.seq_len
    if not (cfg.teacher / "config.json").is_file():
        raise ModelError(f"teacher: {cfg.teacher} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(cfg.teacher)
    except ValueError as e:
        raise ModelError(f"teacher: {cfg.teacher}/config.json cannot be read by transformers: {e}") from None
    arch = (config.architectures or ["?"])[0]
    if not arch.endswith(("ForCausalLM", "LMHeadModel")):
        raise ModelError(f"teacher: {cfg.teacher} holds a {arch}, not a causal language model: the cache holds "
                         "next-token logits")
    config = folder_config(cfg.teacher, seq_len, "data.seq_len")  # seq_len within the teacher's positions
    meta = read_meta(cfg.data.path)
    try:
        teacher_vocab = vocabulary_hash(cfg.teacher)
    except FileNotFoundError as e:
        raise ModelError(f"teacher: {e}") from None
    if vocabulary_hash(cfg.data.path / "tokenizer") != teacher_vocab:
        raise ModelError(f"the token shards in {cfg.data.path} were made with another tokenizer than the teacher "
                         f"{cfg.teacher}'s (their tokenizer.json differ); tokenize with the teacher's "
                         f"(tokenizer.pretrained: {cfg.teacher})")
    if cfg.top_k > config.vocab_size:
        raise ModelError(f"top_k {cfg.top_k} is more than the teacher's vocabulary ({config.vocab_size} tokens); "
                         f"use top_k <= {config.vocab_size}")
    train, val = TokenShards(cfg.data.path, SPLIT), TokenShards(cfg.data.path, "val")
    windows = train.num_windows(seq_len)
    if windows < 1:
        raise ShardError(f"{cfg.data.path}: the train split has {train.num_tokens:,} tokens, fewer than one window "
                         f"of data.seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")
    eval_ids = eval_windows(val, seq_len, cfg.eval_windows)
    teacher_id = {"config": ckpt.config_digest(config), "weights": ckpt.weights_digest(cfg.teacher)}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = eng.resolve_precision(cfg.precision, device)
    return Plan(config, teacher_id, meta, train, val, eval_ids, windows, math.ceil(windows / cfg.windows_per_shard),
                index_dtype(config.vocab_size), VALUE_DTYPES[cfg.dtype], dtype, cfg.top_k)


def main(argv: list[str] | None = None) -> int:
    launched = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_command(PROG, CacheConfig, argv, __doc__.split("\n")[0],
                              extra={"--local_rank": {"type": int, "help": argparse.SUPPRESS}},  # deepspeed launcher
                              example="top_k=32")
    from lmforge import engine as eng

    try:
        p = plan(cfg)
    except (ModelError, ShardError, ckpt.CheckpointError, eng.EngineError, OSError) as e:
        return fail(PROG, e)
    total = p.windows * cfg.data.seq_len * p.bytes_per_token
    summary = (f"{p.windows:,} windows of {cfg.data.seq_len} tokens ({p.windows * cfg.data.seq_len:,} tokens) in "
               f"{p.shards} shard(s) of {cfg.windows_per_shard} windows; top-{cfg.top_k} as {p.index_dtype.name} + "
               f"{cfg.dtype}: {p.bytes_per_token} bytes per token, {human(total)}B in all; teacher "
               f"{p.teacher_config.model_type} in {str(p.dtype).removeprefix('torch.')}")
    if args.dry_run:
        print(to_yaml(cfg), end="")
        print(f"# {summary}")
        return 0
    return write(cfg, p, summary, launched)


def _folder_state(cfg: CacheConfig, p: Plan) -> tuple[bool, list[int]]:
    """Rank 0, under the lease: (finished, the shards already whole). A finished or partial cache of another
    teacher, other data or other settings is a CacheError: never overwritten."""
    out, want = cfg.out_dir, p.identity(cfg)
    if (out / "meta.json").is_file():
        saved = json.loads((out / "meta.json").read_text())
        found = differences(saved, {k: want[k] for k in ("teacher", "data", "top_k", "dtype")})
        if saved.get("format") != FORMAT:
            found.insert(0, f"written in another format ({saved.get('format')!r})")
        if found:
            raise CacheError(f"{out} holds a finished teacher cache {'; '.join(found)}; use another out_dir (it is "
                             "never overwritten)")
        return True, []
    state = out / "state.json"
    if state.is_file():
        found = differences(json.loads(state.read_text()), want)
        if found:
            raise CacheError(f"{out} holds a partial teacher cache {'; '.join(found)}; use another out_dir, or rerun "
                             "with the settings it was started with")
    else:
        atomic.write_json(state, {"format": FORMAT, **want, "teacher_path": str(cfg.teacher.resolve())})
    (out / SPLIT).mkdir(exist_ok=True)
    sizes = {e.name: e.stat().st_size for e in os.scandir(out / SPLIT) if e.is_file()}  # one listing, no stat storm
    return False, [s for s in range(p.shards)
                   if tuple(sizes.get(f"{shard_name(s)}.{kind}") for kind in KINDS) == p.shard_bytes(cfg, s)]


def _collective(fn, *args):
    """`fn(*args)`, a collective; a rank that died meanwhile (killed, out of memory) is a RunError, not a gloo or
    NCCL traceback on every rank that survived it."""
    try:
        return fn(*args)
    except RuntimeError as e:  # torch.distributed.DistBackendError is one
        first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise RunError(f"another rank stopped while this one was writing (killed, or out of memory: see its output): "
                       f"{first}. The whole shards written are kept: rerun the same command to resume") from None


def _abandon(run: Run, error: RunError) -> int:
    """Exit 1 after a lost rank: the lease goes, the process group is left as it is (a barrier would hang)."""
    fail(PROG, error)
    if run.lease is not None:
        run.lease.release()
        run.lease = None
    return 1


class _Partial:
    """A file written in pieces under a temporary name beside `path`; `commit()` fsyncs it and renames it into
    place, `abort()` deletes it (a killed writer's temporary is deleted by the next run's remove_leftovers)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.",
                                                suffix=atomic.TMP_SUFFIX, delete=False)

    def write(self, data: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(data).data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        atomic.share(self.file.name)
        os.replace(self.file.name, self.path)

    def abort(self) -> None:
        self.file.close()
        Path(self.file.name).unlink(missing_ok=True)


def _log_normaliser(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log sum exp(logits / T) over the vocabulary per position, fp32, a block of rows at a time (an fp32 copy of
    a micro-batch's logits would be 16 GB at 8 x 4,096 x 128k)."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, (1 << 24) // flat.shape[1])
    for start in range(0, flat.shape[0], rows):
        out[start:start + rows] = torch.logsumexp(flat[start:start + rows].float() / temperature, dim=-1)
    return out.view(logits.shape[:-1])


def _store_values(values: torch.Tensor, kind: str) -> np.ndarray:
    """The top-k logits as stored: fp16, bf16's bits as uint16, or fp32 (little-endian)."""
    if kind == "bf16":
        return values.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16).astype("<u2", copy=False)
    return values.to(torch.float16 if kind == "fp16" else torch.float32).cpu().numpy().astype(
        VALUE_DTYPES[kind], copy=False)


def write(cfg: CacheConfig, p: Plan, summary: str, launched: float) -> int:
    """The cache: the shards this rank owns and that are missing, then (rank 0) meta.json."""
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from lmforge import engine as eng
    from lmforge.loss import lm_loss
    from lmforge.models import build

    seq_len, k, out = cfg.data.seq_len, cfg.top_k, cfg.out_dir
    try:
        run = Run.open(STAGE, out, launched, COLLECTIVE_TIMEOUT)
        finished, done = run.on_main(lambda: _folder_state(cfg, p), (CacheError, OSError, ValueError))
    except RunError as e:
        return fail(PROG, e)
    d = run.dist
    if finished:
        run.say(f"{out} is already complete for this teacher and data ({p.windows:,} windows, top-{k}); nothing to do")
        return run.close(0)
    todo = [s for s in range(p.shards) if s not in set(done)]
    mine = todo[d.rank::d.world]  # what is left, dealt out evenly (a dead rank's shards do not all come back to it)
    run.say(f"{summary}; {d.world} rank(s) on {d.device.type}")
    if done:
        run.say(f"skipping {len(done)} shard(s) already written; {len(todo)} to write")

    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one bar per rank for a load that takes a second
    try:
        teacher = build(p.teacher_config, cfg.teacher, dtype=p.dtype).eval().requires_grad_(False).to(d.device)
    except (OSError, ValueError, RuntimeError) as e:  # damaged weights, a device out of memory
        return _abandon(run, RunError(f"teacher: {cfg.teacher} could not be loaded: {type(e).__name__}: "
                                      f"{str(e)[:300]}"))
    hf_logging.set_verbosity(quiet)
    hf_logging.enable_progress_bar()

    remaining = sum(len(shard_windows(s, p.windows, cfg.windows_per_shard)) for s in todo)
    bar = tqdm(total=remaining, unit="win", desc="teacher cache", disable=not (cfg.progress and d.is_main),
               dynamic_ncols=True, smoothing=0.1)
    stop = 0.0  # 1: a signal (stop, resumable), 2: the lease was lost (stop, write nothing more)
    written = windows_done = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for shard in mine:
            files = [_Partial(out / SPLIT / f"{shard_name(shard)}.{kind}") for kind in KINDS]
            try:
                ids = shard_windows(shard, p.windows, cfg.windows_per_shard)
                for start in range(ids.start, ids.stop, cfg.micro_batch_size):
                    batch = range(start, min(start + cfg.micro_batch_size, ids.stop))
                    x = torch.from_numpy(np.stack([p.train.window(w, seq_len)[:-1] for w in batch]).astype(np.int64))
                    logits = teacher(input_ids=x.to(d.device), use_cache=False).logits  # [B, S, V], forward dtype
                    values, indices = torch.topk(logits, k, dim=-1)  # largest first; no fp32 copy of the logits
                    lse = _log_normaliser(logits, cfg.temperature)
                    del logits
                    files[0].write(indices.to(torch.int32).cpu().numpy().astype(p.index_dtype, copy=False))
                    files[1].write(_store_values(values, cfg.dtype))
                    files[2].write(lse.cpu().numpy().astype(LSE_DTYPE, copy=False))
                    windows_done += len(batch)
                    bar.update(min(len(batch) * d.world, bar.total - bar.n))  # all ranks: own rate x world
                    if ckpt.fault_requested("cache-shard-mid", shard, d.rank):  # tests: killed mid-shard
                        os._exit(1)
                    if run.signals:
                        raise InterruptedError
                for f in files:
                    f.commit()
            except InterruptedError:
                for f in files:
                    f.abort()
                stop = 1.0
                break
            except BaseException:
                for f in files:
                    f.abort()
                raise
            written += 1
            if ckpt.fault_requested("cache-shard", shard, d.rank):  # tests: killed after writing this shard
                os._exit(1)
            if run.lease is not None and run.lease.lost:
                stop = 2.0
                break
            if run.signals:
                stop = 1.0
                break
    elapsed = time.perf_counter() - started
    bar.n = bar.total if not stop else bar.n
    bar.close()

    try:
        stop = _collective(eng.all_reduce_max, stop, d.device)
    except RunError as e:
        return _abandon(run, e)
    if stop:
        if stop == 2:
            run.say("error: another launch took over this out_dir; stopping", file=sys.stderr)
            return run.close(1)
        run.say(f"{Run.stop_reason(run.signals[-1]) if run.signals else 'a signal on another rank'}: stopped with "
                f"whole shards written; rerun the same command to resume")
        return run.close(0)

    # the teacher's own score on the validation windows the student is evaluated on (its report reads it)
    sums = [0.0, 0.0]
    with torch.inference_mode():
        share = p.eval_ids[d.rank::d.world]
        for i in range(0, len(share), cfg.micro_batch_size):
            x = torch.from_numpy(np.stack([p.val.window(w, seq_len) for w in share[i:i + cfg.micro_batch_size]])
                                 .astype(np.int64)).to(d.device)
            sums[0] += float(lm_loss(teacher, x[:, :-1], x[:, 1:], reduction="sum"))
            sums[1] += x[:, 1:].numel()
    try:
        sums = _collective(eng.all_reduce_sum, sums, d.device)
        rates = _collective(eng.gather_objects, (windows_done, elapsed))  # also: every rank has written its shards
    except RunError as e:
        return _abandon(run, e)
    val_loss = sums[0] / sums[1]
    computed = sum(r[0] for r in rates) * seq_len
    rate = computed / max(max(r[1] for r in rates), 1e-9) if computed else None

    def finish() -> dict:
        shards = []
        for s in range(p.shards):
            sizes = p.shard_bytes(cfg, s)
            for kind, size in zip(KINDS, sizes, strict=True):
                path = out / SPLIT / f"{shard_name(s)}.{kind}"
                if not path.is_file() or path.stat().st_size != size:
                    raise CacheError(f"{path} is missing or short after every rank finished; rerun the same command")
            shards.append({"name": shard_name(s), "windows": len(shard_windows(s, p.windows, cfg.windows_per_shard)),
                           "bytes": sum(sizes)})
        meta = {
            "format": FORMAT,
            "teacher": {"path": str(cfg.teacher.resolve()), **p.teacher_id},
            "data": {"path": str(cfg.data.path.resolve()), "split": SPLIT,
                     "source_fingerprint": p.data_meta["source_fingerprint"], "split_digest": split_digest(p.data_meta),
                     "tokenizer_hash": p.data_meta["tokenizer"].get("hash")},
            "seq_len": seq_len, "top_k": k, "temperature": cfg.temperature, "vocab_size": p.teacher_config.vocab_size,
            "index_dtype": p.index_dtype.name, "dtype": cfg.dtype, "value_dtype": p.value_dtype.name,
            "precision": str(p.dtype).removeprefix("torch."),
            "windows": p.windows, "windows_per_shard": cfg.windows_per_shard, "shards": shards,
            "bytes": sum(s["bytes"] for s in shards), "bytes_per_token": p.bytes_per_token,
            "teacher_tokens_per_s": None if rate is None else round(rate, 1), "tokens_computed": computed,
            "shards_skipped": len(done), "world_size": d.world, "seconds": round(time.perf_counter() - launched, 2),
            "teacher_val_loss": val_loss, "teacher_val_ppl": math.exp(min(val_loss, 50)),
            "teacher_val_windows": len(p.eval_ids),
        }
        atomic.write_json(out / "meta.json", meta)
        atomic.fsync_path(out)
        return meta

    try:
        meta = run.on_main(finish, (CacheError, OSError))
    except RunError as e:
        return fail(PROG, e, code=1)
    run.say(f"done: {meta['windows']:,} windows ({len(todo)} shard(s) written, {len(done)} skipped), "
            f"{meta['bytes_per_token']} bytes per token ({human(meta['bytes'])}B), teacher "
            + (f"{meta['teacher_tokens_per_s']:,.0f} tokens/s" if rate else "idle (nothing left to compute)")
            + f", {meta['seconds']:.1f} s; teacher val loss {val_loss:.4f}, ppl {meta['teacher_val_ppl']:.2f}"
            + f"\n[{STAGE}] cache: {out} (distill with data.cache={out})")
    return run.close(0)


if __name__ == "__main__":
    raise SystemExit(main())
