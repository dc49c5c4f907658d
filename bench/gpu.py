"""GPU benchmark: the GPT-2 124M config on one GPU, in one command (<= 10 minutes on one H100/H200).

    python bench/gpu.py                                   # one CUDA GPU: bench/results/gpu.json + BENCHMARKS.md
    python bench/gpu.py --smoke --out DIR [--table FILE]  # the same code paths on CPU, fp32, a tiny GPT-2 (~1 min)

Without a CUDA GPU with native bf16 the full run refuses to start: GPU figures come from a GPU or not at all.
`--smoke` never writes to bench/results or to the repository's BENCHMARKS.md (it writes the table to
`--table FILE` when given, so that the table code is exercised too).

Data. GPT-2's tokenizer is not on disk and nothing may download, and the stage takes its vocabulary from the
data (a model vocabulary that differs from the data's is refused). So the benchmark writes its own token
folder: a byte-level BPE with GPT-2's layout (256 byte tokens, 50,000 merges, `<|endoftext|>` = 50,256:
50,257 tokens; the merges are byte pairs generated in order, not learned: training a 50k BPE here would take
minutes for nothing the benchmark measures), saved as a Hugging Face tokenizer folder, and synthetic shards
(`lmforge.data.shards.write_shard` + meta.json, as tests/harness.py's `position_corpus` writes them) of
uniformly drawn ids in documents of ~1,000 tokens ended by EOS. Throughput and memory depend on the shapes
only, never on which ids are read; the loss stays near ln(50,257) = 10.8.

What runs, each in processes of its own (`torchrun --nproc_per_node=1`, NCCL on the GPU):
  1. lmforge   `-m pretrain configs/pretrain/gpt2_124m.yaml engine.precision=bf16` as shipped (GPT-2 124M, seq
               1024, micro 16, global 512 sequences = accum 32 on one GPU, ZeRO-2), eval and save only at the
               end, log_every=1. Tokens/s and MFU from the per-step `train/tokens_per_s` and `train/mfu` in
               RUN_DIR/metrics.jsonl: tokens per step / the median step time after `--warmup` steps.
  2. trainer   `transformers.Trainer` on the same model (same seed: the same initial weights), batch, windows (in
               lmforge's order, checked) and DeepSpeed config (lmforge's resolved one, fp32 gradient
               accumulation and reduction included, with "auto" where the Trainer owns the value), bf16=True.
               Timed by a TrainerCallback at every step end, rates as for lmforge.
  3. memory    one training step (forward, loss, backward; no optimizer: its states are the same either way)
               of the same model in bf16 at micro 16 x 1024: `torch.cuda.max_memory_allocated` after
               `reset_peak_memory_stats`, with `lmforge.loss.token_loss` (chunked), with `lmforge.loss.lm_loss`
               (fused: no logits, the stages' loss) and with `F.cross_entropy(logits.float())`, each after a warm-up step of its own (cuBLAS workspaces).
               Step bytes = peak - what was allocated before the step (the weights).
  4. round trip `-m pretrain` in bf16 on the GPU for 4 steps with saves at 2 and 4 (export at 4), then relaunched
               with train.max_steps=6: it must resume at step 4, log steps 5-6 only, save, export final/ whose
               logits match the engine's within the stage's own tolerance (summary.json), load with
               `AutoModelForCausalLM.from_pretrained(final, dtype=bfloat16)` on the GPU and reproduce the
               engine's logits kept in export_parity.safetensors, and load with `AutoTokenizer`.
MFU = tokens/s x `lmforge.models.flops_per_token` / peak, one peak for both methods: the datasheet table in
`lmforge.throughput` (dense bf16) for this GPU's exact name (NaN, null in the JSON, when the name is not in it).

Not measured here: several GPUs, several nodes, torch.compile (`engine.compile`), activation checkpointing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/gpu.py`, this file's folder comes first on sys.path, where bench/tokenize.py would shadow
# the standard library's `tokenize` module; the project root takes its place.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

from bench import memory as bench_memory  # noqa: E402
from bench.report import free_port, parse_args, write_section  # noqa: E402
from bench.train import batch_shape, child_trainer, data_ids, rates, steady  # noqa: E402

BEGIN, END = "<!-- bench:gpu:begin -->", "<!-- bench:gpu:end -->"
CONFIG = ROOT / "configs" / "pretrain" / "gpt2_124m.yaml"
GPT2_VOCAB = 50_257  # GPT-2's tokenizer: 256 bytes + 50,000 merges + <|endoftext|>
EOS = "<|endoftext|>"
NEVER = 10**9  # eval_every / save_every: only the final evaluation and save, after the measured steps
# --smoke: the same paths on CPU in fp32 with a GPT-2 of ~0.1 M parameters and a 512-token vocabulary
SMOKE = {"vocab": 512, "seq_len": 64, "model": {"family": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                               "max_seq_len": 128},
         "batch": {"micro_batch_size": 4, "global_batch_size": 8}}
# steps of the first launch, its saves, the relaunch's; the GPU run's batch (smoke: SMOKE's)
ROUND_TRIP = {"first": 4, "save_every": 2, "second": 6, "batch": {"micro_batch_size": 8, "global_batch_size": 16}}


# --------------------------------------------------------------------------------------------------
# Data: a GPT-2-shaped tokenizer and synthetic token shards


def gpt2_shaped_tokenizer(vocab_size: int):
    """A byte-level BPE with GPT-2's layout: the 256 byte symbols, then `vocab_size - 257` merges of byte pairs
    (in order: generated, not learned), then EOS as the last id. Loads with `AutoTokenizer` like any other."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [(a, b) for a in alphabet for b in alphabet][:vocab_size - len(alphabet) - 1]
    vocab = {c: i for i, c in enumerate(alphabet)} | {a + b: len(alphabet) + i for i, (a, b) in enumerate(merges)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(EOS) == vocab_size - 1, tok.get_vocab_size()
    return tok


def write_data(root: Path, vocab_size: int, seq_len: int, train_windows: int, val_windows: int) -> Path:
    """A token folder the stage reads: tokenizer/, train/ and val/ shards of uniform ids in ~1,000-token
    documents ended by EOS, meta.json last (its presence means complete). Rewritten on every run (seconds)."""
    import numpy as np

    from lmforge import atomic
    from lmforge.data.shards import FORMAT, token_dtype, write_shard
    from lmforge.tokenizer import folder_hash, save_folder

    shutil.rmtree(root, ignore_errors=True)
    save_folder(gpt2_shaped_tokenizer(vocab_size), root / "tokenizer", eos_token=EOS)
    eos, dtype = vocab_size - 1, token_dtype(vocab_size)
    rng = np.random.default_rng(0)
    splits = {}
    for split, windows in (("train", train_windows), ("val", val_windows)):
        n = windows * seq_len + 1  # + 1: the last window's last target
        tokens = rng.integers(0, eos, size=n).astype(dtype)
        ends = np.append(np.cumsum(rng.integers(500, 1500, size=n // 500 + 1)), n)
        ends = np.unique(np.minimum(ends, n))
        tokens[ends - 1] = eos  # every document ends with EOS, as `lmforge tokenize` writes them
        record = write_shard(root, split, 0, tokens, ends.astype(np.uint64))
        splits[split] = {"shards": [record], "tokens": record["tokens"], "documents": record["documents"]}
    atomic.write_json(root / "meta.json", {
        "format": FORMAT, "dtype": str(np.dtype(dtype)), "source_fingerprint": f"bench-gpu-uniform-{vocab_size}-v1",
        "tokenizer": {"vocab_size": vocab_size, "eos_id": eos, "hash": folder_hash(root / "tokenizer"),
                      "eos_token": EOS},
        "splits": splits})
    return root


def write_config(work: Path, data: Path, name: str, smoke: bool, batch: dict | None = None, **train) -> Path:
    """configs/pretrain/gpt2_124m.yaml with this benchmark's data, run folder and `train` keys (smoke: a tiny
    GPT-2 on CPU); `batch` replaces the config's batch sizes."""
    import yaml

    over = {"include": str(CONFIG), "run_dir": str(work / "runs" / name), "data": {"path": str(data)},
            "train": {"log_every": 1, "eval_every": NEVER, "save_every": NEVER, **train},
            "eval": {"windows": 8 if smoke else 32, "max_new_tokens": 8},
            "tracking": {"wandb": False, "plots": False}}
    if smoke:
        over.update(model=SMOKE["model"], batch=SMOKE["batch"])
        over["data"]["seq_len"] = SMOKE["seq_len"]
    if batch:
        over["batch"] = batch
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(over, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Launching


def child_env(smoke: bool, extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if smoke:  # CPU even where a GPU is present: the smoke run is the same on every machine
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return {**env, **(extra or {})}


def launch(name: str, target: list[str], work: Path, smoke: bool, timeout: float, torchrun: bool = True,
           extra_env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `target` as a user would (one rank under torchrun, or plain python); the log goes to WORK/logs."""
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}"]
                             if torchrun else []), *target]
    began = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=child_env(smoke, extra_env), cwd=ROOT,
                         timeout=timeout)
    run.seconds = round(time.perf_counter() - began, 1)
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n{run.stdout}\n--- stderr ---\n{run.stderr}")
    if check and run.returncode != 0:
        raise SystemExit(f"bench/gpu.py: '{name}' failed with exit code {run.returncode} (log: {log}):\n"
                         f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    return run


def run_child(kind: str, spec: dict, work: Path, smoke: bool, timeout: float, torchrun: bool) -> dict:
    spec = {**spec, "result": str(work / "results" / f"{kind}.json")}
    Path(spec["result"]).parent.mkdir(parents=True, exist_ok=True)
    Path(spec["result"]).unlink(missing_ok=True)
    spec_path = work / "specs" / f"{kind}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    # memory on CPU: glibc hands freed blocks over 64 KB back at once, so RSS follows the live tensors
    extra = {"MALLOC_MMAP_THRESHOLD_": "65536"} if kind == "memory" and smoke else None
    run = launch(kind, [str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)], work, smoke,
                 timeout, torchrun, extra)
    return {**json.loads(Path(spec["result"]).read_text()), "wall_seconds": run.seconds}


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# 1. lmforge


def run_lmforge(config: Path, run_dir: Path, work: Path, smoke: bool, precision: str, warmup: int,
                tokens_per_step: int, timeout: float) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # an existing run folder would be resumed, not retrained
    run = launch("lmforge", ["-m", "pretrain", str(config), f"engine.precision={precision}"], work, smoke, timeout)
    rows = [r for r in metric_rows(run_dir) if "train/tokens_per_s" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "lmforge did not log every step"
    # each logged rate covers exactly one step (log_every=1): its seconds are tokens per step / rate
    step_seconds = [tokens_per_step / r["train/tokens_per_s"] for r in rows]
    reported = sorted(r["train/mfu"] for r in rows[warmup:] if r.get("train/mfu") is not None)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**rates(step_seconds, warmup, tokens_per_step), "losses": [r["train/loss"] for r in rows],
            "lmforge_reported_mfu_median": reported[len(reported) // 2] if reported else None,
            "memory_allocated_gb_max": max(r.get("train/memory_gb") or 0 for r in rows),
            "memory_reserved_gb_max": max((r.get("train/memory_reserved_gb") or 0 for r in rows), default=None),
            "zero_stage": summary["zero_stage"], "wall_seconds": run.seconds}


# --------------------------------------------------------------------------------------------------
# 2. The Hugging Face Trainer: bench/train.py's `child_trainer`, under torchrun, with the spec's device and
#    precision (here "cuda" and "bf16"; --smoke: "cpu" and "fp32")


# --------------------------------------------------------------------------------------------------
# 3. Memory of one training step, with and without the chunked and fused losses (one process, no torchrun)


def child_memory(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from lmforge.config.model import ModelConfig
    from lmforge.data.sampler import WindowSampler
    from lmforge.data.shards import TokenShards
    from lmforge.loss import lm_loss, token_loss
    from lmforge.models import build_model

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    torch.manual_seed(1234)
    # bf16 weights and activations, as DeepSpeed's bf16 engine holds them
    model = build_model(ModelConfig(**spec["model"]), *spec["ids"]).to(device=device, dtype=dtype)
    model.train()
    sampler = WindowSampler(TokenShards(Path(spec["data"]), "train"), spec["seq_len"], 1234)
    x = sampler.batch(range(spec["micro"])).to(device)
    losses = {"chunked": lambda x: token_loss(model(input_ids=x[:, :-1], use_cache=False).logits, x[:, 1:]),
              "plain": lambda x: F.cross_entropy(model(input_ids=x[:, :-1], use_cache=False).logits.float().flatten(0, 1),
                                                 x[:, 1:].flatten()),
              "fused": lambda x: lm_loss(model, x[:, :-1], x[:, 1:])}  # the stages' loss: no logits at all

    def current() -> int:
        if cuda:
            torch.cuda.synchronize(device)
            return torch.cuda.memory_allocated(device)
        return bench_memory.status_bytes()["rss_bytes"]

    def step(kind: str) -> dict:
        model.zero_grad(set_to_none=True)  # the gradients are part of the step's memory
        before = current()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: from here on, this step's peak
        loss = losses[kind](x)
        loss.backward()
        current()
        peak = torch.cuda.max_memory_allocated(device) if cuda else bench_memory.status_bytes()["peak_rss_bytes"]
        grad = model.get_output_embeddings().weight.grad.float().cpu()
        return {"loss": float(loss.detach().float()), "before_bytes": before, "peak_bytes": peak,
                "step_bytes": peak - before, "_grad": grad}

    out = {}
    for kind in losses:  # a warm-up step of its own first (cuBLAS workspaces, allocator pools), then the measured one
        warm = step(kind)
        out[kind] = {**step(kind), "warmup_step_bytes": warm["step_bytes"]}
    grads = {k: out[k].pop("_grad") for k in out}
    scale = float(grads["plain"].abs().max())
    return {**out, "loss_abs_diff": max(abs(out[k]["loss"] - out["plain"]["loss"]) for k in ("chunked", "fused")),
            "output_grad_max_abs_diff_rel": max(float((grads[k] - grads["plain"]).abs().max())
                                                for k in ("chunked", "fused")) / max(scale, 1e-30),
            "params": sum(p.numel() for p in model.parameters()),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}


# --------------------------------------------------------------------------------------------------
# 4. The save -> resume -> export round trip through the stage


def round_trip(config: Path, run_dir: Path, work: Path, smoke: bool, precision: str, timeout: float) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge import checkpoint as ckpt

    shutil.rmtree(run_dir, ignore_errors=True)
    stage = ["-m", "pretrain", str(config), f"engine.precision={precision}"]
    first = launch("round_trip_1", stage, work, smoke, timeout)
    saved = [c.step for c in ckpt.complete(run_dir / "checkpoints")]
    summary_1 = json.loads((run_dir / "summary.json").read_text())
    second = launch("round_trip_2", [*stage, f"train.max_steps={ROUND_TRIP['second']}"], work, smoke, timeout)
    summary = json.loads((run_dir / "summary.json").read_text())
    trained = [r["step"] for r in metric_rows(run_dir) if "train/loss" in r]
    final = run_dir / "final"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tolerance = summary.get("export_parity_tolerance") or (5e-2 if precision == "bf16" else 1e-4)  # the stage's defaults
    # final/ as a user loads it, on the device and in the training dtype, against the engine's logits
    device = torch.device("cpu" if smoke else "cuda")
    model = AutoModelForCausalLM.from_pretrained(final, dtype=dtype).to(device).eval()
    probe = load_file(str(run_dir / "export_parity.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"].to(device), use_cache=False).logits.float().cpu()
    reload_diff = float((logits - probe["logits"]).abs().max())
    tokenizer = AutoTokenizer.from_pretrained(final)
    record = ckpt.latest(run_dir / "checkpoints").record
    out = {
        "first_launch": {"steps": summary_1["steps"], "checkpoints": saved, "wall_seconds": first.seconds},
        "second_launch": {"steps": summary["steps"], "wall_seconds": second.seconds,
                          "resumed_at_step": ROUND_TRIP["first"] if f"at step {ROUND_TRIP['first']}" in second.stdout
                          and "resumed from" in second.stdout else None},
        "trained_steps": trained, "each_step_once": trained == list(range(1, ROUND_TRIP["second"] + 1)),
        "checkpoint_dtype": record.get("dtype"), "final_step": json.loads((final / "lineage.json").read_text())["step"],
        "export_dtype": json.loads((final / "config.json").read_text()).get("dtype"),
        "reloaded_param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        "export_parity_max_abs_diff": summary["export_parity_max_abs_diff"], "export_parity_tolerance": tolerance,
        "reload_max_abs_diff": reload_diff, "tokenizer_vocab": len(tokenizer), "val_loss": summary.get("val_loss")}
    out["ok"] = bool(out["second_launch"]["resumed_at_step"] == ROUND_TRIP["first"] and out["each_step_once"]
                     and saved == [ROUND_TRIP["save_every"], ROUND_TRIP["first"]]
                     and out["final_step"] == ROUND_TRIP["second"]
                     and out["checkpoint_dtype"] == out["export_dtype"] == str(dtype).removeprefix("torch.")
                     and out["reloaded_param_dtypes"] == [out["export_dtype"]]
                     and out["export_parity_max_abs_diff"] <= tolerance and reload_diff <= tolerance)
    return out


# --------------------------------------------------------------------------------------------------
# The parent


def strict(value):
    """JSON without NaN/Infinity (null instead): an unknown GPU's MFU is NaN."""
    return json.loads(json.dumps(value, default=str), parse_constant=lambda _: None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, a tiny GPT-2, a few steps; no GPU figures")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the throughput runs (12; smoke 5)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the rates (default 3; smoke 2)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json (default bench/results)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default bench/work/gpu[-smoke])")
    parser.add_argument("--table", type=Path, default=None, help="file for the table (default BENCHMARKS.md; smoke: none)")
    parser.add_argument("--no-table", action="store_true", help="write no table")
    args = parse_args(parser, {"trainer": child_trainer, "memory": child_memory})

    import torch

    if not args.smoke:  # before any work: GPU figures come from a GPU or not at all
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py: no CUDA GPU here, and this benchmark writes GPU figures only from a GPU. "
                             "Run it on a machine with one (and a CUDA build of torch), or run "
                             "`python bench/gpu.py --smoke` to check its code paths on CPU")
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise SystemExit(f"bench/gpu.py: {torch.cuda.get_device_name(0)} has no native bf16 (compute "
                             "capability 8.0+ needed); the 124M figures are bf16")
    elif (args.out and args.out.resolve() == (ROOT / "bench" / "results").resolve()) or (
            args.table and args.table.resolve() == (ROOT / "BENCHMARKS.md").resolve()):
        parser.error("--smoke figures are not GPU figures: give --out and --table outside bench/results and "
                     "BENCHMARKS.md")
    began = time.perf_counter()
    smoke = args.smoke
    args.steps = args.steps or (5 if smoke else 12)
    args.warmup = args.warmup if args.warmup is not None else (2 if smoke else 3)
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    work = (args.work or ROOT / "bench" / "work" / ("gpu-smoke" if smoke else "gpu")).resolve()
    out = args.out or (work / "results-smoke" if smoke else ROOT / "bench" / "results")
    table = None if args.no_table else (args.table or (None if smoke else ROOT / "BENCHMARKS.md"))
    timeout = 300 if smoke else 420  # seconds per launch
    precision, device = ("fp32", "cpu") if smoke else ("bf16", "cuda")
    work.mkdir(parents=True, exist_ok=True)

    from importlib.metadata import version

    from lmforge.config import load_config
    from lmforge.config.pretrain import PretrainConfig
    from lmforge.models import flops_per_token, num_params
    from lmforge.throughput import device_peak

    vocab = SMOKE["vocab"] if smoke else GPT2_VOCAB
    seq = SMOKE["seq_len"] if smoke else load_config(CONFIG, PretrainConfig).data.seq_len
    data = write_data(work / "data", vocab, seq, train_windows=256 if smoke else 4096, val_windows=32 if smoke else 64)
    ids = data_ids(data)
    config = write_config(work, data, "throughput", smoke, max_steps=args.steps)
    cfg = load_config(config, PretrainConfig)
    micro, accum, global_batch = batch_shape(cfg, 1)
    tokens_per_step = global_batch * seq
    fpt = flops_per_token(cfg.model, vocab, seq)
    params = num_params(cfg.model, vocab)["total"]
    if smoke:
        from bench.train import measure_peak

        peak, peak_source = measure_peak(), "fp32 512x512 matmul on one thread (smoke: CPU)"
    else:
        peak, peak_source = device_peak(torch.device("cuda", 0), torch.bfloat16)
    gpu = None if smoke else {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                              "memory_bytes": torch.cuda.get_device_properties(0).total_memory,
                              "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                              "cuda": torch.version.cuda}
    print(f"[bench] {cfg.model.family} {params / 1e6:.1f}M parameters, vocab {vocab:,}, seq {seq}, global batch "
          f"{global_batch} = micro {micro} x accum {accum} x 1 {device} ({tokens_per_step:,} tokens/step), {precision}, "
          f"{args.steps} steps ({args.warmup} warm-up); peak {peak / 1e12:.3g} TFLOP/s ({peak_source})", flush=True)

    # 1 and 2: throughput, lmforge and the Trainer on the same model, batch and windows
    lm = run_lmforge(config, Path(cfg.run_dir), work, smoke, precision, args.warmup, tokens_per_step, timeout)
    tr = run_child("trainer", {"config": str(config), "steps": args.steps, "work": str(work / "runs" / "trainer"),
                               "device": device, "precision": precision}, work, smoke, timeout, torchrun=True)
    ends, start = tr.pop("step_ends"), tr.pop("start")
    tr.update(steady(ends, start, args.warmup, tokens_per_step))
    for name, r in (("lmforge", lm), ("trainer", tr)):
        r["mfu"] = r["tokens_per_s"] * fpt / peak  # NaN for a GPU without a datasheet figure
        print(f"[bench] {name:8s} {r['tokens_per_s']:12,.0f} tokens/s  MFU {100 * r['mfu']:5.1f}%  "
              f"({r['median_step_seconds']:.3f} s/step; run {r['wall_seconds']:.0f} s)", flush=True)
    assert tr["deepspeed_enabled"] and tr["wrapped_by"] == "DeepSpeedEngine", tr["wrapped_by"]
    assert tr["same_windows_as_lmforge"], "the Trainer read other windows than lmforge"

    # 3: memory of one training step at the config's micro batch, with and without the chunked loss
    memory = run_child("memory", {"data": str(data), "model": cfg.model.model_dump(mode="json"), "ids": list(ids),
                                  "seq_len": seq, "micro": micro, "device": device, "precision": precision},
                       work, smoke, timeout, torchrun=False)
    memory["fp32_logits_bytes"] = micro * seq * vocab * 4  # one fp32 [tokens, vocab] tensor
    memory["reduction"] = 1 - memory["fused"]["step_bytes"] / max(memory["plain"]["step_bytes"], 1)
    print(f"[bench] memory of one step (micro {micro} x {seq}): plain {memory['plain']['step_bytes'] / 1e9:.2f} GB, "
          f"chunked {memory['chunked']['step_bytes'] / 1e9:.2f} GB, fused {memory['fused']['step_bytes'] / 1e9:.2f} GB "
          f"({100 * memory['reduction']:.0f}% less)", flush=True)

    # 4: save -> resume -> export through the stage
    # a smaller batch than the throughput runs' on the GPU (accumulation kept): the round trip is about state
    rt_config = write_config(work, data, "round_trip", smoke, None if smoke else ROUND_TRIP["batch"],
                             max_steps=ROUND_TRIP["first"], save_every=ROUND_TRIP["save_every"], keep_last=3)
    rt = round_trip(rt_config, Path(load_config(rt_config, PretrainConfig).run_dir), work, smoke, precision, timeout)
    print(f"[bench] round trip: saved {rt['first_launch']['checkpoints']}, resumed at "
          f"{rt['second_launch']['resumed_at_step']}, final/ step {rt['final_step']} in {rt['export_dtype']}, parity "
          f"{rt['export_parity_max_abs_diff']:.2e} (tolerance {rt['export_parity_tolerance']:.0e}): "
          f"{'ok' if rt['ok'] else 'FAILED'}", flush=True)

    report = strict({
        "benchmark": "gpu", "mode": "smoke" if smoke else "full", "date": time.strftime("%Y-%m-%d"),
        "machine": {"gpu": gpu, "device": device, "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "peak_flops": peak, "peak_source": peak_source},
        "versions": {"torch": torch.__version__, "deepspeed": version("deepspeed"),
                     "transformers": version("transformers")},
        "config": {"pretrain_config": cfg.model_dump(mode="json"), "model_params": params, "vocab_size": vocab,
                   "flops_per_token": fpt, "precision": precision, "micro_batch_size": micro, "grad_accum": accum,
                   "global_batch_size": global_batch, "seq_len": seq, "tokens_per_step": tokens_per_step,
                   "steps": args.steps, "warmup_steps_skipped": args.warmup,
                   "data": "synthetic uniform ids, GPT-2-shaped byte-level BPE (bench/gpu.py docstring)"},
        "results": {"lmforge": lm, "trainer": tr},
        "ratios": {"lmforge_vs_trainer": lm["tokens_per_s"] / tr["tokens_per_s"]},
        "memory": memory, "round_trip": rt, "seconds": round(time.perf_counter() - began, 1)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {out / 'gpu.json'} ({report['seconds']:.0f} s)")
    if table is not None:
        write_table(report, table)
    return 0 if rt["ok"] else 1


def write_table(report: dict, path: Path) -> None:
    """The GPU section of `path` (between its markers), from gpu.json's report."""
    r, c, m, mem, rt = report["results"], report["config"], report["machine"], report["memory"], report["round_trip"]
    gpu, v = m["gpu"], report["versions"]

    def pct(x) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    where = (f"**1 x {gpu['name']}** ({gpu['memory_bytes'] / 2**30:.0f} GiB, CUDA {gpu['cuda']})" if gpu else
             "**CPU, fp32, a tiny GPT-2: a smoke run, not GPU figures**")
    lines = [
        BEGIN,
        f"Measured {report['date']} by `python bench/gpu.py` on {where}, torch {v['torch']}, DeepSpeed "
        f"{v['deepspeed']}, transformers {v['transformers']}; raw figures: `bench/results/gpu.json`. "
        f"`configs/pretrain/gpt2_124m.yaml` ({c['model_params'] / 1e6:.1f}M parameters, vocab {c['vocab_size']:,}) "
        f"in {c['precision']}, seq {c['seq_len']}, global batch {c['global_batch_size']} = micro {c['micro_batch_size']} "
        f"x accum {c['grad_accum']} on one device ({c['tokens_per_step']:,} tokens/step), ZeRO-2, on synthetic tokens of "
        f"GPT-2's vocabulary size. Tokens/s = tokens per step / the median of steps {c['warmup_steps_skipped'] + 1}-"
        f"{c['steps']}; MFU against "
        + (f"{m['peak_flops'] / 1e12:.3g} TFLOP/s ({m['peak_source']})." if m["peak_flops"] else
           f"no peak figure ({m['peak_source']}).") + " Peak GB: the largest memory allocated during training.",
        "",
        "| method | what runs | tokens/s | MFU | s/step | peak GB | vs Trainer |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, key, what, peak_gb in (
            ("**lmforge**", "lmforge", "`torchrun --nproc_per_node=1 -m pretrain`", r["lmforge"]["memory_allocated_gb_max"]),
            ("HF `Trainer`", "trainer", "same model, batch, windows and DeepSpeed config",
             r["trainer"].get("peak_allocated_gb"))):  # CUDA's counter: a GPU run's only
        x = r[key]
        lines.append(f"| {name} | {what} | {x['tokens_per_s']:,.0f} | {pct(x['mfu'])} | {x['median_step_seconds']:.3f} "
                     f"| {'n/a' if peak_gb is None or not gpu else f'{peak_gb:.1f}'} "
                     f"| {x['tokens_per_s'] / r['trainer']['tokens_per_s']:.2f}x |")
    gb = 1e9
    lines += [
        "",
        f"Memory of one training step (forward, loss, backward) at micro {c['micro_batch_size']} x {c['seq_len']}, "
        f"{c['precision']} weights: peak allocated over what the weights hold before the step "
        f"(one fp32 [tokens, vocab] tensor is {mem['fp32_logits_bytes'] / gb:.2f} GB).",
        "",
        "| loss | step peak GB | vs plain | loss |",
        "|---|---:|---:|---:|",
        f"| `F.cross_entropy(logits.float())` | {mem['plain']['step_bytes'] / gb:.2f} | 1.00x | "
        f"{mem['plain']['loss']:.4f} |",
        f"| `lmforge.loss.token_loss` (chunked) | {mem['chunked']['step_bytes'] / gb:.2f} | "
        f"{mem['chunked']['step_bytes'] / mem['plain']['step_bytes']:.2f}x | {mem['chunked']['loss']:.4f} |",
        f"| `lmforge.loss.lm_loss` (fused, the stages' loss) | {mem['fused']['step_bytes'] / gb:.2f} | "
        f"{mem['fused']['step_bytes'] / mem['plain']['step_bytes']:.2f}x | {mem['fused']['loss']:.4f} |",
        "",
        f"Round trip in {c['precision']} through the stage: saved at steps {rt['first_launch']['checkpoints']}, relaunched "
        f"with train.max_steps={rt['second_launch']['steps']}: resumed at step {rt['second_launch']['resumed_at_step']}, "
        f"every step trained once: {rt['each_step_once']}; final/ ({rt['export_dtype']}) matches the engine's logits "
        f"to {rt['export_parity_max_abs_diff']:.2e} (tolerance {rt['export_parity_tolerance']:.0e}) and, reloaded "
        f"with `AutoModelForCausalLM`, to {rt['reload_max_abs_diff']:.2e}: **{'passed' if rt['ok'] else 'FAILED'}**.",
        END,
    ]
    write_section(path, BEGIN, END, "GPU (one device)", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
