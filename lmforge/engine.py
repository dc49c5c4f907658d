"""The engine: the only module that imports DeepSpeed.

It starts the process group (torchrun, `deepspeed --module` or a plain `python -m`; on Slurm, torchrun per node or srun with one task per device), turns a
stage config into a DeepSpeed config (ZeRO settings from `configs/deepspeed/*.json`; batch sizes,
precision, optimizer and clipping injected from the stage config), wraps the model, and saves, loads
and consolidates checkpoints. Stages call these functions and never `deepspeed.*` themselves.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# DeepSpeed picks its accelerator at import time; say "cpu" up front where there is no GPU so it
# neither guesses nor warns. A user's explicit DS_ACCELERATOR wins.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines drown the training status
# DeepSpeed 0.19 still calls collectives that torch 2.13 deprecates: a warning for DeepSpeed, not for users
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class EngineError(Exception):
    """A setting that cannot work (batch arithmetic, precision on this device); the message says which key."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed host list as host names: `node[01-03,07],gpu[1-2]-ib` -> node01 node02 node03
    node07 gpu1-ib gpu2-ib (zero padding kept; several bracket groups in one name multiply out)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):  # split at the commas outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise EngineError(f"cannot read the Slurm host list {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise EngineError(f"cannot read the Slurm host list {nodelist!r}: unbalanced brackets")
    hosts: list[str] = []
    for item in [*items, nodelist[start:]]:
        if not item.strip():
            continue
        parts = re.split(r"\[([^\]]*)\]", item.strip())  # text, ranges, text, ranges, ..., text
        choices = [[part] if i % 2 == 0 else _expand_ranges(part, nodelist) for i, part in enumerate(parts)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    if not hosts:
        raise EngineError(f"cannot read the Slurm host list {nodelist!r}: it names no host")
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise EngineError(f"cannot read the Slurm host list {nodelist!r}: bad range [{ranges}]")
        out += [str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1)]
    return out


