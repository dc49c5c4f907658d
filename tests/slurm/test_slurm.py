"""Pipelines on a real Slurm controller with two nodes (tests/slurm/cluster.py): `lmforge submit` chains the stages
with afterok, a 2-node pretraining job trains across both nodes, a preempted job saves, requeues and resumes to
the weights of an uninterrupted run, and a failing stage cancels what waits for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from lmforge.data.sources import stdlib_files

from ..harness import ROOT, finetune_config, launch, pretrain_config, write_yaml

SECRET = "hf_" + "lmforge" * 4  # a token-shaped value made here, so no token-like literal sits in the source
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def lmforge(slurm, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`lmforge ...` as a user runs it on a login node: the jobs inherit this environment (sbatch --export=ALL)."""
    full = {**slurm.env, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HF_TOKEN": SECRET, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=full,
                          cwd=ROOT, timeout=120)


def pipeline(tmp: Path, stages: list[dict]) -> Path:
    return write_yaml(tmp / "pipeline.yaml", {"name": "t", "work_dir": str(tmp / "work"), "stages": stages})


def jobs(tmp: Path) -> dict[str, str]:
    return {name: e["job_id"] for name, e in json.loads((tmp / "work" / "pipeline.json").read_text()).items()}


def ended(fields: dict) -> bool:
    return fields.get("JobState") in ENDED


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def train_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in m]


def test_a_pipeline_runs_as_slurm_jobs_chained_by_afterok(slurm, tmp_path, tiny_tokenizer, tasks_data):
    """tokenize -> pretrain on 2 nodes (one torchrun each, c10d) -> fine-tune on 2 nodes (one srun task per rank)
    -> export: each job starts after its upstream job completed; a second submit finds everything done."""
    files = [str(p) for p in stdlib_files()[:40]]
    tok = write_yaml(tmp_path / "tokenize.yaml", {
        "out_dir": str(tmp_path / "data"), "sources": [{"type": "files", "paths": files, "format": "txt"}],
        "tokenizer": {"pretrained": str(tiny_tokenizer)}, "split": {"val_fraction": 0.1}, "workers": 1,
        "progress": False, "shard_bytes": 1 << 20})
    pre = pretrain_config(tmp_path / "pretrain.yaml", Path("set-by-the-pipeline"), tmp_path / "pretrain",
                          train={"max_steps": 4, "log_every": 1, "eval_every": 4, "save_every": 4})
    ft = finetune_config(tmp_path / "finetune.yaml", Path("set-by-the-pipeline"), tmp_path / "finetune",
                         "classification", tasks_data, train={"max_steps": 4, "log_every": 1, "eval_every": 4,
                                                              "save_every": 4})
    two_nodes = {"nodes": 2, "procs_per_node": 1}
    path = pipeline(tmp_path, [
        {"name": "tokenize", "stage": "tokenize", "config": str(tok)},
        {"name": "pretrain", "stage": "pretrain", "config": str(pre), "overrides": ["data.path=${tokenize.out_dir}"],
         "resources": two_nodes},
        {"name": "finetune", "stage": "finetune", "config": str(ft), "overrides": ["init_from=${pretrain.final}"],
         "resources": {**two_nodes, "launch": "srun"}},
        {"name": "export", "stage": "export", "source": "${finetune.run_dir}", "out": str(tmp_path / "export")},
    ])
    sub = lmforge(slurm, "submit", str(path))
    assert sub.returncode == 0, sub.stderr
    ids = jobs(tmp_path)
    assert set(ids) == {"tokenize", "pretrain", "finetune", "export"}
    slurm.wait(ids["export"], ended, timeout=900)
    fields = {name: slurm.job(job) for name, job in ids.items()}
    logs = {name: Path(f["StdOut"]) for name, f in fields.items()}
    for name, f in fields.items():
        assert (f["JobState"], f["ExitCode"]) == ("COMPLETED", "0:0"), (name, logs[name].read_text()[-3000:])
    for up, down in [("tokenize", "pretrain"), ("pretrain", "finetune"), ("finetune", "export")]:
        assert fields[down]["StartTime"] >= fields[up]["EndTime"], (up, down)
    records = [tmp_path / "data" / "meta.json", tmp_path / "pretrain" / "final" / "lineage.json",
               tmp_path / "finetune" / "final" / "lineage.json", tmp_path / "export" / "lineage.json"]
    times = [r.stat().st_mtime for r in records]
    assert times == sorted(times)

    assert fields["pretrain"]["NodeList"] == "n[1-2]" and fields["finetune"]["NodeList"] == "n[1-2]"
    assert "2 rank(s)" in logs["pretrain"].read_text() and "2 rank(s)" in logs["finetune"].read_text()
    card = (tmp_path / "finetune" / "final" / "README.md").read_text()
    assert "srun --ntasks=2 python -m finetune" in card  # the one-task-per-rank form, ranks from SLURM_*
    assert "torchrun --nnodes=2 --nproc_per_node=1 -m pretrain" in (tmp_path / "pretrain" / "final" / "README.md").read_text()

    status = lmforge(slurm, "status", str(path))
    assert [line.split()[1] for line in status.stdout.splitlines()] == ["done"] * 4, status.stdout
    again = lmforge(slurm, "submit", str(path))
    assert again.returncode == 0 and again.stdout.count("done, no job") == 4, again.stdout
    assert jobs(tmp_path) == ids
    for text in [*(p.read_text() for p in logs.values()), (tmp_path / "work" / "pipeline.json").read_text()]:
        assert SECRET not in text


