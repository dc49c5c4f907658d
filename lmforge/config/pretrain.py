"""Schema of `python -m pretrain`: data, model, batch, optimizer and schedule, engine, loop, tracking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import StrictModel
from lmforge.config.model import ModelConfig
from lmforge.config.tracking import TrackingConfig

# What a DeepSpeed JSON under configs/deepspeed/ may not set: the stage config owns these and injects
# them, so one ZeRO file serves every model, batch and precision. Key -> where to set it instead.
INJECTED_DS_KEYS = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.grad_accum",
    "optimizer": "optim.*",
    "scheduler": "optim.schedule",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "engine.precision",
    "fp16": "engine.precision",
    "amp": "engine.precision",
}


class MixPart(StrictModel):
    """One token folder of a blend and its weight."""

    path: Path
    """Folder written by `lmforge tokenize`."""
    weight: float = Field(gt=0)
    """Its share of the training windows (weights are normalised to sum to 1)."""


class DataConfig(StrictModel):
    """Token shards written by `lmforge tokenize`."""

    path: Path
    """Folder written by `lmforge tokenize` (holds meta.json, tokenizer/, train/, val/)."""
    seq_len: int = Field(1024, ge=8)
    """Tokens per training sequence (packed windows across document boundaries)."""


class BlendDataConfig(StrictModel):
    """Token shards written by `lmforge tokenize`: one folder (`path`) or several blended by weight (`mix`)."""

    path: Path | None = None
    """Folder written by `lmforge tokenize` (holds meta.json, tokenizer/, train/, val/)."""
    mix: list[MixPart] | None = Field(None, min_length=1)
    """Several token folders (one tokenizer), read by weight: [{path: A, weight: 0.7}, {path: B, weight: 0.3}]."""
    seq_len: int = Field(1024, ge=8)
    """Tokens per training sequence (packed windows across document boundaries)."""

    @model_validator(mode="after")
    def _one_source(self) -> BlendDataConfig:
        if (self.path is None) == (self.mix is None):
            raise ValueError("set exactly one of `data.path` (one token folder) or `data.mix` (several, by weight)")
        return self

    def parts(self) -> list[tuple[Path, float]]:
        """(folder, weight) of every source: a single `path` has weight 1."""
        return [(self.path, 1.0)] if self.mix is None else [(p.path, p.weight) for p in self.mix]

    @property
    def first(self) -> Path:
        """The folder whose tokenizer the model uses (every folder of a blend has the same)."""
        return self.path if self.path is not None else self.mix[0].path


class BatchConfig(StrictModel):
    """Batch arithmetic: global_batch_size = micro_batch_size x grad_accum x world size (sequences)."""

    micro_batch_size: int = Field(8, ge=1)
    """Sequences per rank per forward/backward pass."""
    grad_accum: int | None = Field(None, ge=1)
    """Micro-batches accumulated per optimizer step; default: derived from global_batch_size, else 1."""
    global_batch_size: int | None = Field(None, ge=1)
    """Sequences per optimizer step over all ranks; fixing it keeps a run's math the same on any world size."""


