"""Schema of the `tracking:` section every training stage shares: W&B (offline by default) and plots."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config.base import StrictModel


class TrackingConfig(StrictModel):
    """Experiment tracking on rank 0: metrics.jsonl always, W&B unless switched off, PNG plots at the end."""

    wandb: bool = True
    """Log to Weights & Biases (offline unless an API key is set or you are logged in; see `mode`)."""
    project: str = "lmforge"
    """W&B project."""
    entity: str | None = None
    """W&B user or team; default: your default entity."""
    group: str | None = None
    """W&B run group (e.g. one per pipeline, so its stages sit together)."""
    name: str | None = None
    """W&B run name; default: the run directory's name."""
    tags: list[str] = Field(default_factory=list)
    """W&B run tags."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """auto: WANDB_MODE if set, else online when WANDB_API_KEY or a stored `wandb login` exists, else offline."""
    plots: bool = True
    """Write loss / lr / throughput PNG plots into RUN_DIR/plots/ when the stage finishes."""
