"""Shared fixtures: offline environment, a tiny trained tokenizer, helpers to write configs and corpora."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

# Nothing may download at test time; W&B logs locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sample_texts(n: int = 60, seed: int = 0) -> list[str]:
    """Varied documents: code, prose, unicode, whitespace runs, and the EOS string as plain text."""
    import random

    rng = random.Random(seed)
    words = ["def", "return", "self", "lambda", "naïve", "café", "数据", "🙂", "don't", "we'll", "x1", "42",
             "  ", "\t", "\n", "<|endoftext|>", "Ünïcödé", "print(", ")", "{", "}", "==", "->", "über"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + f" doc{i}" for i in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE saved as a Hugging Face folder (trained on a slice of the stdlib)."""
    from lmforge.data.sources import stdlib_files
    from lmforge.tokenizer import save_folder, train_bpe

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[:80]]
    tok = train_bpe(texts + sample_texts(), 512, ["<|endoftext|>", "<|pad|>"], show_progress=False)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_folder(tok, out, eos_token="<|endoftext|>", pad_token="<|pad|>")
    return out


@pytest.fixture
def tokenize_config(tmp_path, tiny_tokenizer):
    """Write a tokenize config for `sources` (pretrained tiny tokenizer by default); returns its path."""

    def make(sources: list, **extra) -> Path:
        cfg = {"out_dir": str(tmp_path / "out"), "sources": sources,
               "tokenizer": {"pretrained": str(tiny_tokenizer)}, "workers": 2, "progress": False,
               "shard_bytes": 4096}
        cfg.update(extra)
        return write_yaml(tmp_path / "tokenize.yaml", cfg)

    return make


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_tokenizer) -> Path:
    """~150 stdlib files tokenized with the 512-token tokenizer: a pretraining corpus for tests."""
    from lmforge.data.sources import stdlib_files
    from pretrain import tokenize

    root = tmp_path_factory.mktemp("data")
    files = [str(p) for p in stdlib_files()[:150]]
    cfg = write_yaml(root / "tokenize.yaml", {
        "out_dir": str(root / "data"), "sources": [{"type": "files", "paths": files, "format": "txt"}],
        "tokenizer": {"pretrained": str(tiny_tokenizer)}, "split": {"val_fraction": 0.1}, "workers": 2,
        "progress": False, "shard_bytes": 1 << 20})
    assert tokenize.main([str(cfg)]) == 0
    return root / "data"


def pretrain_config(path: Path, data: Path, run_dir: Path, seq_len: int = 64, **sections) -> Path:
    """A tiny pretraining config: the `tiny` model, a few steps; `sections` override keys."""
    cfg = {
        "run_dir": str(run_dir),
        "data": {"path": str(data), "seq_len": seq_len},
        "model": {"include": str(ROOT / "configs" / "model" / "tiny.yaml")},
        "batch": {"micro_batch_size": 4, "global_batch_size": 8},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "engine": {"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json")},
        "train": {"max_steps": 8, "log_every": 1, "eval_every": 4, "save_every": 4},
        "eval": {"windows": 8, "prompt": "def ", "max_new_tokens": 8},
        "tracking": {"wandb": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return write_yaml(path, cfg)


def launch(module: str, config: Path, *overrides: str, nproc: int = 1, timeout: float = 600,
           env: dict | None = None, cwd: Path | None = None):
    """Run a stage as a user would: `torchrun --nproc_per_node=N -m MODULE` (or plain python for one)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", module, str(config), *overrides]
    else:
        cmd = [sys.executable, "-m", module, str(config), *overrides]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)
