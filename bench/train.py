"""Pretraining benchmark: lmforge beside the Hugging Face Trainer and a plain PyTorch loop, in one run.

    python bench/train.py                          # full run: bench/results/train.json + BENCHMARKS.md
    python bench/train.py --smoke --out DIR        # tiny model, a few steps (< 90 s); never touches BENCHMARKS.md

Throughput. Three ways to train the same thing, each launched as a user would, in processes of its own:
2 CPU ranks under `python -m torch.distributed.run --nproc_per_node=2` (gloo, OMP_NUM_THREADS=1,
DS_ACCELERATOR=cpu), fp32, the resolved `configs/pretrain/demo.yaml` (the `demo` model, ~5M parameters,
seq 256, micro batch 8 x 2 ranks = 16 sequences per step; AdamW(0.9, 0.95), clipping at 1.0, linear warmup
then cosine to min_lr) on the built-in corpus tokenized once into bench/work/train/data. Every method builds
the model with `lmforge.models.build_model` after `torch.manual_seed(seed)` (the same initial weights) and
reads the same windows in the same order (lmforge's WindowSampler: global position p holds window
`window_at(p)`; rank r's micro-batch m of step s is `rank_positions(s x G, micro, accum, r, W, m)`):

  lmforge   `-m pretrain CONFIG`: DeepSpeed ZeRO-2 with configs/deepspeed/zero2.json; evaluation, the
            sample and the checkpoint only at the end (outside the measured window), log_every=1. Tokens/s
            come from the per-step `train/tokens_per_s` that it writes to RUN_DIR/metrics.jsonl.
  trainer   `transformers.Trainer` on the same model, DeepSpeed with lmforge's own config (`lmforge.engine.ds_config`
            over zero2.json: the same fused torch AdamW) passed as a dict through `TrainingArguments(deepspeed=...)`
            ("auto" for what the Trainer fills in: batch sizes, clipping, the AdamW hyper-parameters), use_cpu=True,
            lr_scheduler_type=cosine_with_min_lr, logging_steps=1, a map-style Dataset whose item p is the
            window at position p and train_sampling_strategy="sequential" (accelerate hands rank r the batches
            r, r + W, ...: the same windows per rank, checked). Labels are the inputs (HF shifts them inside
            the model: 255 targets per row instead of 256, the same forward). Timed by a TrainerCallback.
            The same child (`child_trainer`) is bench/gpu.py's Trainer, there on CUDA in bf16 (NCCL).
  plain     a hand-written loop: DistributedDataParallel over gloo (no buffer broadcast, gradients as bucket
            views), torch.optim.AdamW(fused=True), no_sync() while accumulating, clip_grad_norm_, the step loss
            all-reduced every step like a logging loop. No framework: a near-upper bound on this machine.

Tokens/s are over the steady state: every method's steps tile rank 0's clock (whatever it does between
steps, logging and data included, counts in the next step), the first W steps are left out, and the rate is
tokens per step / the median of the remaining step times (the mean over them is in the JSON too). Every
method runs `--rounds` times, interleaved, each round starting with the next method (the first run of a round
measured slower, whichever method it was). A ratio between two methods is the median over rounds of the ratio
within a round: the 2 cores are shared with whatever else runs on the machine, and its load drifts over minutes,
so methods run back to back are compared with each other, and the median drops the round a burst of other work
fell on. (Best round against best round, the previous statistic, is kept in the JSON: on this machine single
rounds of one method spread by up to 1.8x, and the best-of ratio swung between 1.04x and 1.23x from one run of
this script to the next.) A method's tokens/s in the table is its best round. MFU = tokens/s x
`flops_per_token(model, vocab, seq_len)` / (peak x ranks), with one peak for every method: an fp32 512x512
matmul on one thread (each rank runs one thread), best of three half-second runs, measured once in this
parent process before any child starts. The first step's loss is recorded by every method: lmforge and the
plain loop start from the same weights on the same windows, so they agree to round-off.

Memory: ZeRO 0/1/2/3 per-rank memory against the model-state theory, in bf16 and fp32; see bench/memory.py.

Writes OUT/train.json (default bench/results) and, for a full run, the Pretraining section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/train.py` (here and in every rank), this file's folder comes first on sys.path, where
# bench/tokenize.py would shadow the standard library's `tokenize` module; the project root takes its place.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

from bench import memory as bench_memory  # noqa: E402
from bench.report import free_port, parse_args, write_section  # noqa: E402

BEGIN, END = "<!-- bench:train:begin -->", "<!-- bench:train:end -->"
TARGETS = {  # from the pretraining issue: what "fast and lean enough" means
    "lmforge_vs_trainer": 1.2,     # tokens/s ratio, at least
    "lmforge_vs_plain": 0.95,      # tokens/s ratio, at least
    "zero3_vs_theory": 1.2,        # measured model-state memory / theory, at most
}
WORLD = 2


def data_ids(data: Path) -> tuple[int, int, int | None]:
    """(vocab size, EOS id, pad id) of a token-shard folder, as `python -m pretrain` reads them."""
    from tokenizers import Tokenizer

    from lmforge.data.shards import read_meta

    tok = read_meta(data)["tokenizer"]
    config = data / "tokenizer" / "tokenizer_config.json"
    pad = json.loads(config.read_text()).get("pad_token") if config.is_file() else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = Tokenizer.from_file(str(data / "tokenizer" / "tokenizer.json")).token_to_id(pad) if pad else None
    return int(tok["vocab_size"]), int(tok["eos_id"]), pad_id


def batch_shape(cfg, world: int) -> tuple[int, int, int]:
    """(micro, accum, global batch) in sequences, the arithmetic lmforge's engine does."""
    micro, global_batch = cfg.batch.micro_batch_size, cfg.batch.global_batch_size
    accum = global_batch // (micro * world) if global_batch else (cfg.batch.grad_accum or 1)
    return micro, accum, micro * accum * world