def test_a_requeued_job_released_at_once_restarts(slurm, tmp_path):
    """The requeue tests release a requeued job instead of waiting Slurm's 121 s hold. A release that lands in the
    same second as the requeue makes the node refuse the relaunch (the old credential is revoked with a one-second
    timestamp) and the job ends FAILED 1:0 (CI failed so once): the requeue here comes right after a second begins,
    where a plain StartTime=now relaunches within that second about every other time."""
    out = tmp_path / "job.out"
    job = slurm.run("sbatch", "--parsable", "--requeue", "--open-mode=append", f"--output={out}",
                    "--wrap", "echo restart=${SLURM_RESTART_COUNT:-0}; sleep 300").stdout.strip()
    for restarted in ("restart=0", "restart=1"):
        fields = slurm.wait(job, lambda f, line=restarted: ended(f) or f["JobState"] == "RUNNING" and out.exists()
                            and line in out.read_text(), timeout=60, poll=0.05)
        assert fields["JobState"] == "RUNNING", (fields["JobState"], fields["ExitCode"], fields["Restarts"])
        time.sleep(1.02 - time.time() % 1)
        slurm.run("scontrol", "requeue", job)
        slurm.wait(job, lambda f: f["JobState"] == "PENDING" and f["Reason"] == "BeginTime", timeout=30, poll=0.02)
        slurm.release(job)
    fields = slurm.wait(job, lambda f: ended(f) or "restart=2" in out.read_text(), timeout=60, poll=0.2)
    assert (fields["JobState"], fields["Restarts"]) == ("RUNNING", "2"), out.read_text()


