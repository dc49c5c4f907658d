"""Shared fixtures: offline environment, a tiny trained tokenizer, helpers to write configs and corpora."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Nothing may download at test time; W&B logs locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[1]

from .harness import launch, pretrain_config, write_yaml  # noqa: E402,F401  (tests import them from here too)

LAUNCHING = ("distributed", "integration", "slurm")  # folders whose tests start stage processes (torchrun, a CLI)


def pytest_collection_modifyitems(config, items):
    """Every test that launches processes is `slow` (~5-90 s each on 2 cores), so `make quick` (`-m "not slow"`)
    is the unit tests: a marker set by hand in each file was missing from some of them."""
    for item in items:
        folder = Path(item.path).relative_to(ROOT / "tests").parts[:1]
        if set(folder) & set(LAUNCHING):
            item.add_marker(pytest.mark.slow)
        if folder == ("slurm",):
            item.add_marker(pytest.mark.slurm)


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


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama causal LM saved as a Hugging Face folder with the 512-token tokenizer: what fine-tuning
    starts from (any HF causal LM folder; a pretraining run's final/ is one)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("lm") / "tiny-llama"
    shutil.copytree(tiny_tokenizer, out)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=None, eos_token_id=0, pad_token_id=1)).save_pretrained(out)
    return out


def word_tasks(root: Path, n: int = 96, seed: int = 0) -> dict[str, Path]:
    """Small task files: classification (a text -> which of three words it has most of) and SFT (a word ->
    the word reversed), train/validation/test JSONL each."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma"]
    out = {}
    for split, count in (("train", n), ("validation", n // 4), ("test", n // 4)):
        cls, sft = [], []
        for _ in range(count):
            picks = [rng.choice(words) for _ in range(rng.randint(3, 12))]
            cls.append({"text": " ".join(picks), "label": max(words, key=picks.count)})
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))
            sft.append({"prompt": f"reverse {word}", "response": word[::-1]})
        out[f"cls_{split}"] = write_jsonl(root / f"cls_{split}.jsonl", cls)
        out[f"sft_{split}"] = write_jsonl(root / f"sft_{split}.jsonl", sft)
    return out


@pytest.fixture(scope="session")
def tasks_data(tmp_path_factory) -> dict[str, Path]:
    return word_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, tiny_lm) -> Path:
    """A classifier teacher over the word tasks' three labels (a fine-tuning run's final/ is one): tiny_lm's body
    with a seeded head, saved with the tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("cls") / "tiny-classifier"
    shutil.copytree(tiny_lm, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json"))
    config = AutoConfig.from_pretrained(tiny_lm)
    config.architectures = ["LlamaForSequenceClassification"]
    config.num_labels, config.id2label = 3, {0: "alpha", 1: "beta", 2: "gamma"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    LlamaForSequenceClassification.from_pretrained(tiny_lm, config=config).save_pretrained(out)
    return out
