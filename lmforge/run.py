"""A training run's lifecycle, shared by every training stage (pretrain, finetune, distill).

    run = Run.open("pretrain", cfg.run_dir, launched, cfg.engine.collective_timeout)
    run.check_resume({...what must match...}); run.finished(max_steps); run.publish(cfg, tokenizer)
    tag = run.resume_tag(ds, universal_ok)     # before the engine: a world-size change converts first
    ... build the engine ...
    state = run.load(engine, tag, seed)        # the checkpoint's record, RNG restored
    ... while loop: if (stop := run.should_stop()): save, run.close ...
    run.close(code)

Every decision read from the shared filesystem (is there a checkpoint, which one, is the run finished,
which ranks saved an RNG state) is made on rank 0 and broadcast: a node with a stale NFS/Lustre view
must not split the ranks. Only one launch works on a run folder at a time (`lmforge.lease`).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from lmforge import atomic
from lmforge import checkpoint as ckpt
from lmforge.lease import Lease, LeaseError

# Why a run stops before max_steps: a signal number (below 65), or one of these. The ranks agree on the
# largest code any of them raised, so the order matters: a lost lease (someone else owns the folder now:
# do not save over their checkpoints) beats everything.
OUT_OF_TIME = 1000  # train.max_time reached
ORPHANED = 1001  # the launcher (torchrun's agent) died: stop after a save instead of training on unseen
LEASE_LOST = 1002  # another launch took the run folder over


def _engine():
    """lmforge.engine imports DeepSpeed (seconds): only once a launch is known to go ahead."""
    from lmforge import engine

    return engine


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank `rank`'s random stream from `step` on (dropout), distinct across ranks and steps."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


def catch_signals() -> list[int]:
    """Record SIGTERM and SIGUSR1 (Slurm's preemption and time-limit notices, torchrun's forwarding) from now
    on, start-up included; the run acts on them at the next step boundary. Call first thing in `main`."""
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda num, frame: received.append(num))
    return received


class RunError(Exception):
    """A launch that must not go on (the folder is busy, a checkpoint does not fit); exit status 2."""


class AnyOf(tuple):
    """A resume check's value that accepts a saved value equal to any of these (this launch's own first)."""


@dataclass(frozen=True)
class Plan:
    """What a launch will do, known before any work: ranks, batch arithmetic, precision, DeepSpeed config."""

    world: int
    micro: int  # sequences (or examples) per rank per forward
    accum: int  # micro-batches per optimizer step
    global_batch: int  # sequences per optimizer step, all ranks
    dtype: object  # torch.dtype of the weights and the forward
    ds: dict  # the full DeepSpeed config

    @classmethod
    def make(cls, batch, engine_cfg, optim) -> Plan:
        """From a stage config's `batch`, `engine` and `optim` sections; EngineError names a bad key."""
        import torch

        world = _engine().launch_world()
        micro, accum, global_batch = _engine().resolve_batch(batch.micro_batch_size, batch.grad_accum,
                                                       batch.global_batch_size, world)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _engine().resolve_precision(engine_cfg.precision, device)
        ds = _engine().ds_config(_engine().read_zero_json(engine_cfg.deepspeed), micro, accum, global_batch, dtype, optim, device)
        return cls(world, micro, accum, global_batch, dtype, ds)

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def zero_stage(self) -> int:
        return _engine().zero_stage(self.ds)

    def dry_run(self, config_yaml: str, facts: dict, hf_config, seq_len: int, max_steps: int, source: str) -> None:
        """Print what `--dry-run` promises: the resolved config, the DeepSpeed JSON, tokens per step,
        parameters and FLOPs per token."""
        import json

        from lmforge.models import human

        tokens = self.global_batch * seq_len
        print(config_yaml, end="")
        print("# DeepSpeed config (ZeRO file + injected batch, precision, optimizer, clipping):")
        print(json.dumps(self.ds, indent=2))
        print(f"# world size {self.world}: global batch {self.global_batch} sequences = micro {self.micro} x accum "
              f"{self.accum} x {self.world} ranks; {tokens:,} tokens per step, {tokens * max_steps:,} in all")
        print(f"# parameters: {facts['total']:,} ({human(facts['total'])}; non-embedding "
              f"{human(facts['non_embedding'])}); {hf_config.model_type}, vocab {hf_config.vocab_size:,}, from {source}")
        print(f"# FLOPs per token (training, 6N + attention): {facts['flops_per_token']:,}; per step "
              f"{facts['flops_per_token'] * tokens:.3e}; precision {self.precision}")

    def resume_checks(self, hf_config, seed: int) -> dict[str, tuple[object, str]]:
        """What every training stage's checkpoint must share with this launch (see `Run.check_resume`)."""
        from lmforge.checkpoint import config_digests

        return {
            "model_digest": (AnyOf(config_digests(hf_config)), "was saved by a different model config; use a new run_dir, "
                             "or restore the model it was trained with (see its config.yaml)"),
            "seed": (seed, "used another train.seed, which sets the data order (a new one would repeat and skip "
                     "examples); restore it"),
            "dtype": (self.precision, "trained in another precision; restore engine.precision"),
            "global_batch_size": (self.global_batch, "trained with another global batch; set "
                                  "batch.global_batch_size to the saved value so the run's math stays the same on "
                                  "any number of ranks"),
            "zero_stage": (self.zero_stage, "was saved with another ZeRO stage; resume with the original DeepSpeed "
                           "config"),
        }


