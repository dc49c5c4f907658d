"""Fine-tuning on 2 ranks (gloo, CPU): the SFT loss is normalised by the step's response tokens over every
micro-batch and rank (1 rank x 2 micro-batches = 2 ranks x 1), resume is bitwise exact under ZeRO-2 and
ZeRO-3, and a signal to one worker saves on every rank and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.harness import ROOT, finetune_config, free_port, launch

pytestmark = pytest.mark.slow


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_sft_loss_is_normalised_by_the_steps_response_tokens_on_any_rank_count(tmp_path, tiny_lm, tasks_data):
    """Examples of different lengths, the same 8 per step split three ways: 1 rank x 1 micro-batch of 8,
    1 rank x 2 of 4, 2 ranks x 2 of 2. A mean per micro-batch would weight a token by its micro-batch's size;
    the sum over the step's response tokens gives every split the same update."""
    runs = {}
    for nproc, micro in ((1, 8), (1, 4), (2, 2)):
        run = tmp_path / f"run{nproc}x{micro}"
        cfg = finetune_config(tmp_path / f"s{nproc}x{micro}.yaml", tiny_lm, run, "sft", tasks_data,
                              batch={"micro_batch_size": micro, "global_batch_size": 8},
                              train={"max_steps": 4, "eval_every": 4, "save_every": 4},
                              task={"exact_match_examples": 0})
        proc = launch("finetune", cfg, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[nproc, micro] = run
    whole = losses(runs[1, 8])
    assert whole.keys() == {1, 2, 3, 4}
    for split in ((1, 4), (2, 2)):
        other = losses(runs[split])
        for step in whole:
            assert other[step] == pytest.approx(whole[step], abs=2e-6), (split, step, whole, other)
        a, b = weights(runs[1, 8]), weights(runs[split])
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-6, msg=f"{split}: {name}")


@pytest.mark.parametrize("kind, zero, lora", [("sft", "zero2", False), ("classification", "zero3", False),
                                              ("sft", "zero3", True)], ids=["sft-zero2", "classification-zero3",
                                                                            "sft-lora-zero3"])
def test_a_run_killed_after_a_save_resumes_to_the_same_weights_bit_for_bit(tmp_path, tiny_lm, tasks_data, kind, zero,
                                                                           lora):
    """Resume restores the weights (LoRA: the adapter over the frozen, partitioned base), the optimizer state,
    the RNG and the position in the examples: the result is the uninterrupted run's, bit for bit."""
    ds = {"deepspeed": str(ROOT / "configs" / "deepspeed" / f"{zero}.json")}
    common = {"train": {"max_steps": 6, "eval_every": 3, "save_every": 3}, "engine": ds}
    if lora:
        common["lora"] = {"r": 4, "dropout": 0.1}  # dropout: the RNG streams must be restored too
    straight = finetune_config(tmp_path / "a.yaml", tiny_lm, tmp_path / "straight", kind, tasks_data, **common)
    assert launch("finetune", straight, nproc=2).returncode == 0
    broken = finetune_config(tmp_path / "b.yaml", tiny_lm, tmp_path / "broken", kind, tasks_data, **common)
    killed = launch("finetune", broken, nproc=2, env={"LMFORGE_FAULT": "save-committed:3:0"})  # rank 0 dies
    assert killed.returncode != 0 and not (tmp_path / "broken" / "final").exists()
    resumed = launch("finetune", broken, nproc=2)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "at step 3" in resumed.stdout, \
        resumed.stderr[-3000:]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    assert losses(tmp_path / "straight") == losses(tmp_path / "broken")  # steps 4-6 logged once, identically


def test_a_signal_to_one_worker_saves_on_every_rank_and_exits_0(tmp_path, tiny_lm, tasks_data):
    cfg = finetune_config(tmp_path / "c.yaml", tiny_lm, tmp_path / "run", "classification", tasks_data,
                          train={"max_steps": 100000, "eval_every": 100000, "save_every": 100000})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "-m", "finetune", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import psutil

    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not metrics.exists() or metrics.read_text().count("train/loss") < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached step 2"
        time.sleep(0.05)
    workers = [c for c in psutil.Process(proc.pid).children() if "finetune" in " ".join(c.cmdline())]
    os.kill(workers[-1].pid, signal.SIGUSR1)  # to one worker, as Slurm's forwarding does
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGUSR1 received: checkpoint saved at step" in out
    stopped = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    record = json.loads((tmp_path / "run" / "checkpoints" / f"step-{stopped:08d}" / "lmforge.json").read_text())
    assert record["step"] == stopped and record["samples"] == stopped * 8  # the position: examples consumed
    resumed = launch("finetune", cfg, f"train.max_steps={stopped + 1}", nproc=2)
    assert resumed.returncode == 0 and f"at step {stopped}" in resumed.stdout, resumed.stderr[-3000:]