def weight_decay_groups(model, weight_decay: float) -> list[dict]:
    """lmforge's grouping: decay on matrices, never on norms, biases or embeddings."""
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in embeddings]
    chosen = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) not in chosen], "weight_decay": 0.0}]


def expected_positions(sampler, steps: int, micro: int, accum: int, rank: int, world: int) -> list[int]:
    """The global positions rank `rank` reads in lmforge's order, step after step, micro-batch after micro-batch."""
    global_batch = micro * accum * world
    return [p for s in range(steps) for m in range(accum)
            for p in sampler.rank_positions(s * global_batch, micro, accum, rank, world, m)]


# --------------------------------------------------------------------------------------------------
# Children (run under torchrun; rank 0 writes spec["result"])


def child_trainer(spec: dict) -> None:
    """`transformers.Trainer` on lmforge's model, batch, windows and DeepSpeed config. Device and precision come
    from the spec: "cpu"/"fp32" (gloo; this benchmark, the default) or "cuda"/"bf16" (NCCL; bench/gpu.py)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lmforge import engine as eng
    from lmforge.config import load_config
    from lmforge.config.pretrain import PretrainConfig
    from lmforge.data.sampler import WindowSampler
    from lmforge.data.shards import TokenShards
    from lmforge.models import build_model

    cfg = load_config(spec["config"], PretrainConfig)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    micro, accum, global_batch = batch_shape(cfg, world)
    device, precision = spec.get("device", "cpu"), spec.get("precision", "fp32")
    steps, seq, cpu, bf16 = spec["steps"], cfg.data.seq_len, device == "cpu", precision == "bf16"
    vocab, eos_id, pad_id = data_ids(Path(cfg.data.path))
    # lmforge's own DeepSpeed config (the ZeRO file, torch's fused AdamW, fp32 accumulation and reduction under
    # bf16), with "auto" wherever the Trainer owns the value (it checks explicit ones against its arguments)
    ds = eng.ds_config(eng.read_zero_json(cfg.engine.deepspeed), micro, accum, global_batch,
                       torch.bfloat16 if bf16 else torch.float32, cfg.optim, torch.device(device))
    fused = {k: v for k, v in ds["optimizer"]["params"].items() if k in ("torch_adam", "fused")}
    ds.update(train_batch_size="auto", train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
              gradient_clipping="auto", bf16={"enabled": "auto"},
              optimizer={"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto", **fused}})
    o = cfg.optim
    args = TrainingArguments(
        output_dir=spec["work"], use_cpu=cpu, deepspeed=ds, ddp_backend="gloo" if cpu else None, seed=cfg.train.seed,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, max_steps=steps,
        learning_rate=o.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": o.min_lr},
        warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, max_grad_norm=o.grad_clip, bf16=bf16, fp16=False,
        train_sampling_strategy="sequential", dataloader_drop_last=True, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True)
    torch.manual_seed(cfg.train.seed)  # lmforge's initial weights
    model = build_model(cfg.model, vocab, eos_id, pad_id)
    sampler = WindowSampler(TokenShards(cfg.data.path, "train"), seq, cfg.train.seed)

    class Windows(torch.utils.data.Dataset):
        """Item p: the window lmforge reads at global position p."""

        def __init__(self):
            self.seen: list[int] = []

        def __len__(self) -> int:
            return steps * global_batch

        def __getitem__(self, p: int) -> dict:
            self.seen.append(int(p))
            ids = torch.from_numpy(sampler.data.window(sampler.window_at(p), seq).astype(np.int64))[:-1]
            return {"input_ids": ids, "labels": ids}  # the model shifts the labels

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.start = [], [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if not cpu:
                torch.cuda.synchronize()  # the step's kernels, not only their launch
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    dataset, timer = Windows(), Timer()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    trainer.train()
    expected = expected_positions(sampler, steps, micro, accum, rank, world)
    box = [None] * world
    dist.all_gather_object(box, {"same_windows": dataset.seen[:len(expected)] == expected})
    if rank == 0:
        result = {
            "start": timer.start, "step_ends": timer.ends, "losses": timer.losses,
            "same_windows_as_lmforge": all(b["same_windows"] for b in box),
            "wrapped_by": type(trainer.model_wrapped).__name__, "deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
            "zero_stage": int(trainer.accelerator.state.deepspeed_plugin.zero_stage),
            "param_dtype": str(next(trainer.model_wrapped.parameters()).dtype).removeprefix("torch."),
            "micro": micro, "accum": accum, "global_batch": global_batch}
        if not cpu:  # CUDA's own counter; on CPU, bench/memory.py measures memory
            result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        write_result(spec, result)
    # Left to interpreter exit, the process group's threads are torn down in no set order and the
    # process can abort ("terminate called without an active exception") after the work is done.
    dist.barrier()
    dist.destroy_process_group()


def child_plain(spec: dict) -> None:
    import contextlib

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.config import load_config
    from lmforge.config.pretrain import PretrainConfig
    from lmforge.data.sampler import WindowSampler
    from lmforge.data.shards import TokenShards
    from lmforge.models import build_model
    from lmforge.schedule import lr_at

    cfg = load_config(spec["config"], PretrainConfig)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, accum, global_batch = batch_shape(cfg, world)
    steps, o = spec["steps"], cfg.optim
    vocab, eos_id, pad_id = data_ids(Path(cfg.data.path))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab, eos_id, pad_id)
    model.train()
    ddp = DDP(model, broadcast_buffers=False, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(weight_decay_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            fused=True)
    sampler = WindowSampler(TokenShards(cfg.data.path, "train"), cfg.data.seq_len, cfg.train.seed)
    ends, losses = [], []
    dist.barrier()
    start = time.perf_counter()
    for step in range(steps):
        lr = lr_at(step, steps, o.lr, o.min_lr, o.warmup_steps, o.schedule, o.decay_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for m in range(accum):
            x = sampler.batch(sampler.rank_positions(step * global_batch, micro, accum, rank, world, m))
            with ddp.no_sync() if m < accum - 1 else contextlib.nullcontext():
                logits = ddp(input_ids=x[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
                (loss / accum).backward()
            step_loss += loss.item() / accum
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = torch.tensor([step_loss], dtype=torch.float64)
        dist.all_reduce(mean)
        losses.append(float(mean.item()) / world)
        ends.append(time.perf_counter())
    if rank == 0:
        write_result(spec, {"start": start, "step_ends": ends, "losses": losses, "micro": micro, "accum": accum,
                            "global_batch": global_batch})
    dist.barrier()
    dist.destroy_process_group()


def write_result(spec: dict, result: dict) -> None:
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# The parent


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(name: str, target: list[str], logs: Path, timeout: float, extra_env: dict | None = None) -> float:
    """Launch `target` on WORLD ranks as a user would; returns the wall time. A failure stops the benchmark."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={free_port()}",
           *target]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**env(), **(extra_env or {})}, cwd=ROOT,
                         timeout=timeout)
    seconds = time.perf_counter() - start
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{run.stdout}\n--- stderr ---\n{run.stderr}")
    if run.returncode != 0:
        raise SystemExit(f"bench run '{name}' failed (log: {logs / f'{name}.log'}):\n{run.stdout[-3000:]}\n"
                         f"{run.stderr[-5000:]}")
    return seconds


