"""The training core on 2 CPU ranks (issue 8, gaps 8 and 9): what is read from the shared filesystem is
decided on rank 0 and broadcast, and a save fsyncs each file on the rank that wrote it.

The test starts two processes running this file (env RANK/WORLD_SIZE as a launcher sets them, gloo):

    python THIS worker OUT RUN_DIR     rank 0 gets run_a (a committed checkpoint at step 4, exported),
                                       rank 1 gets run_b (empty): the view a node with a stale NFS/Lustre
                                       cache would have of the same run folder
    python THIS intruder RUN_DIR       a second launch on run_a while the pair holds it (started by rank 0)

Each rank writes what it saw to OUT/rank{r}.json; the tests read those. One launch serves every test
(two processes importing DeepSpeed cost most of the time on 2 busy cores).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEP = 4  # the committed checkpoint in run_a
SEED = 1000  # train.seed: a rank without a saved RNG state gets run.rank_seed(SEED, rank, STEP)
RANK1_RNG_SEED = 2222  # the state rank 0 saves as rank 1's in the second RNG case
STAGES = ("zero2", "zero3")
# launcher variables the children must not inherit (they get their own, or none: a group of one)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "CROSS_RANK")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    return {**env, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


# --------------------------------------------------------------------------------------------------
# The child processes


def intruder(run_dir: Path) -> int:
    """A second launch on `run_dir`: prints the refusal and exits 0 if refused, 1 if it got in."""
    from lmforge.run import Run, RunError

    try:
        run = Run.open("pretrain", run_dir, time.perf_counter(), 60.0, signals=[])
    except RunError as e:
        print(e, flush=True)
        return 0
    run.close()
    print("opened a run folder another launch holds", flush=True)
    return 1


def worker(out: Path, run_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from lmforge import atomic
    from lmforge import checkpoint as ckpt
    from lmforge import engine as eng
    from lmforge.run import Run, RunError, rank_seed

    rank = int(os.environ["RANK"])
    seen: dict = {"pid": os.getpid(), "rank": rank}
    try:
        run = Run.open("pretrain", run_dir, time.perf_counter(), 120.0)
        # -- gap 9: decisions read from the shared filesystem are rank 0's ---------------------------
        # Before the core (git show HEAD~3:pretrain/__main__.py) only the checkpoint choice was
        # broadcast: every rank read final/lineage.json itself for "already finished?"
        # (`ckpt.exported_step(run_dir / "final")`, so rank 1 here would say False and train on while
        # rank 0 returned), and every rank listed the checkpoint folder itself for "is there an RNG
        # state for me?" (`ckpt.load_rng(resume.path, d.rank)`).
        seen["resume"] = None if run.resume is None else [str(run.resume.path), run.resume.step]
        seen["finished"] = {str(n): run.finished(n) for n in (STEP, 2 * STEP)}
        seen["on_main"] = run.on_main(lambda: sorted(p.name for p in run.dir.iterdir()))

        if rank == 0:  # a second launch while this one holds the lease; rank 1 waits in the barrier
            other = subprocess.run([sys.executable, __file__, "intruder", str(run_dir)], capture_output=True,
                                   text=True, env=child_env(), cwd=ROOT, timeout=180)
            seen["intruder"] = {"rc": other.returncode, "out": other.stdout[-3000:], "err": other.stderr[-3000:]}
        eng.barrier()

        folder = run.resume.path
        loads = []
        real_load, real_ranks, real_unreadable = eng.load_checkpoint, ckpt.rng_ranks, ckpt.unreadable
        eng.load_checkpoint = lambda engine, root, tag: loads.append(tag)  # no engine: only the RNG is tested
        ckpt.unreadable = lambda *args: None  # (the folder holds no DeepSpeed files to open)
        torch.manual_seed(rank_seed(SEED, rank, STEP))
        seeded = torch.get_rng_state()

        def load_with_view(stale: set[int]) -> str:
            """Run.load with rank 1 listing `stale` for the folder: is this rank's RNG state now its file's
            ("loaded"), the fallback stream's ("seeded"), or neither?"""
            if rank == 1:
                ckpt.rng_ranks = lambda f: set(stale)
            torch.manual_seed(7)  # neither the file's state nor the fallback's
            try:  # past its one collective: a rank that fails here leaves the others in step
                record, _ = run.load(None, run.resume.tag, SEED)
            except Exception as e:
                return f"raised {type(e).__name__}: {e}"
            finally:
                ckpt.rng_ranks = real_ranks
            assert record["step"] == STEP
            state = torch.get_rng_state()
            mine = folder / f"rng-rank{rank}.safetensors"
            if mine.is_file() and torch.equal(state, load_file(str(mine))["cpu"]):
                return "loaded"
            return "seeded" if torch.equal(state, seeded) else "other"

        # 1. the folder holds rank 0's state only (saved by a 1-rank run); rank 1's stale view lists a
        #    file of its own too: rank 1 must take the fallback stream, not go looking for that file
        seen["rng_only_rank0"] = load_with_view({0, 1})
        # 2. rank 0 now sees a state for rank 1 as well; rank 1's view lags behind: it must load it
        eng.barrier()
        if rank == 0:
            torch.manual_seed(RANK1_RNG_SEED)
            ckpt.save_rng(folder, 1)
        eng.barrier()
        seen["rng_both"] = load_with_view({0})
        seen["loads"] = loads
        eng.load_checkpoint, ckpt.unreadable = real_load, real_unreadable

        # -- gap 8: each rank fsyncs what it wrote, rank 0 the folders ------------------------------
        for stage in STAGES:
            seen[stage] = save_once(run, stage, out / f"checkpoints-{stage}", atomic, ckpt, eng)

        # last, as it ends the group: an error in rank 0's look becomes a RunError on every rank, and
        # the run closes (the lease released)
        try:
            run.on_main(lambda: (run.dir / "missing.json").read_text(), errors=(OSError,))
            seen["on_main_error"] = None
        except RunError as e:
            seen["on_main_error"] = str(e)
    except BaseException:
        seen["error"] = traceback.format_exc()
        raise
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(seen))


