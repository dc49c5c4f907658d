"""Pretraining on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu) under each ZeRO stage, launched with torchrun.

One run per stage (8 steps of the tiny model, the same seed and global batch) feeds every test here:
the loss goes down, the stages agree with each other, the outputs are there and written once, and the
exported folder loads in plain transformers with the engine's logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from ..conftest import ROOT, launch, pretrain_config
from ..wandb_files import history, wandb_records

STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    out = {}
    for stage in STAGES:
        root = tmp_path_factory.mktemp(f"zero{stage}")
        cfg = pretrain_config(root / "pretrain.yaml", tiny_data, root / "run",
                              engine={"deepspeed": str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json"),
                                      "peak_flops": None},  # the CPU peak measured at start-up, as users get it
                              tracking={"wandb": stage == 2, "plots": stage == 2})
        proc = launch("pretrain", cfg, nproc=2)
        assert proc.returncode == 0, f"ZeRO-{stage} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        out[stage] = (root / "run", proc)
    return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> list[float]:
    return [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]


@pytest.mark.parametrize("stage", STAGES)
def test_loss_goes_down(runs, stage):
    run_dir, _ = runs[stage]
    losses = train_losses(run_dir)
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.3, losses
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss"] < summary["val_loss_start"] - 0.3
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage


def test_zero_stages_agree_with_plain_data_parallel(runs):
    """Same seed, data order and global batch: ZeRO 1-3 must match ZeRO-0 step for step. Not bitwise:
    partitioned reductions sum in another order (fp32 round-off, ~1e-6 relative); 1e-4 is the bound."""
    reference = train_losses(runs[0][0])
    for stage in (1, 2, 3):
        losses = train_losses(runs[stage][0])
        assert losses == pytest.approx(reference, abs=1e-4), f"ZeRO-{stage}: {losses} vs ZeRO-0 {reference}"


def test_outputs_are_written_once_by_rank_zero(runs):
    run_dir, proc = runs[2]
    records = metrics(run_dir)
    steps = [m["step"] for m in records]
    assert steps == sorted(steps)
    pairs = [(m["step"], k) for m in records for k in m if k != "step"]
    assert len(pairs) == len(set(pairs))  # each metric once per step: one writer, not one per rank
    assert any("sample" in m and m["sample"].startswith("def ") for m in records if m["step"] == 8)
    assert proc.stdout.count("[pretrain] step 8/8") == 1  # one status line, not one per rank
    keys = set().union(*metrics(run_dir))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "val/loss",
            "val/ppl"} <= keys
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert (run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    rows = history(wandb_records(offline[0]))
    last = {k: v for row in rows for k, v in row.items()}
    assert last["train/tokens"] == 8 * 8 * 64 and "val/loss" in last and last["sample/_type"] == "html-file"
    assert not (runs[0][0] / "wandb").exists()  # tracking.wandb=false


def test_checkpoints_are_committed_and_pruned(runs):
    run_dir, _ = runs[3]
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert tags == ["step-00000004", "step-00000008"]  # keep_last 2
    record = json.loads((run_dir / "checkpoints" / "step-00000008" / "lmforge.json").read_text())
    assert record["step"] == 8 and record["samples"] == 64 and record["world_size"] == 2
    assert record["zero_stage"] == 3 and record["tokens"] == 8 * 8 * 64
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= {p.name for p in
                                                                 (run_dir / "checkpoints" / "step-00000008").iterdir()}


@pytest.mark.parametrize("stage", (2, 3))
def test_export_loads_in_transformers_with_the_engines_logits(runs, stage, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = runs[stage]
    final = run_dir / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "lineage.json"} <= {p.name for p in final.iterdir()}
    assert not list(final.glob("*.pt")) and not list(final.glob("*.bin"))
    probe = load_file(str(run_dir / "export_parity.safetensors"))  # input and logits from the DeepSpeed engine
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    assert (logits - probe["logits"]).abs().max() < 1e-4  # fp32; thread count changes summation order only
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer("def f(x):", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6 or out[0, -1] == tokenizer.eos_token_id
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["step"] == 8 and lineage["stage"] == "pretrain" and lineage["data"]["fingerprint"]
    card = (final / "README.md").read_text()
    assert "pretrain" in card and "LlamaForCausalLM" in card

    # `lmforge export` rebuilds the same model from the saved checkpoint, in a process of its own
    proc = launch("lmforge.cli", "export", str(run_dir), str(tmp_path / "exported"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(input_ids=probe["input_ids"]).logits - probe["logits"]).abs().max() < 1e-4