def run_child(kind: str, name: str, spec: dict, work: Path, timeout: float) -> dict:
    spec = {**spec, "result": str(work / "results" / f"{name}.json")}
    Path(spec["result"]).parent.mkdir(parents=True, exist_ok=True)
    Path(spec["result"]).unlink(missing_ok=True)
    spec_path = work / "specs" / f"{name}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    # memory: glibc returns every freed block over 64 KB to the OS at once, so that RSS follows the live tensors
    # (by default it keeps freed mid-size blocks in its heap: 150-200 MB more RSS here, none of it in use)
    extra = {"MALLOC_MMAP_THRESHOLD_": "65536"} if kind == "memory" else None
    seconds = torchrun(name, [str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)],
                       work / "logs", timeout, extra)
    return {**json.loads(Path(spec["result"]).read_text()), "wall_seconds": round(seconds, 1)}


def rates(step_seconds: list[float], warmup: int, tokens_per_step: int) -> dict:
    """Steady-state rates from per-step wall times (the first `warmup` steps left out): the headline from the
    median step (robust to bursts of other work on a shared machine), the mean over the window beside it."""
    measured = sorted(step_seconds[warmup:])
    mid = len(measured) // 2
    median = measured[mid] if len(measured) % 2 else (measured[mid - 1] + measured[mid]) / 2
    return {"tokens_per_s": tokens_per_step / median, "mean_tokens_per_s": len(measured) * tokens_per_step / sum(measured),
            "median_step_seconds": round(median, 4), "measured_steps": len(measured),
            "measured_seconds": round(sum(measured), 3), "step_seconds": [round(x, 4) for x in step_seconds]}