def save_once(run, stage: str, root: Path, atomic, ckpt, eng) -> dict:
    """One optimizer step of a tiny model at ZeRO-`stage`, then `checkpoint.save` with every
    `atomic.fsync_path` call recorded: [path, was a folder]."""
    import torch

    from lmforge.config.model import ModelConfig
    from lmforge.config.pretrain import BatchConfig, EngineConfig, OptimConfig
    from lmforge.models import build, model_config
    from lmforge.run import Plan

    plan = Plan.make(BatchConfig(micro_batch_size=2, global_batch_size=4),
                     EngineConfig(deepspeed=ROOT / "configs" / "deepspeed" / f"{stage}.json", precision="fp32"),
                     OptimConfig())
    config = model_config(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_seq_len=64), None, 512, 0,
                          None, 16)
    torch.manual_seed(0)
    with eng.model_context(plan.ds):
        model = build(config)
    engine = eng.initialize(model, plan.ds, 0.1)
    ids = torch.randint(0, 512, (plan.micro, 16))
    for _ in range(plan.accum):
        engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
        engine.step()

    synced: list[tuple[str, bool]] = []
    real = atomic.fsync_path

    def fsync_path(path) -> None:
        synced.append((str(path), os.path.isdir(path)))
        real(path)

    atomic.fsync_path = fsync_path
    try:
        ckpt.save(engine, root, 1, run.dist, {"samples": plan.global_batch}, ckpt.Retention(2), say=run.say)
    finally:
        atomic.fsync_path = real
    latest = ckpt.latest(root)
    seen = {"fsynced": synced, "latest": None if latest is None else [latest.step, latest.record["world_size"]],
            "zero_stage": plan.zero_stage}
    if stage == "zero2":  # rank 0's commit of the next save fails (a full quota): every rank must hear it
        import errno

        real_commit = ckpt.commit

        def commit(folder, record) -> None:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(folder / ckpt.RECORD))

        ckpt.commit = commit if run.dist.is_main else real_commit
        began = time.monotonic()
        try:
            ckpt.save(engine, root, 2, run.dist, {"samples": 2 * plan.global_batch}, ckpt.Retention(2), say=run.say)
            seen["failed_commit"] = "saved"
        except ckpt.CheckpointError as e:
            seen["failed_commit"] = str(e)
        finally:
            ckpt.commit = real_commit
        seen["failed_commit_seconds"] = time.monotonic() - began
        latest = ckpt.latest(root)
        seen["latest_after_failed_commit"] = None if latest is None else latest.step
    return seen


