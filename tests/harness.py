"""The harness the resilience tests (and bench/reliability.py) use: launch a stage as a user would,
write tiny configs, build a corpus whose windows say where they come from, and read back which
windows a run trained on.

Faults are injected through environment variables the stage reads (see lmforge/checkpoint.py):
LMFORGE_FAULT=POINT:STEP:RANK kills a rank at a point of a save (or makes its loss NaN), and
LMFORGE_TRACE_DIR makes every rank record the first tokens of each row it trains on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SEQ, WINDOWS = 16, 48  # the position corpus: 48 windows of 16 tokens


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pretrain_config(path: Path, data: Path, run_dir: Path, seq_len: int = 64, **sections) -> Path:
    """A tiny pretraining config: the `tiny` model, a few steps; `sections` override keys."""
    cfg = {
        "run_dir": str(run_dir),
        "data": {"path": str(data), "seq_len": seq_len},
        "model": {"include": str(ROOT / "configs" / "model" / "tiny.yaml")},
        "batch": {"micro_batch_size": 4, "global_batch_size": 8},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        # a given peak skips the 0.5 s matmul each rank times at start-up (test_pretrain_zero keeps it)
        "engine": {"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json"), "peak_flops": 1.0e11},
        "train": {"max_steps": 8, "log_every": 1, "eval_every": 4, "save_every": 4},
        "eval": {"windows": 8, "prompt": "def ", "max_new_tokens": 8},
        "tracking": {"wandb": False, "plots": False},  # plots cost ~1 s a launch; the tests that read them turn them on
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return write_yaml(path, cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, config: Path, *overrides: str, nproc: int = 1, timeout: float = 600,
           env: dict | None = None, cwd: Path | None = None):
    """Run a stage as a user would: `torchrun --nproc_per_node=N -m MODULE` (or plain python for one)."""
    port = free_port()
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", module, str(config), *overrides]
    else:
        cmd = [sys.executable, "-m", module, str(config), *overrides]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)


def position_corpus(root: Path, tokenizer_dir: Path) -> Path:
    """Token shards whose window k starts with (k // 256, k % 256); the rest is seeded noise."""
    from lmforge import atomic
    from lmforge.data.shards import FORMAT, write_shard

    rng = np.random.default_rng(0)
    train = rng.integers(2, 512, size=WINDOWS * SEQ + 1).astype(np.uint16)
    for k in range(WINDOWS):
        train[k * SEQ], train[k * SEQ + 1] = k // 256, k % 256
    val = rng.integers(2, 512, size=20 * SEQ + 1).astype(np.uint16)
    shards = {split: [write_shard(root, split, 0, tokens, np.array([tokens.size], dtype=np.uint64))]
              for split, tokens in (("train", train), ("val", val))}
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    atomic.write_json(root / "meta.json", {
        "format": FORMAT, "dtype": "uint16", "source_fingerprint": "positions-v1",
        "tokenizer": {"vocab_size": 512, "eos_id": 0, "hash": "tiny", "eos_token": "<|endoftext|>"},
        "splits": {s: {"shards": v, "tokens": int(v[0]["tokens"]), "documents": 1} for s, v in shards.items()}})
    return root


def trained_windows(*trace_dirs) -> dict[int, list[int]]:
    """Step -> the window indices trained on at that step (in global order), from the last launch that
    trained it: a step redone after a crash replaces the lost attempt. One trace folder per launch."""
    by_step: dict[int, list[int]] = {}
    for trace_dir in trace_dirs:
        parts: dict[int, dict] = {}
        for rank_file in sorted(trace_dir.glob("trace-rank*.jsonl")):
            rank = int(rank_file.stem.removeprefix("trace-rank"))
            for line in rank_file.read_text().splitlines():
                rec = json.loads(line)
                parts.setdefault(rec["step"], {})[(rec["micro"], rank)] = [a * 256 + b for a, b in rec["rows"]]
        for step, pieces in parts.items():  # (micro, rank) order is global position order
            by_step[step] = [w for key in sorted(pieces) for w in pieces[key]]
    return dict(sorted(by_step.items()))


def traced(tmp_path, name: str) -> dict:
    folder = tmp_path / f"trace-{name}"
    folder.mkdir()
    return {"LMFORGE_TRACE_DIR": str(folder)}


def finetune_config(path: Path, init_from: Path, run_dir: Path, kind: str, files: dict, **sections) -> Path:
    """A tiny fine-tuning config on the word tasks (tests/conftest.word_tasks): `kind` classification or sft."""
    short = "cls" if kind == "classification" else "sft"
    cfg = {
        "run_dir": str(run_dir),
        "init_from": str(init_from),
        "task": {"type": kind, "max_length": 32, "exact_match_examples": 4, "max_new_tokens": 6},
        "data": {s: str(files[f"{short}_{s}"]) for s in ("train", "validation", "test")},
        "batch": {"micro_batch_size": 4, "global_batch_size": 8},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        # a given peak skips the 0.5 s matmul each rank times at start-up (test_pretrain_zero keeps it)
        "engine": {"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json"), "peak_flops": 1.0e11},
        "train": {"max_steps": 6, "log_every": 1, "eval_every": 3, "save_every": 3},
        "tracking": {"wandb": False, "plots": False},  # plots cost ~1 s a launch; the tests that read them turn them on
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return write_yaml(path, cfg)


def distill_config(path: Path, teacher: Path, run_dir: Path, data: Path | None = None, files: dict | None = None,
                   cache: Path | None = None, **sections) -> Path:
    """A tiny distillation config: a language model on token shards `data` (with the teacher's top-k from `cache`,
    a `distill.cache` folder), or (with `files`, the word tasks of tests/conftest.word_tasks) a classifier; the
    student is teacher layer 1 alone; `sections` override keys."""
    cfg = {
        "run_dir": str(run_dir),
        "teacher": str(teacher),
        "student": {"from_teacher": {"layers": [1]}},
        "kd": {"alpha": 0.5, "temperature": 2.0},
        "batch": {"micro_batch_size": 4, "global_batch_size": 8},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "engine": {"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json"), "peak_flops": 1.0e11},
        "train": {"max_steps": 6, "log_every": 1, "eval_every": 3, "save_every": 3},
        "eval": {"windows": 8},
        "report": {"speed_runs": 2},
        "tracking": {"wandb": False, "plots": False},
    }
    if files is None:
        cfg["data"] = {"path": str(data), "seq_len": 32} | ({"cache": str(cache)} if cache else {})
    else:
        cfg["task"] = {"type": "classification", "max_length": 32}
        cfg["examples"] = {s: str(files[f"cls_{s}"]) for s in ("train", "validation", "test")}
    for key, value in sections.items():  # a section is merged into the default, but a student replaces it
        mergeable = isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "student"
        cfg[key] = {**cfg[key], **value} if mergeable else value
    return write_yaml(path, cfg)
