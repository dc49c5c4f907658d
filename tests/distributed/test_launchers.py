"""Launches as clusters do them (2 CPU ranks, gloo, DS_ACCELERATOR=cpu).

- A signal that reaches torchrun itself: Slurm signals every process of a step (torchrun included) at a
  time limit or on preemption, and a batch shell that got `--signal=B:USR1@T` forwards it to torchrun.
  torch 2.13's torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers (`--signals-to-handle`,
  SIGUSR1 only when listed), SIGKILLs those still alive after `--shutdown-timeout` seconds (default 30,
  or TORCH_ELASTIC_SHUTDOWN_TIMEOUT), and then exits 1 by re-raising the signal as a SignalException,
  whatever its workers did.
- Two torchrun agents as two nodes (c10d rendezvous on 127.0.0.1, one process each, so every worker has
  LOCAL_RANK 0): rank-0 work must follow the global rank.
- DeepSpeed's own launcher, and the offload JSONs, which no other test launches.

The corpus encodes each window's index in its first two tokens (see tests/harness.py), so the windows
a run trained on across several launches can be read back from LMFORGE_TRACE_DIR.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lmforge.checkpoint import latest

from ..harness import ROOT, WINDOWS, launch, position_corpus, pretrain_config, traced, trained_windows

# The launch this file recommends (README, "Resuming and preemption"): torchrun's default set plus
# SIGUSR1, and a grace longer than one step + one save (seconds; torchrun SIGKILLs its workers after it).
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
GRACE_S = 120
RECOMMENDED = [f"--signals-to-handle={SIGNALS_TO_HANDLE}", f"--shutdown-timeout={GRACE_S}"]
# Long enough that a run is still training when the signal lands (~30 ms a step here: > 3 s of margin),
# short enough that the launch which finishes the run takes a few seconds.
STEPS, GLOBAL = 120, 8
DEEPSPEED = ROOT / "configs" / "deepspeed"


@pytest.fixture(scope="module")
def position_data(tmp_path_factory, tiny_tokenizer):
    return position_corpus(tmp_path_factory.mktemp("positions") / "data", tiny_tokenizer)


def config(tmp_path, data, name="run", zero="zero2.json", **train):
    return pretrain_config(tmp_path / f"{name}.yaml", data, tmp_path / name, seq_len=16,
                           batch={"micro_batch_size": 2, "global_batch_size": GLOBAL},
                           engine={"deepspeed": str(DEEPSPEED / zero)},
                           train={"max_steps": STEPS, "log_every": 1, "eval_every": 10_000, "save_every": 50,
                                  "keep_last": 2, **train},
                           eval={"windows": 4, "prompt": "", "max_new_tokens": 4})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_env(extra: dict | None = None) -> dict:
    """What tests/harness.launch gives a stage: the repo on the path, CPU DeepSpeed, offline."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(extra or {})}