def steady(ends: list[float], start: float, warmup: int, tokens_per_step: int) -> dict:
    """Rates from rank 0's clock at the end of every step (the steps tile the time: nothing falls between)."""
    marks = [start, *ends]
    return rates([b - a for a, b in zip(marks[:-1], marks[1:], strict=True)], warmup, tokens_per_step)


def run_lmforge(config: Path, run_dir: Path, name: str, work: Path, warmup: int, tokens_per_step: int,
                timeout: float) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # an existing run_dir would be resumed, not retrained
    seconds = torchrun(name, ["-m", "pretrain", str(config)], work / "logs", timeout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/tokens_per_s" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)), "lmforge did not log every step"
    # each logged rate covers exactly one step (log_every=1): its seconds are tokens per step / rate
    step_seconds = [tokens_per_step / r["train/tokens_per_s"] for r in steps]
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir)
    return {**rates(step_seconds, warmup, tokens_per_step),
            "losses": [r["train/loss"] for r in steps], "lmforge_reported_mfu": [r["train/mfu"] for r in steps],
            "memory_gb": steps[-1]["train/memory_gb"], "zero_stage": summary["zero_stage"],
            "wall_seconds": round(seconds, 1)}


def measure_peak() -> float:
    """fp32 matmul FLOP/s on one thread (the threads each rank runs): best of three."""
    import torch

    from lmforge.throughput import measure_cpu_peak

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return max(measure_cpu_peak(0.5) for _ in range(3))
    finally:
        torch.set_num_threads(threads)