def _tasks_on_node(spec: str, node: int) -> int | None:
    """Entry `node` of Slurm's tasks-per-node list (`2(x3),1` = 2, 2, 2, 1); None if it has none."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node] if 0 <= node < len(counts) else None


# MPI launchers: (variable holding the world size, the launcher's name). Their rank variables could be
# mapped, but not a master address every rank agrees on: DeepSpeed finds it with mpi4py, which we don't use.
MPI_WORLD_VARS = (("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"), ("PMI_SIZE", "an MPICH/Intel MPI mpirun"),
                  ("PMIX_SIZE", "a PMIx launcher"), ("MV2_COMM_WORLD_SIZE", "MVAPICH's mpirun"))
SLURM_PORT_BASE = 15000  # derived MASTER_PORTs are 15000-30999: below Linux's ephemeral range (32768+)


def launcher_env(env: Mapping[str, str], hostnames: Callable[[str], list[str]] = expand_hostlist) -> dict[str, str]:
    """The torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) to set for this process, read from the launcher's own environment `env`; {} when there
    is nothing to map. A pure function of `env` (tests pass the variables Slurm would set).

    - RANK already set (torchrun, `deepspeed --module`, or by hand; also torchrun inside a one-task-per-node
      srun step): the launcher's values win, nothing is mapped.
    - A task of an `srun` step of N > 1 tasks (`srun --ntasks-per-node=8 python -m pretrain`): srun sets
      SLURM_STEP_NUM_TASKS for every step it starts, and neither sbatch's batch shell nor salloc's shell
      has it. Those shells do have SLURM_NTASKS (the allocation's, e.g. 16) and, in the batch shell,
      SLURM_PROCID=0: a `python -m pretrain` typed there is one process and stays a group of one.
      RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID, LOCAL_WORLD_SIZE
      = this node's entry of SLURM_STEP_TASKS_PER_NODE, MASTER_ADDR = the first host of
      SLURM_STEP_NODELIST (task 0 runs there under every srun distribution but `arbitrary`), and
      MASTER_PORT = 15000 + 16 x (SLURM_JOB_ID mod 1000) + (SLURM_STEP_ID mod 16): the same number in
      every task of the step, different for concurrent steps of one job and for jobs whose ids differ
      mod 1000. A MASTER_ADDR or MASTER_PORT already set wins (`export MASTER_PORT=...` if that port is
      taken on the first node).
    - An MPI launch of N > 1 processes without RANK (mpirun without torchrun): EngineError, saying what to do.
    """
    if "RANK" in env:
        return {}
    step_tasks = env.get("SLURM_STEP_NUM_TASKS")
    if step_tasks is not None and step_tasks.isdigit() and int(step_tasks) > 1:
        world = int(step_tasks)
        needed = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID")
        missing = [k for k in needed if not env.get(k)]
        if missing:
            raise EngineError(f"this looks like a task of an srun step of {world} tasks (SLURM_STEP_NUM_TASKS) but "
                              f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, so its rank "
                              "cannot be known; launch with torchrun (one srun task per node), or set RANK, "
                              "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself")
        rank, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"])
        node = int(env.get("SLURM_NODEID", 0))
        local_world = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), node) \
            or int(env.get("SLURM_NTASKS_PER_NODE") or world)
        if not (0 <= rank < world and 0 <= local_rank < local_world):
            raise EngineError(f"inconsistent Slurm variables: SLURM_PROCID={rank} SLURM_LOCALID={local_rank} in a "
                              f"step of {world} tasks with {local_world} on this node; launch with torchrun, or "
                              "set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself")
        port = SLURM_PORT_BASE + 16 * (int(env["SLURM_JOB_ID"]) % 1000) \
            + int(env.get("SLURM_STEP_ID", "0") or 0) % 16
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": str(local_world),
                "MASTER_ADDR": env.get("MASTER_ADDR") or hostnames(env["SLURM_STEP_NODELIST"])[0],
                "MASTER_PORT": env.get("MASTER_PORT") or str(port)}
    for var, launcher in MPI_WORLD_VARS:
        size = env.get(var, "")
        if size.isdigit() and int(size) > 1:
            raise EngineError(
                f"{var}={size}: this process is one of {size} started by {launcher}, but RANK is not set, and "
                "lmforge does not read ranks and the master address from MPI. Launch one torchrun per node "
                "(e.g. `mpirun -npernode 1 torchrun --nnodes=N --nproc_per_node=G --rdzv-backend=c10d "
                "--rdzv-endpoint=HOST:PORT -m pretrain ...`), use srun (its SLURM_* variables are mapped), "
                "or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process")
    return {}


def _slurm_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` where Slurm is installed (it knows every form of its own syntax; it only
    parses, no controller is asked), else our parser."""
    if shutil.which("scontrol"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
    return expand_hostlist(nodelist)


def adopt_launcher_env() -> dict[str, str]:
    """Set the torch.distributed variables a launcher other than torchrun implies (see `launcher_env`);
    returns what was set. Raises EngineError for a launch that cannot be mapped."""
    mapped = launcher_env(os.environ, _slurm_hostnames)
    os.environ.update(mapped)
    return mapped


def launch_world() -> int:
    """How many ranks this launch has, before the process group exists (for the batch arithmetic): an
    srun step's variables are mapped first (see `launcher_env`); EngineError for a launch that cannot be."""
    adopt_launcher_env()
    return int(os.environ.get("WORLD_SIZE", 1))


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of the rank with this local rank when `visible` devices are visible to it: its local
    rank, or 0 where the launcher gave each task its own GPU (srun --gpus-per-task=1 or --gpu-bind)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise EngineError(f"local rank {local_rank} but only {visible} GPUs are visible to this process "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                          f"{visible} ranks per node, or give each task one GPU (srun --gpus-per-task=1)")
    return local_rank


def _clone_world_group_with(timeout: datetime.timedelta) -> None:
    """DeepSpeed runs ZeRO's gradient reductions and parameter all-gathers on a copy of the world group,
    made lazily by `dist.new_group()` with torch's default timeout (30 min gloo, 10 min NCCL) whatever
    `init_distributed(timeout=...)` said (deepspeed/utils/groups.py `_clone_world_group`). Make that copy
    now, with our timeout, so that every collective of a run waits the same time."""
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", None) is None:
        groups._WORLD_GROUP = dist.new_group(ranks=range(dist.get_world_size()), timeout=timeout)


def setup_distributed(timeout_s: float = 1800) -> Dist:
    """Join (or, for a plain `python -m stage`, create) the process group; one device per rank.

    Launchers: torchrun, `deepspeed --module`, a plain `python -m` (a group of one) and srun tasks
    without torchrun (see `launcher_env`); an mpirun without torchrun is refused (EngineError).
    `timeout_s` (seconds) is how long any collective waits for the slowest rank before the run fails:
    the world group and DeepSpeed's data-parallel group, on gloo and NCCL alike."""
    adopt_launcher_env()
    if "RANK" not in os.environ:  # not under a launcher: a group of one, same code path
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        index = cuda_index(local_rank, torch.cuda.device_count())
        os.environ["LOCAL_RANK"] = str(index)  # DeepSpeed picks its device from LOCAL_RANK
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    _clone_world_group_with(timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    return all_reduce_max_list([value], device)[0]


def all_reduce_max_list(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank. A collective."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# Configuration


def resolve_batch(micro: int, accum: int | None, global_batch: int | None, world: int) -> tuple[int, int, int]:
    """(micro, accum, global) with global = micro x accum x world, or an error naming the keys."""
    if global_batch is not None:
        if global_batch % (micro * world):
            raise EngineError(
                f"batch.global_batch_size {global_batch} is not a multiple of batch.micro_batch_size {micro} x "
                f"{world} ranks = {micro * world}; pick a global batch that is, or change the micro batch")
        derived = global_batch // (micro * world)
        if accum is not None and accum != derived:
            raise EngineError(
                f"batch.global_batch_size {global_batch} != batch.micro_batch_size {micro} x batch.grad_accum "
                f"{accum} x {world} ranks = {micro * accum * world}; set one of grad_accum or global_batch_size")
        return micro, derived, global_batch
    accum = accum or 1
    return micro, accum, micro * accum * world


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    # native bf16 only: torch.cuda.is_bf16_supported() also says yes where it is emulated (V100, T4), slowly
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return torch.bfloat16 if native else torch.float32
    if precision == "bf16" and device.type == "cuda" and not native:
        raise EngineError(f"engine.precision: bf16 is not native on {torch.cuda.get_device_name(device)} "
                          "(it needs compute capability 8.0+); use engine.precision=fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def read_zero_json(path: Path) -> dict:
    from lmforge.config.pretrain import located

    return json.loads(located(path).read_text())


def ds_config(zero_json: dict, micro: int, accum: int, global_batch: int, dtype: torch.dtype, optim,
              device: torch.device) -> dict:
    """The full DeepSpeed config: the ZeRO file plus what the stage config owns."""
    config = json.loads(json.dumps(zero_json))  # a deep copy
    zero = config.setdefault("zero_optimization", {"stage": 0})
    on_cpu = device.type == "cpu"
    offloads = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    config.update({
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            # torch's fused AdamW (a CPU and a CUDA kernel, in place): DeepSpeed's FusedAdam would be
            # JIT-built with nvcc at start-up, which a pip-installed GPU box may not have. With optimizer
            # offload on a GPU, DeepSpeed's own CPU Adam (multi-threaded) is the one to use.
            **({"torch_adam": True, "fused": True} if on_cpu or not offloads else {})}},
        "steps_per_print": 2**31 - 1,  # the stage prints its own status line
        "wall_clock_breakdown": False,
    })
    if on_cpu:
        config["zero_force_ds_cpu_optimizer"] = False  # offload with torch's AdamW: no JIT-built CPU Adam
    if dtype == torch.bfloat16:
        bf16_reductions_in_fp32(config)
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return config


def bf16_reductions_in_fp32(config: dict) -> None:
    """With bf16 on and nothing said, DeepSpeed 0.19 sums gradients across micro-batches and across ranks
    in bf16 (8 bits of mantissa: with 8 micro-batches or 64 ranks, the smaller terms lose their last
    bits). Ask for fp32 where DeepSpeed can do it; a value the ZeRO JSON sets itself wins.

    What DeepSpeed 0.19.8 does with bf16, torch's AdamW and these defaults (runtime/engine.py
    `_do_optimizer_sanity_check`, `_configure_*_optimizer`):
    - ZeRO-0: FP16_UnfusedOptimizer in bf16 mode. Gradients accumulate in bf16 `param.grad`: a bf16
      model with `grad_accum_dtype: fp32` is refused ("unsupported mix of model_dtype and
      grad_accum_dtype", NotImplementedError), so only the all-reduce is fp32 (`communication_data_type`;
      the sum is cast back into the bf16 gradient).
    - ZeRO-1: `grad_accum_dtype: fp32` selects BF16_Optimizer (fp32 gradient buffers, fp32 master
      weights, optimizer states partitioned) instead of DeepSpeedZeroOptimizer; it all-reduces those fp32
      buffers in `communication_data_type` (bf16 unless set). With optimizer offload ZeRO-1 stays on
      DeepSpeedZeroOptimizer, which accumulates into an fp32 `param.grad_accum`.
    - ZeRO-2: DeepSpeedZeroOptimizer reduce-scatters in `communication_data_type` and accumulates this
      rank's partition in an fp32 buffer.
    - ZeRO-3: DeepSpeedZeroOptimizer_Stage3 reduce-scatters in `communication_data_type` into an fp32
      gradient partition buffer (`grad_partitions_flat_buffer`).
    ZeRO 1-3 still skip a step whose global gradient norm is not finite (BF16_Optimizer by its own norm
    check, the ZeRO optimizers by `bf16.check_grad_overflow`); at ZeRO-0 the stage skips it (`update_skipped`).
    Checkpoints follow the optimizer: BF16_Optimizer writes `bf16_zero_pp_rank_*_optim_states.pt`.
    """
    config.setdefault("communication_data_type", "fp32")
    if zero_stage(config) > 0:
        data_types = config.setdefault("data_types", {})
        if isinstance(data_types, dict):  # anything else: DeepSpeed's own validation names it
            data_types.setdefault("grad_accum_dtype", "fp32")


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


# --------------------------------------------------------------------------------------------------
# The engine


def initialize(model: torch.nn.Module, config: dict, weight_decay: float):
    """Wrap `model`; weight decay applies to matrices only (not norms, biases or embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    skip_muon_import()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine


def frozen_config(config: dict) -> dict:
    """The DeepSpeed config of a frozen model (a distillation teacher) beside a student trained with `config`:
    ZeRO-3 partitioning of its parameters, no optimizer, in the student's precision and batch arithmetic.
    Build the teacher inside `model_context(frozen_config(...))`, then `freeze` it."""
    out = {k: v for k, v in json.loads(json.dumps(config)).items()
           if k not in ("optimizer", "scheduler", "zero_force_ds_cpu_optimizer", "checkpoint")}
    out["zero_optimization"] = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    return out


def freeze(model: torch.nn.Module, config: dict | None, device: torch.device):
    """A teacher: no gradients, eval mode. With `config` (from `frozen_config`; the model was built partitioned
    inside `model_context(config)`) its own DeepSpeed engine with no optimizer keeps the parameters partitioned
    over the ranks, whatever the student's ZeRO stage, and gathers each layer for its forward: that forward is
    a collective (every rank runs the same number). Without, the whole model goes to `device` (in the dtype it
    was built in). Returns what to call for the teacher's forward."""
    model.requires_grad_(False)
    model.eval()
    if config is None:
        return model.to(device)
    skip_muon_import()
    teacher, _, _, _ = deepspeed.initialize(model=model, config=config)
    teacher.eval()
    return teacher


MUON = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def skip_muon_import() -> None:
    """Keep DeepSpeed from importing its Muon optimizer, which lmforge never uses.

    DeepSpeed imports `MuonWithAuxAdam` at every engine start (the ZeRO optimizer check, the ZeRO and BF16
    optimizers' constructors) and `muon_update` in ZeRO-1/2's gradient partitioning on every step, only to ask
    `isinstance(optimizer, MuonWithAuxAdam)` or to skip `muon_update` for parameters that are not Muon's.
    Those modules apply `torch.compile` when imported, which imports Inductor: 2-3 s of every rank's start-up
    (on 2 CPU cores, a quarter of a small launch). lmforge always hands DeepSpeed the AdamW it injects (a ZeRO
    JSON with an optimizer section is refused), so the answer is always no. Stand-in modules give it at no
    cost: each name they are asked for is a class nothing is an instance of, and calling it raises. Where
    DeepSpeed's modules are already imported, they stay."""
    import functools
    import sys
    import types

    @functools.cache  # one class per name: DeepSpeed appends MuonWithAuxAdam to a list once, not per engine
    def absent(name: str) -> type:
        def refuse(*args, **kwargs):
            raise RuntimeError(f"DeepSpeed's Muon optimizer ({name}) is not loaded in lmforge, which trains with AdamW")

        return type(name, (), {"__new__": refuse, "__doc__": "lmforge.engine.skip_muon_import's stand-in"})

    def attribute(name: str) -> type:  # PEP 562: `from module import anything` gets a stand-in class
        if name.startswith("_"):  # __file__, __path__, ...: what a module without them answers
            raise AttributeError(name)
        return absent(name)

    for module in MUON:
        if module not in sys.modules:
            stand_in = types.ModuleType(module, "lmforge's stand-in (lmforge.engine.skip_muon_import): no Muon")
            stand_in.__getattr__ = attribute
            sys.modules[module] = stand_in


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine) -> float | None:
    """The global gradient norm of the last step, before clipping (ZeRO 1-3 report it; stage 0 does not)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def params_grad_norm(model: torch.nn.Module) -> float:
    """The global gradient norm from the gradients themselves (stage 0, where every rank holds all of them)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


@contextlib.contextmanager
def update_skipped(engine, skip: bool):
    """Stage 0: run `engine.step()` with the optimizer's own step made a no-op, so DeepSpeed's counters
    advance while weights and Adam moments stay as they were. ZeRO 1-3 skip a step whose global
    gradient norm is not finite by themselves."""
    if not skip:
        yield
        return
    optimizer = engine.optimizer
    original = optimizer.step
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        optimizer.step = original


def weights_finite(engine) -> bool:
    """Whether every weight on every rank is finite (ZeRO-3: each rank checks its own partition)."""
    local = all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters())
    flag = torch.tensor([0.0 if local else 1.0], dtype=torch.float64, device=engine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def partitions_weights(engine) -> bool:
    """ZeRO-3: every forward (generation included) is a collective that all ranks must join."""
    return zero_stage(engine.config) == 3


# --------------------------------------------------------------------------------------------------
# Checkpoints and weights


def save_checkpoint(engine, folder: Path, tag: str, die_mid_write: bool = False) -> list[Path]:
    """Every rank writes its shards of model and optimizer state into `folder/tag/` (a collective);
    returns the files this rank wrote, so that it (and only it) can fsync them.
    `die_mid_write` (fault-injection tests) SIGKILLs this rank right after its first file is written."""
    written: list[Path] = []
    write = engine.checkpoint_engine.save

    def recorded(state_dict, path, *args, **kwargs):
        result = write(state_dict, path, *args, **kwargs)
        written.append(Path(path))
        if die_mid_write:
            os.kill(os.getpid(), 9)
        return result

    engine.checkpoint_engine.save = recorded
    try:
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine.save = write
    return written


def load_checkpoint(engine, folder: Path, tag: str) -> None:
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise EngineError(f"{folder / tag}: DeepSpeed could not load this checkpoint")


UNIVERSAL = "universal"  # the converted copy sits inside the checkpoint folder it came from


def convert_to_universal(folder: Path) -> str:
    """Convert the ZeRO checkpoint in `folder` (RUN/checkpoints/step-N) to DeepSpeed's universal format,
    in one process, atomically, into `folder/universal/`; returns the tag to load (`step-N/universal`).
    A converted copy that already exists is reused."""
    import argparse
    import shutil

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = folder / UNIVERSAL
    if not (out / "zero" / "optimizer_state.pt").exists():
        tmp = folder / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(argparse.Namespace(
            input_folder=str(folder), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True,
            inject_missing_state=True))  # the universal_checkpoint_info Megatron would add; we have none
        (folder / "latest_universal").unlink(missing_ok=True)  # the converter's pointer: we name tags
        os.replace(tmp, out)
    return f"{folder.name}/{UNIVERSAL}"


def enable_universal_load(config: dict) -> None:
    """Set before `initialize` when (and only when) the world size changed since the checkpoint."""
    config["checkpoint"] = {"load_universal": True}


def fix_zero3_universal_load(engine, folder: Path) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal loader gives every param group group 0's settings (weight decay
    on norms) and one shared `step` tensor that Adam then advances once per group: put both right."""
    if zero_stage(engine.config) != 3:
        return
    # weights_only=False: a pickle DeepSpeed's converter wrote for this run, inside this run's own checkpoint
    # folder (never a foreign file)
    written = folder / UNIVERSAL / "zero" / "optimizer_state.pt"
    saved = torch.load(written, map_location="cpu", weights_only=False)  # only a file this run wrote itself
    optimizer = engine.optimizer.optimizer
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    for group, saved_group in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def full_state_dict(engine) -> dict | None:
    """The whole model's weights on rank 0 (None elsewhere). A collective under ZeRO-3: call on every rank."""
    if zero_stage(engine.config) == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # gathers one layer at a time into rank 0
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def state_dict_from_checkpoint(folder: Path, tag: str) -> dict:
    """Full fp32 weights from a saved checkpoint, in one process with no process group (for export).

    ZeRO 1-3 keep fp32 master weights in the optimizer shards; stage 0 keeps the model's own weights.
    These files are pickles: call this only on checkpoints this run wrote (lmforge checks the path).
    """
    tag_dir = Path(folder) / tag
    # ZeRO-1 in bf16 runs DeepSpeed's BF16_Optimizer, whose shards (bf16_zero_pp_rank_*) zero_to_fp32 does not
    # read: export its model states, the bf16 weights the stage's own export writes too
    if list(tag_dir.glob("*optim_states.pt")) and not list(tag_dir.glob("bf16_zero_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag))
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise EngineError(f"{tag_dir}: no model states (mp_rank_00_model_states.pt) in this checkpoint")
    # weights_only=False: DeepSpeed's model states hold non-tensor objects; this run wrote the file itself
    # (see the docstring: only checkpoints inside the run's own folder are read)
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]  # only a file this run wrote itself
    return dict(module)


# --------------------------------------------------------------------------------------------------
# Memory at scale: the loss without fp32 [tokens, vocab] tensors, and ZeRO-3 models built partitioned


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                       reduction: str = "mean", block_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), targets)` over [rows, vocab] logits in their own dtype, from
    DeepSpeed's `runtime/chunked_cross_entropy.py`: forward keeps the logits and one fp32 log-sum-exp per
    row; backward writes the gradient straight into a tensor of the logits' dtype. A Triton kernel on CUDA
    (`block_rows` unused), else torch, `block_rows` rows at a time (its fp32 temporaries are that big)."""
    from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy

    return chunked_cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction,
                                 block_rows=block_rows)


class _Zero3Switch:
    """What transformers reads of accelerate's `HfDeepSpeedConfig` (`transformers.integrations.deepspeed`:
    `is_deepspeed_zero3_enabled`, `deepspeed_config`), without needing accelerate installed."""

    def __init__(self, config: dict):
        self.config = config

    def is_zero3(self) -> bool:
        return True


@contextlib.contextmanager
def model_context(config: dict):
    """Build the model inside this (with `lmforge.models.build` / `build_model`): under ZeRO-3 it is built
    partitioned over the ranks, so that no rank ever holds the full model (a 7B model is 28 GB of fp32 per
    rank otherwise); any other stage: nothing changes. `config` is the final DeepSpeed config, the one given
    to `initialize` afterwards (its precision is the weights' dtype); the process group must exist.

    A fresh model gets the same weights as one built without ZeRO under the same `torch.manual_seed`
    (`lmforge.models`); `init_from` loads through transformers' own ZeRO-3 path (rank 0 reads the folder
    and scatters one module at a time). Both read transformers' ZeRO-3 switch, which is on inside only."""
    if zero_stage(config) != 3:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    if hf_deepspeed.deepspeed_config() is not None:
        raise EngineError("a DeepSpeed config is already registered with transformers (an HfDeepSpeedConfig or "
                          "TrainingArguments(deepspeed=...) alive in this process); build lmforge's model outside it")
    switch = _Zero3Switch(config)  # transformers keeps a weak reference: this frame holds the object
    hf_deepspeed.set_hf_deepspeed_config(switch)
    try:
        yield
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


@contextlib.contextmanager
def partitioned_construction(config: dict):
    """Modules constructed inside are partitioned over the ranks as each one's `__init__` returns
    (`deepspeed.zero.Init`), in the config's precision, on this rank's device: a rank holds its partition
    plus, briefly, the module being built."""
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    # RoPE buffers ask torch.arange for int64 on purpose; zero.Init would cast them (must be entered first)
    with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=config):
        yield


def is_partitioned(param: torch.Tensor) -> bool:
    """A parameter ZeRO-3 has partitioned (its full shape is `param.ds_shape`)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def materialized(params):
    """The full tensors of the partitioned `params` inside, made by every rank alike with no communication:
    each rank allocates them (NaN-filled) and on exit keeps its own partition of what was written
    (DeepSpeed's own `param.partition`); a tensor left all NaN was not written and keeps its partition. Only
    for code that writes the same values on every rank: initialisation drawing from generators in step.
    Against `gathered`, no all-gather, no broadcast, and no gather buffer beside the full tensor."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [p for p in params if is_partitioned(p)]
    for p in params:
        p.data = torch.full(p.ds_shape, float("nan"), dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
        p.ds_status = ZeroParamStatus.AVAILABLE
    try:
        yield
    finally:
        partial = []
        for p in params:
            unwritten = torch.isnan(p.data)
            written = not bool(unwritten.all())
            if written and bool(unwritten.any()):
                partial.append(tuple(p.ds_shape))
            p.partition(has_been_updated=written)
        if partial:
            raise EngineError(f"initialisation wrote only part of parameters of shapes {partial} (or wrote NaN)")