def test_a_preempted_job_saves_requeues_and_resumes_to_the_uninterrupted_weights(slurm, tmp_path, tiny_data):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@LEAD does before a time limit) lands in a save: the
    workers finish it and exit, the job requeues itself (same id: the export waiting on it with afterok keeps
    waiting), and once released it resumes into the same W&B run and ends with an uninterrupted run's weights."""
    train = {"max_steps": 8, "log_every": 1, "eval_every": 100, "save_every": 2}
    cfg = pretrain_config(tmp_path / "pretrain.yaml", tiny_data, tmp_path / "run", train=train,
                          tracking={"wandb": True, "plots": False})
    path = pipeline(tmp_path, [
        {"name": "pretrain", "stage": "pretrain", "config": str(cfg), "resources": {"nodes": 2, "procs_per_node": 1}},
        {"name": "export", "stage": "export", "source": "${pretrain.run_dir}", "out": str(tmp_path / "export")},
    ])
    sub = lmforge(slurm, "submit", str(path), env={"LMFORGE_FAULT": "save-slow:2:0", "LMFORGE_FAULT_SECONDS": "8"})
    assert sub.returncode == 0, sub.stderr
    ids = jobs(tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    slurm.wait(ids["pretrain"], lambda f: ended(f) or metrics.exists() and metrics.read_text().count("train/loss") >= 2,
               timeout=300, poll=0.2)
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text()
    slurm.run("scancel", "--signal=USR1", "--batch", ids["pretrain"])  # lands in rank 0's 8 s save of step 2

    held = slurm.wait(ids["pretrain"], lambda f: int(f.get("Restarts", 0)) >= 1 and f["JobState"] == "PENDING",
                      timeout=180)
    log = Path(held["StdOut"])
    assert "USR1 received" in log.read_text() and "checkpoint saved at step 2" in log.read_text()
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "lmforge.json").exists()
    assert not (tmp_path / "run" / "final").exists()
    waiting = slurm.job(ids["export"])
    assert waiting["JobState"] == "PENDING" and waiting["Reason"] == "Dependency"
    status = lmforge(slurm, "status", str(path)).stdout
    assert status.splitlines()[0].split()[1] == "waiting" and "requeued" in status

    slurm.release(ids["pretrain"])
    slurm.wait(ids["export"], ended, timeout=600)
    pre, export = slurm.job(ids["pretrain"]), slurm.job(ids["export"])
    assert (pre["JobState"], pre["ExitCode"], pre["Restarts"]) == ("COMPLETED", "0:0", "1"), log.read_text()[-3000:]
    assert export["JobState"] == "COMPLETED" and export["StartTime"] >= pre["EndTime"]
    assert "checkpoints/step-00000002 at step 2" in log.read_text().split("requeueing job")[1]  # the resumed launch
    assert (tmp_path / "run" / "wandb_id.txt").read_text() == run_id
    assert train_steps(tmp_path / "run") == list(range(1, 9))  # each step logged once across the two jobs

    reference = pretrain_config(tmp_path / "reference.yaml", tiny_data, tmp_path / "reference", train=train)
    proc = launch("pretrain", reference, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine, ref = weights(tmp_path / "run"), weights(tmp_path / "reference")
    assert mine.keys() == ref.keys() and all(mine[k].equal(ref[k]) for k in ref)


def test_a_failing_stage_cancels_its_dependents_and_status_names_its_log(slurm, tmp_path, tiny_data):
    cfg = pretrain_config(tmp_path / "pretrain.yaml", tmp_path / "no-such-data", tmp_path / "run")
    path = pipeline(tmp_path, [
        {"name": "pretrain", "stage": "pretrain", "config": str(cfg)},
        {"name": "export", "stage": "export", "source": "${pretrain.run_dir}", "out": str(tmp_path / "export")},
    ])
    assert lmforge(slurm, "submit", str(path)).returncode == 0
    ids = jobs(tmp_path)
    failed = slurm.wait(ids["pretrain"], ended, timeout=300)
    cancelled = slurm.wait(ids["export"], ended, timeout=120)
    assert failed["JobState"] == "FAILED" and failed["ExitCode"] != "0:0"
    assert cancelled["JobState"] == "CANCELLED"  # --kill-on-invalid-dep: not left pending forever
    log = Path(failed["StdOut"])
    assert "no-such-data" in log.read_text()
    lines = lmforge(slurm, "status", str(path)).stdout.splitlines()
    assert lines[0].split()[1] == "failed" and f"log: {log}" in lines[0] and f"job {ids['pretrain']} FAILED" in lines[0]
    assert lines[1].split()[1] == "cancelled" and "DependencyNeverSatisfied" in lines[1]


def test_the_sbatch_template_runs_by_hand(slurm, tmp_path, tiny_data):
    """`sbatch slurm/train.sbatch pretrain CONFIG key=value`, no pipeline: one node, torchrun, 2 ranks."""
    cfg = pretrain_config(tmp_path / "pretrain.yaml", tiny_data, tmp_path / "run")
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LMFORGE_PROCS_PER_NODE": "2"}
    proc = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch", "pretrain",
                           str(cfg), "train.max_steps=2", "train.save_every=2"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    fields = slurm.wait(job, ended, timeout=300)
    out = Path(fields["StdOut"])
    assert out.name == f"lmforge-train-{job}.out"
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), out.read_text()[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert "2 rank(s)" in out.read_text()


def test_an_array_tokenization_equals_the_one_node_output(slurm, tmp_path):
    """`resources.array: 3`: the tokenizer job, a 3-task array (task i encodes chunks i, i+3, ...), then the job
    that writes meta.json: byte for byte what one `lmforge tokenize` writes. With val_docs and exact dedup the
    tokenizer job's survey (the cut, the duplicates) is what every task reads, not the whole corpus each."""
    from pretrain import tokenize

    files = [str(p) for p in stdlib_files()[:60]]
    cfg = write_yaml(tmp_path / "tokenize.yaml", {
        "out_dir": str(tmp_path / "array"), "sources": [{"type": "files", "paths": files, "format": "txt"}],
        "tokenizer": {"train": {"vocab_size": 600}}, "split": {"val_docs": 6}, "dedup": "exact", "workers": 1,
        "progress": False, "shard_bytes": 1 << 16})
    path = pipeline(tmp_path, [{"name": "tokenize", "stage": "tokenize", "config": str(cfg),
                                "resources": {"array": 3}}])
    sub = lmforge(slurm, "submit", str(path))
    assert sub.returncode == 0, sub.stderr
    record = json.loads((tmp_path / "work" / "pipeline.json").read_text())["tokenize"]
    first, array, last = record["jobs"]
    fields = slurm.wait(last, ended, timeout=600)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), Path(fields["StdOut"]).read_text()[-3000:]
    tasks = [slurm.job(f"{array}_{i}") for i in range(3)]
    assert all(t["JobState"] == "COMPLETED" for t in tasks)
    assert slurm.job(first)["EndTime"] <= min(t["StartTime"] for t in tasks)
    assert max(t["EndTime"] for t in tasks) <= fields["StartTime"]
    logs = [Path(t["StdOut"]).read_text() for t in tasks]
    assert all(f"part {i}/3: " in log and "survey: the val cut and the duplicates from" in log
               for i, log in enumerate(logs))
    chunks = len([p for p in (tmp_path / "array" / "chunks").glob("[0-9]*.json") if p.stem.isdigit()])  # units
    assert chunks >= 3 and f"({chunks} resumed)" in Path(fields["StdOut"]).read_text()  # the array encoded them all
    assert tokenize.main([str(cfg), f"out_dir={tmp_path / 'one'}"]) == 0
    produced = {p.relative_to(tmp_path / "array"): p.read_bytes() for p in sorted((tmp_path / "array").rglob("*"))
                if p.is_file() and p.suffix in (".bin", ".idx") or p.name in ("meta.json", "tokenizer.json")}
    expected = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in sorted((tmp_path / "one").rglob("*"))
                if p.is_file() and p.suffix in (".bin", ".idx") or p.name in ("meta.json", "tokenizer.json")}
    assert len(produced) > 4 and produced == expected


