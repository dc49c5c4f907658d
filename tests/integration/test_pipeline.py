"""`lmforge run` on this machine: the whole chain on tiny configs, a rerun that skips everything, a changed stage that
reruns with what is downstream of it, and a failing stage that stops the chain with its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lmforge.data.sources import stdlib_files

from ..harness import ROOT, distill_config, finetune_config, pretrain_config, write_yaml


def lmforge(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def chain(tmp: Path, tiny_tokenizer: Path, tasks: dict, finetune_overrides: list[str] = ()) -> Path:
    steps = {"max_steps": 4, "log_every": 1, "eval_every": 4, "save_every": 4}
    tok = write_yaml(tmp / "tokenize.yaml", {
        "out_dir": str(tmp / "data"), "sources": [{"type": "files", "paths": [str(p) for p in stdlib_files()[:30]],
                                                    "format": "txt"}],
        "tokenizer": {"pretrained": str(tiny_tokenizer)}, "split": {"val_fraction": 0.1}, "workers": 1,
        "progress": False, "shard_bytes": 1 << 20})
    pre = pretrain_config(tmp / "pretrain.yaml", Path("set-by-the-pipeline"), tmp / "pretrain", train=steps)
    ft = finetune_config(tmp / "finetune.yaml", Path("set-by-the-pipeline"), tmp / "finetune", "classification",
                         tasks, train=steps)
    dist = distill_config(tmp / "distill.yaml", Path("set-by-the-pipeline"), tmp / "distill", files=tasks,
                          train=steps)
    return write_yaml(tmp / "pipeline.yaml", {"name": "tiny", "work_dir": str(tmp / "work"),
                                              "resources": {"procs_per_node": 2}, "stages": [
        {"name": "tokenize", "stage": "tokenize", "config": str(tok)},
        {"name": "pretrain", "stage": "pretrain", "config": str(pre), "overrides": ["data.path=${tokenize.out_dir}"]},
        {"name": "finetune", "stage": "finetune", "config": str(ft),
         "overrides": ["init_from=${pretrain.final}", *finetune_overrides]},
        {"name": "finetune-scratch", "stage": "finetune", "config": str(ft),
         "overrides": ["init_from=${pretrain.final}", "init=random", f"run_dir={tmp / 'finetune-scratch'}"],
         "resources": {"procs_per_node": 1}},
        {"name": "distill", "stage": "distill", "config": str(dist), "overrides": ["teacher=${finetune.final}"]},
        {"name": "export", "stage": "export", "source": "${distill.run_dir}", "out": str(tmp / "export")},
    ]})


def test_the_chain_runs_then_skips_then_reruns_what_changed(tmp_path, tiny_tokenizer, tasks_data):
    path = chain(tmp_path, tiny_tokenizer, tasks_data)
    first = lmforge("run", str(path))
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert "[pipeline] all 6 stages done" in first.stdout
    table = first.stdout.split("all 6 stages done")[1]
    for row in ("tokenize", "pretrain", "finetune", "finetune-scratch", "distill", "export"):
        assert f"\n{row} " in table
    assert "val ppl" in table and "test accuracy" in table and "speed-up" in table and "retention" in table
    assert str(tmp_path / "export") in table
    export = json.loads((tmp_path / "export" / "lineage.json").read_text())
    assert export["step"] == 4 and export["stage"] == "distill"
    scratch = (tmp_path / "work" / "logs" / "finetune-scratch.log").read_text()
    assert "(architecture only: random init)" in scratch and "1 rank(s)" in scratch
    assert "2 rank(s)" in (tmp_path / "work" / "logs" / "pretrain.log").read_text()
    assert json.loads((tmp_path / "pretrain" / "final" / "lineage.json").read_text())["config_digest"]

    t0 = time.time()
    again = lmforge("run", str(path))
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 6, again.stdout
    assert time.time() - t0 < 60  # nothing launched

    changed = chain(tmp_path, tiny_tokenizer, tasks_data, ["optim.lr=1.0e-3"])
    plan = lmforge("run", str(changed), "--dry-run").stdout.splitlines()
    verbs = {line.split()[0]: line.split()[1] for line in plan if not line.startswith("#")}
    assert verbs == {"tokenize": "skip", "pretrain": "skip", "finetune": "rerun", "finetune-scratch": "skip",
                     "distill": "rerun", "export": "rerun"}, plan
    assert any("optim.lr 0.003 -> 0.001" in line for line in plan)
    rerun = lmforge("run", str(changed))
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert rerun.stdout.count("done, skipped") == 3
    old = [p for p in tmp_path.iterdir() if p.name.startswith("finetune.old-")]
    assert len(old) == 1 and (old[0] / "final" / "model.safetensors").exists()  # moved aside, not deleted
    status = lmforge("status", str(changed)).stdout.splitlines()
    assert [line.split()[1] for line in status] == ["done"] * 6


def test_a_failing_stage_stops_the_chain_with_its_log_and_status(tmp_path, tiny_tokenizer, tasks_data):
    data = yaml.safe_load(chain(tmp_path, tiny_tokenizer, tasks_data).read_text())
    data["stages"] = data["stages"][1:3]  # pretrain on data that is not there, then the fine-tuning that needs it
    data["stages"][0]["overrides"] = [f"data.path={tmp_path / 'no-such-data'}"]
    broken = write_yaml(tmp_path / "broken.yaml", data)
    proc = lmforge("run", str(broken))
    log = tmp_path / "work" / "logs" / "pretrain.log"
    assert proc.returncode == 1, proc.stdout[-3000:]  # torchrun's status when a worker fails (the worker's: 2)
    assert f"[pipeline] pretrain failed with exit status 1; log: {log}" in proc.stdout
    assert "[pipeline] stopped: finetune not run" in proc.stdout
    assert "no-such-data" in log.read_text() and not (tmp_path / "finetune").exists()
    status = lmforge("status", str(broken)).stdout.splitlines()
    assert status[0].split()[:2] == ["pretrain", "failed"] and f"log: {log}" in status[0]
    assert status[1].split()[:3] == ["finetune", "not", "run"]
