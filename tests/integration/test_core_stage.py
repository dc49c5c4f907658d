"""The training core through the pretrain stage, as a user runs it: resume refusals, the end of a run (parity
fails the run; rank 0's export keeps no rank waiting), init_from read from the folder, one launch per run
folder, and workers that outlive their launcher."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import ROOT, launch, pretrain_config

pytestmark = pytest.mark.slow


def test_resume_refuses_a_changed_seed_precision_tokenizer_or_split_and_explains_a_longer_schedule(tmp_path, tiny_data):
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 4, "log_every": 2, "eval_every": 4, "save_every": 4})
    first = launch("pretrain", cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    # no deprecation warning from our own calls (is_gradient_checkpointing printed one per rank)
    assert "is_gradient_checkpointing" not in first.stderr and "FutureWarning" not in first.stderr
    config_before = (tmp_path / "run" / "config.yaml").read_text()

    retok = tmp_path / "retok"  # the same text, "re-tokenized": another tokenizer hash, then another split
    shutil.copytree(tiny_data, retok)
    meta = json.loads((retok / "meta.json").read_text())
    meta["tokenizer"]["hash"] = "another-tokenizer"
    (retok / "meta.json").write_text(json.dumps(meta))
    resplit = tmp_path / "resplit"
    shutil.copytree(tiny_data, resplit)
    meta = json.loads((resplit / "meta.json").read_text())
    meta["config"]["split"] = {**meta["config"]["split"], "val_fraction": 0.2}
    (resplit / "meta.json").write_text(json.dumps(meta))
    for overrides, key in ((["train.seed=7", "train.max_steps=6"], "seed: saved 1234, this launch 7"),
                           (["engine.precision=bf16", "train.max_steps=6"], "dtype: saved 'float32'"),
                           ([f"data.path={retok}", "train.max_steps=6"], "tokenizer_hash: saved"),
                           ([f"data.path={resplit}", "train.max_steps=6"], "data_split: saved")):
        proc = launch("pretrain", cfg, *overrides)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before  # a refused rerun changes nothing

    longer = launch("pretrain", cfg, "train.max_steps=6")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "train.max_steps changed from 4 to 6 at step 4: the lr goes from" in longer.stdout
    assert "cosine decay re-shapes" in longer.stdout


def test_an_export_that_does_not_match_the_engine_fails_the_run(tmp_path, tiny_data):
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2})
    proc = launch("pretrain", cfg, env={"LMFORGE_FAULT": "export-drift:2:0"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the export's logits differ from the engine's by" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "final").exists() and (tmp_path / "run" / "final.failed" / "config.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["export_parity_max_abs_diff"] > summary["export_parity_tolerance"] == 1e-4
    again = launch("pretrain", cfg)  # not "already finished": the export is redone, and matches
    assert again.returncode == 0 and "already finished" not in again.stdout, again.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_long_export_on_rank_0_does_not_time_the_other_ranks_out(tmp_path, tiny_data):
    """Rank 0 exports and checks parity alone, after the other ranks have left the process group: an export
    longer than engine.collective_timeout (a 70B model's) must not kill the job."""
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2},
                          engine={"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json"),
                                  "collective_timeout": 12})
    began = time.monotonic()
    proc = launch("pretrain", cfg, nproc=2, env={"LMFORGE_FAULT": "export-slow:2:0", "LMFORGE_FAULT_SECONDS": "25"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert time.monotonic() - began > 25 and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_init_from_takes_the_architecture_from_the_folder(tmp_path, tiny_data):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_positions=48, n_embd=32, n_layer=2, n_head=2, vocab_size=512, eos_token_id=0,
                               bos_token_id=0)).save_pretrained(folder)
    params = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(folder).parameters())
    base = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run", seq_len=32, init_from=str(folder))
    data = __import__("yaml").safe_load(base.read_text())
    del data["model"]  # the folder is the architecture
    cfg = tmp_path / "init.yaml"
    cfg.write_text(__import__("yaml").safe_dump(data))
    dry = launch("pretrain", cfg, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert f"# parameters: {params:,}" in dry.stdout and "gpt2, vocab 512" in dry.stdout
    too_long = launch("pretrain", cfg, "data.seq_len=64", "--dry-run")
    assert too_long.returncode == 2 and "max_position_embeddings" in too_long.stderr, too_long.stderr[-2000:]
    clash = launch("pretrain", base, "--dry-run")  # the tiny llama section beside a gpt2 folder
    assert clash.returncode == 2 and "contradicts init_from" in clash.stderr, clash.stderr[-2000:]
    run = launch("pretrain", cfg, "train.max_steps=2", "train.save_every=2", "train.eval_every=2")
    assert run.returncode == 0, run.stderr[-3000:]
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "GPT2LMHeadModel" in card and f"{params:,}" in card  # the card describes the folder's model


def _popen(cfg: Path, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pretrain", str(cfg), *overrides]
    if nproc > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", "pretrain", str(cfg), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"train/loss"' in line) >= steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"no {steps} logged steps in {timeout} s")


def test_a_second_launch_on_a_busy_run_folder_refuses_and_names_the_holder(tmp_path, tiny_data):
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 100000, "log_every": 1, "eval_every": 100000, "save_every": 100000})
    first = _popen(cfg)
    try:
        _wait_for_steps(tmp_path / "run", 2, first)
        second = launch("pretrain", cfg)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr, second.stderr[-2000:]
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0 and "SIGTERM received: checkpoint saved" in out, err[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    resumed = launch("pretrain", cfg, "train.max_steps=1")  # the lease was released: the folder is free again
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


def test_workers_whose_launcher_died_save_and_stop(tmp_path, tiny_data):
    """torchrun SIGKILLed (a kill -9, an OOM killer): its workers do not go with it. They notice at the next
    step boundary, save, and stop, instead of training on unseen and racing a relaunch."""
    import psutil

    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 100000, "log_every": 1, "eval_every": 100000, "save_every": 100000})
    agent = _popen(cfg, nproc=2)
    try:
        _wait_for_steps(tmp_path / "run", 2, agent)
        workers = psutil.Process(agent.pid).children()
        assert len(workers) == 2
        os.kill(agent.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(workers, timeout=120)  # not our children: no exit status to read
        assert not alive, "orphaned workers trained on"
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)  # the whole session: workers included, if any are left
        except ProcessLookupError:
            pass
    out = agent.stdout.read()
    assert "the launcher is gone: checkpoint saved at step" in out, out[-2000:]
    records = sorted((tmp_path / "run" / "checkpoints").glob("step-*/lmforge.json"))
    assert records and json.loads(records[-1].read_text())["step"] >= 2


