"""The engine: the only module that imports DeepSpeed.

It starts the process group (torchrun, `deepspeed --module` or a plain `python -m`; on Slurm, torchrun per node), turns a
stage config into a DeepSpeed config (ZeRO settings from `configs/deepspeed/*.json`; batch sizes,
precision, optimizer and clipping injected from the stage config), wraps the model, and saves, loads
and consolidates checkpoints. Stages call these functions and never `deepspeed.*` themselves.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import warnings
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


def setup_distributed(timeout_s: float = 1800) -> Dist:
    """Join (or, for a plain `python -m stage`, create) the process group; one device per rank."""
    if "RANK" not in os.environ:  # not under a launcher: a group of one, same code path
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
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
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


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
    return json.loads(Path(path).read_text())


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
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return config


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
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine


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


def save_checkpoint(engine, folder: Path, tag: str, die_mid_write: bool = False) -> None:
    """Every rank writes its shards of model and optimizer state into `folder/tag/` (a collective).
    `die_mid_write` (fault-injection tests) SIGKILLs this rank right after its first file is written."""
    if die_mid_write:
        write = engine.checkpoint_engine.save

        def write_then_die(*args, **kwargs):
            write(*args, **kwargs)
            os.kill(os.getpid(), 9)

        engine.checkpoint_engine.save = write_then_die
    engine.save_checkpoint(str(folder), tag=tag, save_latest=False)


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
    # a pickle DeepSpeed's converter wrote, inside this run's own checkpoint folder (never a foreign file)
    saved = torch.load(folder / UNIVERSAL / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
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
    if list(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag))
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise EngineError(f"{tag_dir}: no model states (mp_rank_00_model_states.pt) in this checkpoint")
    # DeepSpeed's model states hold non-tensor objects; this run wrote the file (see the docstring)
    return dict(torch.load(states, map_location="cpu", weights_only=False)["module"])