# --------------------------------------------------------------------------------------------------
# The tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait for every child; once one fails the others would wait in a collective for minutes: end them."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Launch the 2 ranks once; returns (out, run_a, run_b, [rank0 record, rank1 record])."""
    import torch

    from lmforge import checkpoint as ckpt

    base = tmp_path_factory.mktemp("core_ranks")
    out, run_a, run_b = base / "out", base / "run_a", base / "run_b"
    out.mkdir()
    folder = run_a / "checkpoints" / ckpt.tag_for(STEP)
    folder.mkdir(parents=True)
    torch.manual_seed(99)
    ckpt.save_rng(folder, 0)  # a 1-rank run saved this checkpoint: only rank 0's RNG state
    ckpt.commit(folder, {"step": STEP, "world_size": 1})
    (run_a / "final").mkdir()
    (run_a / "final" / "lineage.json").write_text(json.dumps({"step": STEP}))

    port = str(_free_port())
    procs = []
    for rank, run_dir in ((0, run_a), (1, run_b)):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", str(out), str(run_dir)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    _wait_all(procs, 420)
    logs = [p.stdout.read()[-4000:] for p in procs]
    ranks = []
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote nothing (rc {procs[rank].returncode}):\n{logs[rank]}"
        ranks.append(Seen(json.loads(path.read_text()), logs[rank], procs[rank].returncode))
    return out, run_a, run_b, ranks


class Seen(dict):
    """What one rank recorded; a key it never reached fails the test with that rank's traceback."""

    def __init__(self, record: dict, log: str, rc: int):
        super().__init__(record)
        self.log, self.rc = log, rc

    def __missing__(self, key):
        pytest.fail(f"rank {self.get('rank')} recorded no {key!r}:\n{self.get('error')}\n{self.log}")


@pytest.mark.slow
def test_filesystem_decisions_are_rank_zeros(pair):
    _, run_a, run_b, ranks = pair
    folder = run_a / "checkpoints" / f"step-{STEP:08d}"
    for r in ranks:
        # rank 1's own folder is empty, yet it resumes rank 0's checkpoint ...
        assert r["resume"] == [str(folder), STEP], r["rank"]
        # ... and agrees that the run is finished at STEP (exported there) and not at 2 x STEP
        assert r["finished"] == {str(STEP): True, str(2 * STEP): False}, r["rank"]
        assert r["on_main"] == ["checkpoints", "final", "lease"], r["rank"]  # rank 0's listing of run_a
    # rank 1 took no lease of its own (two leases on one run folder would refuse the launch)
    assert not (run_b / "lease").exists()


@pytest.mark.slow
def test_rng_decision_is_rank_zeros(pair):
    rank0, rank1 = pair[3]
    assert rank0["loads"] == rank1["loads"] == [f"step-{STEP:08d}"] * 2
    assert rank0["rng_only_rank0"] == "loaded"
    # rank 1's view listed a state of its own that rank 0 did not see: it takes the fallback stream
    # (before the core it would have tried to load the file it thought it saw)
    assert rank1["rng_only_rank0"] == "seeded"
    assert rank0["rng_both"] == "loaded"
    # rank 0 saw rank 1's state, rank 1's listing lagged: it loads it (before: it reseeded, and its
    # stream differed from the run it resumes)
    assert rank1["rng_both"] == "loaded"


@pytest.mark.slow
def test_second_launch_is_refused_and_close_releases(pair):
    _, run_a, _, (rank0, rank1) = pair
    intruder = rank0["intruder"]
    assert intruder["rc"] == 0, intruder
    assert "in use by another launch" in intruder["out"], intruder
    assert f"pid {rank0['pid']}" in intruder["out"], intruder  # it names the holder
    # rank 0's error became a RunError on both ranks, with rank 0's message, and both ended cleanly
    assert [rank0.rc, rank1.rc] == [0, 0], (rank0.get("error"), rank1.get("error"))
    assert rank0["on_main_error"] and rank0["on_main_error"] == rank1["on_main_error"]
    assert "missing.json" in rank0["on_main_error"]
    from lmforge.lease import Lease

    # the pair closed the run (on the RunError): the lease is free, not left to be taken over
    lease = Lease.acquire(run_a, ttl_s=5.0, renew=False)
    try:
        assert lease.took_over is None, lease.took_over
    finally:
        lease.release()


