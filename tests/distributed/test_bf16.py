"""bf16 through the real stage on 2 CPU ranks (gloo): it trains, a non-finite step is skipped on every rank,
it saves, a relaunch with more steps resumes, and the export is bf16.

With bf16 on, lmforge asks DeepSpeed for fp32 gradient accumulation and fp32 reductions
(engine.bf16_reductions_in_fp32): under ZeRO-1 that makes DeepSpeed use its BF16_Optimizer instead of the
ZeRO optimizer, a different checkpoint layout, so ZeRO-1 is run here as well as ZeRO-3. bf16 matmuls are
slow on CPUs without native bf16: the tiny model, short sequences, a few steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from ..conftest import ROOT, launch, pretrain_config


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_trains_skips_a_bad_step_saves_resumes_and_exports_bf16(tmp_path, tiny_data, stage):
    cfg = pretrain_config(tmp_path / "pretrain.yaml", tiny_data, tmp_path / "run", seq_len=32,
                          batch={"micro_batch_size": 2, "global_batch_size": 8},  # 2 micro-batches accumulated
                          engine={"deepspeed": str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json"),
                                  "precision": "bf16"},
                          train={"max_steps": 4, "log_every": 1, "eval_every": 100, "save_every": 2},
                          eval={"windows": 4, "prompt": "", "max_new_tokens": 4})
    first = launch("pretrain", cfg, nproc=2, env={"LMFORGE_FAULT": "nan-loss:3:0"})  # rank 0's loss at step 3
    assert first.returncode == 0, f"{first.stdout[-2000:]}\n{first.stderr[-4000:]}"
    assert f"ZeRO-{stage}, bfloat16" in first.stdout
    assert "step 3: non-finite gradient norm" in first.stdout and "update skipped on all ranks" in first.stdout
    run = tmp_path / "run"
    losses = {m["step"]: m["train/loss"] for m in metrics(run) if m.get("train/loss") is not None}
    trained = [losses[s] for s in (1, 2, 4)]
    assert all(math.isfinite(x) for x in trained) and losses[4] < losses[1], losses
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1 and summary["world_size"] == 2

    second = launch("pretrain", cfg, "train.max_steps=6", nproc=2)
    assert second.returncode == 0, f"{second.stdout[-2000:]}\n{second.stderr[-4000:]}"
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    later = {m["step"]: m["train/loss"] for m in metrics(run) if m.get("train/loss") is not None}
    assert {5, 6} <= later.keys() and all(math.isfinite(later[s]) for s in (5, 6))
    assert json.loads((run / "summary.json").read_text())["steps"] == 6

    final = run / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert dtypes == {"BF16"}, dtypes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.bfloat16 and all(p.isfinite().all() for p in model.parameters())
