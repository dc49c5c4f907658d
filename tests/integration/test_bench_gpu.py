"""bench/gpu.py: its data is what the 124M config needs, it refuses to write GPU figures without a GPU, and its
smoke mode runs every code path of the GPU run on CPU (so that the script is ready when a GPU is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ..conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu.py"


def run_script(*args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT)


def test_data_has_gpt2_vocabulary_and_the_config_is_gpt2_small(tmp_path):
    from transformers import AutoTokenizer

    from bench import gpu
    from lmforge.config import load_config
    from lmforge.config.pretrain import PretrainConfig
    from lmforge.data.sampler import WindowSampler
    from lmforge.data.shards import TokenShards
    from lmforge.models import num_params

    data = gpu.write_data(tmp_path / "data", gpu.GPT2_VOCAB, 1024, train_windows=3, val_windows=2)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == 50_257 and meta["tokenizer"]["eos_id"] == 50_256
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")  # as the stage's export will ship it
    assert len(tok) == 50_257 and tok.eos_token_id == 50_256
    assert tok.decode(tok("The meaning of life is")["input_ids"]) == "The meaning of life is"

    train = TokenShards(data, "train")
    assert train.num_tokens == 3 * 1024 + 1 and train.dtype == np.uint16
    ids = WindowSampler(train, 1024, 0).batch(range(3))
    assert ids.shape == (3, 1025) and int(ids.max()) <= 50_256 and int(ids.min()) >= 0
    # documents end with EOS, as `lmforge tokenize` writes them, and the index says where
    ends = np.fromfile(data / "train" / "000000.idx", dtype="<u8")
    tokens = np.fromfile(data / "train" / "000000.bin", dtype="<u2")
    assert ends[-1] == tokens.size and (tokens[ends.astype(np.int64) - 1] == 50_256).all()

    # the full run's config is the shipped GPT-2 small: 124.4M parameters with the 50,257-token vocabulary
    cfg = load_config(gpu.write_config(tmp_path, data, "throughput", smoke=False, max_steps=12), PretrainConfig)
    assert num_params(cfg.model, 50_257)["total"] == 124_439_808
    assert (cfg.model.family, cfg.data.seq_len, cfg.batch.micro_batch_size) == ("gpt2", 1024, 16)
    assert cfg.train.log_every == 1 and cfg.train.max_steps == 12


def test_refuses_gpu_figures_without_a_gpu(tmp_path):
    results = ROOT / "bench" / "results" / "gpu.json"
    before = results.read_bytes() if results.exists() else None
    run = run_script("--work", str(tmp_path / "work"), CUDA_VISIBLE_DEVICES="")
    assert run.returncode != 0 and "no CUDA GPU" in run.stderr and "--smoke" in run.stderr, run.stderr[-2000:]
    assert (results.read_bytes() if results.exists() else None) == before
    assert not (tmp_path / "work").exists()  # refused before any work
    # smoke figures are not GPU figures: they never go where GPU figures go
    run = run_script("--smoke", "--out", str(ROOT / "bench" / "results"), CUDA_VISIBLE_DEVICES="")
    assert run.returncode == 2 and "--smoke figures are not GPU figures" in run.stderr, run.stderr[-2000:]


def test_benchmarks_md_says_whether_gpu_figures_were_measured():
    """BENCHMARKS.md holds bench/gpu.py's section (its markers, so a GPU run replaces it in place): the figures of
    bench/results/gpu.json when a GPU has run it, else a statement that they are unrun and the command to run."""
    from bench import gpu

    text = (ROOT / "BENCHMARKS.md").read_text()
    assert text.count(gpu.BEGIN) == text.count(gpu.END) == 1
    section = text.split(gpu.BEGIN, 1)[1].split(gpu.END, 1)[0]
    results = ROOT / "bench" / "results" / "gpu.json"
    if results.exists():
        report = json.loads(results.read_text())
        assert report["mode"] == "full" and report["machine"]["gpu"]["name"] in section
    else:
        assert "Not measured" in section and "python bench/gpu.py" in section, section
        assert "smoke run" not in section  # CPU smoke figures never stand in for GPU figures


@pytest.mark.slow
def test_smoke_run_covers_every_gpu_code_path(tmp_path):
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_bytes()
    table = tmp_path / "BENCHMARKS.md"
    run = run_script("--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--table", str(table),
                     timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert report["mode"] == "smoke" and report["machine"]["gpu"] is None
    c = report["config"]
    assert c["precision"] == "fp32" and c["grad_accum"] == 2  # the accumulation path too

    lm, tr = report["results"]["lmforge"], report["results"]["trainer"]
    for r in (lm, tr):
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["measured_steps"] == c["steps"] - c["warmup_steps_skipped"]
    assert len(lm["losses"]) == len(tr["losses"]) == c["steps"]
    assert report["ratios"]["lmforge_vs_trainer"] == pytest.approx(lm["tokens_per_s"] / tr["tokens_per_s"])
    # the Trainer ran on DeepSpeed ZeRO-2 over lmforge's windows, from lmforge's initial weights: its first loss
    # is lmforge's (the Trainer divides the loss summed over seq - 1 targets per row by seq labels)
    assert tr["wrapped_by"] == "DeepSpeedEngine" and tr["zero_stage"] == lm["zero_stage"] == 2
    assert tr["same_windows_as_lmforge"] is True
    seq = c["seq_len"]
    assert min(abs(tr["losses"][0] - lm["losses"][0]),
               abs(tr["losses"][0] * seq / (seq - 1) - lm["losses"][0])) < 0.01, (tr["losses"][0], lm["losses"][0])

    # one step with the chunked loss, the fused loss and with F.cross_entropy(logits.float()): the same loss and gradients in fp32
    mem = report["memory"]
    assert mem["loss_abs_diff"] < 1e-5 and mem["output_grad_max_abs_diff_rel"] < 1e-4
    assert mem["plain"]["step_bytes"] > 0 and mem["chunked"]["step_bytes"] > 0 and mem["fused"]["step_bytes"] > 0

    rt = report["round_trip"]
    assert rt["ok"] is True
    assert rt["first_launch"]["checkpoints"] == [2, 4] and rt["second_launch"]["resumed_at_step"] == 4
    assert rt["trained_steps"] == [1, 2, 3, 4, 5, 6] and rt["final_step"] == 6
    assert rt["export_dtype"] == rt["checkpoint_dtype"] == "float32"
    assert rt["export_parity_max_abs_diff"] <= rt["export_parity_tolerance"]
    assert rt["reload_max_abs_diff"] <= rt["export_parity_tolerance"] and rt["tokenizer_vocab"] == 512

    text = table.read_text()
    assert "<!-- bench:gpu:begin -->" in text and "<!-- bench:gpu:end -->" in text and "smoke run" in text
    assert benchmarks.read_bytes() == before  # a smoke run never touches the recorded tables