@dataclass
class Run:
    stage: str
    dir: Path
    dist: object  # engine.Dist: rank, world, local_rank, device
    launched: float  # time.perf_counter() at launch: train.max_time counts start-up too
    resume: ckpt.Checkpoint | None = None
    lease: Lease | None = None
    signals: list[int] = field(default_factory=list)
    launcher_pid: int | None = None  # the torchrun / deepspeed agent this worker was started by

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def say(self, *args, **kwargs) -> None:
        """Print on rank 0 only, prefixed with the stage; flushed (logs are read live on clusters)."""
        if self.dist.is_main:
            file = kwargs.pop("file", sys.stdout)
            print(f"[{self.stage}]", *args, file=file, flush=True, **kwargs)

    # -- opening ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, stage: str, run_dir: Path, launched: float, collective_timeout: float,
             lease_ttl: float = 120.0, signals: list[int] | None = None) -> Run:
        """Join the process group, take the run folder's lease, clean up after a crash and choose the
        checkpoint to resume from (all on rank 0, the outcome broadcast). Raises RunError."""
        try:
            d = _engine().setup_distributed(collective_timeout)
        except _engine().EngineError as e:  # a launch that cannot be mapped to ranks (see engine.launcher_env)
            raise RunError(str(e)) from None
        # Slurm sends SIGTERM (or --signal=USR1@T) before a time limit or on preemption. The handler only
        # records it; the ranks agree at the next step boundary, save, and exit 0 together.
        run = cls(stage, Path(run_dir), d, launched, signals=catch_signals() if signals is None else signals)
        if launcher() in ("torchrun", "deepspeed"):  # their workers outlive a SIGKILLed agent
            run.launcher_pid = os.getppid()
        problem, resume = None, None
        if d.is_main:
            try:
                run.dir.mkdir(parents=True, exist_ok=True)
                run.lease = Lease.acquire(run.dir, ttl_s=lease_ttl, info={"command": command_line(stage)})  # before any cleanup: it may be someone's work
                atomic.remove_leftovers(run.dir)
                for gone in ckpt.remove_incomplete(run.checkpoints):
                    run.say(f"removed an interrupted save: {gone}")
                resume = ckpt.latest(run.checkpoints)
            except (LeaseError, ckpt.CheckpointError, OSError) as e:
                problem = str(e)
        problem, run.resume = _engine().broadcast_object((problem, resume))
        if problem:
            run.close(2)
            raise RunError(problem)
        return run

    def check_resume(self, expected: dict[str, tuple[object, str]]) -> None:
        """Refuse to resume a checkpoint whose record differs from this launch in any `expected` key
        (key -> (this launch's value, why that matters and what to do)). Call before anything in the folder
        changes: a refused rerun must leave the run as it was."""
        if self.resume is None:
            return
        expected = _engine().broadcast_object(expected)  # rank 0's view of the data too (a stale meta.json elsewhere)
        older = [key for key in expected if key not in self.resume.record]
        if older:  # an earlier lmforge recorded less: say so, rather than blame a changed config
            self.close(2)
            raise RunError(f"{self.resume.path} was saved by an earlier lmforge (its record has no {', '.join(older)}); "
                           "resume it with that version, or start a new run_dir (`lmforge export` still reads it)")
        for key, (want, why) in expected.items():
            have = self.resume.record.get(key)
            if (have not in want) if isinstance(want, AnyOf) else (have != want):
                self.close(2)
                want = want[0] if isinstance(want, AnyOf) else want
                raise RunError(f"{self.resume.path} {why} ({key}: saved {have!r}, this launch {want!r})")

    def on_main(self, fn, errors: tuple[type[Exception], ...] = (Exception,)):
        """`fn()` run on rank 0 alone (a look at the shared filesystem), its result given to every rank;
        one of `errors` there becomes a RunError on every rank."""
        result = problem = None
        if self.dist.is_main:
            try:
                result = fn()
            except errors as e:
                problem = str(e)
        result, problem = _engine().broadcast_object((result, problem))
        if problem:
            self.close(2)
            raise RunError(problem)
        return result

    def finished(self, max_steps: int) -> bool:
        """Whether an earlier launch already trained `max_steps` and exported them (rank 0 decides)."""
        done = (self.resume is not None and self.resume.step >= max_steps
                and ckpt.exported_step(self.dir / "final") == self.resume.step) if self.dist.is_main else None
        return bool(_engine().broadcast_object(done))

    def publish(self, config, tokenizer: Path) -> None:
        """config.yaml, and the tokenizer the run trains with, into the run folder (rank 0); a barrier.
        A fresh start takes the source's tokenizer even over one an earlier attempt (which died before its
        first checkpoint) copied from elsewhere."""
        from lmforge.config import save_config

        if self.dist.is_main:
            save_config(config, self.dir / "config.yaml")
            if self.resume is None or not (self.dir / "tokenizer" / "tokenizer.json").exists():
                atomic.publish_folder(self.dir / "tokenizer", lambda tmp: [
                    (tmp / n).write_bytes((Path(tokenizer) / n).read_bytes())
                    for n in ckpt.TOKENIZER_FILES if (Path(tokenizer) / n).is_file()])
        _engine().barrier()

    # -- resuming -----------------------------------------------------------------------------------

    def resume_tag(self, ds: dict, universal: bool) -> str | None:
        """The tag to load, after the checks that depend on the world size. A ZeRO-1/2/3 checkpoint from
        another world size is converted to DeepSpeed's universal format (once, atomically, on rank 0) and
        `ds` is switched to load it; call before the engine is built."""
        if self.resume is None:
            return None
        saved, stage = self.resume.record.get("world_size"), _engine().zero_stage(ds)
        if saved == self.dist.world or stage == 0:
            return self.resume.tag
        if not universal:
            self.close(2)
            raise RunError(f"{self.resume.path} was saved on {saved} ranks with ZeRO-{stage} and this run has "
                           f"{self.dist.world}: relaunch on {saved} ranks, or set engine.universal_checkpoint=true to "
                           "convert it to DeepSpeed's universal checkpoint and resume on any number of ranks")
        tag = problem = None
        if self.dist.is_main:
            self.say(f"{self.resume.path} was saved on {saved} ranks; converting it to a universal checkpoint for "
                     f"{self.dist.world} (the other ranks wait up to engine.collective_timeout)")
            try:
                tag = _engine().convert_to_universal(self.resume.path)
            except Exception as e:  # a damaged or vanished checkpoint: every rank must hear it
                problem = f"converting {self.resume.path} to a universal checkpoint failed: {type(e).__name__}: {e}"
        tag, problem = _engine().broadcast_object((tag, problem))
        if problem:
            self.close(2)
            raise RunError(problem)
        _engine().enable_universal_load(ds)
        return tag

    def load(self, engine, tag: str, seed: int) -> tuple[dict, float]:
        """Load the chosen checkpoint into `engine` (every rank) and restore each rank's RNG stream (a rank
        the saving run did not have gets a stream of its own from `seed`); returns (record, seconds)."""
        began = time.perf_counter()
        path = self.resume.path
        if ckpt.fault_requested("load-vanish", self.resume.step, 0):  # tests: pruned by another launch, after the choice
            if self.dist.is_main:
                shutil.rmtree(path)
            _engine().barrier()
        vanished = (f"{path} disappeared while it was being loaded; another launch is pruning this run folder? "
                    "Make sure only one job uses it, then rerun")
        if tag == self.resume.tag:  # (a universal copy is rank 0's own conversion, read just after it)
            problem = ckpt.unreadable(path, self.dist.rank, self.resume.step, self.resume.record.get("zero_stage"))
            self.agree(vanished if problem and not os.path.isfile(path / ckpt.RECORD) else problem)
        problem = None
        try:
            _engine().load_checkpoint(engine, self.checkpoints, tag)
            if tag != self.resume.tag:
                _engine().fix_zero3_universal_load(engine, path)
        except Exception as e:
            if not os.path.isfile(path / ckpt.RECORD):  # pruned or deleted under us: say so, not a bare assert
                problem = vanished
            elif isinstance(e, (OSError, EOFError, pickle.UnpicklingError)):  # a late or damaged view of a file
                problem = (f"rank {self.dist.rank} could not load {path}: {type(e).__name__}: {str(e)[:300]}. If the "
                           "file is damaged, move this checkpoint out of checkpoints/ and rerun: the resume takes the "
                           "one before")
            else:  # not the files: a bug here or in DeepSpeed; this rank's traceback says where
                traceback.print_exc()
                problem = (f"rank {self.dist.rank} failed loading {path}: {type(e).__name__}: {str(e)[:300]} (its "
                           "traceback is in that rank's output)")
        self.agree(problem)
        saved = _engine().broadcast_object(ckpt.rng_ranks(path) if self.dist.is_main else None)
        if not ckpt.load_rng(path, self.dist.rank, saved):  # a rank the saving run did not have
            import torch

            torch.manual_seed(rank_seed(seed, self.dist.rank, self.resume.step))
        return self.resume.record, time.perf_counter() - began

    def agree(self, problem: str | None) -> None:
        """One collective over every rank's problem (None: none): a rank failing alone stops every rank now,
        with its reason, instead of leaving them in the next collective until engine.collective_timeout."""
        problems = [p for p in _engine().gather_objects(problem) if p]
        if problems:
            self.close(2)
            more = f" ({len(problems) - 1} more rank(s) failed too)" if len(problems) > 1 else ""
            raise RunError(problems[0] + more)

    # -- stopping -----------------------------------------------------------------------------------

    def tracker(self, cfg, config: dict, step: int):
        """The rank-0 tracker (metrics.jsonl, W&B, plots), continuing the checkpoint's W&B run on a resume."""
        from lmforge.tracking import Tracker

        return Tracker(self.dir, cfg, self.stage, config, self.dist.rank,
                       run_id=self.resume.record.get("wandb_id") if self.resume else None,
                       resume_step=step + 1 if self.resume else None)

    def facts(self) -> dict:
        """What the model card says of this launch: ranks, device, the command, the run's name."""
        return {"world_size": self.dist.world, "device": device_name(self.dist.device),
                "command": command_line(self.stage), "name": self.dir.name}

    def owns(self) -> bool:
        """Rank 0: whether this launch still holds the run folder's lease (checked now, not by the renewer)."""
        return self.lease is None or self.lease.verify()

    def should_stop(self, max_time: float | None) -> int:
        """Every rank's reasons to stop now (signals, the time budget, a dead launcher, a lost lease),
        agreed in one collective: 0 to go on, else the largest code any rank raised."""
        flag = 0
        if self.lease is not None and self.lease.lost:
            flag = LEASE_LOST
        elif self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            flag = ORPHANED
        elif max_time is not None and time.perf_counter() - self.launched > max_time:
            flag = OUT_OF_TIME
        flag = max([flag, *self.signals])
        return int(_engine().all_reduce_max(float(flag), self.dist.device))

    def save_or_stop(self, step: int, due: bool, last: bool, save, tracker, max_time: float | None, prog: str
                     ) -> int | None:
        """The end of a step: the stop agreement (signals, max_time, a dead launcher, a lost lease; one
        collective) and `save()` when `due`, at the `last` step, or to stop. Returns None to train on, else the
        stage's exit status: 0 after the save a stop asked for, 1 when the lease was lost (no save: the run
        folder is another launch's now) or the save failed. A signal during the save stops right after it."""
        from lmforge.checkpoint import CheckpointError

        stop = 0 if last else self.should_stop(max_time)
        if stop == LEASE_LOST:
            self.say(f"error: {self.stop_reason(stop)}; stopping without saving", file=sys.stderr)
            tracker.finish(exit_code=1)
            return self.close(1)
        if due or last or stop:
            try:
                save()
            except CheckpointError as e:  # non-finite weights, or the run folder is someone else's now
                tracker.finish(exit_code=1)
                return self.close(fail(prog, e, code=1))
            if not stop and not last:  # a signal during the save: stop now, not after another step and save
                stop = self.should_stop(max_time)
                stop = 0 if stop == LEASE_LOST else stop  # a lost lease stops at the next step, unsaved
        if stop:
            self.say(f"{self.stop_reason(stop)}: checkpoint saved at step {step}; rerun the same command to resume")
            tracker.finish()
            return self.close(0)
        return None

    @staticmethod
    def stop_reason(code: int) -> str:
        return {OUT_OF_TIME: "train.max_time reached", ORPHANED: "the launcher is gone",
                LEASE_LOST: "another launch took over this run folder"}.get(code) or \
            f"{signal.Signals(code).name} received"

    def close(self, code: int = 0) -> int:
        """Leave the process group and release the lease; returns `code` (the stage's exit status)."""
        _engine().teardown()
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        return code

    def release(self) -> None:
        """This run folder is done and another run follows in the same launch (a distillation's no-KD baseline,
        then the distillation): release the lease, keep the process group; a barrier."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        _engine().barrier()

    def leave(self) -> None:
        """Tear down the process group now, keeping the lease (rank 0 still has single-process work to do:
        nothing that could keep the other ranks waiting in a collective)."""
        _engine().teardown()


def launcher() -> str:
    """Who started this process: torchrun, deepspeed (its launcher sets CROSS_RANK), srun, or python."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "CROSS_RANK" in os.environ:
        return "deepspeed"
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", 1)) > 1:  # an srun step of several tasks (engine.launcher_env)
        return "srun"
    return "python"


def command_line(stage: str) -> str:
    """How this run was launched, for the model card (the launcher's own flags are not visible here)."""
    import shlex

    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                             os.environ.get("LOCAL_SIZE", 1)))
    nodes = max(1, world // max(local, 1))
    args = " ".join(shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
    how = launcher()
    if how == "torchrun":
        return (f"torchrun --nnodes={nodes} " if nodes > 1 else "torchrun ") + f"--nproc_per_node={local} -m {stage} {args}"
    if how == "deepspeed":
        return (f"deepspeed --num_nodes={nodes} " if nodes > 1 else "deepspeed ") + f"--num_gpus={local} --module {stage} {args}"
    if how == "srun":
        return f"srun --ntasks={world} python -m {stage} {args}"
    return f"python -m {stage} {args}"


def device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def fail(prog: str, error: Exception, code: int = 2) -> int:
    """Print a refusal once (rank 0, or the only process) and return the exit status."""
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:  # once, even before ranks are mapped
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return code