def test_a_time_limit_saves_and_requeues_and_without_requeue_never_satisfies_afterok(slurm, tmp_path, tiny_data):
    """A 2-minute job told to save 45 s before its limit (--signal=B:USR1@45; slurmctld checks every 30 s, so it
    comes 45-75 s in, after start-up) whose 60 steps with a 1.5 s save each cannot finish by then: it saves, requeues, and, released
    with a longer limit, resumes and finishes with the uninterrupted run's weights. The same stop in a job submitted
    with --no-requeue ends FAILED (exit 75), not COMPLETED: the export waiting on it is cancelled rather than run on
    a half-trained model."""
    train = {"max_steps": 60, "log_every": 1, "eval_every": 100, "save_every": 1, "keep_last": 1}
    stages = lambda cfg, resources: [  # noqa: E731
        {"name": "pretrain", "stage": "pretrain", "config": str(cfg), "resources": {"procs_per_node": 2, **resources}},
        {"name": "export", "stage": "export", "source": "${pretrain.run_dir}", "out": str(cfg.parent / "export")}]

    limited, once = tmp_path / "limited", tmp_path / "once"
    cfg = pretrain_config(limited / "pretrain.yaml", tiny_data, limited / "run", train=train)
    sub = lmforge(slurm, "submit", str(pipeline(limited, stages(cfg, {"time": "2", "signal_lead": 45}))),
                  env={"LMFORGE_FAULT": "save-slow:1+:0", "LMFORGE_FAULT_SECONDS": "1.5"})
    assert sub.returncode == 0, sub.stderr
    ids = jobs(limited)

    # meanwhile, on the other node: the same stop where requeueing is not allowed
    cfg = pretrain_config(once / "pretrain.yaml", tiny_data, once / "run", train={**train, "save_every": 2})
    sub = lmforge(slurm, "submit", str(pipeline(once, stages(cfg, {"sbatch": ["--no-requeue"]}))),
                  env={"LMFORGE_FAULT": "save-slow:2:0", "LMFORGE_FAULT_SECONDS": "8"})
    assert sub.returncode == 0, sub.stderr
    no_requeue = jobs(once)
    metrics = once / "run" / "metrics.jsonl"
    slurm.wait(no_requeue["pretrain"], lambda f: ended(f) or metrics.exists() and metrics.read_text().count(
        "train/loss") >= 2, timeout=300, poll=0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", no_requeue["pretrain"])
    pre = slurm.wait(no_requeue["pretrain"], ended, timeout=180)
    assert (pre["JobState"], pre["ExitCode"]) == ("FAILED", "75:0"), Path(pre["StdOut"]).read_text()[-3000:]
    assert "requeue refused" in Path(pre["StdOut"]).read_text()
    assert slurm.wait(no_requeue["export"], ended, timeout=60)["JobState"] == "CANCELLED"
    assert not (once / "export").exists()

    deadline = time.time() + 400
    while not ended(export := slurm.job(ids["export"])):
        pre = slurm.job(ids["pretrain"])  # (a requeue passes through CANCELLED: the export's end decides)
        assert time.time() < deadline, Path(pre["StdOut"]).read_text()[-3000:]
        if slurm.held(pre):  # requeued: released, with time to finish
            slurm.release(ids["pretrain"], "TimeLimit=10")
        time.sleep(1)
    pre = slurm.job(ids["pretrain"])
    log = Path(pre["StdOut"]).read_text()
    assert (pre["JobState"], pre["ExitCode"], pre["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert export["JobState"] == "COMPLETED" and "USR1 received" in log and "checkpoint saved at step" in log
    reference = pretrain_config(tmp_path / "reference.yaml", tiny_data, tmp_path / "reference",
                                train={**train, "save_every": 60})  # the saves change nothing but the time
    assert launch("pretrain", reference, nproc=2).returncode == 0
    mine, ref = weights(limited / "run"), weights(tmp_path / "reference")
    assert all(mine[k].equal(ref[k]) for k in ref)