@dataclass
class Launch:
    """A launcher started in the background; its output goes to files (a pipe nobody reads while it
    trains would fill up and block rank 0)."""
    proc: subprocess.Popen
    out_path: Path
    err_path: Path

    @classmethod
    def start(cls, cmd: list[str], log_prefix: Path, env: dict | None = None) -> Launch:
        out, err = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=stage_env(env), stdout=o, stderr=e, text=True)
        return cls(proc, out, err)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.proc.args} still running after {timeout} s:\n{self.err[-3000:]}") from None

    def workers(self) -> list[psutil.Process]:
        """The stage processes under this launcher (not the launcher's other helpers)."""
        found = []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:  # the launcher is gone
            return []
        for child in children:
            try:
                if "pretrain" in child.cmdline():
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def kill(self) -> None:
        for p in self.workers():
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def started():
    """The launches a test starts; any still running when it ends (a failed assertion) are killed."""
    launches: list[Launch] = []
    yield launches
    for one in launches:
        if one.proc.poll() is None:
            one.kill()


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def last_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (-1 before the first line; a half-written last line is skipped)."""
    steps = [-1]
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return max(steps)


def wait_for_step(run_dir: Path, step: int, launches: list[Launch], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run_dir) < step:
        for one in launches:
            assert one.proc.poll() is None, f"exited {one.proc.returncode} before step {step}:\n{one.err[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.05)


def deliver(signum: signal.Signals, launches: list[Launch], to: str) -> None:
    """`to="torchrun"`: the launcher process only (a batch shell forwarding B:USR1, or `kill PID`);
    `to="every process"`: each launcher and each of its workers, as Slurm signals a job step."""
    for one in launches:
        targets = [one.proc.pid] + ([w.pid for w in one.workers()] if to == "every process" else [])
        for pid in targets:
            os.kill(pid, signum)


def assert_saved_on_signal(launches: list[Launch], signum: signal.Signals, run_dir: Path, after: int) -> int:
    """Every launcher exits 1 (torchrun re-raises the signal once its workers are gone), no worker was
    SIGKILLed or failed, rank 0 said it saved, and that step is the newest committed checkpoint.
    Returns that step."""
    for one in launches:
        code = one.wait(GRACE_S + 60)
        err = one.err
        assert code == 1, f"torchrun exited {code}:\n{err[-3000:]}"
        assert f"SignalException: Process {one.proc.pid} got signal: {int(signum)}" in err, err[-3000:]
        assert "forcefully exiting" not in err  # every worker left within --shutdown-timeout
        assert not re.search(r"\[rank\d+\]: Traceback", err), err[-3000:]
    said = [m for one in launches for m in re.findall(
        rf"\[pretrain\] {signum.name} received: checkpoint saved at step (\d+); rerun", one.out)]
    assert len(said) == 1, [one.out[-2000:] for one in launches]  # rank 0 only, on whichever node holds it
    step = int(said[0])
    assert after < step < STEPS
    committed = latest(run_dir / "checkpoints")
    assert committed.step == step and (committed.path / "lmforge.json").is_file()
    assert committed.record["world_size"] == 2
    assert not (run_dir / "final").exists()
    return step


def assert_each_window_once(traces: list[Path]) -> None:
    """Across all launches: every step 1..STEPS trained by exactly one launch, and each epoch of the
    global order a permutation of the windows (no window skipped or seen twice)."""
    per_launch = [set(trained_windows(t)) for t in traces]
    for i, steps in enumerate(per_launch):
        for other in per_launch[i + 1:]:
            assert not steps & other, f"steps trained twice: {sorted(steps & other)}"
    windows = trained_windows(*traces)
    assert sorted(windows) == list(range(1, STEPS + 1))
    order = [w for step in sorted(windows) for w in windows[step]]
    assert len(order) == STEPS * GLOBAL
    for start in range(0, len(order), WINDOWS):
        epoch = order[start:start + WINDOWS]
        assert len(set(epoch)) == len(epoch) and set(epoch) <= set(range(WINDOWS)), f"epoch at {start}"


@pytest.mark.slow
def test_a_signal_to_torchrun_saves_on_all_ranks_and_the_run_resumes(tmp_path, position_data, started):
    """One run stopped twice by a signal to the torchrun process only (as a batch shell forwards
    `--signal=B:USR1@T`, or `kill PID`): SIGUSR1, then SIGTERM. The third launch finishes. (Signals to
    every process, as Slurm sends them to a step, are in the two-node test.) The run uses the ZeRO-2
    offload JSON, so that an offloaded optimizer state is saved on a signal and resumed too."""
    cfg = config(tmp_path, position_data, zero="zero2_offload.json")
    run_dir, traces, stopped = tmp_path / "run", [], 0
    for n, signum in enumerate([signal.SIGUSR1, signal.SIGTERM]):
        env = traced(tmp_path, str(n))
        traces.append(Path(env["LMFORGE_TRACE_DIR"]))
        one = Launch.start(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", *RECOMMENDED,
                                    "-m", "pretrain", str(cfg)), tmp_path / f"launch{n}", env)
        started.append(one)
        wait_for_step(run_dir, stopped + 2, [one])
        deliver(signum, [one], "torchrun")
        resumed_from = stopped
        stopped = assert_saved_on_signal([one], signum, run_dir, after=stopped)
        if resumed_from:
            assert f"at step {resumed_from}" in one.out
    env = traced(tmp_path, "last")
    traces.append(Path(env["LMFORGE_TRACE_DIR"]))
    proc = launch("pretrain", cfg, nproc=2, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"at step {stopped}" in proc.stdout and (run_dir / "final" / "model.safetensors").is_file()
    assert_each_window_once(traces)


@pytest.mark.slow
def test_two_nodes_stop_on_a_signal_and_resume_on_one_node(tmp_path, position_data, started):
    """Two torchrun agents as two nodes (c10d rendezvous, one process each: both workers have LOCAL_RANK 0,
    global ranks 0 and 1), ZeRO-3. SIGTERM to every process of both (a time limit on a 2-node job): all
    ranks save once; then the run resumes on one node with two processes and finishes."""
    cfg = config(tmp_path, position_data, zero="zero3.json")
    run_dir = tmp_path / "run"
    first, second = traced(tmp_path, "two-nodes"), traced(tmp_path, "one-node")
    port = free_port()
    nodes = [Launch.start(torchrun("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                                   f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=two-nodes-{port}", *RECOMMENDED,
                                   "-m", "pretrain", str(cfg)), tmp_path / f"node{node}", first)
             for node in (0, 1)]
    started.extend(nodes)
    wait_for_step(run_dir, 2, nodes)
    seen = sorted((int(e["RANK"]), e["LOCAL_RANK"], e["GROUP_RANK"])
                  for e in (w.environ() for node in nodes for w in node.workers()))
    assert [(rank, local) for rank, local, _ in seen] == [(0, "0"), (1, "0")]  # what this test is about
    assert {group for _, _, group in seen} == {"0", "1"}
    deliver(signal.SIGTERM, nodes, "every process")
    stopped = assert_saved_on_signal(nodes, signal.SIGTERM, run_dir, after=0)
    quiet = [node for node in nodes if "[pretrain]" not in node.out]
    assert len(quiet) == 1, "the node without global rank 0 must not print (nor log, nor commit)"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "metrics.jsonl written by more than one rank"

    resumed = launch("pretrain", cfg, nproc=2, env=second)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at step {stopped}" in resumed.stdout
    assert_each_window_once([Path(first["LMFORGE_TRACE_DIR"]), Path(second["LMFORGE_TRACE_DIR"])])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["steps"] == STEPS
    assert summary["export_parity_max_abs_diff"] < 1e-5
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.num_hidden_layers == 2


# -- DeepSpeed's launcher and ZeRO-3 offload: 6 steps each, the same seed and global batch ---------------
SHORT = 6


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, position_data):
    """`deepspeed --module pretrain` with ZeRO-2, and torchrun with the ZeRO-3 offload JSON."""
    out = {}
    for name in ("deepspeed", "zero3_offload"):
        root = tmp_path_factory.mktemp(name)
        zero = "zero2.json" if name == "deepspeed" else f"{name}.json"
        cfg = config(root, position_data, zero=zero, max_steps=SHORT, save_every=3)
        if name == "deepspeed":
            # DeepSpeed's runner counts "GPUs" on CPU as NUMA nodes (1 here): --num_gpus sets the process
            # count; --master_port keeps parallel test runs apart. The stage accepts the --local_rank=N
            # it appends, so --no_local_rank is not needed.
            cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus=2",
                   f"--master_port={free_port()}", "--module", "pretrain", str(cfg)]
            proc = subprocess.run(cmd, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=600)
        else:
            proc = launch("pretrain", cfg, nproc=2)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        out[name] = root / "run"
    return out


def train_losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in m]


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_stage_and_the_model_card_names_it(short_runs):
    run_dir = short_runs["deepspeed"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == SHORT
    card = (run_dir / "final" / "README.md").read_text()
    command = re.search(r"```bash\n(.*?)\n```", card, re.S)
    assert command, card
    # DeepSpeed's launcher sets CROSS_RANK, CROSS_SIZE and LOCAL_SIZE (no TORCHELASTIC_RUN_ID, no
    # LOCAL_WORLD_SIZE): the card says how to rerun it, without the --local_rank the launcher appends.
    assert command[1].startswith("deepspeed --num_gpus=2 --module pretrain "), command[1]
    assert "--local_rank" not in command[1] and "torchrun" not in command[1]


@pytest.mark.slow
def test_zero3_offload_runs_on_cpu_and_trains_the_same_model(short_runs):
    """Parameter and optimizer offload to host memory run on a CPU device too (with torch's AdamW: no
    JIT-built CPU Adam) and are the same optimization as ZeRO-2 without offload. (zero2_offload.json is
    launched by the signal test above.)"""
    run_dir = short_runs["zero3_offload"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["steps"] == SHORT
    assert summary["export_parity_max_abs_diff"] < 1e-5
    assert train_losses(run_dir) == pytest.approx(train_losses(short_runs["deepspeed"]), abs=1e-4)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000006"]
