"""The learning-rate schedule: linear warmup, then cosine decay, warmup-stable-decay, or constant."""

from __future__ import annotations

import math


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup_steps: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based: the update that takes the model from step to step + 1).

    warmup: lr x (step + 1) / warmup_steps for the first warmup_steps updates (never 0, so update 0 counts);
    cosine: min_lr + (lr - min_lr) x (1 + cos(pi x t)) / 2, t going 0 -> 1 from the end of warmup to max_steps;
    wsd:    lr until the last decay_fraction x max_steps updates, then linear down to min_lr;
    constant: lr.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return lr
        t = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
        return lr + (min_lr - lr) * t
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    span = max(1, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps + 1) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def schedule_change(saved_max_steps: int | None, max_steps: int, step: int, optim) -> str | None:
    """What resuming at `step` with a changed train.max_steps does to the learning rate, in words (None when
    nothing changes). The schedule is a function of (step, max_steps): cosine re-shapes around the new
    length, so the lr jumps; WSD holds lr until its decay and so extends cleanly if the decay has not begun."""
    if saved_max_steps is None or saved_max_steps == max_steps:
        return None
    args = (optim.lr, optim.min_lr, optim.warmup_steps, optim.schedule, optim.decay_fraction)
    before, after = lr_at(step, saved_max_steps, *args), lr_at(step, max_steps, *args)
    how = {"cosine": "cosine decay re-shapes to the new length", "constant": "a constant lr is unchanged",
           "wsd": "WSD holds lr and decays over the new last steps"}[optim.schedule]
    return (f"train.max_steps changed from {saved_max_steps} to {max_steps} at step {step}: the lr goes from "
            f"{before:.3e} (the old schedule) to {after:.3e} ({how})")