class OptimConfig(StrictModel):
    """AdamW with linear warmup, then cosine decay or warmup-stable-decay (WSD)."""

    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(3e-5, ge=0)
    """Learning rate at the end of the decay."""
    warmup_steps: int = Field(100, ge=0)
    """Steps of linear warmup from 0 to lr."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine decay to min_lr at train.max_steps; `wsd` holds lr, then decays linearly; `constant` holds it."""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """For `wsd`: the share of train.max_steps spent in the final linear decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW beta1, beta2."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay on matrices (never on norms, biases or embeddings)."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 turns clipping off)."""

    @model_validator(mode="after")
    def _lrs(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


CHECKOUT = Path(__file__).resolve().parents[2]  # the lmforge tree this runs from: its configs/ hold the defaults


def located(path: Path) -> Path:
    """`path` itself if it is absolute or exists from the working directory, else the same relative path under
    lmforge's own tree: a shipped default (`configs/deepspeed/zero2.json`) works from any working directory."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (CHECKOUT / path).exists():
        return path
    return CHECKOUT / path


class EngineConfig(StrictModel):
    """DeepSpeed and numerics."""

    deepspeed: Path = Path("configs/deepspeed/zero2.json")
    """DeepSpeed JSON holding ZeRO settings only (batch, precision, optimizer and clipping are injected)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision; auto: bf16 on GPU, fp32 on CPU (bf16 matmuls are ~200x slower on most CPUs)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile the model (slow to start, faster steps; pays off most on GPU)."""
    universal_checkpoint: bool = True
    """Resume a ZeRO-1/2/3 checkpoint on another number of ranks by converting it to DeepSpeed's universal format."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s of one device for MFU; default: a table of GPUs, or a matmul measured at start-up on CPU."""
    collective_timeout: float = Field(1800, gt=0)
    """Seconds a rank waits in one collective before the job fails (a universal conversion on rank 0 runs inside one)."""

    @field_validator("deepspeed")
    @classmethod
    def _zero_only(cls, path: Path) -> Path:
        try:
            data = json.loads(located(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"DeepSpeed config not found: {path} (looked in the working directory and in {CHECKOUT})")\
                from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read DeepSpeed config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a DeepSpeed config must be a JSON object")
        clash = [f"'{k}' (set {INJECTED_DS_KEYS[k]} in the stage config)" for k in data if k in INJECTED_DS_KEYS]
        if clash:
            raise ValueError(f"{path} sets {', '.join(clash)}; a DeepSpeed JSON here holds ZeRO settings only")
        stage = data.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        return path


class TrainConfig(StrictModel):
    """The loop: length, seed, and how often to log, evaluate and save."""

    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to train for."""
    seed: int = 1234
    """Seed of the initialisation and of the data order."""
    log_every: int = Field(10, ge=1)
    """Steps between status lines and logged metrics."""
    eval_every: int = Field(200, ge=1)
    """Steps between evaluations on the validation windows (and one at the start and the end)."""
    save_every: int = Field(500, ge=1)
    """Steps between checkpoints (and one at the end)."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    keep_every: int | None = Field(None, ge=1)
    """Also keep, forever, the checkpoints at multiples of this many steps (the final one is always kept)."""
    max_bad_steps: int = Field(5, ge=1)
    """Abort after this many consecutive steps with a non-finite gradient norm (each one is skipped on all ranks)."""
    max_time: float | None = Field(None, gt=0)
    """Wall-clock budget in seconds from launch: at the first step past it, save a checkpoint and exit 0 (rerun to go on)."""
    lease_timeout: float = Field(120, gt=0)
    """Seconds without a heartbeat after which another launch may take over this run folder's lease (a dead run)."""


class EvalConfig(StrictModel):
    """Validation: loss and perplexity on a fixed set of windows, and a short generated sample."""

    windows: int = Field(64, ge=1)
    """Validation windows (of data.seq_len tokens) evaluated each time, spread evenly over the val split."""
    prompt: str = "def "
    """Text the model continues for the logged sample ('' turns the sample off)."""
    max_new_tokens: int = Field(48, ge=1)
    """Tokens generated for the sample."""
    parity_tolerance: float | None = Field(None, gt=0)
    """Largest |logit| difference allowed between final/ reloaded and the engine; default 1e-4 in fp32, 5e-2 in bf16."""


class PretrainConfig(StrictModel):
    """`python -m pretrain`: token shards -> a causal LM trained on DeepSpeed ZeRO -> RUN_DIR/final (HF folder)."""

    run_dir: Path
    """Output folder: config.yaml, metrics.jsonl, checkpoints/, final/, plots/."""
    data: BlendDataConfig
    """Tokenized data."""
    model: ModelConfig | None = None
    """Architecture and size (usually `include: ../model/NAME.yaml`); leave out with init_from (the folder says)."""
    init_from: Path | None = None
    """A Hugging Face causal LM folder to continue pretraining from; its config.json is the architecture."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Batch sizes."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """DeepSpeed ZeRO variant and numerics."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Loop length and intervals."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Validation."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """W&B, metrics.jsonl and plots."""

    @model_validator(mode="after")
    def _fits(self) -> PretrainConfig:
        if self.model is None and self.init_from is None:
            raise ValueError("set `model` (a size, e.g. include: ../model/tiny.yaml) or `init_from` (a HF folder)")
        if self.model is not None and self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len {self.data.seq_len} is longer than model.max_seq_len "
                             f"{self.model.max_seq_len}")
        return self