def prepare_data(work: Path, smoke: bool) -> Path:
    """Token shards for the benchmark: the built-in corpus (reused when already complete), or a slice."""
    data = work / "data"
    if (data / "meta.json").exists():
        return data
    lmforge = [sys.executable, "-m", "lmforge.cli", "tokenize"]
    if smoke:
        import yaml

        from lmforge.data.sources import stdlib_files
        from lmforge.tokenizer import save_folder, train_bpe

        files = stdlib_files()[:60]
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        tok = train_bpe(texts, 512, ["<|endoftext|>", "<|pad|>"], show_progress=False)
        save_folder(tok, work / "tokenizer", eos_token="<|endoftext|>", pad_token="<|pad|>")
        config = work / "tokenize.yaml"
        config.write_text(yaml.safe_dump({
            "out_dir": str(data), "sources": [{"type": "files", "format": "txt", "paths": [str(p) for p in files]}],
            "tokenizer": {"pretrained": str(work / "tokenizer")}, "split": {"val_fraction": 0.05}, "progress": False,
            "shard_bytes": 1 << 20}))
        cmd = [*lmforge, str(config)]
    else:
        cmd = [*lmforge, str(ROOT / "configs" / "tokenize" / "demo.yaml"), f"out_dir={data}", "progress=false"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"lmforge tokenize failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return data


def write_pretrain_config(work: Path, data: Path, args: argparse.Namespace) -> Path:
    """configs/pretrain/demo.yaml with this benchmark's data, length, and eval/saves only at the end."""
    import yaml

    never = 10**9  # eval_every / save_every: only the mandatory final eval and save (after the last step)
    over = {
        "include": str(ROOT / "configs" / "pretrain" / "demo.yaml"),
        "run_dir": str(work / "runs" / "lmforge"),
        "data": {"path": str(data)},
        "engine": {"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json")},
        "train": {"max_steps": args.steps, "log_every": 1, "eval_every": never, "save_every": never},
        "eval": {"windows": 2, "prompt": ""},
        "tracking": {"wandb": False, "plots": False},
    }
    if args.smoke:
        over["model"] = {"include": str(ROOT / "configs" / "model" / "tiny.yaml")}
        over["data"]["seq_len"] = 64
        over["batch"] = {"micro_batch_size": 4, "global_batch_size": 16}  # accum 2: the accumulation path too
    path = work / "pretrain.yaml"
    path.write_text(yaml.safe_dump(over, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps; never writes BENCHMARKS.md")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 13; smoke 6)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the rates (default 3; smoke 2)")
    parser.add_argument("--rounds", type=int, default=None, help="runs of each method, interleaved (default 5; smoke 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for train.json (default bench/results)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default bench/work/train[-smoke])")
    parser.add_argument("--no-memory", action="store_true", help="skip the ZeRO memory runs (implies --no-table)")
    parser.add_argument("--no-table", action="store_true", help="leave BENCHMARKS.md as it is")
    args = parse_args(parser, {"trainer": child_trainer, "plain": child_plain, "memory": bench_memory.child})

    began = time.perf_counter()
    args.steps = args.steps or (6 if args.smoke else 13)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 3)
    args.rounds = args.rounds or (1 if args.smoke else 5)
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    work = args.work or ROOT / "bench" / "work" / ("train-smoke" if args.smoke else "train")
    out = args.out or (work / "results-smoke" if args.smoke else ROOT / "bench" / "results")
    work.mkdir(parents=True, exist_ok=True)
    timeout = 300 if args.smoke else 900

    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # transformers' Trainer runs on it
        raise SystemExit("bench/train.py: the Hugging Face Trainer needs `accelerate`: pip install 'accelerate>=1.1'")
    import accelerate
    import deepspeed
    import torch
    import transformers

    from lmforge.config import load_config
    from lmforge.config.pretrain import PretrainConfig
    from lmforge.models import flops_per_token, num_params

    data = prepare_data(work, args.smoke)
    config = write_pretrain_config(work, data, args)
    cfg = load_config(config, PretrainConfig)
    vocab = data_ids(data)[0]
    micro, accum, global_batch = batch_shape(cfg, WORLD)
    tokens_per_step = global_batch * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, vocab, cfg.data.seq_len)
    params = num_params(cfg.model, vocab)["total"]
    peak = measure_peak()
    print(f"[bench] {cfg.model.family} {params / 1e6:.2f}M parameters, vocab {vocab}, seq {cfg.data.seq_len}, "
          f"global batch {global_batch} = micro {micro} x accum {accum} x {WORLD} ranks ({tokens_per_step:,} tokens/step),"
          f" {args.steps} steps ({args.warmup} warm-up) x {args.rounds} round(s); peak {peak / 1e9:.1f} GFLOP/s "
          "per thread", flush=True)

    spec = {"config": str(config), "steps": args.steps}
    runs: dict[str, list[dict]] = {"lmforge": [], "trainer": [], "plain": []}
    for k in range(args.rounds):
        # each round starts with another method: whatever the one before leaves behind (a process still
        # exiting, pages being reclaimed) falls on every method in turn
        order = list(runs)[k % len(runs):] + list(runs)[:k % len(runs)]
        for method in order:
            name = f"{method}_r{k}"
            if method == "lmforge":
                r = run_lmforge(config, Path(cfg.run_dir), name, work, args.warmup, tokens_per_step, timeout)
            else:
                r = run_child(method, name, {**spec, "work": str(work / "runs" / method)}, work, timeout)
                r = {**r, **steady(r.pop("step_ends"), r.pop("start"), args.warmup, tokens_per_step)}
            r["mfu"] = r["tokens_per_s"] * fpt / (peak * WORLD)
            runs[method].append(r)
            print(f"[bench] {name:10s} {r['tokens_per_s']:9,.0f} tokens/s  MFU {100 * r['mfu']:5.1f}%  "
                  f"({r['measured_steps']} steps in {r['measured_seconds']:.1f} s; run {r['wall_seconds']:.0f} s)",
                  flush=True)
        shutil.rmtree(work / "runs", ignore_errors=True)
    results = {}
    for method, rs in runs.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        results[method] = {**best, "tokens_per_s": round(best["tokens_per_s"], 1), "mfu": round(best["mfu"], 4),
                           "mean_tokens_per_s": round(best["mean_tokens_per_s"], 1),
                           "all_rounds_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
                           "all_rounds_mean_tokens_per_s": [round(r["mean_tokens_per_s"], 1) for r in rs]}
    trainer = results["trainer"]
    assert trainer["deepspeed_enabled"] and trainer["wrapped_by"] == "DeepSpeedEngine", trainer["wrapped_by"]
    assert trainer["same_windows_as_lmforge"], "the Trainer read other windows than lmforge"
    tps = {m: r["tokens_per_s"] for m, r in results.items()}
    per_round = {f"{a}_vs_{b}": [round(x["tokens_per_s"] / y["tokens_per_s"], 3) for x, y in zip(runs[a], runs[b],
                                                                                                strict=True)]
                 for a, b in (("lmforge", "trainer"), ("lmforge", "plain"), ("trainer", "plain"))}
    ratios = {**{key: round(statistics.median(values), 3) for key, values in per_round.items()},
              "per_round": per_round,
              "best_of_rounds": {key: round(tps[key.split("_vs_")[0]] / tps[key.split("_vs_")[1]], 3)
                                 for key in per_round},
              # same model, weights, windows and update rule: the first step's loss must agree
              "first_loss_lmforge_minus_plain": abs(results["lmforge"]["losses"][0] - results["plain"]["losses"][0])}
    memory = None if args.no_memory else bench_memory.measure(
        data, work, args.smoke, data_ids(data), lambda kind, name, spec: run_child(kind, name, spec, work, timeout))

    targets = {"lmforge_vs_trainer": {"target": f">= {TARGETS['lmforge_vs_trainer']}",
                                      "measured": ratios["lmforge_vs_trainer"],
                                      "met": ratios["lmforge_vs_trainer"] >= TARGETS["lmforge_vs_trainer"]},
               "lmforge_vs_plain": {"target": f">= {TARGETS['lmforge_vs_plain']}", "measured": ratios["lmforge_vs_plain"],
                                    "met": ratios["lmforge_vs_plain"] >= TARGETS["lmforge_vs_plain"]}}
    if memory:
        z3 = memory["precisions"]["bf16"]["stages"]["3"]["vs_theory"]
        targets["zero3_vs_theory"] = {"target": f"<= {TARGETS['zero3_vs_theory']}", "measured": z3,
                                      "met": z3 <= TARGETS["zero3_vs_theory"]}
    report = {
        "benchmark": "train",
        "mode": "smoke" if args.smoke else "full",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "gpu": torch.cuda.is_available(), "ranks": WORLD,
                    "threads_per_rank": 1, "peak_flops_per_thread": round(peak),
                    "peak_source": "fp32 512x512 matmul on one thread in the parent, best of 3 x 0.5 s"},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
        "config": {"pretrain_config": cfg.model_dump(mode="json"), "model_params": params, "vocab_size": vocab,
                   "flops_per_token": fpt, "micro_batch_size": micro, "grad_accum": accum,
                   "global_batch_size": global_batch, "seq_len": cfg.data.seq_len, "tokens_per_step": tokens_per_step,
                   "steps": args.steps, "warmup_steps_skipped": args.warmup, "rounds": args.rounds,
                   "deepspeed_json": json.loads(Path(cfg.engine.deepspeed).read_text()),
                   "data": str(data), "train_tokens": int(json.loads((data / "meta.json").read_text())
                                                          ["splits"]["train"]["tokens"])},
        "results": results,
        "ratios": ratios,
        "memory": memory,
        "targets": targets,
        "seconds": round(time.perf_counter() - began, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {out / 'train.json'} ({report['seconds']:.0f} s)")
    for key, t in targets.items():
        print(f"[bench] {key}: {t['measured']} (target {t['target']}) {'met' if t['met'] else 'NOT MET'}")
    if not (args.smoke or args.no_memory or args.no_table):
        write_table(report, ROOT / "BENCHMARKS.md")
    return 0


def write_table(report: dict, path: Path) -> None:
    """Replace the Pretraining section of BENCHMARKS.md (between its markers) with this run's tables."""
    r, ratio, c, m, mem, t = (report["results"], report["ratios"], report["config"], report["machine"],
                              report["memory"], report["targets"])

    def met(key: str) -> str:
        return "met" if t[key]["met"] else "**NOT MET**"

    def versus(a: str, b: str) -> float:  # the median per-round ratio, either way round
        return 1.0 if a == b else ratio[f"{a}_vs_{b}"] if f"{a}_vs_{b}" in ratio else 1 / ratio[f"{b}_vs_{a}"]

    def row(name: str, key: str, what: str) -> str:
        x = r[key]
        return (f"| {name} | {what} | {x['tokens_per_s']:,.0f} | {100 * x['mfu']:.1f}% | "
                f"{c['tokens_per_step'] / x['tokens_per_s']:.2f} | {versus(key, 'trainer'):.2f}x | "
                f"{versus(key, 'plain'):.2f}x |")

    pc = c["pretrain_config"]
    lines = [
        BEGIN,
        f"Measured {report['date']} by `make bench` (`python bench/train.py`) on **{m['cpus']} CPU cores** "
        f"({m['processor']}, Python {m['python']}, torch {report['versions']['torch']}, DeepSpeed "
        f"{report['versions']['deepspeed']}, transformers {report['versions']['transformers']}), fp32, "
        f"{m['ranks']} ranks under torchrun (gloo, one thread each). **No GPU here**: GPU numbers (bf16, NCCL) need a "
        "GPU and are not measured here (`python bench/gpu.py` measures them on one GPU: the GPU section). A 2-core CPU gives small absolute numbers; the ratios between methods, measured "
        "in the same run on the same model, data and batch, are what matter. Raw figures: `bench/results/train.json`.",
        "",
        f"Throughput: the `demo` model ({c['model_params'] / 1e6:.1f}M parameters, {pc['model']['family']}, vocab "
        f"{c['vocab_size']:,}) on the built-in corpus, seq {c['seq_len']}, global batch {c['global_batch_size']} = "
        f"micro {c['micro_batch_size']} x accum {c['grad_accum']} x {m['ranks']} ranks "
        f"({c['tokens_per_step']:,} tokens/step), DeepSpeed ZeRO-2 (`configs/deepspeed/zero2.json`) for lmforge and "
        f"the Trainer. Tokens/s = tokens per step / the median time of steps {c['warmup_steps_skipped'] + 1}-"
        f"{c['steps']} (the first {c['warmup_steps_skipped']} are warm-up), best of {c['rounds']} interleaved rounds "
        "of each method, each round led by the next method (every run's figures are in the JSON). A ratio is the "
        "median over rounds of the ratio within a round: the machine is shared and its load drifts, so methods "
        "run back to back are compared, and the median drops the round a burst of other work fell on. MFU "
        f"against {m['peak_flops_per_thread'] / 1e9:.1f} GFLOP/s per rank (an fp32 matmul on one "
        "thread, measured once).",
        "",
        "| method | what runs | tokens/s | MFU | s/step | vs Trainer | vs plain |",
        "|---|---|---:|---:|---:|---:|---:|",
        row("**lmforge**", "lmforge", "`torchrun -m pretrain`, DeepSpeed ZeRO-2"),
        row("HF `Trainer`", "trainer", "same ZeRO-2 JSON via `TrainingArguments(deepspeed=...)`, `use_cpu=True`"),
        row("plain PyTorch", "plain", "DDP (gloo) + `torch.optim.AdamW`, hand-written loop"),
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
        f"| lmforge / HF Trainer (tokens/s) | {ratio['lmforge_vs_trainer']:.2f}x | >= {TARGETS['lmforge_vs_trainer']}x | "
        f"{met('lmforge_vs_trainer')} |",
        f"| lmforge / plain PyTorch (tokens/s) | {ratio['lmforge_vs_plain']:.2f}x | >= {TARGETS['lmforge_vs_plain']}x | "
        f"{met('lmforge_vs_plain')} |",
        f"| HF Trainer / plain PyTorch (tokens/s) | {ratio['trainer_vs_plain']:.2f}x | | |",
        "",
        "Per round (lmforge / Trainer): " + ", ".join(f"{x:.2f}x" for x in ratio["per_round"]["lmforge_vs_trainer"])
        + "; best round against best round: " + f"{ratio['best_of_rounds']['lmforge_vs_trainer']:.2f}x.",
    ]
    if mem:
        lines += bench_memory.table(mem, TARGETS["zero3_vs_theory"], met("zero3_vs_theory"))
    lines.append(END)
    write_section(path, BEGIN, END, "Pretraining", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
