"""Which launcher started a process, and the torch.distributed variables it implies (engine.launcher_env):
srun tasks without torchrun are mapped, torchrun's own values win, a batch shell stays one process, and an
mpirun without torchrun is refused. The environments below are the ones Slurm 23+ sets (src/common/env.c:
env_array_for_batch_job for sbatch's shell, env_array_for_step for srun's tasks, setup_env per task)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest

from lmforge.engine import EngineError, cuda_index, expand_hostlist, launcher_env

from ..conftest import ROOT, pretrain_config

JOB = {  # what every process of job 4242 on gpu07 and gpu08 sees (sbatch -N2 --ntasks-per-node=2)
    "SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_JOB_CPUS_PER_NODE": "64(x2)", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CLUSTER_NAME": "lab",
    "SLURM_JOB_PARTITION": "gpu", "SLURM_SUBMIT_DIR": "/home/me", "SLURM_SUBMIT_HOST": "login1",
}


def srun_task(procid: int, localid: int, nodeid: int, tasks: int = 4, per_node: str = "2(x2)",
              nodes: str = "gpu[07-08]", step: int = 0) -> dict:
    """A task of `srun -N2 --ntasks-per-node=2 python -m pretrain` inside that job."""
    return {**JOB, "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step), "SLURM_STEP_NODELIST": nodes,
            "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_TASKS_PER_NODE": per_node,
            "SLURM_NTASKS": str(tasks), "SLURM_NPROCS": str(tasks), "SLURM_TASKS_PER_NODE": per_node,
            "SLURM_STEP_LAUNCHER_PORT": "40123", "SLURM_SRUN_COMM_PORT": "40123", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), "SLURM_TASK_PID": "777",
            "SLURM_CPUS_ON_NODE": "64", "SLURMD_NODENAME": f"gpu0{7 + nodeid}"}


def test_an_srun_task_becomes_its_rank():
    """(a) task 3 of `srun -N2 --ntasks-per-node=2 python -m pretrain`: second task on the second node."""
    assert launcher_env(srun_task(procid=3, localid=1, nodeid=1)) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(15000 + 16 * 242 + 0)}  # the job id picks the port: the same in every task
    task0 = launcher_env(srun_task(procid=0, localid=0, nodeid=0))
    assert task0["MASTER_ADDR"] == "gpu07" and task0["MASTER_PORT"] == str(15000 + 16 * 242)
    # a second step of the same job running at the same time gets another port
    assert launcher_env(srun_task(0, 0, 0, step=1))["MASTER_PORT"] == str(15000 + 16 * 242 + 1)
    # uneven nodes (srun -n 5 on two nodes: 3 + 2): this node's own count
    uneven = launcher_env(srun_task(procid=4, localid=1, nodeid=1, tasks=5, per_node="3,2"))
    assert uneven["WORLD_SIZE"] == "5" and uneven["LOCAL_WORLD_SIZE"] == "2"


def test_a_master_address_or_port_the_user_exported_wins():
    env = {**srun_task(3, 1, 1), "MASTER_ADDR": "gpu07-ib", "MASTER_PORT": "29400"}
    mapped = launcher_env(env)
    assert mapped["MASTER_ADDR"] == "gpu07-ib" and mapped["MASTER_PORT"] == "29400" and mapped["RANK"] == "3"


@pytest.mark.parametrize("shell", ["sbatch", "salloc"])
def test_a_batch_or_salloc_shell_stays_one_process(shell):
    """(b) `python -m pretrain` typed in the job's own shell: Slurm's SLURM_NTASKS there is the allocation's
    (4), not this process's world, and sbatch's shell also has SLURM_PROCID=0."""
    env = {**JOB, "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_TASKS_PER_NODE": "2(x2)"}
    if shell == "sbatch":
        env.update(ENVIRONMENT="BATCH", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_TASK_PID="99",
                   SLURM_CPUS_ON_NODE="64", SLURMD_NODENAME="gpu07")
    assert launcher_env(env) == {}
    # an srun of a single task is one process too: the stage's own group of one (a free local port)
    assert launcher_env(srun_task(0, 0, 0, tasks=1, per_node="1")) == {}


def test_torchrun_inside_an_srun_step_keeps_its_own_values():
    """(c) `srun --ntasks-per-node=1 torchrun --nproc_per_node=8 ...`: the worker sees the step's SLURM_*
    (2 tasks) and torchrun's RANK/WORLD_SIZE (16 ranks); torchrun's win."""
    env = {**srun_task(procid=1, localid=0, nodeid=1, tasks=2, per_node="1(x2)"), "RANK": "9", "WORLD_SIZE": "16",
           "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1", "MASTER_ADDR": "gpu07",
           "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "4242"}
    assert launcher_env(env) == {}


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_mpirun_without_torchrun_is_refused_with_what_to_do(var):
    """(d) `mpirun -np 4 python -m pretrain` (Open MPI, or MPICH/Intel MPI's hydra)."""
    ranks = {"OMPI_COMM_WORLD_SIZE": {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                                      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
             "PMI_SIZE": {"PMI_RANK": "2", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}}[var]
    with pytest.raises(EngineError, match=rf"{var}=4: .* RANK is not set.*torchrun.*srun.*MASTER_PORT"):
        launcher_env({var: "4", **ranks})
    assert launcher_env({var: "1"}) == {}  # mpirun -np 1: one process, nothing to agree on
    assert launcher_env({var: "4", **ranks, "RANK": "2", "WORLD_SIZE": "4"}) == {}  # mpirun starting torchrun


def test_an_srun_task_without_its_rank_is_refused():
    env = srun_task(3, 1, 1)
    del env["SLURM_PROCID"]
    with pytest.raises(EngineError, match="srun step of 4 tasks .* SLURM_PROCID is not set"):
        launcher_env(env)
    with pytest.raises(EngineError, match="inconsistent Slurm variables: SLURM_PROCID=7"):
        launcher_env(srun_task(7, 1, 1))


def test_slurm_host_lists_expand_as_scontrol_show_hostnames_does():
    assert expand_hostlist("gpu[07-08]") == ["gpu07", "gpu08"]
    assert expand_hostlist("node[01-03,10],login2") == ["node01", "node02", "node03", "node10", "login2"]
    assert expand_hostlist("n[8-11]") == ["n8", "n9", "n10", "n11"]  # no padding: none in the bounds
    assert expand_hostlist("rack[1-2]-gpu[1,3]-ib") == ["rack1-gpu1-ib", "rack1-gpu3-ib", "rack2-gpu1-ib",
                                                        "rack2-gpu3-ib"]
    assert expand_hostlist("127.0.0.1") == ["127.0.0.1"]
    for bad in ("node[01-", "node01]", "node[a-b]", "node[5-3]", ""):
        with pytest.raises(EngineError, match="cannot read the Slurm host list"):
            expand_hostlist(bad)


def test_each_rank_gets_its_gpu_or_the_one_the_launcher_gave_it():
    assert cuda_index(3, 8) == 3
    assert cuda_index(3, 1) == 0  # srun --gpus-per-task=1: every task sees its own GPU as device 0
    with pytest.raises(EngineError, match="local rank 5 but only 4 GPUs are visible"):
        cuda_index(5, 4)


# A group of one in a fresh interpreter: the timeout given to setup_distributed reaches every process
# group a ZeRO run uses, DeepSpeed's copy of the world group included (torch would give it 30 min).
TIMEOUTS = """
import json, torch
from torch.distributed.distributed_c10d import _world
from lmforge import engine as eng
from lmforge.config.pretrain import OptimConfig
d = eng.setup_distributed(timeout_s=77)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
eng.initialize(model, eng.ds_config({"zero_optimization": {"stage": 2}}, 1, 1, 1, torch.float32, OptimConfig(),
                                    d.device), 0.1)
print("RESULT " + json.dumps([pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                              for pg in _world.pg_map]))
"""


def test_the_collective_timeout_reaches_deepspeeds_groups():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", TIMEOUTS], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    timeouts = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert len(timeouts) >= 2 and set(timeouts) == {77.0}, timeouts  # the world group and DeepSpeed's copy


def slurm_port_free() -> tuple[int, int]:
    """A job id whose derived MASTER_PORT (step 0) is free here now, and that port."""
    for _ in range(100):
        job = random.randrange(100_000, 999_999)
        port = 15000 + 16 * (job % 1000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job, port
    raise RuntimeError("no free port in 15000-30999")


@pytest.mark.slow
def test_two_plain_processes_of_an_srun_step_form_one_run(tmp_path, tiny_data):
    """Two `python -m pretrain` processes (no torchrun) with the environment srun gives tasks 0 and 1 of a
    one-node step: they must form one 2-rank run (not two 1-rank runs writing the same folder)."""
    cfg = pretrain_config(tmp_path / "pretrain.yaml", tiny_data, tmp_path / "run", seq_len=32,
                          batch={"micro_batch_size": 2, "global_batch_size": 4},
                          train={"max_steps": 2, "log_every": 1, "eval_every": 100, "save_every": 2},
                          eval={"windows": 4, "prompt": "", "max_new_tokens": 4})
    job, port = slurm_port_free()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                     "MASTER_", "TORCHELASTIC"))}
    base.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline",
                HF_HUB_OFFLINE="1", SLURM_JOB_ID=str(job), SLURM_JOBID=str(job), SLURM_JOB_NODELIST="127.0.0.1",
                SLURM_NODELIST="127.0.0.1", SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1", SLURM_STEP_ID="0",
                SLURM_STEPID="0", SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_NUM_NODES="1",
                SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_NTASKS="2", SLURM_NPROCS="2",
                SLURM_TASKS_PER_NODE="2", SLURM_NODEID="0")
    procs = [subprocess.Popen([sys.executable, "-m", "pretrain", str(cfg)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)})
             for task in (0, 1)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    stdout = outputs[0][0] + outputs[1][0]
    assert stdout.count(" 2 rank(s) on cpu") == 1 and " 1 rank(s)" not in stdout  # one run, rank 0 speaks
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
