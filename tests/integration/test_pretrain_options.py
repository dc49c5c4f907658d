"""The engine options a user turns on for memory or speed change how a step is computed, not what it computes:
activation checkpointing and torch.compile give the losses of a plain run, and the run says they are on."""

from __future__ import annotations

import json

import pytest

from ..conftest import launch, pretrain_config

STEPS = 4


def train(tmp_path, tiny_data, name: str, **engine) -> tuple[list[float], str]:
    """Losses per step and stdout of a one-process run of the tiny model with `engine` options added."""
    cfg = pretrain_config(tmp_path / f"{name}.yaml", tiny_data, tmp_path / name, engine=engine,
                          train={"max_steps": STEPS, "log_every": 1, "eval_every": 100, "save_every": 100})
    proc = launch("pretrain", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [m["train/loss"] for m in metrics if "train/loss" in m], proc.stdout


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_data) -> list[float]:
    losses, out = train(tmp_path_factory.mktemp("plain"), tiny_data, "plain")
    assert len(losses) == STEPS
    assert "activation checkpointing" not in out and "torch.compile" not in out
    return losses


def test_activation_checkpointing_recomputes_the_same_step(tmp_path, tiny_data, plain):
    losses, out = train(tmp_path, tiny_data, "ckpt", activation_checkpointing=True)
    assert "ZeRO-2, float32, activation checkpointing;" in out  # read back from the model, not the config
    # the recomputed forward runs the same kernels on the same inputs: bitwise on CPU
    assert losses == plain


@pytest.mark.slow
def test_torch_compile_trains_the_same_model_and_exports_it(tmp_path, tiny_data, plain):
    """Inductor builds C++ kernels on CPU (tens of seconds on 2 cores): a compile that breaks shows here."""
    losses, out = train(tmp_path, tiny_data, "compiled", compile=True)
    assert "ZeRO-2, float32, torch.compile;" in out
    # fused kernels sum in another order: fp32 round-off, not a different model
    assert losses == pytest.approx(plain, abs=1e-4)
    assert "logits match the engine's" in out and (tmp_path / "compiled" / "final" / "model.safetensors").exists()
