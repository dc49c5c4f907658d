"""Schema of `python -m finetune`: the task, its data, the model folder it starts from, and the loop."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import StrictModel
from lmforge.config.pretrain import BatchConfig, EngineConfig, OptimConfig, TrainConfig
from lmforge.config.tracking import TrackingConfig

BUILTIN_TASKS = ("stdlib-docstring-package", "stdlib-docstring-name")


class TaskConfig(StrictModel):
    """What is learned: a label per text (classification) or a response per prompt (instruction SFT)."""

    type: Literal["classification", "sft"]
    """classification: text (or a text pair) -> label; sft: prompt/response pairs or chat messages, loss on responses."""
    max_length: int = Field(256, ge=8)
    """Tokens per example (SFT: prompt + response); longer ones are cut or refused by `truncation`."""
    truncation: Literal["right", "left", "error"] = "right"
    """An example past max_length: keep its start (right), its end (left), or stop with an error naming it (error)."""
    class_weights: bool = False
    """Classification: weight the loss by inverse class frequency in train (for imbalanced labels)."""
    exact_match_examples: int = Field(64, ge=0)
    """SFT: validation examples answered greedily and scored by exact match at each evaluation (0: none)."""
    max_new_tokens: int = Field(16, ge=1)
    """SFT: tokens generated per exact-match answer."""


class SplitSource(StrictModel):
    """One split's examples: a local file, or a Hugging Face dataset read from the local cache."""

    path: Path | None = None
    """A .jsonl, .csv or .parquet file (relative to the working directory)."""
    hf: str | None = None
    """A dataset name on the Hub (e.g. glue), loaded from the datasets cache (offline works once cached)."""
    config: str | None = None
    """The Hub dataset's configuration (e.g. sst2)."""
    split: str = "train"
    """The Hub dataset's split to read."""

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, value):
        return {"path": value} if isinstance(value, (str, Path)) else value

    @model_validator(mode="after")
    def _one(self) -> SplitSource:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path` (a local file) or `hf` (a Hub dataset name)")
        return self

    def describe(self) -> str:
        return str(self.path) if self.path else f"{self.hf}{'/' + self.config if self.config else ''}:{self.split}"


class FinetuneDataConfig(StrictModel):
    """Where the examples come from and which fields hold what."""

    builtin: Literal["stdlib-docstring-package", "stdlib-docstring-name"] | None = None
    """A built-in task made from this interpreter's standard library (no download); or give `train`."""
    top_packages: int = Field(16, ge=2)
    """stdlib-docstring-package: the most frequent packages kept as classes."""
    holdout: float = Field(0.1, gt=0, lt=1)
    """Built-in tasks: share of source files held out for validation + test (<= the pretraining split.val_fraction)."""
    train: SplitSource | None = None
    """Training examples."""
    validation: SplitSource | None = None
    """Validation examples; default: `val_fraction` of train, seeded."""
    test: SplitSource | None = None
    """Test examples, scored once at the end (optional)."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of train held out for validation when `validation` is not given."""
    text_field: str = "text"
    """Classification: the field holding the text."""
    text_pair_field: str | None = None
    """Classification: a second text per example (e.g. a hypothesis), or none."""
    label_field: str = "label"
    """Classification: the field holding the label (a string or an integer)."""
    prompt_field: str = "prompt"
    """SFT: the field holding the prompt."""
    response_field: str = "response"
    """SFT: the field holding the response."""
    messages_field: str | None = None
    """SFT: a field holding chat messages ([{role, content}, ...]) instead of prompt/response."""

    @model_validator(mode="after")
    def _source(self) -> FinetuneDataConfig:
        if (self.builtin is None) == (self.train is None):
            raise ValueError("give exactly one of `builtin` (a built-in task) or `train` (your own examples)")
        if self.builtin is not None and (self.validation is not None or self.test is not None):
            raise ValueError("a built-in task has its own validation and test splits; leave those out")
        return self


class LoraSettings(StrictModel):
    """LoRA adapters (peft) on a frozen base: far fewer trainable parameters and optimizer states."""

    r: int = Field(8, ge=1)
    """Rank of each adapter."""
    alpha: float = Field(16.0, gt=0)
    """Scale: the update is (alpha / r) x B A."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]); all-linear: every linear layer but the output layer."""


class FinetuneTrainConfig(TrainConfig):
    """The loop: length (steps or epochs), seed, and how often to log, evaluate and save."""

    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train for; or set `epochs`."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training examples (rounded up to whole steps); or set `max_steps`."""
    eval_every: int = Field(50, ge=1)
    """Steps between evaluations on the validation split (and one at the start and the end)."""
    save_every: int = Field(100, ge=1)
    """Steps between checkpoints (and one at the end)."""

    @model_validator(mode="after")
    def _length(self) -> FinetuneTrainConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps or train.epochs")
        return self


class FinetuneEvalConfig(StrictModel):
    """Evaluation and the export check."""

    parity_tolerance: float | None = Field(None, gt=0)
    """Largest |logit| difference allowed between final/ reloaded and the engine; default 1e-4 in fp32, 5e-2 in bf16."""


class FinetuneConfig(StrictModel):
    """`python -m finetune`: a Hugging Face causal LM folder + examples -> a fine-tuned model in RUN_DIR/final."""

    run_dir: Path
    """Output folder: config.yaml, metrics.jsonl, checkpoints/, final/, plots/."""
    init_from: Path
    """The Hugging Face causal LM folder to start from (a pretraining run's final/, or any local Llama/GPT-2-style model)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained: init_from's weights; random: its architecture and tokenizer with fresh weights (seeded by
    train.seed), the from-scratch baseline that shows what pretraining bought."""
    task: TaskConfig
    """The task."""
    data: FinetuneDataConfig
    """The examples."""
    batch: BatchConfig = Field(default_factory=lambda: BatchConfig(micro_batch_size=8))
    """Batch sizes, in examples."""
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=20,
                                                                   weight_decay=0.0))
    """Optimizer and learning-rate schedule."""
    lora: LoraSettings | None = None
    """LoRA instead of full fine-tuning; final/ holds the merged model, final/adapter/ the adapter alone."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """DeepSpeed ZeRO variant and numerics."""
    train: FinetuneTrainConfig = Field(default_factory=lambda: FinetuneTrainConfig(epochs=1))
    """Loop length and intervals."""
    eval: FinetuneEvalConfig = Field(default_factory=FinetuneEvalConfig)
    """Evaluation."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """W&B, metrics.jsonl and plots."""

    @model_validator(mode="after")
    def _task_fits(self) -> FinetuneConfig:
        if self.init == "random" and self.lora is not None:
            raise ValueError("lora trains adapters over pretrained weights; with init: random, train in full (no lora)")
        wants = {"stdlib-docstring-package": "classification", "stdlib-docstring-name": "sft"}
        if self.data.builtin is not None and wants[self.data.builtin] != self.task.type:
            raise ValueError(f"data.builtin {self.data.builtin} is a {wants[self.data.builtin]} task, but "
                             f"task.type is {self.task.type}")
        return self