def _owner(name: str) -> int | None:
    """The rank that writes a file of a checkpoint folder, by DeepSpeed's and lmforge's naming."""
    if m := re.fullmatch(r"(?:rng-rank|zero_pp_rank_)(\d+)[._].*", name):
        return int(m.group(1))
    if name in ("mp_rank_00_model_states.pt", "config.json", "lmforge.json", "zero_to_fp32.py"):
        return 0
    return None


def _final_name(path: str) -> str:
    """`.rng-rank1.safetensors.tmp` (fsynced before its rename) -> `rng-rank1.safetensors`."""
    name = Path(path).name
    return name[1:-len(".tmp")] if name.startswith(".") and name.endswith(".tmp") else name


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_each_rank_fsyncs_what_it_wrote(pair, stage):
    # Before the core every rank ran `atomic.sync_tree` over the whole step folder: W ranks x (every
    # file + every folder), and rank 1 fsyncing rank 0's model states flushes nothing on a parallel
    # filesystem (rank 0's node holds the dirty pages).
    out, _, _, ranks = pair
    root = out / f"checkpoints-{stage}"
    folder = root / "step-00000001"
    on_disk = sorted(p.name for p in folder.iterdir() if p.is_file())
    files = {}
    for r in ranks:
        assert r[stage]["latest"] == [1, 2], "the checkpoint is not complete"
        synced = r[stage]["fsynced"]
        files[r["rank"]] = [_final_name(p) for p, is_dir in synced if not is_dir]
        folders = [p for p, is_dir in synced if is_dir]
        strangers = [n for n in files[r["rank"]] if _owner(n) != r["rank"]]
        assert not strangers, f"rank {r['rank']} fsynced files another rank wrote: {strangers}"
        assert len(set(files[r["rank"]])) == len(files[r["rank"]]), f"a file fsynced twice: {synced}"
        if r["rank"] == 0:
            assert {str(folder), str(root)} <= set(folders), folders
            assert len(folders) <= 2 * len(set(folders)), f"folders fsynced again and again: {folders}"
        else:
            assert folders == [], f"rank 1 fsynced folders (rank 0's job): {folders}"
    expected1 = {"rng-rank1.safetensors", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    if stage == "zero3":
        expected1.add("zero_pp_rank_1_mp_rank_00_model_states.pt")
    assert set(files[1]) == expected1
    assert {"rng-rank0.safetensors", "config.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(files[0])
    # every file of the checkpoint is durable: fsynced by its writer (the record by atomic.write_json)
    unsynced = set(on_disk) - set(files[0]) - set(files[1]) - {"lmforge.json"}
    assert not unsynced, f"nobody fsynced {sorted(unsynced)} (on disk: {on_disk})"


@pytest.mark.slow
def test_a_failed_commit_on_rank_0_fails_the_save_on_every_rank(pair):
    # rank 0 alone commits; before its outcome was broadcast, a commit that raised left rank 1 in the next
    # collective until the collective timeout (30 minutes), and the error was rank 0's alone
    _, _, _, ranks = pair
    for r in ranks:
        assert "the commit failed" in r["zero2"]["failed_commit"] and "Disk quota exceeded" in r["zero2"]["failed_commit"]
        assert "step 2 is not saved" in r["zero2"]["failed_commit"], r["zero2"]["failed_commit"]
        assert r["zero2"]["failed_commit_seconds"] < 60
        assert r["zero2"]["latest_after_failed_commit"] == 1  # the failed step is not complete


def test_load_rng_follows_the_given_view(tmp_path):
    """`load_rng(folder, rank, saved)` decides from `saved` (rank 0's listing), not from this rank's."""
    import torch

    from lmforge import checkpoint as ckpt

    torch.manual_seed(5)
    ckpt.save_rng(tmp_path, 1)
    saved_state = torch.get_rng_state()
    torch.manual_seed(6)
    before = torch.get_rng_state()
    assert not ckpt.load_rng(tmp_path, 1, saved={0})  # the file exists here, but rank 0 did not see it
    assert torch.equal(torch.get_rng_state(), before)
    assert ckpt.load_rng(tmp_path, 1, saved={0, 1}) and torch.equal(torch.get_rng_state(), saved_state)


if __name__ == "__main__":
    if sys.argv[1] == "intruder":
        sys.exit(intruder(Path(sys.argv[2])))
    worker(Path(sys.argv[2]), Path(sys.argv[3]))
