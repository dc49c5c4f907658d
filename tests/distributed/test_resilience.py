"""Crashes, preemption and time limits: a checkpoint is complete or invisible, resume is exact, and
every training window is consumed exactly once across any number of restarts (2 CPU ranks, ZeRO-2).

The corpus here encodes each window's index in its first two tokens, so the windows a run trained on
can be read back from what the ranks saw (LMFORGE_TRACE_DIR). Faults are injected with
LMFORGE_FAULT=POINT:STEP:RANK, which SIGKILLs that rank at that point of a save.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from lmforge.checkpoint import FAULT_POINTS

from ..harness import ROOT, SEQ, WINDOWS, launch, position_corpus, pretrain_config, traced, trained_windows

STEPS, GLOBAL = 8, 8  # 48 windows = 6 steps: the run goes 2 steps into epoch 2


@pytest.fixture(scope="module")
def position_data(tmp_path_factory, tiny_tokenizer):
    return position_corpus(tmp_path_factory.mktemp("positions") / "data", tiny_tokenizer)


def config(tmp_path, data, name="run", **train):
    return pretrain_config(tmp_path / f"{name}.yaml", data, tmp_path / name, seq_len=SEQ,
                           batch={"micro_batch_size": 2, "global_batch_size": GLOBAL},
                           train={"max_steps": STEPS, "log_every": 1, "eval_every": 100, "save_every": 2,
                                  "keep_last": 2, **train},
                           eval={"windows": 4, "prompt": "", "max_new_tokens": 4})


def weights(run_dir) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def losses(run_dir) -> list[float]:
    return [m["train/loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in m]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, position_data):
    """The uninterrupted run every interrupted one must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    env = traced(tmp, "reference")
    proc = launch("pretrain", config(tmp, position_data), nproc=2, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "run", trained_windows(Path(env["LMFORGE_TRACE_DIR"]))


def assert_same_as_reference(run_dir, reference, trace_dirs=(), tolerance=0.0):
    """Bitwise by default (fp32 on CPU, same reduction order); `tolerance` where the rank count changed."""
    ref_dir, ref_windows = reference
    assert losses(run_dir) == pytest.approx(losses(ref_dir), abs=tolerance, rel=0)
    ref_w, got_w = weights(ref_dir), weights(run_dir)
    assert ref_w.keys() == got_w.keys()
    assert max(float((ref_w[k] - got_w[k]).abs().max()) for k in ref_w) <= tolerance
    if trace_dirs:
        assert trained_windows(*trace_dirs) == ref_windows


@pytest.fixture(scope="module")
def reference_zero3(tmp_path_factory, position_data):
    """The uninterrupted 2-rank run under ZeRO-3. A ZeRO-3 model is built partitioned (same initial weights),
    and DeepSpeed then reduces its gradients in another order than ZeRO-2's: 8 steps of Adam carry that
    round-off to ~1e-4 in the weights, so a ZeRO-3 run is held to a ZeRO-3 reference."""
    tmp = tmp_path_factory.mktemp("reference3")
    env = traced(tmp, "reference")
    proc = launch("pretrain", config(tmp, position_data),
                  f"engine.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}", nproc=2, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "run", trained_windows(Path(env["LMFORGE_TRACE_DIR"]))


def test_the_reference_run_reads_every_window_once_per_epoch(reference):
    _, windows = reference
    order = [w for step in sorted(windows) for w in windows[step]]
    assert len(order) == STEPS * GLOBAL
    assert sorted(order[:WINDOWS]) == list(range(WINDOWS))  # epoch 1: each window exactly once
    assert len(set(order[WINDOWS:])) == len(order) - WINDOWS  # epoch 2 so far: no repeats


# Every point of a save, killed on the rank that matters there: (point, rank, the step whose save is killed,
# the newest complete checkpoint after the kill). A chain is one run killed once per launch, each launch
# resuming from the previous kill's survivor, then resumed to the end: 10 launches for 7 kills, where a
# launch pair per kill took 14 (each launch costs ~10 s of start-up on 2 cores).
CHAINS = [[("save-begin", 1, 4, 2), ("save-mid-shards", 1, 6, 4), ("save-shards", 0, 8, 6)],
          [("save-rng", 1, 4, 2), ("save-committed", 0, 6, 6), ("save-commit", 0, 8, 6)],
          [("save-pruned", 0, 4, 4)]]
assert {k[0] for chain in CHAINS for k in chain} == set(FAULT_POINTS)


@pytest.mark.parametrize("kills", CHAINS, ids=["+".join(f"{p}-rank{r}" for p, r, _, _ in c) for c in CHAINS])
def test_kills_during_saves_leave_the_last_complete_checkpoint_and_resume_is_exact(
        tmp_path, position_data, reference, kills):
    from lmforge.checkpoint import complete

    cfg = config(tmp_path, position_data)
    traces, resumed_at = [], None
    for k, (point, rank, step, survivor) in enumerate(kills):
        env = traced(tmp_path, f"launch{k}")
        traces.append(Path(env["LMFORGE_TRACE_DIR"]))
        crashed = launch("pretrain", cfg, nproc=2, env={**env, "LMFORGE_FAULT": f"{point}:{step}:{rank}"})
        assert crashed.returncode != 0, f"the kill at {point} of step {step}'s save did not happen"
        if resumed_at is not None:
            assert f"at step {resumed_at}" in crashed.stdout, crashed.stdout[-2000:]
        found = complete(tmp_path / "run" / "checkpoints")
        assert found and found[-1].step == survivor, (point, step, [c.step for c in found])
        assert not (tmp_path / "run" / "final").exists()
        resumed_at = survivor
    env = traced(tmp_path, "last")
    traces.append(Path(env["LMFORGE_TRACE_DIR"]))
    resumed = launch("pretrain", cfg, nproc=2, env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at step {resumed_at}" in resumed.stdout
    assert_same_as_reference(tmp_path / "run", reference, traces)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert names == ["step-00000006", "step-00000008"]  # partial folders cleaned, keep_last 2


def worker_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of each worker torchrun started: its direct children only. A worker's own child (a fork that
    has not exec'd yet, a helper process) carries the same RANK and command line, and a signal sent to it instead
    of the worker is lost (a clean-clone CI run once finished all 8 steps after its SIGUSR1)."""
    out = {}
    for child in psutil.Process(torchrun.pid).children(recursive=False):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "pretrain" in " ".join(child.cmdline()):
            out[int(rank)] = child.pid
    return out


@pytest.mark.parametrize("signum, during_save", [(signal.SIGUSR1, True), (signal.SIGTERM, False)],
                         ids=["SIGUSR1-during-a-save", "SIGTERM"])
def test_a_signal_to_one_worker_saves_on_all_ranks_and_exits_0(tmp_path, position_data, reference, signum,
                                                                during_save):
    """during_save: rank 1's save at step 2 takes 5 s (the signal lands in it, as on a cluster where a save
    takes minutes): the run stops right after that save, not after another step and another save."""
    cfg = config(tmp_path, position_data)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", **({"LMFORGE_FAULT": "save-slow:2:1"} if during_save else {})}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", "-m", "pretrain", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while not metrics.exists() or metrics.read_text().count("train/loss") < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached step 2"
        time.sleep(0.05)
    os.kill(worker_pids(proc)[1], signum)  # to a worker, as Slurm's signal forwarding does; not to torchrun
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert f"{signum.name} received: checkpoint saved at step" in out
    stopped_at = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    assert 2 <= stopped_at < STEPS and not (tmp_path / "run" / "final").exists()
    if during_save:  # stopped by the save the signal landed in: no step 3, no second save
        assert stopped_at == 2 and [c.name for c in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-00000002"]
    resumed = launch("pretrain", cfg, nproc=2)
    assert resumed.returncode == 0 and f"at step {stopped_at}" in resumed.stdout, resumed.stderr[-3000:]
    assert_same_as_reference(tmp_path / "run", reference)


def test_max_time_stops_cleanly_and_many_restarts_consume_each_window_once(tmp_path, position_data, reference):
    """A time budget so short that each launch trains a step or two: restarted until done, the run
    trains exactly the reference's windows in the reference's order, with its weights."""
    cfg = config(tmp_path, position_data, max_time=0.05)
    traces = []
    while not (tmp_path / "run" / "final").exists():
        assert len(traces) < STEPS, "no progress"
        env = traced(tmp_path, str(len(traces)))
        traces.append(Path(env["LMFORGE_TRACE_DIR"]))
        proc = launch("pretrain", cfg, nproc=2, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(traces) >= 3
    assert_same_as_reference(tmp_path / "run", reference, traces)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nan_on_one_rank_skips_that_update_on_every_rank(tmp_path, position_data, stage):
    from lmforge.engine import state_dict_from_checkpoint

    cfg = config(tmp_path, position_data, max_steps=5, save_every=1, keep_last=10)
    proc = launch("pretrain", cfg, f"engine.deepspeed={ROOT / 'configs' / 'deepspeed' / f'zero{stage}.json'}",
                  nproc=2, env={"LMFORGE_FAULT": "nan-loss:3:1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 3: non-finite gradient norm" in proc.stdout and "update skipped on all ranks" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in records if "train/skipped_steps" in r] == [1]
    root = tmp_path / "run" / "checkpoints"
    before, after, later = (state_dict_from_checkpoint(root, f"step-0000000{s}") for s in (2, 3, 4))
    assert all((before[k] == after[k]).all() for k in before)  # step 3 changed nothing...
    assert any((after[k] != later[k]).any() for k in after)  # ...and training went on after it
    assert all(v.isfinite().all() for v in weights(tmp_path / "run").values())


def test_consecutive_non_finite_steps_abort_with_a_clear_message(tmp_path, position_data):
    cfg = config(tmp_path, position_data, max_steps=8, save_every=2, max_bad_steps=3)
    proc = launch("pretrain", cfg, nproc=2, env={"LMFORGE_FAULT": "nan-loss:3+:0"})
    assert proc.returncode != 0
    assert "3 consecutive steps with a non-finite loss or gradient (train.max_bad_steps)" in proc.stderr
    from lmforge.checkpoint import latest

    assert latest(tmp_path / "run" / "checkpoints").step == 4  # saved before the streak reached 3
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("stage, before, after", [(1, 2, 1), (2, 2, 1), (3, 2, 1), (2, 1, 2), (3, 1, 2)])
def test_resume_on_another_number_of_ranks_continues_the_same_run(tmp_path, position_data, reference, reference_zero3,
                                                                   stage, before, after):
    """Saved on `before` ranks, resumed on `after`: converted through a universal checkpoint, with the
    optimizer moments and the data position carried over. Losses and weights agree with the uninterrupted
    2-rank run to fp32 round-off (reductions sum in another order on another rank count)."""
    zero = f"engine.deepspeed={ROOT / 'configs' / 'deepspeed' / f'zero{stage}.json'}"
    cfg = config(tmp_path, position_data)
    first, second = traced(tmp_path, "first"), traced(tmp_path, "second")
    crashed = launch("pretrain", cfg, zero, nproc=before, env={**first, "LMFORGE_FAULT": "save-committed:4:0"})
    assert crashed.returncode != 0
    resumed = launch("pretrain", cfg, zero, nproc=after, env=second)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"saved on {before} ranks, now {after}" in resumed.stdout
    assert "converting it to a universal checkpoint" in resumed.stdout
    assert_same_as_reference(tmp_path / "run", reference_zero3 if stage == 3 else reference,
                             [Path(first["LMFORGE_TRACE_DIR"]), Path(second["LMFORGE_TRACE_DIR"])], tolerance=1e-4)


def test_without_conversion_a_changed_rank_count_says_how_to_turn_it_on(tmp_path, position_data):
    cfg = config(tmp_path, position_data, max_steps=2)
    assert launch("pretrain", cfg, nproc=2).returncode == 0
    proc = launch("pretrain", cfg, "train.max_steps=4", "engine.universal_checkpoint=false", nproc=1)
    assert proc.returncode == 2
    assert "was saved on 2 ranks with ZeRO-2 and this run has 1" in proc.stderr
    assert "engine.universal_checkpoint=true" in proc.stderr
