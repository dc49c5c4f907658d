"""Schema of a pipeline (`lmforge run|submit|status PIPELINE.yaml`): the stages of a model's life in order, each
with its stage config, overrides that name upstream outputs (`${pretrain.final}`), and its Slurm resources."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import StrictModel

# `${stage.key}`: a value of an earlier stage's resolved config (`${tokenize.out_dir}`, `${pretrain.run_dir}`) or
# one of the outputs every stage names: `dir` (the folder it makes) and `final` (its Hugging Face model folder).
REFERENCE = re.compile(r"\$\{([a-z0-9][a-z0-9_-]*)\.([A-Za-z0-9_.]+)\}")
CONFIG_KINDS = ("tokenize", "pretrain", "finetune", "distill")
TRAINING_KINDS = ("pretrain", "finetune", "distill")


class Resources(StrictModel):
    """What a stage's Slurm job asks for (`lmforge submit`); `lmforge run` uses only `procs_per_node`."""

    nodes: int | None = Field(None, ge=1)
    """Nodes (sbatch --nodes); default 1."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs per node (sbatch --gpus-per-node); default 0 (a CPU job)."""
    procs_per_node: int | None = Field(None, ge=1)
    """Training processes per node (torchrun --nproc_per_node); default gpus_per_node, or 1 without GPUs."""
    cpus_per_task: int | None = Field(None, ge=1)
    """CPU cores for each node's task (sbatch --cpus-per-task)."""
    mem: str | None = None
    """Memory per node, e.g. 200G (sbatch --mem); 0 asks for all of it."""
    time: str | None = None
    """Time limit, e.g. 2-00:00:00 or 90 (minutes) (sbatch --time); the job saves and requeues before it."""
    partition: str | None = None
    """Slurm partition (sbatch --partition)."""
    account: str | None = None
    """Slurm account (sbatch --account)."""
    qos: str | None = None
    """Slurm QOS (sbatch --qos)."""
    signal_lead: int | None = Field(None, ge=10)
    """Seconds before the time limit that the job is told to save (sbatch --signal=B:USR1@LEAD); default: three
    times the stage's measured checkpoint save plus 120, at least 300 (Slurm sends it up to 60 s early)."""
    launch: Literal["torchrun", "srun"] | None = None
    """torchrun: one task per node running torchrun (c10d rendezvous on the first node); srun: one task per
    process, ranks from Slurm's variables. Default torchrun."""
    array: int | None = Field(None, ge=1)
    """tokenize: encode the corpus in this many array tasks (task i takes every N-th chunk), then one job writes
    meta.json; default: one job."""
    sbatch: list[str] = Field(default_factory=list)
    """Extra sbatch options, e.g. ["--constraint=a100", "--exclusive"]."""


class StageSpec(StrictModel):
    """One stage of the pipeline."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    """The stage's name: in references (`${NAME.final}`), job names, logs and `lmforge status`."""
    stage: Literal["tokenize", "pretrain", "finetune", "distill", "export", "push"]
    """What runs: a stage with a config (tokenize, pretrain, finetune, distill), `lmforge export` or `lmforge push`."""
    config: Path | None = None
    """The stage's YAML config (tokenize, pretrain, finetune, distill), relative to the pipeline file."""
    overrides: list[str] = Field(default_factory=list)
    """key=value overrides of the stage config; values may name upstream outputs: init_from=${pretrain.final}."""
    source: str | None = None
    """export: the training run folder to export (e.g. ${distill.run_dir}); push: the Hugging Face folder to upload."""
    out: str | None = None
    """export: the folder to write."""
    repo_id: str | None = None
    """push: the Hub repo, ORG/NAME."""
    revision: str | None = None
    """push: the branch to upload to (created when missing); default main."""
    private: bool = False
    """push: create the repo private."""
    after: list[str] = Field(default_factory=list)
    """Stages this one waits for besides those it references."""
    resources: Resources = Field(default_factory=Resources)
    """This stage's Slurm resources; unset keys come from the pipeline's `resources`."""

    @model_validator(mode="after")
    def _fields_fit(self) -> StageSpec:
        needs = {"export": ("source", "out"), "push": ("source", "repo_id")}
        if self.stage in CONFIG_KINDS:
            if self.config is None:
                raise ValueError(f"stage {self.name}: `stage: {self.stage}` needs `config`")
            given = [k for k in ("source", "out", "repo_id", "revision") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"stage {self.name}: {', '.join(given)} belong to export and push stages")
        else:
            missing = [k for k in needs[self.stage] if getattr(self, k) is None]
            if missing:
                raise ValueError(f"stage {self.name}: `stage: {self.stage}` needs {', '.join(missing)}")
            if self.config is not None or self.overrides:
                raise ValueError(f"stage {self.name}: `stage: {self.stage}` takes no config or overrides")
        return self

    def references(self) -> list[str]:
        """The stages this one names in `${...}`, in order of appearance."""
        texts = [*self.overrides, self.source or "", self.out or ""]
        return [m.group(1) for text in texts for m in REFERENCE.finditer(text)]


class PipelineConfig(StrictModel):
    """`lmforge run|submit|status`: stages run in order, each skipped when its output is complete for its config."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The pipeline's name: the W&B group of its stages and the prefix of its Slurm job names."""
    work_dir: Path
    """Where the pipeline keeps its logs (logs/), its job record (pipeline.json) and the sbatch lines it ran."""
    resources: Resources = Field(default_factory=Resources)
    """Slurm resources every stage gets unless it sets its own."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines each Slurm job runs first, e.g. ["module load cuda/12.4", "source .venv/bin/activate"]."""
    stages: list[StageSpec] = Field(min_length=1)
    """The stages, in the order `lmforge run` runs them."""

    @model_validator(mode="after")
    def _graph(self) -> PipelineConfig:
        seen: set[str] = set()
        for spec in self.stages:
            if spec.name in seen:
                raise ValueError(f"two stages are named {spec.name}")
            for ref in [*spec.references(), *spec.after]:
                if ref == spec.name:
                    raise ValueError(f"stage {spec.name} names itself")
                if ref not in seen:
                    where = "comes later" if ref in {s.name for s in self.stages} else "is not a stage of this pipeline"
                    raise ValueError(f"stage {spec.name} names {ref}, which {where}: a stage may only use the "
                                     "outputs of stages before it")
            if spec.resources.array is not None and spec.stage != "tokenize":
                raise ValueError(f"stage {spec.name}: resources.array is for tokenize stages")
            seen.add(spec.name)
        return self