def test_data_without_a_usable_val_split_is_refused_before_the_run_opens(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"] = {"tokens": 0, "documents": 0, "shards": []}
    (data / "meta.json").write_text(json.dumps(meta))
    cfg = pretrain_config(tmp_path / "p.yaml", data, tmp_path / "run")
    proc = launch("pretrain", cfg)  # (under torchrun, torchrun adds its own report of a worker's exit 2)
    assert proc.returncode == 2 and "fewer than one window" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "lease").exists()


def test_a_checkpoint_deleted_after_the_resume_chose_it_gives_a_clear_error(tmp_path, tiny_data):
    """Another launch pruned (or a user deleted) the checkpoint between the resume decision and the load:
    every rank says so and exits 2, the lease is released, nothing else is touched."""
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2})
    first = launch("pretrain", cfg, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    proc = launch("pretrain", cfg, "train.max_steps=4", nproc=2, env={"LMFORGE_FAULT": "load-vanish:2:0"})
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "disappeared while it was being loaded" in proc.stderr, proc.stderr[-3000:]
    # torchrun prints its own traceback for a worker's exit 2; none may come from a worker (ours or DeepSpeed's)
    assert not re.search(r'File ".*/(lmforge|pretrain|deepspeed)/', proc.stderr), proc.stderr[-3000:]
    newest = sorted((tmp_path / "run" / "lease").glob("*.json"))[-1]
    assert json.loads(newest.read_text()).get("released") is True  # the next launch need not wait for a TTL
    assert not (tmp_path / "run" / "checkpoints" / "step-4").exists()


def test_a_load_failing_on_one_rank_stops_every_rank_at_once(tmp_path, tiny_data):
    """One node's read of the checkpoint fails (a late or damaged view): the ranks agree before DeepSpeed's
    load, and the run stops with that rank's error (from rank 0) and releases the lease, instead of the
    others waiting out engine.collective_timeout."""
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2})
    assert launch("pretrain", cfg, nproc=2).returncode == 0
    began = time.monotonic()
    proc = launch("pretrain", cfg, "train.max_steps=4", "engine.collective_timeout=600", nproc=2,
                  env={"LMFORGE_FAULT": "load-fail:2:1"})
    assert proc.returncode != 0 and time.monotonic() - began < 300, proc.stderr[-3000:]
    assert "rank 1 cannot read the checkpoint" in proc.stderr and "injected read failure" in proc.stderr, \
        proc.stderr[-3000:]
    assert not re.search(r'File ".*/(lmforge|pretrain|deepspeed)/', proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "step-4").exists()
    newest = sorted((tmp_path / "run" / "lease").glob("*.json"))[-1]
    assert json.loads(newest.read_text()).get("released") is True
