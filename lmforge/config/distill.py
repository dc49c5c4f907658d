"""Schema of `python -m distill`: the teacher, the student, the KD loss, the data
(token shards for a language model, a task's examples for a classifier), the loop and the report; and of
`python -m distill.cache`, which writes a teacher's top-k logits over token shards once (offline distillation)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import StrictModel
from lmforge.config.finetune import FinetuneDataConfig, TaskConfig
from lmforge.config.model import ModelConfig
from lmforge.config.pretrain import BatchConfig, DataConfig, EngineConfig, OptimConfig, TrainConfig
from lmforge.config.tracking import TrackingConfig


class CacheConfig(StrictModel):
    """`python -m distill.cache`: a teacher's top-k logits at every input position of the train split's windows."""

    teacher: Path
    """The teacher: a Hugging Face causal LM folder (a pretraining run's final/, or any local HF model)."""
    data: DataConfig
    """Token shards (written with the teacher's tokenizer) and the student's seq_len: the windows it trains on."""
    out_dir: Path
    """The cache folder: meta.json (written last: complete), train/shard-NNNNN.idx and .val."""
    top_k: int = Field(64, ge=1)
    """Logits kept per position, the largest (64 at uint16 + fp16: 256 bytes per token)."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """How the kept logits are stored: fp16 (2 bytes), bf16 (2 bytes, stored as its uint16 bits) or fp32 (4)."""
    micro_batch_size: int = Field(8, ge=1)
    """Windows per teacher forward."""
    windows_per_shard: int = Field(1024, ge=1)
    """Windows per cache file pair (a rank writes whole shards; a rerun redoes only the missing ones)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The teacher's forward dtype: auto is bf16 on a GPU with native bf16, fp32 elsewhere."""
    temperature: float = Field(1.0, gt=0)
    """The distillation's kd.temperature: the teacher's log-normaliser is kept at it, so the mass beyond its top-k is
    known (a distillation at another temperature is refused)."""
    eval_windows: int = Field(64, ge=1)
    """Validation windows the teacher's perplexity is measured on: the distillation's eval.windows (they must agree)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""


class DistillDataConfig(DataConfig):
    """Token shards written by `lmforge tokenize` (with the teacher's tokenizer), optionally with a teacher cache."""

    cache: Path | None = None
    """A folder written by `python -m distill.cache` (the teacher's top-k logits): train without the teacher in memory."""


class FromTeacher(StrictModel):
    """A student as wide as the teacher with some of its layers: DistilBERT's initialisation."""

    layers: list[int] = Field(min_length=1)
    """Teacher layer indices copied into the student, in order (e.g. [0, 2] of 4: every other one); embeddings,
    final norm and head are copied too."""


class StudentConfig(StrictModel):
    """The model trained: give exactly one of `from_teacher`, `model` or `init_from`."""

    from_teacher: FromTeacher | None = None
    """Chosen teacher layers copied (same width)."""
    model: ModelConfig | None = None
    """A model size (usually `include: ../model/NAME.yaml`), freshly initialised; may be narrower than the teacher."""
    init_from: Path | None = None
    """A Hugging Face folder to start from (it must use the teacher's tokenizer)."""

    @model_validator(mode="after")
    def _one(self) -> StudentConfig:
        given = [k for k in ("from_teacher", "model", "init_from") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of from_teacher, model or init_from (got {given or 'none'})")
        return self


class HiddenLossConfig(StrictModel):
    """A loss between hidden states (DistilBERT's cosine term), on chosen layer pairs."""

    pairs: list[tuple[int, int]] = Field(min_length=1)
    """[student, teacher] hidden-state indices (0: the embeddings, i: layer i's output; the last is after the final
    norm, the others before it: pair last with last), e.g. [[2, 4]]."""
    loss: Literal["cosine", "mse"] = "cosine"
    """cosine: 1 - cos(student, teacher) per token; mse: mean squared difference."""
    weight: float = Field(1.0, gt=0)
    """Weight of this term, added to the KD + hard-label loss."""


class KDConfig(StrictModel):
    """loss = alpha x T^2 x divergence(teacher, student) + (1 - alpha) x cross entropy on the hard labels."""

    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the distillation term (0: the student alone, the no-KD baseline; 1: soft labels only)."""
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T of both distributions (the term is scaled by T^2 so its gradients keep their size)."""
    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    """forward: KL(teacher || student) (Hinton, DistilBERT); reverse: KL(student || teacher) (MiniLLM); jsd: JSD(beta) (GKD)."""
    beta: float = Field(0.5, gt=0, lt=1)
    """jsd: the mixture's weight on the teacher."""
    hidden: HiddenLossConfig | None = None
    """A hidden-state loss on layer pairs (language models; a learned projection when the widths differ)."""


class DistillTrainConfig(TrainConfig):
    """The loop: length, seed, and how often to log, evaluate and save."""

    max_steps: int = Field(500, ge=1)
    """Optimizer steps to train for."""
    eval_every: int = Field(100, ge=1)
    """Steps between evaluations (and one at the start and the end)."""


class DistillEvalConfig(StrictModel):
    """Evaluation and the export check."""

    windows: int = Field(64, ge=1)
    """Language models: validation windows (of data.seq_len tokens) scored each time."""
    parity_tolerance: float | None = Field(None, gt=0)
    """Largest |logit| difference allowed between final/ reloaded and the engine; default 1e-4 in fp32, 5e-2 in bf16."""


class ReportConfig(StrictModel):
    """RUN_DIR/report.md, report.json and plots/report.png: what distillation bought, measured."""

    baseline: bool = False
    """Also train the same student without distillation (kd.alpha = 0, same steps and data) into RUN_DIR/baseline."""
    speed_batch: int = Field(8, ge=1)
    """Sequences (or examples) per forward when timing inference."""
    speed_runs: int = Field(5, ge=1)
    """Timed forwards per model after warm-up; the report gives their median."""


class DistillConfig(StrictModel):
    """`python -m distill`: a teacher folder + data -> a smaller student in RUN_DIR/final, and a report."""

    run_dir: Path
    """Output folder: config.yaml, metrics.jsonl, checkpoints/, final/, plots/, report.md."""
    teacher: Path
    """The teacher: a Hugging Face folder (a pretraining or fine-tuning run's final/, or any local HF model)."""
    teacher_zero3: bool = False
    """Partition the teacher over the ranks with its own ZeRO-3 engine (no optimizer), whatever the student's stage:
    for a teacher too big for one device. Its forward is then a collective."""
    student: StudentConfig
    """The student."""
    kd: KDConfig = Field(default_factory=KDConfig)
    """The distillation loss."""
    data: DistillDataConfig | None = None
    """Language models: token shards (the teacher is a causal LM), and optionally its cached top-k logits."""
    task: TaskConfig | None = None
    """Classifiers: the task (type classification; the teacher is a fine-tuned classifier's folder)."""
    examples: FinetuneDataConfig | None = None
    """Classifiers: the task's examples (as in a fine-tuning config's `data`)."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Batch sizes (sequences or examples)."""
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20))
    """Optimizer and learning-rate schedule of the student."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """The student's DeepSpeed ZeRO variant and numerics (the teacher runs in the same precision)."""
    train: DistillTrainConfig = Field(default_factory=DistillTrainConfig)
    """Loop length and intervals."""
    eval: DistillEvalConfig = Field(default_factory=DistillEvalConfig)
    """Evaluation."""
    report: ReportConfig = Field(default_factory=ReportConfig)
    """The end-of-run report."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """W&B, metrics.jsonl and plots."""

    @model_validator(mode="after")
    def _mode(self) -> DistillConfig:
        if (self.data is None) == (self.examples is None):
            raise ValueError("give exactly one of `data` (token shards: language-model distillation) or `examples` "
                             "with `task` (a classification task: classifier distillation)")
        if self.examples is not None:
            if self.task is None or self.task.type != "classification":
                raise ValueError("classifier distillation needs `task` with type: classification")
            if self.examples.builtin == "stdlib-docstring-name":
                raise ValueError("examples.builtin stdlib-docstring-name is an SFT task; classifier distillation "
                                 "takes a classification task (stdlib-docstring-package)")
            if self.kd.hidden is not None:
                raise ValueError("kd.hidden is for language models; leave it out for a classifier")
        elif self.task is not None:
            raise ValueError("`task` goes with `examples` (classifier distillation); token shards need none")
        if self.data is not None and self.data.cache is not None:
            if self.kd.divergence != "forward":
                raise ValueError(f"data.cache: kd.divergence {self.kd.divergence} cannot use a cache: it holds the "
                                 "teacher's top-k logits only, and reverse KL and JSD need the whole distribution: "
                                 "use the live teacher (remove data.cache) or kd.divergence=forward")
            if self.kd.hidden is not None:
                raise ValueError("data.cache: kd.hidden needs the teacher's hidden states, which the cache does not "
                                 "hold; remove kd.hidden, or use the live teacher (remove data.cache)")
            if self.teacher_zero3:
                raise ValueError("data.cache: teacher_zero3 partitions a live teacher; with a cache no teacher is "
                                 "loaded: remove teacher_zero3")
        return self

